"""The command-line programs: ``python -m codellama COMMAND`` and the modules and scripts that start each one.

    python -m codellama                      # list the commands
    python -m codellama complete --help      # one command's flags, each with its default

The library never imports this package; every program builds on the library below it. What the programs
share is here: the flags (from :mod:`codellama.options`, the same names in Python and on the command line),
printing on rank 0 only under ``torchrun``, and one way to end: a bad input is one line on stderr naming
the flag and exit status 2, Ctrl-C is one line and status 130, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

from ..distributed import close_process_group
from ..options import OptionError

RULE = "=" * 34


def is_main_process() -> bool:
    """Rank 0 prints; the other ranks of a ``torchrun`` job stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def say(*lines: str) -> None:
    """Print on rank 0 only."""
    if is_main_process():
        for line in lines:
            print(line)


def error_line(error: BaseException) -> str:
    """One line saying what was wrong, naming the flag when an option was."""
    if isinstance(error, OptionError):
        text = error.for_command_line()
    elif getattr(error, "option", None):  # codellama.options.blame: the value of this option was the cause
        text = f"--{error.option}: {error}"
    else:
        text = str(error)
    return " ".join(text.split("\n")) or type(error).__name__


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a note is emitted: a program run in-process (a notebook, a
    test) may have swapped or closed the one there was when it started."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def show_progress() -> None:
    """Let the library's progress notes (``codellama.progress``: e.g. that a step is being compiled) reach
    stderr, on rank 0."""
    logger = logging.getLogger("codellama.progress")
    if is_main_process() and not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("codellama: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run(main: Callable[..., Optional[int]], argv: Optional[List[str]] = None) -> None:
    """Run a program's ``main`` (with ``argv`` when given, else as ``main()``: its arguments from ``sys.argv``)
    and exit: the library's input errors become one line and status 2, Ctrl-C one line and status 130."""
    show_progress()
    status = 0
    try:
        status = (main() if argv is None else main(argv)) or 0
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
    except TimeoutError as e:  # a stalled rank under torchrun: the message names the rank and the timeout
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.stdout.flush()
        os._exit(130)  # not through the interpreter's exit: threads still decoding must not hold it up
    if close_process_group():
        # Under torchrun, gloo's C++ teardown at interpreter exit sometimes aborts a rank that has finished
        # its work ("terminate called without an active exception"): leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


# Every program: its module and function (``main(argv, prog)``), imported only when it runs, and one line of help.
PROGRAMS: Dict[str, Tuple[str, str, str]] = {
    "complete": ("codellama.cli.generate", "complete", "code completion: continue prompts"),
    "infill": ("codellama.cli.generate", "infill", "fill the <FILL> gap of code"),
    "chat": ("codellama.cli.generate", "chat", "answer dialogs with an Instruct model"),
    "serve": ("codellama.cli.serve", "main", "an HTTP server: OpenAI, Ollama and llama.cpp protocols, "
                                             "fill-in-the-middle"),
    "convert": ("codellama.cli.convert", "main", "convert a checkpoint between Meta's and Hugging Face's layouts"),
    "evaluate": ("codellama.cli.evaluate", "main", "HumanEval / MBPP pass@k, generated code run in a sandbox"),
    "quantize": ("codellama.cli.quantize", "main", "write an int8 / int4 weight-only quantized checkpoint"),
}


def program(name: str) -> Callable[[List[str]], Optional[int]]:
    """The ``main`` of the program ``name``, as ``python -m codellama name`` runs it."""
    module, function, _ = PROGRAMS[name]
    main = getattr(importlib.import_module(module), function)
    return lambda argv: main(argv, prog=f"python -m codellama {name}")


def usage() -> str:
    lines = ["usage: python -m codellama COMMAND [ARGS]   (python -m codellama COMMAND --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in PROGRAMS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m codellama COMMAND [ARGS]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in PROGRAMS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run(program(name), rest)
    return 0

"""``python -m codellama COMMAND [ARGS]``: every command-line program of the library in one place.

    python -m codellama                      # list the commands
    python -m codellama complete --help      # one command's flags
"""

from __future__ import annotations

import runpy
import sys
from typing import List, Optional

from .commands import PROGRAMS, run

# Programs that live in their own module: run as `python -m codellama.<module>` would run them.
MODULES = {
    "serve": ("codellama.serve", "an HTTP server: OpenAI, Ollama and llama.cpp protocols, fill-in-the-middle"),
    "convert": ("codellama.convert", "convert a checkpoint between Meta's and Hugging Face's layouts"),
    "evaluate": ("codellama.evaluate", "HumanEval / MBPP pass@k, generated code run in a sandbox"),
    "quantize": ("codellama.quantize", "write an int8 / int4 weight-only quantized checkpoint"),
}
HELP = {"complete": "code completion: continue prompts", "infill": "fill the <FILL> gap of code",
        "chat": "answer dialogs with an Instruct model"}


def available(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def usage() -> str:
    lines = ["usage: python -m codellama COMMAND [ARGS]   (python -m codellama COMMAND --help for its flags)", "",
             "commands:"]
    for name, _ in PROGRAMS:
        lines.append(f"  {name:<10} {HELP[name]}")
    for name, (module, text) in MODULES.items():
        if available(module):
            lines.append(f"  {name:<10} {text}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    programs = dict(PROGRAMS)
    if name in programs:
        run(lambda a: programs[name](a, prog=f"python -m codellama {name}"), rest)
        return 0
    if name in MODULES and available(MODULES[name][0]):
        sys.argv = [f"python -m codellama {name}", *rest]
        runpy.run_module(MODULES[name][0], run_name="__main__", alter_sys=True)
        return 0
    print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The command-line programs: code completion, infilling and instruct chat, with Meta's flags.

``python -m codellama complete|infill|chat`` and the example scripts (``example_completion.py``, …) run the
same functions below. What they share: the reference's flags (with each program's defaults, shown by
``--help``), building a ``Llama`` from them, printing on rank 0 only under ``torchrun``, and turning the
library's input errors into one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence, Tuple

from .distributed import close_process_group
from .generation import Llama
from .ops import ATTENTION_CHOICES
from .quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, QuantConfig
from .runtime import DTYPES
from .engine.speculative import SPECULATE_CHOICES


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the usage text's line breaks and shows each default (unless the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def example_parser(description: str, *, temperature: float, top_p: float, max_seq_len: int, max_batch_size: int,
                   max_gen_len: Optional[int], prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags of Meta's example scripts (with their defaults per script) plus this library's own."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--ckpt_dir", default=None, help="checkpoint directory, Meta or Hugging Face layout "
                                                    "(default: the tiny demonstration model bundled with the package)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model (default: CKPT_DIR/tokenizer.model)")
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=top_p, help="nucleus sampling: the probability mass kept")
    p.add_argument("--max_seq_len", type=int, default=max_seq_len, help="context length (prompt + answer)")
    p.add_argument("--max_batch_size", type=int, default=max_batch_size, help="prompts decoded at once")
    gen_default = "until the context is full; the bundled model stops at 128" if max_gen_len is None else max_gen_len
    p.add_argument("--max_gen_len", type=int, default=max_gen_len, help=f"new tokens per answer (default: {gen_default})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                   help="kernels for attention, RMSNorm and RoPE (auto: Triton on CUDA)")
    p.add_argument("--compile", action="store_true", help="decode with a torch.compile'd static-shape step")
    p.add_argument("--speculate", default=None, choices=SPECULATE_CHOICES,
                   help="speculative decoding: prompt lookup, or a draft model (--draft_ckpt_dir); output unchanged")
    p.add_argument("--draft_ckpt_dir", default=None, help="the draft model for --speculate draft (same tokenizer)")
    add_quantize_flags(p)
    return p


def add_quantize_flags(p: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--group_size`` (the examples' and the server's); read them with ``quantize_option``."""
    p.add_argument("--quantize", default=None, choices=SCHEMES,
                   help="weight-only quantization as the checkpoint loads (a quantized checkpoint needs none)")
    p.add_argument("--group_size", "--group-size", type=int, default=None, choices=GROUP_SIZES,
                   help=f"int4 only: inputs per scale (default {DEFAULT_GROUP_SIZE})")


def quantize_option(args: argparse.Namespace) -> Optional[QuantConfig]:
    """``--quantize`` and ``--group_size`` as the ``quantize=`` of ``Llama.build`` (None: no quantization)."""
    if args.quantize is None:
        if args.group_size is not None:
            raise ValueError("--group_size needs --quantize int4")
        return None
    return QuantConfig(args.quantize, args.group_size)


def build(args: argparse.Namespace) -> Llama:
    return Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len, args.max_batch_size,
                       device=args.device, dtype=args.dtype, attention=args.attention, compile=args.compile,
                       speculate=args.speculate, draft_ckpt_dir=args.draft_ckpt_dir, quantize=quantize_option(args))


def is_main_process() -> bool:
    """Rank 0 prints; the other ranks of a ``torchrun`` job stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def say(*lines: str) -> None:
    """Print on rank 0 only."""
    if is_main_process():
        for line in lines:
            print(line)


def run(main: Callable[..., None], argv: Optional[List[str]] = None) -> None:
    """Run a program's ``main`` (with ``argv`` when given, else as ``main()``: its arguments from ``sys.argv``),
    turning the library's input errors into one line and exit status 2."""
    try:
        main() if argv is None else main(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TimeoutError as e:  # a stalled rank under torchrun: the message names the rank and the timeout
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if close_process_group():
        # Under torchrun, gloo's C++ teardown at interpreter exit sometimes aborts a rank that has finished
        # its work ("terminate called without an active exception"): leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


RULE = "=" * 34


# ----------------------------------------------------------------------------- complete
COMPLETE_USAGE = """Code completion: continue each prompt.

    python -m codellama complete --ckpt_dir CodeLlama-7b/
    python -m codellama complete --prompt 'def fizzbuzz(n: int):' --stream
    torchrun --nproc_per_node 1 example_completion.py --ckpt_dir CodeLlama-7b/
"""
COMPLETE_PROMPTS = [
    "def fizzbuzz(n: int):",
    'import argparse\n\ndef main(string: str):\n    print(string)\n    print(string[::-1])\n\nif __name__ == "__main__":',
]


def complete(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> None:
    parser = example_parser(COMPLETE_USAGE, temperature=0.2, top_p=0.9, max_seq_len=256, max_batch_size=4,
                            max_gen_len=None, prog=prog)
    parser.add_argument("--prompt", action="append", default=None, help="your own prompt (repeatable; default: "
                                                                        "the built-in prompts)")
    parser.add_argument("--stream", action="store_true", help="print the first completion as it is generated")
    args = parser.parse_args(argv)
    prompts = args.prompt or COMPLETE_PROMPTS
    generator = build(args)
    if args.stream:  # the first prompt's completion, piece by piece
        say(prompts[0])
        if is_main_process():
            print("> ", end="")
        for piece in generator.stream_completion(prompts[0], args.temperature, args.top_p, args.max_gen_len):
            if is_main_process():
                print(piece, end="", flush=True)
        say("\n\n" + RULE + "\n")
        return
    results = generator.text_completion(prompts, temperature=args.temperature, top_p=args.top_p,
                                        max_gen_len=args.max_gen_len)
    for prompt, result in zip(prompts, results):
        say(prompt, f"> {result['generation']}", "\n" + RULE + "\n")


# ----------------------------------------------------------------------------- infill
FILL = "<FILL>"
INFILL_USAGE = f"""Code infilling: fill the {FILL} gap of each prompt from the code before and after it.

    python -m codellama infill --ckpt_dir CodeLlama-7b/
    python -m codellama infill --prompt $'def area(r):\\n    {FILL}\\n'
"""
INFILL_PROMPTS = [
    'def remove_non_ascii(s: str) -> str:\n    """ <FILL>\n    return result\n',
    "# Installation instructions:\n    ```bash\n<FILL>\n    ```\nThis downloads the LLaMA inference code and installs the repository as a local pip package.\n",
    "class InterfaceManagerFactory(AbstractManagerFactory):\n    def __init__(<FILL>\ndef main():\n    factory = InterfaceManagerFactory(start=datetime.now())\n    managers = []\n    for i in range(10):\n        managers.append(factory.build(id=i))\n",
    "/-- A quasi-prefunctoid is 1-connected iff all its etalisations are 1-connected. -/\ntheorem connected_iff_etalisation [C D : precategoroid] (P : quasi_prefunctoid C D) :\n  π₁ P = 0 ↔ <FILL> = 0 :=\nbegin\n  split,\n  { intros h f,\n    rw pi_1_etalisation at h,\n    simp [h],\n    refl\n  },\n  { intro h,\n    have := @quasi_adjoint C D P,\n    simp [←pi_1_etalisation, this, h],\n    refl\n  }\nend\n",
]


def split_prompt(prompt: str) -> Tuple[str, str]:
    """``(prefix, suffix)`` around the one ``<FILL>`` marker of an infilling prompt."""
    if prompt.count(FILL) != 1:
        raise ValueError(f"an infilling prompt needs exactly one {FILL} marker, found {prompt.count(FILL)}: {prompt[:40]!r}…")
    prefix, suffix = prompt.split(FILL)
    return prefix, suffix


def infill(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> None:
    parser = example_parser(INFILL_USAGE, temperature=0.0, top_p=0.9, max_seq_len=256, max_batch_size=4,
                            max_gen_len=128, prog=prog)
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"your own code with one {FILL} marker (repeatable; default: the built-in prompts)")
    args = parser.parse_args(argv)
    prompts = args.prompt or INFILL_PROMPTS
    prefixes, suffixes = zip(*(split_prompt(p) for p in prompts))  # check the markers before loading
    generator = build(args)
    results = generator.text_infilling(list(prefixes), list(suffixes), temperature=args.temperature, top_p=args.top_p,
                                       max_gen_len=args.max_gen_len)
    for prompt, result in zip(prompts, results):
        say("\n================= Prompt text =================\n", prompt,
            "\n================= Filled text =================\n", result["full_text"])


# ----------------------------------------------------------------------------- chat
CHAT_USAGE = """Instruct: answer each dialog with an Instruct model ([INST] format, or <step> for 70B-Instruct).

    python -m codellama chat --ckpt_dir CodeLlama-7b-Instruct/
    python -m codellama chat --prompt 'Write a function that reverses a string.'
"""
DIALOGS = [
    [{"role": "user", "content": "In Bash, how do I list all text files in the current directory (excluding "
                                 "subdirectories) that have been modified in the last month?"}],
    [{"role": "user", "content": "What is the difference between inorder and preorder traversal? Give an example in Python."}],
    [{"role": "system", "content": "Provide answers in JavaScript"},
     {"role": "user", "content": "Write a function that computes the set of sums of all contiguous sublists of a given list."}],
]


def chat(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> None:
    parser = example_parser(CHAT_USAGE, temperature=0.2, top_p=0.95, max_seq_len=512, max_batch_size=8,
                            max_gen_len=None, prog=prog)
    parser.add_argument("--prompt", action="append", default=None,
                        help="your own question, a one-message dialog (repeatable; default: the built-in dialogs)")
    args = parser.parse_args(argv)
    dialogs = [[{"role": "user", "content": p}] for p in args.prompt] if args.prompt else DIALOGS
    generator = build(args)
    results = generator.chat_completion(dialogs, temperature=args.temperature, top_p=args.top_p,
                                        max_gen_len=args.max_gen_len)
    for dialog, result in zip(dialogs, results):
        say(*(f"{msg['role'].capitalize()}: {msg['content']}\n" for msg in dialog),
            f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}", "\n" + RULE + "\n")


PROGRAMS: Sequence[Tuple[str, Callable]] = (("complete", complete), ("infill", infill), ("chat", chat))

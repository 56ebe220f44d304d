"""The programs complete, infill and chat, with Meta's flags (``python -m codellama complete|infill|chat`` and the
example scripts ``example_completion.py``, ``example_infill.py``, ``example_instruct.py`` run the same
functions). Each has the reference's defaults for its flags, shown by ``--help``.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Tuple

from ..build import build
from ..generation import Llama
from ..options import ENGINE_FLAGS, LOAD_FLAGS, SAMPLING_FLAGS, HelpFormatter, add_flags, engine_options, load_options
from . import RULE, is_main_process, run, say  # noqa: F401  (run: the example scripts' entry)


def example_parser(description: str, *, temperature: float, top_p: float, max_seq_len: int, max_batch_size: int,
                   max_gen_len: Optional[int], prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags of Meta's example scripts (with their defaults per script) plus this library's own."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_flags(p, LOAD_FLAGS + ENGINE_FLAGS + SAMPLING_FLAGS, temperature=temperature, top_p=top_p,
              max_seq_len=max_seq_len, max_batch_size=max_batch_size, max_gen_len=max_gen_len)
    return p


def build_llama(args: argparse.Namespace) -> Llama:
    return Llama.from_built(build(load_options(args), engine_options(args)))


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
    generator = build_llama(args)
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
    generator = build_llama(args)
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
    generator = build_llama(args)
    results = generator.chat_completion(dialogs, temperature=args.temperature, top_p=args.top_p,
                                        max_gen_len=args.max_gen_len)
    for dialog, result in zip(dialogs, results):
        say(*(f"{msg['role'].capitalize()}: {msg['content']}\n" for msg in dialog),
            f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}", "\n" + RULE + "\n")


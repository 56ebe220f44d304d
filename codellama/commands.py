"""What the command-line programs share (the example scripts): the reference's flags, building a ``Llama`` from them, clean errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from .distributed import close_process_group
from .generation import Llama
from .ops import ATTENTION_CHOICES
from .quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, QuantConfig
from .runtime import DTYPES
from .speculative import SPECULATE_CHOICES


def example_parser(description: str, *, temperature: float, top_p: float, max_seq_len: int, max_batch_size: int,
                   max_gen_len: int | None) -> argparse.ArgumentParser:
    """The flags of Meta's example scripts (with their defaults per script) plus ``--device`` and ``--dtype``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ckpt_dir", default=None, help="checkpoint directory, Meta or Hugging Face layout "
                                                    "(default: the tiny model bundled with the package)")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer.model (default: CKPT_DIR/tokenizer.model)")
    p.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    p.add_argument("--top_p", type=float, default=top_p)
    p.add_argument("--max_seq_len", type=int, default=max_seq_len)
    p.add_argument("--max_batch_size", type=int, default=max_batch_size)
    p.add_argument("--max_gen_len", type=int, default=max_gen_len)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    p.add_argument("--compile", action="store_true", help="decode with a torch.compile'd static-shape step")
    p.add_argument("--speculate", default=None, choices=SPECULATE_CHOICES,
                   help="speculative decoding: prompt lookup, or a draft model (--draft_ckpt_dir); output unchanged")
    p.add_argument("--draft_ckpt_dir", default=None, help="the draft model for --speculate draft (same tokenizer)")
    p.add_argument("--quantize", default=None, choices=SCHEMES,
                   help="weight-only quantization as the checkpoint loads (a quantized checkpoint needs none)")
    p.add_argument("--group_size", type=int, default=None, choices=GROUP_SIZES,
                   help=f"int4 only: inputs per scale (default {DEFAULT_GROUP_SIZE})")
    return p


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


def run(main: Callable[[], None]) -> None:
    """Run an example's ``main``, turning the library's input errors into one line and exit status 2."""
    try:
        main()
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

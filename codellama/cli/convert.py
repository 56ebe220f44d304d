"""Convert a checkpoint between Meta's and Hugging Face's layouts (``python -m codellama convert``).

    python -m codellama.convert SRC DST --to hf           # Meta → Hugging Face (config.json, safetensors, tokenizer)
    python -m codellama.convert SRC DST --to meta --shards 2   # any → Meta, split into 2 model-parallel shards
    python -m codellama.convert codellama-7b.Q8_0.gguf DST --to hf --dtype bf16   # GGUF → HF (dequantized)

SRC is only read. DST must be new or empty (--force replaces the checkpoint files in it); it is written in a
temporary sibling directory and moved into place only when complete, so a failed run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
from typing import Callable

from ..options import HelpFormatter, add_flag
from ..runtime import DTYPES
from ..save import convert_checkpoint


def gib_as_bytes(text: str) -> int:
    """``--max_shard_gb`` as bytes: a finite number of GiB, at least one byte."""
    try:
        gb = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(gb) or gb * 2**30 < 1:
        raise argparse.ArgumentTypeError(f"must be a positive size in GiB (e.g. 5 or 0.5), got {text!r}")
    return int(gb * 2**30)


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def main(argv=None, prog: str = "python -m codellama.convert") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", help="checkpoint directory (Meta or Hugging Face layout, detected from its files) or GGUF file")
    p.add_argument("dst", help="output directory (new or empty, or any with --force)")
    add_flag(p, "to", "target layout", required=True, choices=["meta", "hf"])
    add_flag(p, "shards", "number of consolidated.*.pth files (Meta target only; unset: 1)", type=positive_int)
    add_flag(p, "dtype", "convert weights to this dtype (unset: keep, which is exact)", choices=sorted(DTYPES))
    add_flag(p, "max_shard_gb", "safetensors file size limit in GiB (HF target only; unset: 5)", type=gib_as_bytes,
             metavar="GB")
    add_flag(p, "force", "write into a non-empty DST, replacing the checkpoint files it holds (other files stay)",
             action="store_true")
    a = p.parse_args(argv)

    def convert() -> str:
        convert_checkpoint(a.src, a.dst, a.to, num_shards=a.shards, dtype=a.dtype, max_shard_bytes=a.max_shard_gb,
                           force=a.force)
        return f"wrote {a.to} checkpoint to {a.dst}"

    return run_writer(convert)


def run_writer(write: Callable[[], str]) -> int:
    """Run a command line's checkpoint writer: print what it says and return 0, or one line of error and 2 (bad
    input) or 1 (the system's: disk full, permission denied). Either way the writer leaves nothing half-written.
    """
    # A plain `kill` ends the run as Ctrl-C does, through the clean-up that removes the temporary output.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        message = write()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied: nothing was left behind, say what happened in one line
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(message)
    return 0


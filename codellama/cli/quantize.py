"""Write an int8 / int4 weight-only quantized checkpoint (``python -m codellama quantize``).

    python -m codellama.quantize CodeLlama-7b/ CodeLlama-7b-int4/ --int4 --group_size 32

SRC is only read; DST is written as ``convert`` writes (a temporary sibling moved into place when complete).
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from ..options import HelpFormatter, add_flag
from ..quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, QuantConfig
from ..save import quantize_checkpoint
from .convert import run_writer


def main(argv: Optional[List[str]] = None, prog: str = "python -m codellama.quantize") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("src", help="checkpoint directory (Meta or Hugging Face layout), full precision")
    p.add_argument("dst", help="output directory (new or empty, or any with --force): config.json + model.safetensors")
    scheme = p.add_mutually_exclusive_group(required=True)
    scheme.add_argument("--int8", dest="scheme", action="store_const", const="int8",
                        help="int8 codes, one scale per output channel")
    scheme.add_argument("--int4", dest="scheme", action="store_const", const="int4",
                        help="int4 codes, a scale and a zero per group of inputs")
    add_flag(p, "group_size", f"int4 only: inputs per group (unset: {DEFAULT_GROUP_SIZE})", type=int,
             choices=GROUP_SIZES)
    add_flag(p, "include_output", "quantize the output layer too", action="store_true")
    add_flag(p, "output_scheme", "the output layer's own scheme (implies --include_output), e.g. int8 in an int4 "
                                 "checkpoint", choices=SCHEMES)
    add_flag(p, "include_embeddings", "quantize the token embedding too", action="store_true")
    add_flag(p, "dtype", "dtype of the scales and the layers left in full precision (unset: the checkpoint's)")
    add_flag(p, "force", "write into a non-empty DST, replacing its checkpoint files", action="store_true")
    a = p.parse_args(argv)

    def write() -> str:
        config = QuantConfig(a.scheme, a.group_size, include_output=a.include_output or a.output_scheme is not None,
                             include_embeddings=a.include_embeddings, output_scheme=a.output_scheme)
        quantize_checkpoint(a.src, a.dst, config, dtype=a.dtype, force=a.force)
        return f"wrote {config.describe()} checkpoint to {a.dst}"

    return run_writer(write)

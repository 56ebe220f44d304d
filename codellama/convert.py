"""Convert a checkpoint between Meta's and Hugging Face's layouts.

    python -m codellama.convert SRC DST --to hf           # Meta → Hugging Face (config.json + safetensors)
    python -m codellama.convert SRC DST --to meta --shards 2   # any → Meta, split into 2 model-parallel shards
"""

from __future__ import annotations

import argparse
import sys

from .save import convert_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m codellama.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (Meta or Hugging Face layout, detected from its files)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", required=True, choices=["meta", "hf"], help="target layout")
    p.add_argument("--shards", type=int, default=1, help="number of consolidated.*.pth files (Meta target only)")
    p.add_argument("--dtype", default=None, help="convert weights to this dtype (default: keep, which is exact)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size limit (HF target only)")
    a = p.parse_args(argv)
    try:
        convert_checkpoint(a.src, a.dst, a.to, num_shards=a.shards, dtype=a.dtype, max_shard_bytes=int(a.max_shard_gb * 2**30))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.to} checkpoint to {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

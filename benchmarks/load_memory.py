"""Peak host memory while loading a checkpoint, against the size of the loaded weights.

    python benchmarks/load_memory.py                  # a ~1 GiB bf16 random checkpoint, several cases
    python benchmarks/load_memory.py --size-gb 4

Each case loads in a fresh subprocess. "anon" is the peak of anonymous memory (RssAnon, polled every
2 ms) above the level after imports: the memory a load really costs. "rss" is the kernel's peak
resident set (VmHWM) above the same level; it also counts pages of the memory-mapped checkpoint file
that were read, which are clean page cache the kernel drops under pressure. Ratios are against the
bytes of the weights as loaded. The loader builds on the meta device and converts one tensor at a
time, so "anon" stays near one copy (near zero when the mapped file is used in place: one shard,
same dtype, CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, threading, time, torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
peak_anon, done = [0], [False]
def sample():  # RssAnon has no kernel high-water mark: poll it
    while not done[0]:
        peak_anon[0] = max(peak_anon[0], status("RssAnon:"))
        time.sleep(0.002)
from codellama import load_model
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
t = threading.Thread(target=sample); t.start()
start = time.perf_counter()
model = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2], quantize=None if sys.argv[3] == "none" else sys.argv[3])
seconds = time.perf_counter() - start
done[0] = True; t.join()
nbytes = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])  # packed weights are buffers
print(json.dumps({"rss": status("VmHWM:") - base_rss, "anon": peak_anon[0] - base_anon, "weights": nbytes,
                  "seconds": seconds}))
"""


def measure(path: str, dtype: str, quantize: str = "none") -> dict:
    """Load ``path`` in a fresh subprocess: peak anon and rss above the level after imports, the weights' bytes as
    loaded, and the seconds ``load_model`` took."""
    out = subprocess.run([sys.executable, "-c", CHILD, path, dtype, quantize], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"loading {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="approximate bf16 checkpoint size")
    p.add_argument("--dir", default=None, help="where to write the random checkpoints (default: a temp dir)")
    a = p.parse_args()

    from codellama import ModelArgs

    dim = 2048
    per_layer = ModelArgs(dim=dim, n_layers=1, n_heads=16, vocab_size=32000).num_params() - 2 * 32000 * dim
    n_layers = max(1, int((a.size_gb * 2**30 / 2 - 2 * 32000 * dim) / per_layer))
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=16, vocab_size=32000)
    root = a.dir or tempfile.mkdtemp(prefix="load_memory_")
    try:
        run_cases(args, root)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run_cases(args, root: str) -> None:
    import torch

    from codellama.testing import write_checkpoint

    dim, n_layers = args.dim, args.n_layers
    print(f"model: dim {dim}, {n_layers} layers, {args.num_params() / 1e6:.0f}M parameters; checkpoints in {root}")
    cases = [("meta", 1, "bf16"), ("meta", 2, "bf16"), ("meta", 2, "fp32"), ("hf", 1, "bf16"), ("hf", 1, "fp32")]
    written = {}
    print(f"{'layout':<8}{'shards':>7}{'file dtype':>11}{'load dtype':>11}{'weights GiB':>13}"
          f"{'anon GiB':>10}{'ratio':>7}{'rss GiB':>9}{'ratio':>7}")
    for layout, shards, dtype in cases:
        key = (layout, shards)
        if key not in written:
            written[key] = write_checkpoint(os.path.join(root, f"{layout}{shards}"), args, layout, shards=shards,
                                            dtype=torch.bfloat16)
        r = measure(written[key], dtype)
        w = r["weights"]
        print(f"{layout:<8}{shards:>7}{'bf16':>11}{dtype:>11}{w / 2**30:>13.2f}"
              f"{r['anon'] / 2**30:>10.2f}{r['anon'] / w:>7.2f}{r['rss'] / 2**30:>9.2f}{r['rss'] / w:>7.2f}")


if __name__ == "__main__":
    main()

"""Peak host memory while loading a checkpoint, against the size of the loaded weights.

    python benchmarks/load_memory.py                  # a ~1 GiB bf16 random checkpoint, several cases
    python benchmarks/load_memory.py --size-gb 4
    python benchmarks/load_memory.py --quantized      # also int8/int4: on load, and from a quantized checkpoint
    python benchmarks/load_memory.py --ckpt DIR --tp 2   # an existing checkpoint split over 2 ranks (torchrun)

Each case loads in a fresh subprocess. "anon" is the peak of anonymous memory (RssAnon, polled every
2 ms) above the level after imports: the memory a load really costs. "rss" is the kernel's peak
resident set (VmHWM) above the same level; it also counts pages of the memory-mapped checkpoint file
that were read, which are clean page cache the kernel drops under pressure. Ratios are against the
bytes of the weights as loaded (packed, quantized). The loader builds on the meta device, converts one
tensor at a time, lays out each layer as it completes and gives back the file pages of what it converted,
so both stay near the weights' size plus about a layer. Under tensor parallelism (``--tp N``: ``torchrun``, one
process per rank on this machine, gloo) each rank reads only its slices; each rank's figures are against the
bytes of its own part of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

from memory_sampler import MEMORY_SAMPLER

CHILD = MEMORY_SAMPLER + r"""
import json, torch
from codellama import Llama, load_model
from codellama.cpu import native_kernel_available
native_kernel_available()  # (builds or loads the native kernels before the baseline)
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
start_sampler()
start = time.perf_counter()
quantize = None if sys.argv[3] == "none" else sys.argv[3]
if "RANK" in os.environ:  # under torchrun: each rank joins the group and loads its part
    model = Llama.build(sys.argv[1], None, 64, 1, device="cpu", dtype=sys.argv[2], quantize=quantize).model
else:
    model = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2], quantize=quantize)
seconds = time.perf_counter() - start
nbytes = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])  # packed weights are buffers
print(json.dumps({"rank": int(os.environ.get("RANK", 0)), "rss": status("VmHWM:") - base_rss,
                  "anon": peak_anon[0] - base_anon, "weights": nbytes, "seconds": seconds}), flush=True)
"""


def measure_tp(path: str, dtype: str, quantize: str, world: int) -> list:
    """Load ``path`` split over ``world`` ranks (``torchrun``, gloo on CPU): each rank's figures, as ``measure``'s."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(CHILD)
    try:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), f.name,
                              path, dtype, quantize], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.remove(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"loading {path} on {world} ranks failed:\n{out.stderr[-3000:]}")
    ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
    return sorted(ranks, key=lambda r: r["rank"])


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
    p.add_argument("--quantized", action="store_true", help="also int8/int4: quantized on load and pre-quantized")
    p.add_argument("--ckpt", default=None, help="measure this checkpoint (with its tokenizer) instead of random ones")
    p.add_argument("--dtype", default="bf16", help="with --ckpt: the load dtype")
    p.add_argument("--quantize", default="none", help="with --ckpt: quantize on load (int8, int4)")
    p.add_argument("--tp", type=int, default=1, help="with --ckpt: ranks to split it over (torchrun, gloo)")
    a = p.parse_args()
    if a.ckpt:
        header = f"{'rank':<6}{'weights GiB':>13}{'anon GiB':>10}{'ratio':>7}{'rss GiB':>9}{'ratio':>7}{'seconds':>9}"
        results = measure_tp(a.ckpt, a.dtype, a.quantize, a.tp) if a.tp > 1 else \
            [measure(a.ckpt, a.dtype, a.quantize)]
        print(f"{a.ckpt}: {a.dtype}, quantize {a.quantize}, {a.tp} rank(s)\n{header}")
        for r in results:
            w = r["weights"]
            print(f"{r['rank']:<6}{w / 2**30:>13.2f}{r['anon'] / 2**30:>10.2f}{r['anon'] / w:>7.2f}"
                  f"{r['rss'] / 2**30:>9.2f}{r['rss'] / w:>7.2f}{r['seconds']:>9.1f}")
        return

    from codellama import ModelArgs

    dim = 2048
    per_layer = ModelArgs(dim=dim, n_layers=1, n_heads=16, vocab_size=32000).num_params() - 2 * 32000 * dim
    n_layers = max(1, int((a.size_gb * 2**30 / 2 - 2 * 32000 * dim) / per_layer))
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=16, vocab_size=32000)
    root = a.dir or tempfile.mkdtemp(prefix="load_memory_")
    try:
        run_cases(args, root, a.quantized)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run_cases(args, root: str, quantized: bool = False) -> None:
    import torch

    from codellama.save import quantize_checkpoint
    from codellama.testing import write_checkpoint

    dim, n_layers = args.dim, args.n_layers
    print(f"model: dim {dim}, {n_layers} layers, {args.num_params() / 1e6:.0f}M parameters; checkpoints in {root}")
    # (checkpoint, load dtype, quantize on load): "meta2" has two shards, "hf-int4" was written by quantize_checkpoint
    cases = [("meta1", "bf16", "none"), ("meta2", "bf16", "none"), ("meta2", "fp32", "none"), ("hf1", "bf16", "none"),
             ("hf1", "fp32", "none")]
    if quantized:
        cases += [("hf1", "bf16", "int8"), ("hf1", "bf16", "int4"), ("meta1", "bf16", "int4"),
                  ("hf-int8", "bf16", "none"), ("hf-int4", "bf16", "none")]
    written = {}
    print(f"{'checkpoint':<11}{'load dtype':>11}{'quantize':>9}{'weights GiB':>13}{'anon GiB':>10}{'ratio':>7}"
          f"{'rss GiB':>9}{'ratio':>7}{'seconds':>9}")
    for name, dtype, quantize in cases:
        if name not in written:
            path = os.path.join(root, name)
            if name.startswith("hf-"):
                quantize_checkpoint(written.get("hf1") or write_checkpoint(os.path.join(root, "hf1"), args, "hf",
                                                                            dtype=torch.bfloat16), path, name[3:])
            else:
                write_checkpoint(path, args, name[:-1], shards=int(name[-1]), dtype=torch.bfloat16)
            written[name] = path
        r = measure(written[name], dtype, quantize)
        w = r["weights"]
        print(f"{name:<11}{dtype:>11}{quantize:>9}{w / 2**30:>13.2f}{r['anon'] / 2**30:>10.2f}{r['anon'] / w:>7.2f}"
              f"{r['rss'] / 2**30:>9.2f}{r['rss'] / w:>7.2f}{r['seconds']:>9.1f}")


if __name__ == "__main__":
    main()

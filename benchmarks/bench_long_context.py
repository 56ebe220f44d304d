"""A CPU decode step at long contexts: attention read straight from the bf16 cache, and over its float32 copies.

    python benchmarks/bench_long_context.py                    # 4 layers of Code Llama 7B's shape, bf16
    python benchmarks/bench_long_context.py --layers 2 --contexts 256 1024

The eager CPU decode step attends over float32 copies of each layer's cached keys and values (torch's SDPA is
faster in float32 there, copies included). Made fresh every layer and step, those copies are fresh pages: the
attended length grows by one each step, so glibc maps every new, slightly larger block anew and each page
faults in. ``codellama.ops.float_copies`` writes them into buffers it keeps. Where AVX-512 is available, the
native kernel (``cpu_kernels/attention.cpp``) reads the bf16 cache itself and makes no copies. This
times one greedy decode step (``(time for N tokens − time for 1) / (N − 1)``, the prompt cached) all three
ways, in rotating rounds, on a random model with 7B's width and heads (dim 4096, 32 heads of 128, FFN 11008)
and fewer layers, and prints the ratios. Each layer's attention costs what a 7B's does, so the difference per
layer carries over to 32 layers; the weights' share of the step does not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_quant import Ours, build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", nargs="+", type=int, default=[256, 2048, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    a = p.parse_args()
    from codellama import ModelArgs, ops

    args = ModelArgs(dim=4096, n_layers=a.layers, n_heads=32, multiple_of=256, vocab_size=32016, rope_theta=1e6)
    model = build(args, "bf16", seed=0)
    kept, fresh = ops.float_copies, (lambda k, v: (k.float(), v.float()))
    native = ops._native_decode_attention
    modes = {"native": (kept, native), "kept": (kept, lambda *a: None), "fresh": (fresh, lambda *a: None)}
    if ops._native_decode_attention(*(torch.zeros(1, 1, 1, 128, dtype=torch.bfloat16),) * 3, 0) is None:
        del modes["native"]  # (no AVX-512 here)
    g = torch.Generator().manual_seed(0)
    print(f"{a.layers} layers of 7B's shape, bf16, batch 1, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| context | " + " | ".join(f"step, {m} (ms)" for m in modes) + " | fresh / kept | kept / native |")
    print("|---|" + "---|" * (len(modes) + 2))
    try:
        for context in a.contexts:
            ours = Ours(model, torch.randint(3, args.vocab_size, (1, context), generator=g).tolist(), a.new_tokens)
            times = {m: [] for m in modes}
            order = list(modes)
            for r in range(a.rounds):
                for name in order[r % len(order):] + order[:r % len(order)]:
                    ops.float_copies, ops._native_decode_attention = modes[name]
                    times[name].append(ours.step_seconds())
            t = {m: statistics.median(times[m]) for m in modes}
            native_ratio = f"**{t['kept'] / t['native']:.2f}×**" if "native" in t else ""
            print(f"| {context} | " + " | ".join(f"{t[m] * 1e3:.1f}" for m in modes) +
                  f" | {t['fresh'] / t['kept']:.2f}× | {native_ratio} |", flush=True)
            del ours
    finally:
        ops.float_copies, ops._native_decode_attention = kept, native


if __name__ == "__main__":
    main()

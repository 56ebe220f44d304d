"""A CPU decode step at long contexts: the float32 copies of the bf16 cache into kept buffers, against fresh ones.

    python benchmarks/bench_long_context.py                    # 4 layers of Code Llama 7B's shape, bf16
    python benchmarks/bench_long_context.py --layers 2 --contexts 256 1024

The eager CPU decode step attends over float32 copies of each layer's cached keys and values (torch's SDPA is
faster in float32 there, copies included). Made fresh every layer and step, those copies are fresh pages: the
attended length grows by one each step, so glibc maps every new, slightly larger block anew and each page
faults in. ``codellama.ops.float_copies`` writes them into buffers it keeps. This times one greedy decode step
(``(time for N tokens − time for 1) / (N − 1)``, the prompt cached) both ways, in alternating rounds, on a
random model with 7B's width and heads (dim 4096, 32 heads of 128, FFN 11008) and fewer layers, and prints
the ratio (fresh / kept). Each layer's attention costs what a 7B's does, so the difference per layer carries
over to 32 layers; the weights' share of the step does not.
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
    g = torch.Generator().manual_seed(0)
    print(f"{a.layers} layers of 7B's shape, bf16, batch 1, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| context | step, fresh copies (ms) | step, kept buffers (ms) | fresh / kept |")
    print("|---|---|---|---|")
    try:
        for context in a.contexts:
            ours = Ours(model, torch.randint(3, args.vocab_size, (1, context), generator=g).tolist(), a.new_tokens)
            times = {"fresh": [], "kept": []}
            for r in range(a.rounds):
                for name in (("fresh", "kept") if r % 2 == 0 else ("kept", "fresh")):
                    ops.float_copies = fresh if name == "fresh" else kept
                    times[name].append(ours.step_seconds())
            f, k = statistics.median(times["fresh"]), statistics.median(times["kept"])
            print(f"| {context} | {f * 1e3:.1f} | {k * 1e3:.1f} | **{f / k:.2f}×** |", flush=True)
            del ours
    finally:
        ops.float_copies = kept


if __name__ == "__main__":
    main()

"""The native CPU kernels against torch's on the same weights: read bandwidth and error, layer by layer.

    python benchmarks/bench_cpu_kernels.py                    # Code Llama 7B's layer shapes, 2 layers
    python benchmarks/bench_cpu_kernels.py --layers 4 --rows 1 4 64 --schemes int8
    python benchmarks/bench_cpu_kernels.py --quantizers       # the one-pass quantizers against PyTorch's
    python benchmarks/bench_cpu_kernels.py --schemes bf16-order --rows 1 --layers 32   # batch-1 read order, 13 GB

For each scheme, a stack of layers of Code Llama 7B's shapes (wq|wk|wv fused 12288×4096, wo 4096×4096, w1|w3
fused 22016×4096, w2 4096×11008: more bytes than any cache) is multiplied with ``rows`` activation rows,
through this library's native kernel (``codellama.cpu_kernels``) and through the kernel torch offers for the
same codes, in alternating rounds:

    int8  int8 rows in place (int8 activations, VNNI; above 8 rows, tiles packed per call)
                                                vs  aten._weight_int8pack_mm (bf16 activations)
    int4  int4 tiles g32 (int8 activations)     vs  aten._weight_int4pack_mm_for_cpu (bf16 activations)
    bf16  bf16 rows, the weight in place        vs  oneDNN on its packed copy of the weight
          (above 8 rows, as the layers do: F.linear on the weight in place)
    bf16-order  the bf16 row kernel's own choice vs  the same kernel reading four weight rows side by side
          (for one activation row it reads one weight row at a time; the outputs are the same bits)

``--quantizers`` times quantizing those weights instead: the native one-pass quantizers
(``cpu_kernels.quantize_int8`` / ``quantize_int4``) against ``codellama.quantize``'s PyTorch arithmetic, whose
codes they reproduce bit for bit (checked here too).

"GB/s" is the bytes of the weights (codes and scales as the kernel stores them) over the median time of a
pass; the ratio is the median of the rounds' ratios (baseline time / ours). "err" is the largest error of a
pass's last layer against float64 on the same codes, over the largest output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (out, in) of a 7B layer's products


def layers_for(scheme: str, count: int, seed: int) -> Tuple[List[Tuple[Callable, Callable, int]], int, int, torch.Tensor]:
    """``([(ours, theirs, in_features)], our bytes, their bytes, the last weight in float64)``."""
    from codellama import cpu, cpu_kernels
    from codellama.quantize import dequantize_int4, quantize_int4, quantize_int8, unpack_int4

    g = torch.Generator().manual_seed(seed)
    out, ours_bytes, theirs_bytes, exact = [], 0, 0, None
    for _ in range(count):
        for N, K in SHAPES:
            w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
            if scheme == "int8":
                codes, scales = quantize_int8(w, torch.bfloat16)
                ours = lambda x, c=codes, s=scales: cpu_kernels.int8_rows_linear(x, c, s)
                theirs = lambda x, c=codes, s=scales: torch.ops.aten._weight_int8pack_mm(x, c, s)
                ours_bytes += codes.numel() + scales.numel() * 2
                theirs_bytes += codes.numel() + scales.numel() * 2
                exact = codes.double() * scales.double().unsqueeze(1)
            elif scheme == "int4":
                packed, scales, zeros = quantize_int4(w, 32, torch.bfloat16)
                tiles, sz = cpu_kernels.int4_tiles(packed, scales, zeros, 32)
                tp, tsz = cpu.pack_int4(unpack_int4(packed, 32), scales, zeros, 32)
                ours = lambda x, t=tiles, s=sz, N=N: cpu_kernels.int4_tiles_linear(x, t, s, 32, N)
                theirs = lambda x, t=tp, s=tsz: cpu.int4_linear(x, t, s, 32)
                ours_bytes += tiles.numel() + sz.numel() * sz.element_size()
                theirs_bytes += tp.numel() * tp.element_size() + tsz.numel() * tsz.element_size()
                exact = dequantize_int4(packed, scales.double(), zeros.double())
            elif scheme == "bf16-order":
                isa = cpu_kernels.native_isa("bf16")
                kernel = torch.ops.codellama_native.bf16_rows_linear
                ours = lambda x, w=w: kernel(x, w, isa, 0)
                theirs = lambda x, w=w: kernel(x, w, isa, 4)
                ours_bytes += w.numel() * 2
                theirs_bytes += w.numel() * 2
                exact = w.double()
            else:
                packed = cpu.pack_weight(w)
                ours = lambda x, w=w: (cpu_kernels.bf16_rows_linear(x, w) if x.shape[0] <= cpu.ROWS_KERNEL_MAX
                                       else torch.nn.functional.linear(x, w))  # (as a bf16 layer chooses)
                theirs = lambda x, p=packed: cpu.packed_linear(x, p)
                ours_bytes += w.numel() * 2
                theirs_bytes += w.numel() * 2
                exact = w.double()
            out.append((ours, theirs, K))
    return out, ours_bytes, theirs_bytes, exact


def run(layers, rows: int, which: int, seed: int) -> Tuple[float, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = {K: torch.randn(rows, K, generator=g).to(torch.bfloat16) for K in {k for *_, k in layers}}
    start = time.perf_counter()
    for layer in layers:
        y = layer[which](xs[layer[2]])
    return time.perf_counter() - start, (xs[layers[-1][2]], y)


def time_quantizers(layers: int, rounds: int) -> None:
    """Native one-pass quantizers against the PyTorch ones on 7B's bf16 weights: time per pass, same codes."""
    from codellama import cpu_kernels
    from codellama.quantize import quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16) for _ in range(layers) for N, K in SHAPES]
    cases = {"int8": (lambda w: quantize_int8(w, w.dtype), cpu_kernels.quantize_int8),
             "int4 g32": (lambda w: quantize_int4(w, 32, w.dtype), lambda w: cpu_kernels.quantize_int4(w, 32))}
    print("| scheme | PyTorch s | native s | PyTorch / native | same codes |")
    print("|---|---|---|---|---|")
    for name, (theirs, ours) in cases.items():
        times = ([], [])
        for _ in range(rounds):
            for i, f in enumerate((theirs, ours)):
                start = time.perf_counter()
                for w in weights:
                    f(w)
                times[i].append(time.perf_counter() - start)
        same = all(torch.equal(a, b) for w in weights[:4] for a, b in zip(theirs(w), ours(w)))
        t, o = statistics.median(times[0]), statistics.median(times[1])
        print(f"| {name} | {t:.2f} | {o:.2f} | **{t / o:.1f}×** | {same} |", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="+", default=["int8", "int4", "bf16"],
                   choices=["int8", "int4", "bf16", "bf16-order"])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 64])
    p.add_argument("--layers", type=int, default=2, help="7B layers' worth of weights per pass")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantizers", action="store_true", help="time the quantizers instead of the products")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from codellama import cpu, cpu_kernels

    if not cpu_kernels.available("int8"):
        sys.exit("the native kernels are unavailable here (see the line above)")
    if a.quantizers:
        print(f"{torch.get_num_threads()} threads; {a.layers} layers of 7B's shapes (bf16) a pass; load average "
              f"{os.getloadavg()[0]:.2f}")
        return time_quantizers(a.layers, min(a.rounds, 3))
    load = os.getloadavg()[0]
    print(f"{torch.get_num_threads()} threads; int8/int4: {cpu_kernels.isa('int8')}, bf16: {cpu_kernels.isa('bf16')} "
          f"(baseline: {cpu.bf16_path()}); load average {load:.2f}; {a.layers} layers of 7B's shapes a pass")
    print("| scheme | rows | ours GB/s | baseline GB/s | ours / baseline | err ours | err baseline |")
    print("|---|---|---|---|---|---|---|")
    for scheme in a.schemes:
        if scheme == "bf16" and not cpu.bf16_packing_supported():
            print("| bf16 | | | | oneDNN cannot pack bf16 here | | |")
            continue
        if scheme == "bf16-order" and cpu_kernels.native_isa("bf16") != 2:
            print("| bf16-order | | | | the bf16 kernel has one order on AVX2 | | |")
            continue
        layers, ours_bytes, theirs_bytes, exact = layers_for(scheme, a.layers, seed=0)
        for rows in a.rows:
            for which in (0, 1):  # warm-up: page in, build, pack
                run(layers, rows, which, seed=1)
            times, ratios = ([], []), []
            for r in range(a.rounds):
                t = [run(layers, rows, which, seed=2)[0] for which in ((0, 1) if r % 2 == 0 else (1, 0))]
                if r % 2:
                    t.reverse()
                times[0].append(t[0])
                times[1].append(t[1])
                ratios.append(t[1] / t[0])
            errs = []
            for which in (0, 1):
                _, (x, y) = run(layers, rows, which, seed=3)
                want = x.double() @ exact.T
                errs.append(((y.double() - want).abs().max() / want.abs().max()).item())
            ours_gbs = ours_bytes / statistics.median(times[0]) / 1e9
            theirs_gbs = theirs_bytes / statistics.median(times[1]) / 1e9
            print(f"| {scheme} | {rows} | {ours_gbs:.1f} | {theirs_gbs:.1f} | **{statistics.median(ratios):.2f}×** | "
                  f"{errs[0]:.1e} | {errs[1]:.1e} |", flush=True)
        del layers


if __name__ == "__main__":
    main()

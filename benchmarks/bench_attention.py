"""Benchmark the Triton kernels against PyTorch on a CUDA GPU; prints markdown tables.

    python benchmarks/bench_attention.py                 # all four tables, bf16
    python benchmarks/bench_attention.py --only decode --dtype fp16
    python benchmarks/bench_attention.py --sweep         # try other block sizes / split counts too
    python benchmarks/bench_attention.py --cpu           # the compiled CPU decode step's attention (no GPU needed)
    python benchmarks/bench_attention.py --cpu-prefill   # a CPU prompt chunk's attention: native kernel vs torch's

Tables (each measures its baseline in the same run, with triton.testing.do_bench):
  prefill  causal flash attention, head_dim 128, 7B heads (32/32), 1k–16k tokens: TFLOP/s vs
           scaled_dot_product_attention on its flash backend. Target: ≥ 0.9× SDPA.
  decode   one query over 4k–128k cached tokens, batch 1, 7B (32/32) and 34B (64/8) heads: time and GB/s
           (k and v read once) vs the model's PyTorch path (SDPA). Target: ≥ 70% of HBM peak, ≥ 3× SDPA at 32k+.
  rmsnorm  (tokens, 4096) and rope on 7B/34B q, k: GB/s vs eager PyTorch. Target: ≥ 80% of HBM peak.
HBM peak comes from a small table of known cards (or --peak-gbps).

``--cpu``: one query per row over a bf16/fp16 cache inside ``torch.compile`` on the CPU, as the engine's
compiled decode step attends (``TorchOps.attention``: sums Inductor fuses, reading the cache in its dtype),
against the eager path's way compiled the same way (SDPA over float32 copies of the cache), batch 1 and 4,
the 194M benchmark model's heads (8/8) and 7B's (32/32), ragged positions; each timed over several layers'
caches (together larger than the CPU's caches) and checked against the other before timing.

``--cpu-prefill``: a prompt chunk of ``--chunk`` queries after ``--cpu-prefix`` cached positions (bf16, no
compile), as the engine's prefill attends on a CPU with AVX-512 BF16 (``cpu_kernels/attention.cpp``) against
the path it replaced, torch's CPU flash attention (``is_causal`` SDPA for a first chunk, the chunk's keys and
the cached ones merged by log-sum-exp after it), the 194M benchmark model's heads and 7B's: ms per layer,
GFLOP/s (the causal products' 4·T·(prefix + T/2)·hd a head) and the ratio; each checked against float32 first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Peak HBM bandwidth (GB/s) by device-name fragment, from the vendors' data sheets; first match wins.
PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
             ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("A10G", 600),
             ("RTX 4090", 1008), ("RTX 3090", 936)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"


def peak_gbps(name: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def bench(fn: Callable[[], object]) -> float:
    """Milliseconds per call (median of do_bench's repetitions)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def table(title: str, header: Sequence[str], rows: List[Sequence[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def check(name: str, got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 2e-2) -> None:
    """Refuse to time a kernel whose result differs from PyTorch's by more than ``atol + rtol·|want|``."""
    excess = ((got.float() - want.float()).abs() - rtol * want.float().abs()).max().item()
    if not excess <= atol:
        raise SystemExit(f"{name}: the Triton result differs from PyTorch by {excess:.3g} beyond rtol {rtol} "
                         f"(> atol {atol}); not timing a wrong kernel")


# ----------------------------------------------------------------------------- prefill
def bench_prefill(dtype: torch.dtype, lengths: Sequence[int], sweep: bool) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from codellama.kernels.flash_attention import flash_attention
    B, H, hd = 1, 32, 128
    rows = []
    for T in lengths:
        q, k, v = (torch.randn(B, H, T, hd, device=DEVICE, dtype=dtype) for _ in range(3))
        flops = 4 * B * H * T * T * hd / 2  # QKᵀ and PV, half of the square under the causal mask

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        check(f"prefill T={T}", flash_attention(q, k, v, 0), sdpa(), atol=3e-2)
        t_sdpa, t_ours = bench(sdpa), bench(lambda: flash_attention(q, k, v, 0))
        best = []
        if sweep:
            configs = [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)]
            timed = []
            for bm, bn, w, s in configs:
                try:
                    timed.append((bench(lambda: flash_attention(q, k, v, 0, block_m=bm, block_n=bn, num_warps=w,
                                                                num_stages=s)), (bm, bn, w, s)))
                except Exception as e:  # out of shared memory / registers for this config
                    print(f"  skip config {(bm, bn, w, s)}: {type(e).__name__}", file=sys.stderr)
            t_best, cfg = min(timed)
            best = [f"{flops / t_best * 1e-9:.0f} @ {cfg}"]
        rows.append([f"{T:,}", f"{t_sdpa:.3f}", f"{flops / t_sdpa * 1e-9:.0f}", f"{t_ours:.3f}",
                     f"{flops / t_ours * 1e-9:.0f}", f"{t_sdpa / t_ours:.2f}×"] + best)
        del q, k, v
    header = ["tokens", "SDPA flash ms", "SDPA TFLOP/s", "Triton ms", "Triton TFLOP/s", "Triton / SDPA"]
    if sweep:
        header.append("best TFLOP/s @ (BM, BN, warps, stages)")
    table(f"Prefill: causal attention, batch {B}, {H} heads, head_dim {hd}, {str(dtype)[6:]}", header, rows)


# ----------------------------------------------------------------------------- decode
def bench_decode(dtype: torch.dtype, lengths: Sequence[int], peak: Optional[float], sweep: bool) -> None:
    from codellama.ops import TorchOps
    from codellama.kernels.decode_attention import decode_attention, decode_config
    hd = 128
    rows = []
    for label, H, Hkv in (("7B", 32, 32), ("34B", 64, 8)):
        for L in lengths:
            q = torch.randn(1, H, 1, hd, device=DEVICE, dtype=dtype)
            k, v = (torch.randn(1, Hkv, L, hd, device=DEVICE, dtype=dtype) for _ in range(2))
            nbytes = 2 * Hkv * L * hd * k.element_size()  # k and v, read once
            start = L - 1
            check(f"decode {label} L={L}", decode_attention(q, k, v, start), TorchOps.attention(q, k, v, start), atol=2e-2)
            t_sdpa = bench(lambda: TorchOps.attention(q, k, v, start))
            t_ours = bench(lambda: decode_attention(q, k, v, start))
            splits = decode_config(1, Hkv, L, hd, dtype, q.device)[0]
            gbps = nbytes / t_ours * 1e-6
            extra = []
            if sweep:
                timed = [(bench(lambda: decode_attention(q, k, v, start, num_splits=s, block_n=bn)), (s, bn))
                         for s in (8, 16, 32, 64, 128) for bn in (32, 64, 128)]
                t_best, cfg = min(timed)
                extra = [f"{nbytes / t_best * 1e-6:,.0f} @ {cfg}"]
            rows.append([label, f"{H}/{Hkv}", f"{L:,}", f"{t_sdpa * 1e3:.1f}", f"{t_ours * 1e3:.1f}", str(splits),
                         f"{gbps:,.0f}", pct(gbps / peak if peak else None), f"{t_sdpa / t_ours:.1f}×"] + extra)
            del q, k, v
    header = ["model", "heads", "cached tokens", "SDPA µs", "Triton µs", "splits", "Triton GB/s", "of peak", "speedup"]
    if sweep:
        header.append("best GB/s @ (splits, BLOCK_N)")
    table(f"Decode: one query, batch 1, head_dim {hd}, {str(dtype)[6:]}", header, rows)


# ----------------------------------------------------------------------------- CPU: the compiled decode step
def cpu_timed(fn: Callable, *args, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn(*args)`` over ``repeat`` calls after ``warmup`` (CPU: wall time)."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cpu_decode(dtype: torch.dtype, lengths: Sequence[int], batches: Sequence[int], repeat: int = 20) -> None:
    from codellama.ops import TorchOps

    def copies(q, k, v, pos):  # the eager path: float32 copies of the cache, then SDPA
        return TorchOps.attention(q.float(), k.float(), v.float(), pos).to(q.dtype)

    def timed(fn, *args) -> float:
        return cpu_timed(fn, *args, repeat=repeat)

    def over_layers(attend):
        return lambda q, pos, *kv: [attend(q, kv[i], kv[i + len(kv) // 2], pos) for i in range(len(kv) // 2)]

    hd, rows = 128, []
    with torch.inference_mode():
        for label, H in (("194M", 8), ("7B", 32)):
            for B in batches:
                for L in lengths:
                    per_layer = 2 * B * H * L * hd * dtype.itemsize
                    layers = max(1, min(10, 2**26 // per_layer))  # ≥ 64 MiB of caches, or 10 layers
                    g = torch.Generator().manual_seed(L)
                    ks, vs = ([torch.randn(B, H, L, hd, generator=g).to(dtype) for _ in range(layers)] for _ in "kv")
                    q = torch.randn(B, H, 1, hd, generator=g).to(dtype)
                    pos = torch.tensor([L - 1 - (b * L) // (2 * B) for b in range(B)])  # ragged: rows end apart
                    ours = torch.compile(over_layers(TorchOps.attention), dynamic=False)
                    base = torch.compile(over_layers(copies), dynamic=False)
                    want, got = base(q, pos, *ks, *vs)[0], ours(q, pos, *ks, *vs)[0]
                    err = (got.float() - want.float()).abs().max().item()
                    if not err <= 2 * torch.finfo(dtype).eps * want.float().abs().max().item() + 1e-6:
                        raise SystemExit(f"cpu decode {label} B={B} L={L}: results differ by {err:.3g}; not timing")
                    t_base, t_ours = timed(base, q, pos, *ks, *vs) / layers, timed(ours, q, pos, *ks, *vs) / layers
                    rows.append([label, f"{H}/{H}", str(B), f"{L:,}", f"{t_base * 1e6:,.0f}", f"{t_ours * 1e6:,.0f}",
                                 f"{per_layer / t_ours * 1e-9:.1f}", f"{t_base / t_ours:.2f}×"])
                    torch._dynamo.reset()
    table(f"CPU decode attention inside torch.compile, one layer, head_dim {hd}, {str(dtype)[6:]}, "
          f"{torch.get_num_threads()} threads",
          ["model", "heads", "rows", "cached tokens", "SDPA on float32 copies µs", "ours µs", "ours GB/s (k+v)",
           "speedup"], rows)


def bench_cpu_prefill(prefixes: Sequence[int], chunk: int, repeat: int = 5) -> None:
    from codellama import cpu_kernels, ops

    if cpu_kernels.native_isa("bf16") != 2:
        raise SystemExit(f"--cpu-prefill: the native prefill attention needs AVX-512 BF16; this CPU's kernels: "
                         f"{cpu_kernels.isa('bf16')}")

    def torchs(q, k, v, start):  # the path the native kernel replaced
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return ops._chunk_attention_cpu(q, k, v, start)

    hd, T, rows = 128, chunk, []
    with torch.inference_mode():
        for label, H in (("194M", 8), ("7B", 32)):
            for prefix in prefixes:
                g = torch.Generator().manual_seed(prefix)
                q = torch.randn(1, H, T, hd, generator=g).to(torch.bfloat16)
                k, v = (torch.randn(1, H, prefix + T, hd, generator=g).to(torch.bfloat16) for _ in "kv")
                native = ops._native_prefill_attention(q, k, v, prefix)
                want = ops.TorchOps.attention(q.float(), k.float(), v.float(), prefix)
                for name, got in (("native", native), ("torch", torchs(q, k, v, prefix))):
                    err = (got.float() - want).abs().max().item()
                    if not err <= 0.03:  # bf16 probabilities and output
                        raise SystemExit(f"cpu prefill {label} prefix {prefix}: {name} differs from float32 by "
                                         f"{err:.3g}; not timing")
                t_base = cpu_timed(torchs, q, k, v, prefix, repeat=repeat, warmup=1)
                t_ours = cpu_timed(ops._native_prefill_attention, q, k, v, prefix, repeat=repeat, warmup=1)
                flops = 4 * H * T * (prefix + T / 2) * hd
                rows.append([label, f"{H}/{H}", f"{prefix:,}", f"{T:,}", f"{t_base * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                             f"{flops / t_base * 1e-9:.0f}", f"{flops / t_ours * 1e-9:.0f}", f"{t_base / t_ours:.2f}×"])
    table(f"CPU prompt-chunk attention, one layer, head_dim {hd}, bf16, {torch.get_num_threads()} threads",
          ["model", "heads", "cached tokens", "chunk", "torch's flash ms", "native ms", "torch GFLOP/s",
           "native GFLOP/s", "speedup"], rows)


# ----------------------------------------------------------------------------- RMSNorm and RoPE
def bench_norm_rope(dtype: torch.dtype, peak: Optional[float], tokens: Sequence[int] = (1, 4096, 16384)) -> None:
    from codellama.model import rope_angles, rope_inv_freq
    from codellama.ops import TorchOps
    from codellama.kernels.rmsnorm import rms_norm
    from codellama.kernels.rope import rotary
    rows = []
    D = 4096
    for N in tokens:
        x = torch.randn(N, D, device=DEVICE, dtype=dtype)
        w = torch.randn(D, device=DEVICE, dtype=dtype)
        nbytes = 2 * x.numel() * x.element_size() + w.numel() * w.element_size()
        check(f"rmsnorm N={N}", rms_norm(x, w, 1e-5), TorchOps.rms_norm(x, w, 1e-5), atol=3e-2)
        t_torch, t_ours = bench(lambda: TorchOps.rms_norm(x, w, 1e-5)), bench(lambda: rms_norm(x, w, 1e-5))
        rows.append((f"RMSNorm ({N:,}, {D})", f"{t_torch * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                     f"{nbytes / t_ours * 1e-6:,.0f}", pct(nbytes / t_ours * 1e-6 / peak if peak else None),
                     f"{t_torch / t_ours:.1f}×"))
    for label, H, Hkv in (("7B", 32, 32), ("34B", 64, 8)):
        for T in tokens:
            q = torch.randn(1, T, H, 128, device=DEVICE, dtype=dtype)
            k = torch.randn(1, T, Hkv, 128, device=DEVICE, dtype=dtype)
            cos, sin = rope_angles(torch.arange(T, device=DEVICE)[None], rope_inv_freq(128, 1e6, DEVICE))
            nbytes = 2 * (q.numel() + k.numel()) * q.element_size() + 2 * cos.numel() * 4
            check(f"rope {label} T={T}", rotary(q, k, cos, sin)[0], TorchOps.rotary(q, k, cos, sin)[0], atol=3e-2)
            t_torch = bench(lambda: TorchOps.rotary(q, k, cos, sin))
            t_ours = bench(lambda: rotary(q, k, cos, sin))
            rows.append((f"RoPE {label} q+k, {T:,} tokens", f"{t_torch * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                         f"{nbytes / t_ours * 1e-6:,.0f}", pct(nbytes / t_ours * 1e-6 / peak if peak else None),
                         f"{t_torch / t_ours:.1f}×"))
    table(f"RMSNorm and RoPE, {str(dtype)[6:]}", ["op", "PyTorch µs", "Triton µs", "Triton GB/s", "of peak", "speedup"], rows)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("prefill", "decode", "norm"), action="append",
                        help="run only these tables (repeatable); default all")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--peak-gbps", type=float, default=None, help="HBM peak of this card, if not in the table")
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes / split counts")
    parser.add_argument("--cpu", action="store_true", help="the compiled CPU decode attention table instead")
    parser.add_argument("--cpu-lengths", type=int, nargs="+", default=[160, 512, 2048])
    parser.add_argument("--cpu-batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cpu-prefill", action="store_true", help="the CPU prompt-chunk attention table instead")
    parser.add_argument("--cpu-prefix", type=int, nargs="+", default=[0, 1536, 3584], help="cached positions")
    parser.add_argument("--chunk", type=int, default=512, help="queries a prompt chunk (the engine's default "
                        "max_tokens_per_step)")
    args = parser.parse_args(argv)

    if args.cpu_prefill:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
        bench_cpu_prefill(args.cpu_prefix, args.chunk)
        return

    if args.cpu:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
              f"{torch.backends.cpu.get_cpu_capability()}")
        bench_cpu_decode(DTYPES[args.dtype], args.cpu_lengths, args.cpu_batch)
        return

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("bench_attention.py: unset TRITON_INTERPRET; timings of Triton's CPU interpreter mean nothing")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU (none found here); on a CPU there is nothing to measure")
    import triton

    from codellama.kernels import triton_available
    ok, why = triton_available()
    if not ok:
        raise SystemExit(f"bench_attention.py: the Triton kernels cannot run here: {why}")
    name = torch.cuda.get_device_name()
    peak = peak_gbps(name, args.peak_gbps)
    dtype = DTYPES[args.dtype]
    print(f"device: {name} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), HBM peak "
          f"{'%g GB/s' % peak if peak else 'unknown (pass --peak-gbps)'}; torch {torch.__version__}, "
          f"triton {triton.__version__}, CUDA {torch.version.cuda}")
    only = set(args.only or ("prefill", "decode", "norm"))
    torch.manual_seed(0)
    if "prefill" in only:
        bench_prefill(dtype, args.prefill_lengths, args.sweep)
    if "decode" in only:
        bench_decode(dtype, args.decode_lengths, peak, args.sweep)
    if "norm" in only:
        bench_norm_rope(dtype, peak)


if __name__ == "__main__":
    main()

"""Everything this library should show on a GPU, in one prepared command (at most ~8 minutes on an H100/H200).

    python benchmarks/gpu_suite.py --out gpu_report                 # on the GPU machine
    python benchmarks/gpu_suite.py --dry-run --out /tmp/dry          # on a CPU: tiny shapes, same code paths
    python benchmarks/gpu_suite.py --skip long engine                # leave sections out

Sections, in order of value; each prints its figures as soon as it has them and appends them to
OUT/gpu_suite.md (Markdown that benchmarks/RESULTS.md can take as is) and OUT/gpu_suite.json, so a run cut
short still reports what it measured:

  kernels    bf16/fp16 results of every Triton kernel against its float64 reference at real shapes
             (7B, 34B GQA and 70B heads; 1, 1k and 16k tokens; ragged rows)
  decode     tokens/s at batch 1 and 8 of a 7B-shaped random bf16 model: eager PyTorch (SDPA) attention,
             eager Triton, compiled (CUDA graphs), int8 and int4 weights; as a fraction of the memory
             bandwidth measured in the same run (a large copy)
  attention  prefill TFLOP/s of the flash kernel against SDPA's flash backend (4k, 16k); split-KV decode
             attention against SDPA (32k, 100k)
  long       a 7B-shaped model prefills a 100,000-token prompt in chunks and decodes 32 tokens: peak memory
             against the plan (weights + KV cache + a chunk's activations) and the time
  engine     the engine under 32 concurrent requests: aggregate tokens/s

Nothing is installed and nothing is downloaded: random weights of the real shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_attention import peak_gbps  # noqa: E402  (the table of known cards)

from codellama import ModelArgs  # noqa: E402
from codellama.model import rope_angles, rope_inv_freq  # noqa: E402

SECTIONS = ("kernels", "decode", "attention", "long", "engine")
SEVEN_B = dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.0, vocab_size=32016,
               rope_theta=1e6)


@dataclass
class Scale:
    """The shapes of a run: the real ones on a GPU, tiny ones for the dry run on a CPU."""

    device: str
    dtypes: List[torch.dtype]
    model: Dict
    heads: Dict[str, tuple]  # label → (query heads, kv heads, head_dim)
    kernel_lengths: List[int]
    prefill_lengths: List[int]
    decode_lengths: List[int]
    long_tokens: int
    long_chunk: int
    engine_requests: int
    new_tokens: int


def scale_for(dry_run: bool) -> Scale:
    if dry_run:  # Triton's interpreter: small shapes, fp16/fp32 (its bf16 tl.dot is wrong)
        return Scale("cpu", [torch.float16, torch.float32],
                     dict(dim=64, n_layers=2, n_heads=4, multiple_of=16, vocab_size=512, rope_theta=1e6),
                     {"7B-like": (4, 4, 16), "GQA": (4, 2, 16)}, [1, 16, 40], [32, 64], [64, 128], 256, 64, 4, 8)
    return Scale("cuda", [torch.bfloat16, torch.float16], SEVEN_B,
                 {"7B": (32, 32, 128), "34B": (64, 8, 128), "70B": (64, 8, 128)}, [1, 1024, 16384],
                 [4096, 16384], [32768, 100000], 100_000, 8192, 32, 64)


class Report:
    """Figures as they come: printed, appended to the Markdown file and the JSON list."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.md_path, self.json_path = os.path.join(out_dir, "gpu_suite.md"), os.path.join(out_dir, "gpu_suite.json")
        self.records: List[Dict] = []
        open(self.md_path, "w").close()

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        with open(self.md_path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def table(self, title: str, header: List[str]) -> None:
        self.line(f"\n### {title}\n")
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "|".join("---" for _ in header) + "|")

    def row(self, section: str, cells: List[str], **figures) -> None:
        self.line("| " + " | ".join(cells) + " |")
        self.records.append({"section": section, **figures})
        with open(self.json_path, "w", encoding="utf-8") as f:
            json.dump(self.records, f, indent=1)


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Seconds per call: Triton's do_bench on CUDA, a short wall-clock loop on the CPU."""
    if device == "cuda":
        from triton.testing import do_bench
        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3

    def cpu(fn):
        fn()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        return (time.perf_counter() - start) / 3
    return cpu


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- kernels
def excess(got: torch.Tensor, want: torch.Tensor, rtol: float) -> float:
    """How far ``got`` is outside ``rtol·|want|`` of the float64 reference (≤ atol passes)."""
    return ((got.double() - want).abs() - rtol * want.abs()).max().item()


def section_kernels(s: Scale, report: Report) -> None:
    from codellama.kernels.decode_attention import decode_attention
    from codellama.kernels.flash_attention import attention_reference, flash_attention
    from codellama.kernels.rmsnorm import rms_norm, rms_norm_reference
    from codellama.kernels.rope import rotary, rotary_reference
    report.table("Triton kernels against float64 references", ["kernel", "heads", "tokens", "dtype", "max excess",
                                                               "atol", "ok"])
    g = torch.Generator(device=s.device).manual_seed(0)
    rnd = lambda *shape, dtype: torch.randn(*shape, generator=g, device=s.device).to(dtype)  # noqa: E731
    for dtype in s.dtypes:
        tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
        name = str(dtype).removeprefix("torch.")

        def record(kernel, label, tokens, err):
            report.row("kernels", [kernel, label, f"{tokens:,}", name, f"{err:.2e}", f"{tol:g}",
                                   "yes" if err <= tol else "**NO**"],
                       kernel=kernel, heads=label, tokens=tokens, dtype=name, excess=err, atol=tol, ok=err <= tol)

        for label, (H, Hkv, hd) in s.heads.items():
            D = H * hd
            for T in s.kernel_lengths:
                x, w = rnd(T, D, dtype=dtype), rnd(D, dtype=dtype)
                record("rms_norm", label, T, excess(rms_norm(x, w, 1e-5), rms_norm_reference(x.double(), w.double(), 1e-5), 1e-2))
                q, k = rnd(1, T, H, hd, dtype=dtype), rnd(1, T, Hkv, hd, dtype=dtype)
                cos, sin = rope_angles(torch.arange(T, device=s.device) + 3, rope_inv_freq(hd, 1e6, s.device))
                got = rotary(q, k, cos[None], sin[None])
                want = rotary_reference(q.double(), k.double(), cos[None].double(), sin[None].double())
                record("rotary", label, T, max(excess(a, b, 1e-2) for a, b in zip(got, want)))
                L = T + 7  # a prefix already cached: attention at start_pos = 7
                q = rnd(1, H, T, hd, dtype=dtype)
                k, v = rnd(1, Hkv, L, hd, dtype=dtype), rnd(1, Hkv, L, hd, dtype=dtype)
                rows = slice(max(0, T - 64), T)  # the float64 reference on the last query rows only
                if T > 1:
                    got = flash_attention(q, k, v, 7)[:, :, rows]
                    want = attention_reference(q[:, :, rows].double(), k.double(), v.double(), 7 + rows.start)
                    record("flash_attention", label, T, excess(got, want, 1e-2))
                else:
                    starts = torch.tensor([L - 1, L // 2, 3], device=s.device)  # ragged rows of one batch
                    qb, kb, vb = q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1)
                    got = decode_attention(qb.contiguous(), kb.contiguous(), vb.contiguous(), starts)
                    want = attention_reference(qb.double(), kb.double(), vb.double(), starts)
                    record("decode_attention (ragged)", label, L, excess(got, want, 1e-2))
                del x, q, k, v


# ----------------------------------------------------------------------------- decode speed
def random_llm(margs: ModelArgs, dtype: torch.dtype, device: str, attention: str = "auto"):
    """A model of ``margs``' shape with random weights made on the device (no host copy, no download)."""
    from codellama.checkpoint import build_on_meta, default_transforms
    model = build_on_meta(margs)
    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for key, t in model.state_dict().items():
        w = torch.randn(t.shape, generator=g, device=device, dtype=torch.float32)
        state[key] = (1 + 0.1 * w if key.endswith("norm.weight") else w / t.shape[-1] ** 0.5).to(dtype)
        del w
    model.load_state_dict(state, assign=True, strict=True)
    for transform in default_transforms(torch.device(device)):
        model = transform(model)
    model.set_attention(attention)
    return model.eval()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes/s of a large device copy (read + write): the practical bandwidth limit of decoding."""
    x = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    y = torch.empty_like(x)
    t = timer(device)(lambda: y.copy_(x))
    del x, y
    return 2 * nbytes / t


def decode_rate(engine, prompts: List[List[int]], new_tokens: int) -> float:
    """Aggregate decode tokens/s of ``prompts`` submitted at once."""
    from codellama.engine import SamplingParams
    requests = [engine.submit(p, SamplingParams(temperature=0, max_tokens=new_tokens)) for p in prompts]
    for r in requests:
        r.result()
    tokens = sum(len(r.tokens) - 1 for r in requests)
    return tokens / (max(r.finished_at for r in requests) - min(r.first_token_at for r in requests))


def section_decode(s: Scale, report: Report) -> None:
    from codellama.engine import Engine
    margs = ModelArgs(**s.model)
    dtype = s.dtypes[0]
    bw = copy_bandwidth(s.device, 2**32 if s.device == "cuda" else 2**26)
    peak = peak_gbps(torch.cuda.get_device_name(), None) if s.device == "cuda" else None
    report.line(f"\nCopy bandwidth measured: {bw / 1e9:,.0f} GB/s" + (f" (data sheet peak {peak:,} GB/s)" if peak else ""))
    report.table(f"Decode, {margs.num_params() / 1e9:.3g}B-parameter random model, {str(dtype)[6:]}",
                 ["variant", "batch", "tok/s", "bytes/token", "of copy bandwidth"])
    variants = [("eager, PyTorch SDPA attention", dict(attention="torch")), ("eager, Triton kernels", dict(attention="triton")),
                ("compiled step (CUDA graphs)", dict(compile=True)), ("int8 weights", dict(quantize="int8")),
                ("int4 weights", dict(quantize="int4"))]
    prompt_len = 128
    for label, opts in variants:
        try:
            model = random_llm(margs, dtype, s.device, opts.get("attention", "auto"))
            if "quantize" in opts:
                from codellama.quantize import quantize_model
                model = quantize_model(model, opts["quantize"])
        except (ImportError, ValueError, RuntimeError) as e:
            report.line(f"| {label} | | skipped: {type(e).__name__}: {str(e)[:80]} | | |")
            continue
        weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        weight_bytes -= model.tok_embeddings.weight.numel() * model.tok_embeddings.weight.element_size()
        for batch in (1, 8):
            engine = Engine(model, max_batch_size=batch, max_seq_len=prompt_len + s.new_tokens + 8,
                            compile=opts.get("compile", False))
            prompts = [[1] + list(range(3 + i, 3 + i + prompt_len - 1)) for i in range(batch)]
            decode_rate(engine, [p[:-1] + [7] for p in prompts], 4)  # warm-up (and compilation)
            rate = decode_rate(engine, prompts, s.new_tokens)
            kv = batch * (prompt_len + s.new_tokens / 2) * engine.cache_bytes / engine.max_seq_len / batch
            per_token = (weight_bytes + kv) / batch
            report.row("decode", [label, str(batch), f"{rate:,.1f}", f"{per_token / 1e6:,.3g} MB",
                                  f"{rate * per_token / bw:.0%}"],
                       variant=label, batch=batch, tokens_per_s=rate, bytes_per_token=per_token,
                       fraction_of_bandwidth=rate * per_token / bw)
            del engine
        del model
        if s.device == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- attention speed
def section_attention(s: Scale, report: Report) -> None:
    import torch.nn.functional as F

    from codellama.kernels.decode_attention import decode_attention
    from codellama.kernels.flash_attention import flash_attention
    from codellama.ops import TorchOps
    H, Hkv, hd = next(iter(s.heads.values()))
    dtype = s.dtypes[0]
    bench = timer(s.device)
    report.table(f"Prefill attention, causal, {H} heads of {hd}, {str(dtype)[6:]}",
                 ["tokens", "SDPA TFLOP/s", "Triton TFLOP/s", "Triton / SDPA"])
    for T in s.prefill_lengths:
        q, k, v = (torch.randn(1, H, T, hd, device=s.device, dtype=dtype) for _ in range(3))
        flops = 4 * H * T * T * hd / 2

        def sdpa():
            if s.device == "cuda":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        t_sdpa, t_ours = bench(sdpa), bench(lambda: flash_attention(q, k, v, 0))
        report.row("attention", [f"{T:,}", f"{flops / t_sdpa / 1e12:.1f}", f"{flops / t_ours / 1e12:.1f}",
                                 f"{t_sdpa / t_ours:.2f}×"], kind="prefill", tokens=T, sdpa_s=t_sdpa, triton_s=t_ours)
        del q, k, v
    report.table(f"Decode attention, batch 1, {H}/{Hkv} heads, {str(dtype)[6:]}",
                 ["cached tokens", "SDPA µs", "Triton split-KV µs", "GB/s", "speed-up"])
    for L in s.decode_lengths:
        q = torch.randn(1, H, 1, hd, device=s.device, dtype=dtype)
        k, v = (torch.randn(1, Hkv, L, hd, device=s.device, dtype=dtype) for _ in range(2))
        t_sdpa = bench(lambda: TorchOps.attention(q, k, v, L - 1))
        t_ours = bench(lambda: decode_attention(q, k, v, L - 1))
        gbps = 2 * Hkv * L * hd * k.element_size() / t_ours / 1e9
        report.row("attention", [f"{L:,}", f"{t_sdpa * 1e6:,.0f}", f"{t_ours * 1e6:,.0f}", f"{gbps:,.0f}",
                                 f"{t_sdpa / t_ours:.1f}×"], kind="decode", tokens=L, sdpa_s=t_sdpa, triton_s=t_ours)
        del q, k, v


# ----------------------------------------------------------------------------- 100k tokens
def planned_bytes(margs: ModelArgs, dtype: torch.dtype, tokens: int, chunk: int) -> Dict[str, int]:
    """The memory plan of a chunked prefill: weights, the KV cache, and the largest activation of a chunk
    (the SwiGLU's two hidden projections and their product, the embeddings in and out)."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = margs.num_params() * size
    kv = 2 * margs.n_layers * margs.kv_heads * margs.head_dim * size * tokens
    act = chunk * (3 * margs.hidden_dim + 4 * margs.dim) * size + chunk * 4 * margs.dim * 4  # + fp32 norms / RoPE
    return {"weights": weights, "kv_cache": kv, "activations": act, "total": weights + kv + act}


def section_long(s: Scale, report: Report) -> None:
    margs = ModelArgs(**s.model)
    dtype = s.dtypes[0]
    tokens, chunk = s.long_tokens, s.long_chunk
    plan = planned_bytes(margs, dtype, tokens + 32, chunk)
    model = random_llm(margs, dtype, s.device)
    model.setup_cache(1, tokens + 32)
    prompt = torch.randint(3, margs.vocab_size, (1, tokens), device=s.device)
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, tokens, chunk):
            logits = model(prompt[:, i:i + chunk], i, logits_index=-1)
        sync(s.device)
        prefill_s = time.perf_counter() - start
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for p in range(tokens, tokens + 32):
            nxt = model(nxt, p)[:, -1].argmax(-1, keepdim=True)
        sync(s.device)
        decode_s = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if s.device == "cuda" else None
    report.table(f"{tokens:,} tokens on one device ({margs.num_params() / 1e9:.3g}B parameters, {str(dtype)[6:]}, "
                 f"chunks of {chunk:,})", ["planned GiB (weights + KV + chunk)", "peak GiB", "prefill s",
                                           "decode tok/s"])
    gib = lambda b: f"{b / 2**30:,.3g}" if b is not None else "n/a"  # noqa: E731
    report.row("long", [f"{gib(plan['total'])} ({gib(plan['weights'])} + {gib(plan['kv_cache'])} + "
                        f"{gib(plan['activations'])})", gib(peak), f"{prefill_s:.1f}", f"{32 / decode_s:.1f}"],
               tokens=tokens, planned=plan, peak_bytes=peak, prefill_s=prefill_s, decode_s=decode_s)
    model.clear_cache()
    del model


# ----------------------------------------------------------------------------- engine
def section_engine(s: Scale, report: Report) -> None:
    from codellama.engine import Engine
    margs = ModelArgs(**s.model)
    model = random_llm(margs, s.dtypes[0], s.device)
    n = s.engine_requests
    engine = Engine(model, max_batch_size=n, max_seq_len=512)
    prompts = [[1] + [(7 * i + j) % (margs.vocab_size - 3) + 3 for j in range(100 + 5 * i)] for i in range(n)]
    decode_rate(engine, prompts[:2], 4)  # warm-up
    threads = []
    start = time.perf_counter()
    results = []

    def client(p):
        from codellama.engine import SamplingParams
        results.append(engine.submit(p, SamplingParams(temperature=0, max_tokens=s.new_tokens)).result())

    for p in prompts:
        threads.append(threading.Thread(target=client, args=(p,)))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in results)
    ttft = statistics.median(r.first_token_at - r.submitted for r in results)
    report.table(f"Engine, {n} concurrent requests of {s.new_tokens} tokens", ["aggregate tok/s",
                                                                             "median time to first token s"])
    report.row("engine", [f"{tokens / wall:,.1f}", f"{ttft:.2f}"], requests=n, tokens_per_s=tokens / wall,
               median_ttft_s=ttft)
    del engine, model


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_report", help="directory for gpu_suite.md and gpu_suite.json")
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    elif not torch.cuda.is_available():
        print("gpu_suite.py: no CUDA GPU here; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    s = scale_for(a.dry_run)
    report = Report(a.out)
    where = "CPU dry run" if a.dry_run else torch.cuda.get_device_name()
    report.line(f"## GPU suite: {where}\n\ntorch {torch.__version__}" + (
        "" if a.dry_run else f", CUDA {torch.version.cuda}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"))
    runners = {"kernels": section_kernels, "decode": section_decode, "attention": section_attention,
               "long": section_long, "engine": section_engine}
    failed = []
    for name in SECTIONS:
        if name in a.skip:
            continue
        start = time.perf_counter()
        try:
            runners[name](s, report)
        except Exception as e:  # one section's failure must not cost the others' figures
            failed.append(name)
            report.line(f"\n**{name} failed**: {type(e).__name__}: {e}")
        report.line(f"\n_{name}: {time.perf_counter() - start:.0f} s_")
        if s.device == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Weight-only quantization on CPU: decode speed against this library's fp32 and llama.cpp on the same weights,
and accuracy against fp32 on random models with Code Llama 7B's proportions.

    python benchmarks/bench_quant.py                  # speed, the 194M-parameter model of bench_generate.py
    python benchmarks/bench_quant.py --accuracy       # max logit error, greedy agreement over 256 steps
    python benchmarks/bench_quant.py --formats        # int4 g32/g64/g128 against llama.cpp's Q4_0 and Q4_1
    python benchmarks/bench_quant.py --batch 1 --schemes bf16 int8
    python benchmarks/bench_quant.py --compile --batch 1  # the compiled decode step (Llama(compile=True))

**Speed.** Decode tokens/s at batch 1 and 8 (greedy, 128-token prompts, 32 new tokens; (time for N tokens −
time for 1) / (N − 1), each through the library's ``Llama.generate``), for fp32, bf16, int8 and int4 g32
(activations bf16; the output layer in bf16 unless "+out", "+out8": in int8), against this library's fp32 in the same run
and, when ``llama-cpp-python`` is installed (a test-only peer, never a dependency), against llama.cpp on
the same weights: written as an F32 GGUF file with the ``gguf`` package (``gguf_export.py``), and
quantized by llama.cpp's own quantizer (BF16, Q8_0, Q4_0; its Q4_0 keeps the output layer in
Q6_K). Pairs: fp32 ↔ F32, bf16 ↔ BF16, int8 ↔ Q8_0, int4 ↔ Q4_0; the two are timed in alternating rounds
and the ratio is the median of the rounds' ratios. "util" is the bytes one decode step
reads (every weight but the embedding, in its stored format, plus the KV cache) per second over the
machine's read bandwidth, measured in the same run (the best of a few streaming reads).

**Accuracy.** For random models of 7B's proportions (vocab and head_dim kept, scaled down), fp32 greedily
generates 256 tokens; each scheme is then run over the same tokens: the largest logit error (over the
largest fp32 logit) and the fraction of the 256 positions where its argmax is fp32's.

**int4 formats** (``--formats``): this library's int4 (a scale and a zero per group of 32, 64 or 128 inputs)
against llama.cpp's 4-bit formats of blocks of 32, Q4_0 (one fp16 scale, symmetric) and Q4_1 (an fp16 scale and
an fp16 minimum), quantized by the ``gguf`` package's reference quantizers (llama.cpp's own ``quantize_row_*_ref``
in numpy). Each format replaces weights by the values its codes stand for (fake quantization, computed in fp32):
bits a weight; the relative error (Frobenius norm) on a Gaussian matrix and on a heavy-tailed one (Student's t,
4 degrees of freedom; trained weights have heavier tails than Gaussian ones); and the bundled model's bits per
byte on its held-out files (``training/evaluate_tiny.py``), every linear layer but the output in the format.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # training/ (--formats)
from bench_generate import SIZES, _Vocab, timed  # noqa: E402
from gguf_export import write_gguf  # noqa: E402

from codellama import Llama, ModelArgs  # noqa: E402
from codellama.checkpoint import default_transforms  # noqa: E402
from codellama.cpu import bf16_path, pack_weight  # noqa: E402
from codellama.quantize import QuantConfig, quantize_model  # noqa: E402
from codellama.testing import random_model  # noqa: E402

# name → (model dtype, quantization): what each row of the table runs
SCHEMES: Dict[str, Tuple[torch.dtype, Optional[QuantConfig]]] = {
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.bfloat16, QuantConfig("int8")),
    "int8+out": (torch.bfloat16, QuantConfig("int8", include_output=True)),
    "int4": (torch.bfloat16, QuantConfig("int4", 32)),
    "int4+out": (torch.bfloat16, QuantConfig("int4", 32, include_output=True)),
    "int4+out8": (torch.bfloat16, QuantConfig("int4", 32, include_output=True, output_scheme="int8")),
}
LLAMA_CPP = {"fp32": "F32", "bf16": "BF16", "int8": "Q8_0", "int8+out": "Q8_0", "int4": "Q4_0", "int4+out": "Q4_0",
             "int4+out8": "Q4_0"}
LLAMA_FTYPES = {"BF16": 32, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


# ----------------------------------------------------------------------------- this library
def build(args: ModelArgs, scheme: str, seed: int = 0, compiled_rows: Optional[int] = None):
    """The random model as ``load_model`` would give it on CPU for this scheme (and for a compiled decode step of
    ``compiled_rows`` rows, as ``Llama.build(compile=True)`` lays it out)."""
    dtype, config = SCHEMES[scheme]
    model = quantize_model(random_model(args, seed=seed, dtype=dtype), config)
    for transform in default_transforms(torch.device("cpu"), compiled_decode_rows=compiled_rows):
        model = transform(model)
    return model


class Ours:
    """``Llama.generate`` on a model, one greedy row per prompt; ``step_seconds()`` times one decode step."""

    def __init__(self, model, prompts: List[List[int]], new_tokens: int, compile: bool = False):
        self.llama = Llama(model, _Vocab(model.args.vocab_size), max_seq_len=len(prompts[0]) + new_tokens + 1,
                           max_batch_size=len(prompts), compile=compile)
        self.prompts, self.new_tokens = prompts, new_tokens
        self.gen(new_tokens)  # warm-up (and the prompt's KV cache, reused by every later call)

    def gen(self, n: int) -> float:
        start = time.perf_counter()
        self.llama.generate(self.prompts, n, temperature=0, stop_token=[])
        return time.perf_counter() - start

    def step_seconds(self) -> float:
        """(time for N tokens − time for 1) / (N − 1): decode steps only, prefill excluded."""
        return (self.gen(self.new_tokens) - self.gen(1)) / (self.new_tokens - 1)


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every tensor of ``state_dict`` but the embedding."""
    return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if not k.startswith("tok_embeddings"))


def read_bandwidth(repeat: int = 5) -> float:
    """Bytes/s of the fastest plain streaming read here: sums of 1 GiB (fp32, bf16), and oneDNN's matrix–vector
    product over a 512 MiB fp32 matrix (what the fp32 decode step runs)."""
    def summed(dtype: torch.dtype) -> float:
        buf = torch.ones(2**30 // dtype.itemsize, dtype=dtype)
        return 2**30 / timed(lambda: buf.sum(), repeat)

    w, x = pack_weight(torch.randn(8192, 16384)), torch.randn(1, 16384)
    matvec = 2**29 / timed(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), repeat)
    return max(summed(torch.float32), summed(torch.bfloat16), matvec)


# ----------------------------------------------------------------------------- llama.cpp on the same weights
def llama_cpp_quantize(src: str, dst: str, kind: str) -> None:
    """``kind`` (BF16, Q8_0, Q4_0) of an F32 GGUF file, by llama.cpp's own quantizer."""
    import llama_cpp
    llama_cpp.llama_log_set(_quiet_logs(), ctypes.c_void_p())
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[kind]
    params.nthread = torch.get_num_threads()
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")


class LlamaCpp:
    """A GGUF model in llama.cpp through llama-cpp-python's C API, with one sequence per prompt row."""

    def __init__(self, path: str, batch: int, max_len: int, threads: int):
        import llama_cpp
        self.lib = llama_cpp
        llama_cpp.llama_log_set(_quiet_logs(), ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = batch * max_len, 512, 512, batch
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(512, 0, batch)
        self._prompts: List[List[int]] = []  # what ``greedy`` last prefilled, and the first token of each row
        self._first: List[int] = []

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def _decode(self, items: List[Tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) items."""
        b = self.batch
        b.n_tokens = len(items)
        for j, (token, pos, seq, logits) in enumerate(items):
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = token, pos, 1, logits
            b.seq_id[j][0] = seq
        if self.lib.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def prefill(self, prompt: List[int]) -> None:
        """One prompt's prefill into an emptied cache (as a new request's, nothing reused)."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self._prompts, self._first = [], []
        self._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])

    def _argmax(self, index: int) -> int:
        import numpy as np
        return int(np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, index), shape=(self.vocab,)).argmax())

    def greedy(self, prompts: List[List[int]], n: int) -> Tuple[List[List[int]], float]:
        """``n`` greedy tokens of every row, and the seconds of the ``n - 1`` decode steps after the prefill.
        The prompts of the last call stay cached: called again with them, only what it decoded is dropped."""
        memory = self.lib.llama_get_memory(self.ctx)
        if prompts == self._prompts:
            for s, p in enumerate(prompts):
                self.lib.llama_memory_seq_rm(memory, s, len(p), -1)
            out = [[t] for t in self._first]
        else:
            self.lib.llama_memory_clear(memory, True)
            out = []
            for s, p in enumerate(prompts):  # each row's prefill gives its first token
                self._decode([(t, i, s, i == len(p) - 1) for i, t in enumerate(p)])
                out.append([self._argmax(-1)])
            self._prompts, self._first = [list(p) for p in prompts], [row[0] for row in out]
        start = time.perf_counter()
        for step in range(1, n):  # then all rows together, one token each
            self._decode([(row[-1], len(p) + step - 1, s, True) for s, (p, row) in enumerate(zip(prompts, out))])
            for s, row in enumerate(out):
                row.append(self._argmax(s))
        return out, time.perf_counter() - start

    def step_seconds(self, prompts: List[List[int]], n: int) -> float:
        """Seconds of one decode step, from ``n`` greedy tokens of every row."""
        return self.greedy(prompts, n)[1] / (n - 1)


_QUIET = None


def _quiet_logs():
    """llama.cpp's log callback that drops everything (its loader prints hundreds of lines)."""
    import llama_cpp
    global _QUIET
    if _QUIET is None:
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, data: None)
    return _QUIET


def llama_cpp_files(model, workdir: str) -> Dict[str, str]:
    """The model as GGUF files for llama.cpp: F32 written from its state dict, BF16/Q8_0/Q4_0 by llama.cpp's quantizer."""
    files = {"F32": os.path.join(workdir, "f32.gguf")}
    write_gguf(files["F32"], {k: v.float() for k, v in model.state_dict().items()}, model.args)
    for kind in LLAMA_FTYPES:
        files[kind] = os.path.join(workdir, f"{kind.lower()}.gguf")
        llama_cpp_quantize(files["F32"], files[kind], kind)
    return files


def gguf_weight_bytes(path: str) -> int:
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


# ----------------------------------------------------------------------------- speed
def speed(a) -> None:
    args = ModelArgs(**SIZES[a.size])
    bw = read_bandwidth()
    flags = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")
             if f in open("/proc/cpuinfo").read().split()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()} ({' '.join(flags)}); bf16 linear layers: {bf16_path()}")
    print(f"model: {args.num_params() / 1e6:.0f}M parameters ({a.size}); read bandwidth {bw / 1e9:.1f} GB/s; "
          f"ours decodes with the {'compiled' if a.compile else 'eager'} step")
    kv_per_token = 2 * args.n_layers * args.kv_heads * args.head_dim
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
        have_peer = True
    except ImportError as e:
        print(f"skipping llama.cpp: {e.name} is not installed (pip install llama-cpp-python gguf)")
        have_peer = False
    with tempfile.TemporaryDirectory() as workdir:
        files = llama_cpp_files(build(args, "fp32"), workdir) if have_peer else {}
        print("\n| weights | batch | bytes/step | tok/s | vs fp32 | util | llama.cpp | bytes/step | tok/s | util "
              "| ours / llama.cpp |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for batch in a.batch:
            g = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, args.vocab_size, (batch, a.prompt_len), generator=g).tolist()
            kv = kv_per_token * batch * (a.prompt_len + a.new_tokens / 2)
            base = None
            for scheme in a.schemes:
                model = build(args, scheme, compiled_rows=batch if a.compile else None)
                step_bytes = weight_bytes(model) + kv * SCHEMES[scheme][0].itemsize
                ours = Ours(model, prompts, a.new_tokens, compile=a.compile)
                kind = LLAMA_CPP[scheme] if LLAMA_CPP[scheme] in files else None
                peer = LlamaCpp(files[kind], batch, a.prompt_len + a.new_tokens + 8, torch.get_num_threads()) if kind else None
                if peer:
                    peer.step_seconds(prompts, 4)  # warm-up
                # Rounds alternate the two libraries, so a slow stretch of this shared machine hits both alike.
                times = [(ours.step_seconds(), peer.step_seconds(prompts, a.new_tokens) if peer else None)
                         for _ in range(a.repeat)]
                rate = batch / statistics.median(t for t, _ in times)
                base = rate if scheme == "fp32" else base
                vs_fp32 = f"{rate / base:.2f}×" if base else ""
                row = (f"| {scheme} | {batch} | {step_bytes / 1e6:.0f} MB | {rate:.1f} | {vs_fp32} | "
                       f"{step_bytes * rate / batch / bw:.0%} |")
                if peer:
                    peer.close()
                    theirs = batch / statistics.median(t for _, t in times)
                    ratio = statistics.median(t_peer / t_ours for t_ours, t_peer in times)
                    peer_bytes = gguf_weight_bytes(files[kind]) + kv * (4 if kind == "F32" else 2)
                    row += (f" {kind} | {peer_bytes / 1e6:.0f} MB | {theirs:.1f} | {peer_bytes * theirs / batch / bw:.0%} "
                            f"| **{ratio:.2f}×** |")
                else:
                    row += " | | | | |"
                print(row, flush=True)
                del model, ours
        if have_peer:
            check_same_weights(build(args, "fp32"), files["F32"], a.prompt_len)


def check_same_weights(model, f32_path: str, prompt_len: int, n: int = 16) -> None:
    """Our fp32 and llama.cpp's F32 should agree on greedy tokens (the conversion is right)."""
    prompt = torch.randint(3, model.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(7)).tolist()
    llama = Llama(model, _Vocab(model.args.vocab_size), max_seq_len=prompt_len + n + 1, max_batch_size=1)
    ours = llama.generate([prompt], n, temperature=0, stop_token=[])[0][0]
    peer = LlamaCpp(f32_path, 1, prompt_len + n + 8, torch.get_num_threads())
    theirs = peer.greedy([prompt], n)[0][0]
    peer.close()
    same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), n)
    print(f"\nsame weights: our fp32 and llama.cpp F32 agree on the first {same} of {n} greedy tokens")


# ----------------------------------------------------------------------------- accuracy
ACCURACY_SIZES = {  # Code Llama 7B's proportions (dim / layers / heads scaled together; vocab and head_dim kept)
    "7b/16": dict(dim=256, n_layers=4, n_heads=2, multiple_of=64, vocab_size=32016, rope_theta=1e6),
    "7b/4": dict(dim=1024, n_layers=8, n_heads=8, multiple_of=256, vocab_size=32016, rope_theta=1e6),
}


@torch.inference_mode()
def accuracy(a) -> None:
    print("| model | weights | max logit error / max logit | argmax = fp32's, 256 positions |")
    print("|---|---|---|---|")
    for size, spec in ACCURACY_SIZES.items():
        args = ModelArgs(**spec)
        reference = build(args, "fp32", seed=1)
        prompt = torch.randint(3, args.vocab_size, (16,), generator=torch.Generator().manual_seed(2)).tolist()
        llama = Llama(reference, _Vocab(args.vocab_size), max_seq_len=16 + a.steps + 1, max_batch_size=1)
        tokens = torch.tensor([prompt + llama.generate([prompt], a.steps, temperature=0, stop_token=[])[0][0]])
        expected = reference(tokens)[0, 15:-1]  # (steps, V): the logits that chose each generated token
        for scheme in (s for s in a.schemes if s != "fp32"):
            got = build(args, scheme, seed=1)(tokens)[0, 15:-1].float()
            err = (got - expected).abs().max() / expected.abs().max()
            agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
            print(f"| {size} ({args.num_params() / 1e6:.0f}M) | {scheme} | {err:.3f} | {agree:.1%} |", flush=True)


# ----------------------------------------------------------------------------- int4 formats
def int4_formats() -> Dict[str, Tuple[float, Callable[[torch.Tensor], torch.Tensor]]]:
    """name → (bits a weight, weight (out, in) fp32 → the values its codes stand for): this library's int4 group
    sizes and llama.cpp's Q4_0 / Q4_1 (the ``gguf`` package's reference quantizers)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    from codellama.quantize import GROUP_SIZES, dequantize_int4, quantize_int4

    def ours(group: int):
        return lambda w: dequantize_int4(*quantize_int4(w, group, torch.bfloat16), dtype=torch.float32)[:, :w.shape[1]]

    def llama_cpp(kind: GGMLQuantizationType):
        return lambda w: torch.from_numpy(quants.dequantize(quants.quantize(w.float().numpy(), kind), kind))

    table = {f"int4 g{g}": (4 + 2 * 16 / g, ours(g)) for g in GROUP_SIZES}  # bf16 scale and zero a group
    for kind in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1):
        block, size = GGML_QUANT_SIZES[kind]
        table[kind.name] = (size * 8 / block, llama_cpp(kind))
    return table


def relative_error(approx: torch.Tensor, w: torch.Tensor) -> float:
    return float((approx - w).norm() / w.norm())


@torch.inference_mode()
def formats(a) -> None:
    from codellama import Tokenizer, load_model
    from codellama.checkpoint import BUNDLED_CKPT_DIR
    from training.data import load_corpus
    from training.evaluate_tiny import measure_loss

    g = torch.Generator().manual_seed(0)
    matrices = {"Gaussian": torch.randn(a.matrix_rows, 4096, generator=g),
                "Student's t (4)": torch.distributions.StudentT(4.0).sample((a.matrix_rows, 4096))}
    corpus = load_corpus()
    heldout, train = list(corpus.heldout.values()), list(corpus.library.values())
    tokenizer = Tokenizer(os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))

    def bits_per_byte(fake: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> float:
        model = load_model(BUNDLED_CKPT_DIR, device="cpu", dtype="fp32", optimize=False)  # plain nn.Linear layers
        for name, module in model.named_modules():
            if fake and isinstance(module, torch.nn.Linear) and name != "output":
                module.weight.copy_(fake(module.weight))
        return measure_loss(model, tokenizer, heldout, train, seq_len=512).model_bits_per_byte

    full = bits_per_byte(None)
    print(f"bundled model, fp32: {full:.4f} bits per byte on {len(heldout)} held-out files")
    print(f"| format | bits a weight | {' | '.join(f'{m}: weight error' for m in matrices)} | bundled model: "
          "bits per byte (over fp32) |")
    print("|---|---|" + "---|" * len(matrices) + "---|")
    for name, (bits, fake) in int4_formats().items():
        errors = " | ".join(f"{relative_error(fake(w), w):.4f}" for w in matrices.values())
        bpb = bits_per_byte(fake)
        print(f"| {name} | {bits:.2f} | {errors} | {bpb:.4f} ({bpb / full - 1:+.2%}) |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true", help="logit error and greedy agreement instead of speed")
    p.add_argument("--formats", action="store_true", help="int4 against llama.cpp's 4-bit formats instead of speed")
    p.add_argument("--matrix-rows", type=int, default=4096, help="--formats: rows of the random matrices (of 4096 "
                   "inputs)")
    p.add_argument("--size", default="base", choices=sorted(SIZES), help="random model size for speed")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=256, help="--accuracy: greedy steps compared")
    p.add_argument("--repeat", type=int, default=5, help="alternating timing rounds per row (medians are printed)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true",
                   help="decode with the compiled step (Llama(compile=True); at batch 1 on the matvec layout)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    formats(a) if a.formats else accuracy(a) if a.accuracy else speed(a)


if __name__ == "__main__":
    main()

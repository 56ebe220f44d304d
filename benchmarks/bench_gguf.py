"""GGUF files: load time and peak memory of a 7B-shaped model, and each tensor type's accuracy.

    python benchmarks/bench_gguf.py                          # 7B shapes: Q4_0, Q8_0 (as int8), Q4_K (as int4)
    python benchmarks/bench_gguf.py --types Q4_0 --scale 8   # dims and layers / 8: a quick run
    python benchmarks/bench_gguf.py --accuracy               # logit error of every type, no large files
    python benchmarks/bench_gguf.py --llama-cpp              # greedy tokens against llama.cpp on its own files

**Loading.** A random model of Code Llama 7B's shapes (dim 4096, 32 layers, 32 heads, FFN 11008, vocab 32016)
is written as GGUF tensor by tensor (one tensor in memory; llama.cpp's mixes: Q4_0 and Q4_K files keep the
output layer in Q6_K), loaded in a fresh subprocess with ``load_model(path, device="cpu", dtype="bf16",
quantize=…)`` (``load_memory.py``'s child: peak anonymous memory and peak RSS above the level after imports,
the seconds ``load_model`` took), then deleted. Baseline, in the same run: reading the file's bytes (the
page cache is warm for both: the file was just written). "weights" is what the loaded model holds
(``int4``'s CPU layout keeps torch's packed copy of the codes beside the canonical ones).

**Accuracy.** For the random model of 7B's proportions that ``bench_quant.py --accuracy`` uses (168M
parameters), fp32 greedily generates 256 tokens; each GGUF type is then run over them: the largest logit
error over the largest fp32 logit, and how often its argmax is fp32's. The files are quantized by
llama.cpp itself when ``llama-cpp-python`` is installed (a peer, never a dependency), else by the ``gguf``
package (and ``codellama.testing``'s plain K-quant rounding, a little less accurate than llama.cpp's).

**Against llama.cpp.** The trained stories260K model (``../shared/data``) as an F32 file and quantized by
llama.cpp: how many of 100 greedy tokens from BOS this library (each way of loading the file) and llama.cpp
(llama-cpp-python) share before they first differ. Exact equality is the bar for F32 only: for its
quantized types llama.cpp also rounds the activations to 8 bits (Q8_0/Q8_K) in its dot products.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from typing import Iterator, Mapping

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_generate import _Vocab  # noqa: E402
from bench_quant import ACCURACY_SIZES, LLAMA_FTYPES, _quiet_logs  # noqa: E402
from load_memory import measure  # noqa: E402

from codellama import Llama, ModelArgs, load_model  # noqa: E402
from codellama.checkpoint import build_on_meta  # noqa: E402
from codellama.testing import random_model, write_gguf  # noqa: E402

CODE_LLAMA_7B = ModelArgs.from_name("7b")
# file type → (what each matrix is stored as, the quantize= it loads with)
LOADS = {"Q4_0": ("Q4_0", "none"), "Q8_0": ("Q8_0", "int8"), "Q4_K": ("Q4_K", "int4")}
ACCURACY_TYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
FTYPES = {**LLAMA_FTYPES, "F16": 1, "Q6_K": 18, "Q5_K_M": 17, "Q5_0": 8, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10}


class RandomWeights(Mapping):
    """A model's weights made one at a time when asked (Meta names; deterministic per name), never all at once."""

    def __init__(self, args: ModelArgs):
        self.shapes = {k: tuple(v.shape) for k, v in build_on_meta(args).state_dict().items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(sum(map(ord, key)) * 131 + len(key))
        shape = self.shapes[key]
        if len(shape) == 1:
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * shape[-1] ** -0.5

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def read_seconds(path: str) -> float:
    """Seconds to read the whole file in 64 MiB pieces (into one reused buffer)."""
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - start


def loading(a) -> None:
    args = CODE_LLAMA_7B if a.scale == 1 else ModelArgs(
        dim=4096 // a.scale, n_layers=max(1, 32 // a.scale), n_heads=max(1, 32 // a.scale), multiple_of=256,
        ffn_dim_multiplier=1.0, vocab_size=32016, rope_theta=1e6)
    root = a.dir or tempfile.gettempdir()
    print(f"model: dim {args.dim}, {args.n_layers} layers, FFN {args.hidden_dim}, vocab {args.vocab_size} "
          f"({args.num_params() / 1e9:.2f}B parameters); files in {root}; load average {os.getloadavg()[0]:.2f}")
    print("| file | loads as | file GiB | write s | read s (baseline) | load s | load / read | weights GiB "
          "| peak anon GiB | peak rss GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in a.types:
        stored, quantize = LOADS[kind]
        path = os.path.join(root, f"bench-7b.{kind}.gguf")
        try:
            start = time.perf_counter()
            write_gguf(path, RandomWeights(args), args,
                       tensor_type=lambda key: "Q6_K" if key == "output.weight" and kind != "Q8_0" else stored)
            written = time.perf_counter() - start
            read = read_seconds(path)
            r = measure(path, "bf16", quantize)
            size = os.path.getsize(path)
            loads = "int4 g32 (file's codes)" if quantize == "none" else f"quantize={quantize!r}"
            print(f"| {kind} | {loads} | {size / 2**30:.2f} | {written:.0f} | {read:.2f} | {r['seconds']:.1f} | "
                  f"{r['seconds'] / read:.0f}x | {r['weights'] / 2**30:.2f} | {r['anon'] / 2**30:.2f} | "
                  f"{r['rss'] / 2**30:.2f} |", flush=True)
        finally:
            if os.path.exists(path):
                os.remove(path)


# ----------------------------------------------------------------------------- accuracy
def quantized_files(f32: str, workdir: str, state, args: ModelArgs) -> dict:
    """Each type of ``ACCURACY_TYPES`` as a GGUF file: llama.cpp's quantizer when it is installed, else the writer's."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    files = {}
    for kind in ACCURACY_TYPES:
        files[kind] = os.path.join(workdir, f"{kind}.gguf")
        if llama_cpp is not None:
            llama_cpp.llama_log_set(_quiet_logs(), ctypes.c_void_p())
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = FTYPES[kind]
            if llama_cpp.llama_model_quantize(f32.encode(), files[kind].encode(), ctypes.byref(params)) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {f32} to {kind}")
        else:  # the K-quant mixes are llama.cpp's; here every matrix gets the base type
            stored = kind.removesuffix("_M")
            if stored in ("Q5_K", "Q3_K", "Q2_K"):
                continue  # neither the gguf package nor codellama.testing writes these
            write_gguf(files[kind], state, args, tensor_type=stored)
    return {k: v for k, v in files.items() if os.path.exists(v)}


@torch.inference_mode()
def accuracy(a) -> None:
    args = ModelArgs(**ACCURACY_SIZES["7b/4"])
    reference = random_model(args, seed=1)
    prompt = torch.randint(3, args.vocab_size, (16,), generator=torch.Generator().manual_seed(2)).tolist()
    llama = Llama(reference, _Vocab(args.vocab_size), max_seq_len=16 + a.steps + 1, max_batch_size=1)
    tokens = torch.tensor([prompt + llama.generate([prompt], a.steps, temperature=0, stop_token=[])[0][0]])
    expected = reference(tokens)[0, 15:-1]  # (steps, V): the logits that chose each generated token
    print(f"model: {args.num_params() / 1e6:.0f}M parameters (dim {args.dim}, {args.n_layers} layers); "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| file | loads as | max logit error / max logit | argmax = fp32's |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        state = {k: v.detach() for k, v in reference.state_dict().items()}
        f32 = write_gguf(os.path.join(workdir, "F32.gguf"), state, args)
        for kind, path in quantized_files(f32, workdir, state, args).items():
            for quantize in ([None, "int8"] if kind == "Q8_0" else [None]):
                model = load_model(path, device="cpu", dtype="fp32", quantize=quantize)
                got = model(tokens)[0, 15:-1].float()
                err = (got - expected).abs().max() / expected.abs().max()
                agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
                loads = (f"quantize={quantize!r}" if quantize else
                         "int4 g32" if kind == "Q4_0" else "as it is" if kind in ("F16", "BF16") else "dequantized")
                print(f"| {kind} | {loads} | {err:.4f} | {agree:.1%} |", flush=True)


def against_llama_cpp(a) -> None:
    import llama_cpp
    from codellama import open_checkpoint
    source = open_checkpoint(a.stories)
    print(f"model: stories260K ({a.stories}); load average {os.getloadavg()[0]:.2f}")
    print("| file (llama.cpp's quantizer) | this library loads it as | greedy tokens equal to llama.cpp's, of 100 |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        f32 = write_gguf(os.path.join(workdir, "F32.gguf"), {k: t.load() for k, t in source.tensors.items()},
                         source.args, tokenizer_path=os.path.join(a.stories, "tokenizer.model"), context=512)
        llama_cpp.llama_log_set(_quiet_logs(), ctypes.c_void_p())
        for kind in ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q4_0"):
            path = f32
            if kind != "F32":
                path = os.path.join(workdir, f"{kind}.gguf")
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = FTYPES[kind]
                llama_cpp.llama_model_quantize(f32.encode(), path.encode(), ctypes.byref(params))
            llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, verbose=False)
            theirs = [t for _, t in zip(range(100), llm.generate([1], top_k=1, temp=0.0, repeat_penalty=1.0))]
            for quantize in (None, "int8", "int4"):
                llama = Llama.build(path, max_seq_len=256, max_batch_size=1, device="cpu", dtype="fp32",
                                    quantize=quantize)
                ours = llama.generate([[1]], max_gen_len=100, temperature=0)[0][0]
                same = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), len(theirs))
                loads = (f"quantize={quantize!r}" if quantize else "int4 g32" if kind == "Q4_0" else
                         "as it is" if kind == "F32" else "dequantized (fp32)")
                print(f"| {kind} | {loads} | {same} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accuracy", action="store_true", help="each type's logit error instead of load time and memory")
    p.add_argument("--types", nargs="+", default=list(LOADS), choices=list(LOADS))
    p.add_argument("--scale", type=int, default=1, choices=[1, 2, 4, 8, 16], help="divide dims and layers by this")
    p.add_argument("--dir", default=None, help="where to write the files (default: the temp dir); they are deleted")
    p.add_argument("--steps", type=int, default=256, help="--accuracy: greedy steps compared")
    p.add_argument("--llama-cpp", action="store_true", help="greedy tokens against llama.cpp on the same files")
    p.add_argument("--stories", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                     "stories260K", "meta"), help="--llama-cpp: stories260K's folder")
    a = p.parse_args()
    against_llama_cpp(a) if a.llama_cpp else accuracy(a) if a.accuracy else loading(a)


if __name__ == "__main__":
    main()

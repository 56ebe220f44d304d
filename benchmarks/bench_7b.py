"""Code Llama 7B's shape on this CPU against llama.cpp on the same weights: load time, peak memory, prefill, decode.

    python benchmarks/bench_7b.py --dir /work/peers/big-models          # 7B: every row, and llama.cpp's
    python benchmarks/bench_7b.py --dir ... --size 13b --rows int4-file --quantized-only   # 13B int4, no bf16 file
    python benchmarks/bench_7b.py --size tiny                             # a smoke run (the slow tests)
    python benchmarks/bench_7b.py --dir ... --rows int4-g64 --theirs Q4_0 --interleave 5   # the default int4, in turns
    python benchmarks/bench_7b.py --dir ... --rows int4-g64+out8 --theirs Q4_0 --compiled   # + the compiled step
    python benchmarks/bench_7b.py --dir ... --rows int4 --theirs BF16 Q4_1 --interleave 5 --batch 1   # its own format
    python benchmarks/bench_7b.py --dir ... --rows bf16 --theirs BF16 --alternate 4   # whole runs, one after the other
    python benchmarks/bench_7b.py --dir ... --rows bf16-gguf --theirs BF16 --interleave 5   # in turns, on one file

A random model of the shape (7B: dim 4096, 32 layers, 32 heads, FFN 11008, vocab 32016, rope theta 1e6) is
written as Hugging Face bf16 safetensors in ~400 MB shards, a tensor at a time (no model-sized memory), with
the Code Llama tokenizer of ``../shared/data``. Each row then runs in its own process, one at a time:

* ours: ``load_model`` of that checkpoint in bf16 (``bf16``), of its Meta-layout copy (``bf16-meta``),
  quantized on load (``int8``; ``int4-g64`` = ``quantize="int4"`` as it comes, the library's default: g64, 4.5
  bits a weight as Q4_0's blocks of 32 with one fp16 scale, the output layer in bf16; ``int4`` = int4 g32 (5
  bits a weight, Q4_1's); ``int4+out8`` = int4 g32 with the output layer in int8, as llama.cpp's Q4_0 keeps it
  in Q6_K; ``int4-g64+out8``), and of
  checkpoints written by ``python -m codellama quantize`` (``int8-file``, ``int4-file``: int4 g32 +out8), and
  of llama.cpp's own BF16 file (``bf16-gguf``: the GGUF loader reads its tensors in place, so with BF16 the two
  processes map the same pages of the page cache and fit in memory side by side: ``--interleave`` then times
  bf16 against BF16 on the very same bytes, taking turns);
* llama.cpp (llama-cpp-python's C API, ``LLAMA_CPP_LIB_PATH`` pointing at a build of it): GGUF files made by
  its own tools from the same safetensors: ``convert_hf_to_gguf.py --outtype bf16`` (BF16) and ``q8_0``
  (Q8_0), and ``llama-quantize`` of the BF16 file (Q4_0; Q4_1, whose blocks of 32 carry an fp16 scale and an
  fp16 minimum: int4 g32's layout and bytes, so ``int4`` pairs with it when it is asked for). Found under
  ``--llama-cpp`` (its source tree, with ``gguf-py`` and ``build/bin``); rows are skipped with a line when it
  is absent.

Per row: load seconds (until the model can run; llama.cpp maps its file and reads pages on first use, so its
first prefill carries that, ``first prefill``), peak resident memory over the process against the bytes of
the weights as loaded ("rss" counts the mapped file's pages, "anon" only allocated memory), prefill of a
256-token prompt (the second one: warm), and greedy decode tokens/s at batch 1 and 4 ((time for N tokens −
time for 1) / (N − 1), the prompt cached). "bw" is the fraction of the machine's read bandwidth (the best
of a few streaming reads, measured first, in its own process) that batch-1 decode reads its weights at.
Memory: run one of these at a time on a 24 GB machine; ``free -g`` first. Files already in ``--dir`` (the
checkpoint, the GGUFs) are reused and never deleted; what the run writes is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

from memory_sampler import MEMORY_SAMPLER

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, vocab_size=32016, rope_theta=1e6),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, vocab_size=32016, rope_theta=1e6),
    "tiny": dict(dim=256, n_layers=2, n_heads=4, multiple_of=64, vocab_size=32016, rope_theta=1e6),
}
TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "codellama-like.model")
LLAMA_CPP_DIR = "/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp"
# row → (checkpoint, load dtype, quantize on load as JSON for QuantConfig, or None)
OURS = {
    "bf16": ("hf", "bf16", None),
    "bf16-meta": ("meta", "bf16", None),
    "int8": ("hf", "bf16", {"scheme": "int8"}),
    "int4-g64": ("hf", "bf16", {"scheme": "int4", "group_size": 64}),  # the library's default (tested)
    "int4": ("hf", "bf16", {"scheme": "int4", "group_size": 32}),
    "int4+out8": ("hf", "bf16", {"scheme": "int4", "group_size": 32, "include_output": True, "output_scheme": "int8"}),
    "int4-g64+out8": ("hf", "bf16", {"scheme": "int4", "group_size": 64, "include_output": True,
                                     "output_scheme": "int8"}),
    "int8-file": ("int8", "bf16", None),
    "int4-file": ("int4", "bf16", None),
    "bf16-gguf": ("gguf-BF16", "bf16", None),  # llama.cpp's own BF16 file, read in place
}
QUANTIZED_FILES = {"int8": {"scheme": "int8"},
                   "int4": {"scheme": "int4", "group_size": 32, "include_output": True, "output_scheme": "int8"}}
# llama.cpp row → convert_hf_to_gguf --outtype (None: llama-quantize of the BF16 file)
THEIRS = {"BF16": "bf16", "Q8_0": "q8_0", "Q4_0": None, "Q4_1": None}
# (ours, llama.cpp, what the pair compares)
PAIRS = [("bf16", "BF16", "decode, prefill, load"), ("bf16-gguf", "BF16", "decode, prefill, load"),
         ("int8", "Q8_0", "decode, prefill"),
         ("int4-g64", "Q4_0", "decode, prefill"),
         ("int4", "Q4_1", "decode, prefill"), ("int4", "Q4_0", "decode, prefill"),
         ("int4+out8", "Q4_0", "decode, prefill"),
         ("int4-g64+out8", "Q4_0", "decode, prefill"),
         ("int8-file", "Q8_0", "load"), ("int4-file", "Q4_0", "load")]

# ----------------------------------------------------------------------------- the processes
# What both children start with: the memory sampler, their results (out) and the decode measurements' loop.
CHILD_PRELUDE = MEMORY_SAMPLER + r"""
import json
start_sampler(0.005)
out = {}
def decode(measure):
    # Decode tok/s per batch size, the best of spec["repeat"] measurements; or, serving (--interleave), one
    # measurement per line the parent sends (a batch size), answered on stdout, until "end".
    if not spec.get("serve"):
        for batch in spec["batches"]:
            out[f"decode{batch}"] = max(measure(batch) for _ in range(spec["repeat"]))
        return
    for batch in spec["batches"]:
        measure(batch)  # (warm-ups: the engines and their caches before the rounds)
    print(json.dumps(out), flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            break
        print(json.dumps(measure(int(line))), flush=True)
"""

CHILD_OURS = CHILD_PRELUDE + r"""
import torch
sys.path.insert(0, sys.argv[1])
from bench_generate import _Vocab
from bench_quant import Ours
from codellama import Llama, load_model
from codellama.cpu import native_kernel_available
from codellama.quantize import QuantConfig
spec = json.loads(sys.argv[3])
native_kernel_available()  # (the kernel built or loaded before the baseline)
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
start = time.perf_counter()
model = load_model(sys.argv[2], device="cpu", dtype=spec["dtype"],
                   quantize=QuantConfig(**spec["quantize"]) if spec["quantize"] else None)
out.update(load_s=time.perf_counter() - start, load_rss=status("VmHWM:") - base_rss,
           load_anon=peak_anon[0] - base_anon)
out["weights"] = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
out["step_bytes"] = sum(t.numel() * t.element_size() for k, t in [*model.named_parameters(), *model.named_buffers()]
                        if not k.startswith("tok_embeddings"))  # (not state_dict(): it would copy packed weights out)
V, P, N = model.args.vocab_size, spec["prompt_len"], spec["new_tokens"]
g = torch.Generator().manual_seed(0)
prompt = lambda rows: torch.randint(3, V, (rows, P), generator=g).tolist()
llama = Llama(model, _Vocab(V), max_seq_len=P + N + 1, max_batch_size=1)
prefill = []
for _ in range(2):  # fresh prompts: nothing cached
    t = time.perf_counter()
    llama.generate(prompt(1), 1, temperature=0, stop_token=[])
    prefill.append(time.perf_counter() - t)
out["prefill_first_s"], out["prefill_s"] = prefill
del llama
engines = {}
def measure(batch):  # tok/s of one decode measurement; one engine a batch size, its prompts cached
    if batch not in engines:
        if not spec.get("serve"):
            engines.clear()  # (one at a time: their KV caches)
        engines[batch] = Ours(model, prompt(batch), N, compile=spec["compile"])
    return batch / engines[batch].step_seconds()
decode(measure)
engines.clear()
out["rss"], out["anon"] = status("VmHWM:") - base_rss, peak_anon[0] - base_anon
print(json.dumps(out))
"""

CHILD_THEIRS = CHILD_PRELUDE + r"""
import os, torch
sys.path.insert(0, sys.argv[1])
from bench_quant import LlamaCpp, gguf_weight_bytes
spec = json.loads(sys.argv[3])
import llama_cpp  # noqa (loads the library before the baseline)
base_rss, base_anon = status("VmRSS:"), status("RssAnon:")
P, N, batches = spec["prompt_len"], spec["new_tokens"], spec["batches"]
start = time.perf_counter()
peer = LlamaCpp(sys.argv[2], max(batches), P + N + 8, torch.get_num_threads())
out.update(load_s=time.perf_counter() - start, load_rss=status("VmHWM:") - base_rss,
           load_anon=peak_anon[0] - base_anon)
out["weights"] = os.path.getsize(sys.argv[2])
out["step_bytes"] = gguf_weight_bytes(sys.argv[2])
g = torch.Generator().manual_seed(0)
prompt = lambda rows: torch.randint(3, peer.vocab, (rows, P), generator=g).tolist()
prefill = []
for _ in range(2):
    p = prompt(1)[0]
    t = time.perf_counter()
    peer.prefill(p)
    prefill.append(time.perf_counter() - t)
out["prefill_first_s"], out["prefill_s"] = prefill
prompts = {}
def measure(batch):  # tok/s of one decode measurement; the batch's prompts prefilled once
    if batch not in prompts:
        prompts[batch] = prompt(batch)
        peer.step_seconds(prompts[batch], 2)  # warm-up
    return batch / peer.step_seconds(prompts[batch], N)
decode(measure)
peer.close()
out["rss"], out["anon"] = status("VmHWM:") - base_rss, peak_anon[0] - base_anon
print(json.dumps(out))
"""

CHILD_BANDWIDTH = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from bench_quant import read_bandwidth
print(read_bandwidth())
"""


def child(code: str, argv, env: Optional[Dict[str, str]]) -> Tuple[List[str], Dict[str, str]]:
    """The command line and environment of a child process running ``code``."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    return [sys.executable, "-c", code, HERE, *argv], env


def run_child(code: str, *argv: str, env: Optional[Dict[str, str]] = None) -> dict:
    cmd, env = child(code, argv, env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({argv[0]}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


class Served:
    """A row's child kept running (``--interleave``): it loads and measures prefill, then answers one decode
    measurement (tok/s) per batch size it is sent, so that two rows can take turns under the same conditions."""

    def __init__(self, code: str, *argv: str, env: Optional[Dict[str, str]] = None):
        cmd, env = child(code, argv, env)
        self.what, self.log = argv[0], tempfile.TemporaryFile(mode="w+")
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                  env=env)
        self.result = self._answer()

    def _answer(self):
        for line in self.p.stdout:
            try:
                return json.loads(line)
            except ValueError:
                continue  # (anything else the child printed)
        self.p.wait()
        self.log.seek(0)
        lines = self.log.read().strip().splitlines()
        raise RuntimeError(f"child failed ({self.what}): {lines[-1] if lines else self.p.returncode}")

    def measure(self, batch: int) -> float:
        self.p.stdin.write(f"{batch}\n")
        self.p.stdin.flush()
        return self._answer()

    def end(self) -> dict:
        """The load/prefill results with the peak memory over the whole run; the process is waited for."""
        self.p.stdin.write("end\n")
        self.p.stdin.close()
        self.result.update(self._answer())
        self.p.wait()
        return self.result

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def interleaved(ours: Served, theirs: Served, batches: List[int], rounds: int) -> Tuple[dict, dict, dict]:
    """``rounds`` decode measurements of each batch size from both, taking turns (who goes first alternates):
    each side's results with its median tok/s, and per batch size the rounds' ratios ours / theirs."""
    runs: Dict[str, Dict[int, List[float]]] = {"ours": {b: [] for b in batches}, "theirs": {b: [] for b in batches}}
    for r in range(rounds):
        for i, b in enumerate(batches):
            order = (("ours", ours), ("theirs", theirs))
            for side, served in order if (r + i) % 2 == 0 else order[::-1]:
                runs[side][b].append(served.measure(b))
    results = []
    for side, served in (("ours", ours), ("theirs", theirs)):
        out = served.end()
        out.update({f"decode{b}": statistics.median(runs[side][b]) for b in batches})
        results.append(out)
    ratios = {b: [x / y for x, y in zip(runs["ours"][b], runs["theirs"][b])] for b in batches}
    return results[0], results[1], ratios


def alternated(ours: Callable[[], dict], theirs: Callable[[], dict], batches: List[int],
               rounds: int) -> Tuple[dict, dict, dict]:
    """``rounds`` whole runs of each row, a process each, one after the other (who goes first alternating), for
    rows that do not fit in memory side by side (bf16 and BF16): each side's median figures, and per batch size
    the ratios ours / theirs of each round's two runs, minutes apart instead of months."""
    runs: Dict[str, List[dict]] = {"ours": [], "theirs": []}
    for r in range(rounds):
        order = (("ours", ours), ("theirs", theirs))
        for side, run in order if r % 2 == 0 else order[::-1]:
            runs[side].append(run())
            print(f"  round {r + 1}, {side}: " + ", ".join(f"b{b} {runs[side][-1][f'decode{b}']:.2f} tok/s"
                                                        for b in batches), flush=True)
    medians = [{key: statistics.median(run[key] for run in runs[side]) for key in runs[side][0]}
               for side in ("ours", "theirs")]
    ratios = {b: [x[f"decode{b}"] / y[f"decode{b}"] for x, y in zip(runs["ours"], runs["theirs"])] for b in batches}
    return medians[0], medians[1], ratios


# ----------------------------------------------------------------------------- the checkpoints
def write_random(path: str, args, tokenizer: Optional[str]) -> None:
    """The random bf16 HF checkpoint (~400 MB shards, a tensor at a time) with the tokenizer files llama.cpp's
    converter reads."""
    import torch

    from codellama import Tokenizer
    from codellama.formats.hf import save_hf_tokenizer
    from codellama.testing import write_checkpoint

    write_checkpoint(path, args, "hf", dtype=torch.bfloat16, tokenizer=tokenizer, max_shard_bytes=400 * 2**20)
    if tokenizer is not None:
        save_hf_tokenizer(Tokenizer(tokenizer), path)


def make_gguf(llama_cpp: str, hf: str, kind: str, out: str, bf16_gguf: Optional[str]) -> None:
    """llama.cpp's own tools: its converter for BF16 / Q8_0, its quantizer (of the BF16 file) for Q4_0 / Q4_1."""
    if THEIRS[kind] is not None:
        cmd = [sys.executable, os.path.join(llama_cpp, "convert_hf_to_gguf.py"), hf, "--outtype", THEIRS[kind],
               "--outfile", out]
    else:
        cmd = [os.path.join(llama_cpp, "build", "bin", "llama-quantize"), bf16_gguf, out, kind]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed: {r.stderr.strip()[-500:]}")


def llama_cpp_problem(llama_cpp: str) -> Optional[str]:
    """Why llama.cpp's rows cannot run here, or None."""
    lib = os.environ.setdefault("LLAMA_CPP_LIB_PATH", os.path.join(llama_cpp, "build", "bin"))
    for need in (os.path.join(llama_cpp, "convert_hf_to_gguf.py"), os.path.join(llama_cpp, "build", "bin", "llama-quantize"),
                 os.path.join(lib, "libllama.so")):
        if not os.path.exists(need):
            return f"{need} not found (--llama-cpp: a llama.cpp source tree with its build)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    except Exception as e:  # its library failed to load
        return f"llama-cpp-python cannot load its library: {e}"
    return None


# ----------------------------------------------------------------------------- the table
def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def print_tables(results: Dict[str, dict], bandwidth: float, batches: List[int],
                 partner_runs: Optional[Dict[str, dict]] = None) -> None:
    """The rows, then ours / llama.cpp per pair: against the llama.cpp run a row took turns with
    (``partner_runs``, ``--interleave``), else against llama.cpp's own row."""
    cols = " | ".join(f"decode b{b} tok/s" for b in batches)
    print(f"\n| row | weights GiB | load s | peak rss GiB (× weights) | peak anon GiB | first prefill s | "
          f"prefill {{P}} s | {cols} | bytes/step | bw |".replace("{P}", str(results.get("_prompt_len", ""))))
    print("|---|" + "---|" * (8 + len(batches)))
    for name, r in results.items():
        if name.startswith("_"):
            continue
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        decode = " | ".join(f"{r[f'decode{b}']:.2f}" if r[f"decode{b}"] > 0 else "n/a" for b in batches)
        util = r["step_bytes"] * r[f"decode{batches[0]}"] / bandwidth
        print(f"| {name} | {gib(r['weights'])} | {r['load_s']:.1f} | {gib(r['rss'])} ({r['rss'] / r['weights']:.2f}×) | "
              f"{gib(r['anon'])} | {r['prefill_first_s']:.2f} | {r['prefill_s']:.2f} | {decode} | "
              f"{r['step_bytes'] / 1e9:.2f} GB | {util:.0%} |")
    pairs = PAIRS + [(o + "+compiled", t, what.replace(", load", "")) for o, t, what in PAIRS]
    rows = [(o, t, what) for o, t, what in pairs if o in results and t in results
            and "error" not in results[o] and "error" not in results[t]]
    if not rows:
        return
    print("\n| ours | llama.cpp | " + " | ".join(f"decode b{b}" for b in batches) +
          " | prefill (warm) | load | peak rss |")
    print("|---|---|" + "---|" * (len(batches) + 3))
    for o, t, what in rows:
        a, b = results[o], (partner_runs or {}).get(o, results[t])
        decode = " | ".join(f"{a[f'decode{n}'] / b[f'decode{n}']:.2f}×" if "decode" in what else "" for n in batches)
        prefill = f"{b['prefill_s'] / a['prefill_s']:.1f}× faster" if "prefill" in what else ""
        load = f"{a['load_s'] / b['load_s']:.2f}× the time" if "load" in what else ""
        print(f"| {o} | {t} | {decode} | {prefill} | {load} | {a['rss'] / b['rss']:.2f}× |")


def print_interleaved(results: Dict[str, dict], paired: List[tuple], batches: List[int],
                      rounds: int, how: str = "interleaved") -> None:
    if not paired:
        return
    print(f"\n{rounds} {how} rounds a pair: each side's median tok/s, and ours / llama.cpp per round "
          "(median, min–max)")
    print("\n| ours | llama.cpp | " + " | ".join(f"decode b{b}" for b in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    for label, partner, ratios, theirs in paired:
        cells = []
        for b in batches:
            r = ratios[b]
            cells.append(f"{results[label][f'decode{b}']:.2f} / {theirs[f'decode{b}']:.2f}: "
                         f"**{statistics.median(r):.2f}×** ({min(r):.2f}–{max(r):.2f}×)")
        print(f"| {label} | {partner} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="7b", choices=sorted(SIZES))
    p.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary directory)")
    p.add_argument("--rows", nargs="*", default=list(OURS), choices=list(OURS), help="our rows (none: llama.cpp only)")
    p.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR", LLAMA_CPP_DIR),
                   help="llama.cpp's source tree with its build (convert_hf_to_gguf.py, gguf-py, build/bin)")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--theirs", nargs="+", default=list(THEIRS), choices=list(THEIRS), help="llama.cpp's rows")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeat", type=int, default=2, help="decode measurements per batch (the best is kept)")
    p.add_argument("--compiled", action="store_true",
                   help="also run each of our rows with the compiled decode step (``Llama(..., compile=True)``), "
                        "as the row's name + '+compiled'")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="decode: each of our rows and its llama.cpp row loaded side by side (both must fit in "
                        "memory: quantized rows), taking turns for ROUNDS measurements a batch size; the ratio "
                        "per round shows what a shared machine's changing bandwidth does to one-off rows")
    p.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                   help="each of our rows and its llama.cpp row run whole, a process each, one after the other "
                        "ROUNDS times (for rows that do not fit in memory together: bf16 and BF16); the ratio "
                        "per round compares runs minutes apart")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and GGUF files this run wrote")
    p.add_argument("--meta", default=None, help="an existing Meta-layout copy of the checkpoint for bf16-meta "
                   "(default: converted from the HF one, then deleted)")
    p.add_argument("--quantized-only", action="store_true",
                   help="write the quantized checkpoints directly from random weights, with no bf16 checkpoint "
                        "(a 13B on a small disk); only the *-file rows, no llama.cpp")
    p.add_argument("--max-anon-gb", type=float, default=None,
                   help="stop a row whose process allocates more than this (a machine shared with others)")
    a = p.parse_args()
    if a.interleave and a.alternate:
        p.error("--interleave and --alternate are two ways of pairing the same rows: choose one")
    sys.path.insert(0, ROOT)
    from codellama import ModelArgs
    from codellama.quantize import QuantConfig
    from codellama.save import convert_checkpoint, quantize_checkpoint
    from codellama.testing import write_checkpoint
    import torch

    args = ModelArgs(**SIZES[a.size])
    tokenizer = TOKENIZER if os.path.exists(TOKENIZER) else None
    if a.quantized_only and any(not OURS[r][0].startswith("int") for r in a.rows):
        p.error(f"--quantized-only writes no float checkpoint: only the rows {[r for r in OURS if r.endswith('-file')]}")
    problem = "--no-llama-cpp" if a.no_llama_cpp or a.quantized_only else llama_cpp_problem(a.llama_cpp) if tokenizer else \
        f"its converter needs a tokenizer ({TOKENIZER} not found)"
    root = a.dir or tempfile.mkdtemp(prefix="bench_7b_")
    work = os.path.join(root, f"bench-{a.size}")
    quantized = [k for k in a.theirs if THEIRS[k] is None]
    if problem is None and quantized and a.theirs.index(quantized[0]) < (a.theirs + ["BF16"]).index("BF16") \
            and not os.path.exists(os.path.join(work, f"{a.size}-bf16.gguf")):
        p.error(f"--theirs: {quantized[0]} is quantized from the BF16 file, which does not exist yet: "
                "list BF16 before it")
    os.makedirs(work, exist_ok=True)
    spec = {"prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "batches": a.batch, "repeat": a.repeat}
    env = {"LLAMA_CPP_LIB_PATH": os.environ.get("LLAMA_CPP_LIB_PATH") or os.path.join(a.llama_cpp, "build", "bin"),
           "PYTHONPATH": os.path.join(a.llama_cpp, "gguf-py")}  # llama.cpp's own gguf package
    results: Dict[str, dict] = {"_prompt_len": a.prompt_len}
    created: List[str] = []  # what this run wrote (deleted at the end unless --keep); anything found is reused
    if a.max_anon_gb:
        os.environ["BENCH_MAX_ANON_GB"] = str(a.max_anon_gb)
    try:
        load = os.getloadavg()[0]
        bandwidth = float(run_child(CHILD_BANDWIDTH, "bandwidth"))
        print(f"model: {a.size}, {args.num_params() / 1e9:.2f}B parameters; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
              f"load average {load:.2f}; llama.cpp: {problem or a.llama_cpp}", flush=True)
        hf = os.path.join(work, "hf")
        if not a.quantized_only and not os.path.exists(os.path.join(hf, "config.json")):
            t = time.perf_counter()
            created.append(hf)
            write_random(hf, args, tokenizer)
            print(f"wrote {hf} in {time.perf_counter() - t:.0f} s", flush=True)
        files = {"hf": hf, **({"meta": a.meta} if a.meta else {})}

        def gguf(kind: str) -> str:
            out = os.path.join(work, f"{a.size}-{kind.lower()}.gguf")
            if not os.path.exists(out):
                t = time.perf_counter()
                created.append(out)
                make_gguf(a.llama_cpp, hf, kind, out, os.path.join(work, f"{a.size}-bf16.gguf"))
                print(f"wrote {out} in {time.perf_counter() - t:.0f} s", flush=True)
            return out

        paired: List[tuple] = []  # (our row, llama.cpp's, the rounds' ratios per batch size, llama.cpp's results)
        partners = {o: next((t for o2, t, what in PAIRS if o2 == o and "decode" in what and t in a.theirs), None)
                    for o in a.rows} if (a.interleave or a.alternate) and problem is None else {}
        for kind in a.theirs if partners else ():
            gguf(kind)  # (llama.cpp's files first, in --theirs' order: they take turns with ours)
        for name in a.rows:
            kind = OURS[name][0]
            path = os.path.join(work, kind)
            if kind.startswith("gguf-"):
                if problem is not None:
                    print(f"{name}: skipped (it reads llama.cpp's {kind[5:]} file: {problem})", flush=True)
                    continue
                files[kind] = gguf(kind[5:])
            if kind not in files:
                t = time.perf_counter()
                created.append(path)
                if kind == "meta":
                    convert_checkpoint(hf, path, "meta", force=True)
                elif a.quantized_only:
                    write_checkpoint(path, args, "hf", dtype=torch.bfloat16, tokenizer=tokenizer,
                                     quantize=QuantConfig(**QUANTIZED_FILES[kind]))
                else:
                    quantize_checkpoint(hf, path, QuantConfig(**QUANTIZED_FILES[kind]), force=True)
                files[kind] = path
                print(f"wrote {path} in {time.perf_counter() - t:.0f} s", flush=True)
            for compiled in (False, True) if a.compiled else (False,):
                label = name + "+compiled" * compiled
                row = {**spec, "dtype": OURS[name][1], "quantize": OURS[name][2], "compile": compiled}
                partner = partners.get(name)
                try:
                    if partner is None:
                        results[label] = run_child(CHILD_OURS, files[kind], json.dumps(row))
                    elif a.alternate:
                        results[label], results[partner], ratios = alternated(
                            lambda: run_child(CHILD_OURS, files[kind], json.dumps(row)),
                            lambda: run_child(CHILD_THEIRS, gguf(partner), json.dumps(spec), env=env),
                            a.batch, a.alternate)
                    else:
                        served = []
                        try:
                            served.append(Served(CHILD_OURS, files[kind], json.dumps({**row, "serve": True})))
                            served.append(Served(CHILD_THEIRS, gguf(partner), json.dumps({**spec, "serve": True}),
                                                 env=env))
                            results[label], results[partner], ratios = interleaved(*served, a.batch, a.interleave)
                        finally:
                            for s in served:
                                s.kill()
                    if partner is not None:
                        paired.append((label, partner, ratios, results[partner]))
                        print(f"{partner}: {json.dumps(results[partner])}", flush=True)
                except RuntimeError as e:
                    results[label] = {"error": str(e)}
                print(f"{label}: {json.dumps(results[label])}", flush=True)
            if kind != "hf" and path in created and not any(OURS[r][0] == kind for r in a.rows[a.rows.index(name) + 1:]) \
                    and not a.keep:
                shutil.rmtree(path)  # done with it: disk for the next one
                created.remove(path)
        if problem is None:
            for kind in a.theirs:
                if kind in partners.values():
                    continue  # (measured with the rows it took turns with)
                out = gguf(kind)
                try:
                    results[kind] = run_child(CHILD_THEIRS, out, json.dumps(spec), env=env)
                except RuntimeError as e:
                    results[kind] = {"error": str(e)}
                print(f"{kind}: {json.dumps(results[kind])}", flush=True)
                if kind == "Q8_0" and out in created and not a.keep:
                    os.remove(out)
                    created.remove(out)
        print_tables(results, bandwidth, a.batch, {label: theirs for label, _, _, theirs in paired})
        print_interleaved(results, paired, a.batch, a.interleave or a.alternate,
                          "alternated" if a.alternate else "interleaved")
        failed = [name for name, r in results.items() if isinstance(r, dict) and "error" in r]
        if failed:
            sys.exit(f"rows failed: {', '.join(failed)}")
    finally:
        if not a.keep:
            for path in created:
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else \
                    os.path.exists(path) and os.remove(path)
            if a.dir is None:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

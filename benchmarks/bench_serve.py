"""The HTTP server under load: N concurrent streaming clients against the same load sent one request at a time, and
against llama.cpp's server (llama-cpp-python) on the same weights converted to GGUF.

    python benchmarks/bench_serve.py                          # the 194M-parameter random model, bf16, 1/4/8 clients
    python benchmarks/bench_serve.py --dtype fp32 --clients 1 8 --new-tokens 32

The model is bench_generate.py's "base" size (Code Llama 7B's proportions, scaled down) with random weights;
its vocabulary is the tokenizer's (a Code Llama one: 32016 pieces, 194M parameters; ../shared/data has one).
Each load is N streaming ``POST /v1/completions`` requests, sent at once: ~128-token prompts of code, greedy,
``--new-tokens`` each; every load has prompts of its own (the same ones on both servers), so no answer
comes from a cached prompt. "one at a time" sends N such requests one after another. Figures:
aggregate tokens/s (streamed tokens of all N requests over the wall time from the first send to the last
token), time to first token (TTFT) and inter-token latency (ITL), p50 and p99 over all requests; a "token"
is one streamed chunk with text. Both servers run as subprocesses, one at a time, with the same threads;
the clients run here on asyncio. The llama.cpp peer is skipped, with one line, where ``llama_cpp`` (with its
server extra) or ``gguf`` cannot be imported; it never is a dependency of the library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import httpx
import torch

from bench_generate import SIZES
from gguf_export import write_gguf
from codellama import ModelArgs, Tokenizer
from codellama.checkpoint import BUNDLED_CKPT_DIR
from codellama.runtime import parse_dtype
from codellama.formats.meta import save_meta
from codellama.testing import random_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZER = os.path.join(ROOT, "..", "shared", "data", "tokenizers", "codellama-like.model")
NAME = "bench"


@dataclass
class Timing:
    """One streamed request: when it was sent and when each chunk with text arrived."""

    sent: float
    chunks: List[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- the model, both formats
def write_checkpoint(out_dir: str, args: ModelArgs, dtype: torch.dtype, tokenizer_path: str) -> Dict[str, torch.Tensor]:
    """The random model as a Meta checkpoint (with its tokenizer); returns its state dict."""
    state = random_state_dict(args, seed=0, dtype=dtype)
    save_meta(state, args, out_dir)
    with open(tokenizer_path, "rb") as src, open(os.path.join(out_dir, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    return state


# ----------------------------------------------------------------------------- servers
class ServerProcess:
    """A server started as a subprocess; its address is the one it prints when ready (``ready``'s group 1:
    uvicorn's line by default, which both servers of this benchmark print)."""

    def __init__(self, command: Sequence[str], timeout: float = 300.0, ready: str = r"Uvicorn running on (http://\S+)",
                 env: Optional[Dict[str, str]] = None):
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        deadline, self.log = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.log += line
            found = re.search(ready, line)
            if found:
                self.url = found.group(1)
                self._drain()
                return
        self.proc.kill()
        raise RuntimeError(f"{' '.join(command[:3])} did not start:\n{self.log[-3000:]}")

    def _drain(self) -> None:
        """Keep reading its output so that a full pipe never blocks it."""
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- the load
def make_prompts(tokenizer: Tokenizer, n: int, length: int) -> List[str]:
    """``n`` distinct windows of ``length`` tokens of this library's code (no shared prefix to reuse)."""
    with open(os.path.join(ROOT, "codellama", "engine.py"), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), bos=False, eos=False)
    if len(ids) < n * length:
        raise ValueError(f"engine.py has {len(ids)} tokens: too few for {n} distinct prompts of {length}")
    step = (len(ids) - length) // max(n - 1, 1)
    return [tokenizer.decode(ids[i * step:i * step + length]) for i in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> Timing:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    timing = Timing(time.perf_counter())
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                timing.chunks.append(time.perf_counter())
    return timing


async def run_load(url: str, prompts: List[str], new_tokens: int, concurrent: bool) -> List[Timing]:
    async with httpx.AsyncClient(timeout=600) as client:
        if concurrent:
            return list(await asyncio.gather(*(one_request(client, url, p, new_tokens) for p in prompts)))
        return [await one_request(client, url, p, new_tokens) for p in prompts]


async def greedy_text(url: str, prompt: str, new_tokens: int) -> str:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await client.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": new_tokens,
                                                              "temperature": 0})
        return r.json()["choices"][0]["text"]


def percentile(values: List[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def summarize(timings: List[Timing]) -> Dict[str, float]:
    tokens = sum(len(t.chunks) for t in timings)
    span = max(t.chunks[-1] for t in timings if t.chunks) - min(t.sent for t in timings)
    ttft = [t.chunks[0] - t.sent for t in timings if t.chunks]
    itl = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:])]
    return {"tok/s": tokens / span, "tokens": tokens, "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99),
            "itl50": percentile(itl, 50), "itl99": percentile(itl, 99)}


def measure(server: str, url: str, prompts: List[str], clients: Sequence[int], new_tokens: int) -> Dict[tuple, dict]:
    """Every load gets prompts of its own, the same on both servers: no server answers from a cached prompt."""
    fresh = iter(prompts)
    asyncio.run(run_load(url, [next(fresh)], new_tokens, concurrent=False))  # warm-up: one whole request,
    asyncio.run(run_load(url, [next(fresh), next(fresh)], 4, concurrent=True))  # and two at once
    results = {}
    for n in clients:
        for concurrent in (True, False):
            load = [next(fresh) for _ in range(n)]
            s = summarize(asyncio.run(run_load(url, load, new_tokens, concurrent)))
            results[(n, concurrent)] = s
            mode = "concurrent" if concurrent else "one at a time"
            print(f"| {server} | {n} | {mode} | {s['tok/s']:.1f} | {s['tokens']} | {s['ttft50'] * 1e3:.0f} | "
                  f"{s['ttft99'] * 1e3:.0f} | {s['itl50'] * 1e3:.1f} | {s['itl99'] * 1e3:.1f} |", flush=True)
    return results


def has_llama_cpp() -> Optional[str]:
    """None when the peer can run, else why not."""
    try:
        import gguf  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install 'llama-cpp-python[server]' gguf)"
    return None


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--tokenizer", default=None, help="a 32016-piece Code Llama tokenizer.model (default: "
                   "../shared/data's, else the bundled model's 4096-piece one, which makes the model smaller)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-llama-cpp", action="store_true")
    a = p.parse_args()
    tokenizer_path = a.tokenizer or (SHARED_TOKENIZER if os.path.isfile(SHARED_TOKENIZER)
                                     else os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))
    tokenizer = Tokenizer(tokenizer_path)
    args = ModelArgs(**{**SIZES[a.size], "vocab_size": tokenizer.n_words})
    context = a.prompt_len + a.new_tokens + 64
    slots = max(a.clients)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {a.threads} threads, load average {load:.2f}; model {args.num_params() / 1e6:.0f}M "
          f"parameters ({a.size}), {a.dtype}; {a.new_tokens} new tokens per request, greedy; tokenizer {tokenizer_path}")
    prompts = make_prompts(tokenizer, 3 + 2 * sum(a.clients), a.prompt_len)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # both servers' thread pools
    print("\n| server | clients | mode | tok/s | tokens | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        state = write_checkpoint(ckpt, args, parse_dtype(a.dtype), tokenizer_path)
        ours = ServerProcess([sys.executable, "-m", "codellama.serve", "--ckpt_dir", ckpt, "--port", "0",
                              "--max_batch_size", str(slots), "--max_seq_len", str(context), "--dtype", a.dtype,
                              "--model_name", NAME])
        try:
            ours_text = asyncio.run(greedy_text(ours.url, prompts[0], 16))
            ours_results = measure("codellama.serve", ours.url, prompts, a.clients, a.new_tokens)
        finally:
            ours.stop()
        why_not = "--skip-llama-cpp" if a.skip_llama_cpp else has_llama_cpp()
        if why_not:
            print(f"\nllama.cpp peer skipped: {why_not}")
            peer_results, peer_text = None, None
        else:
            gguf_path = os.path.join(tmp, "model.gguf")
            write_gguf(gguf_path, state, args, tokenizer_path, context)
            del state
            peer = ServerProcess([sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--port", "0",
                                  "--host", "127.0.0.1", "--n_ctx", str(context), "--n_threads", str(a.threads),
                                  "--n_threads_batch", str(a.threads), "--interrupt_requests", "False",
                                  "--verbose", "False"])
            try:
                peer_text = asyncio.run(greedy_text(peer.url, prompts[0], 16))
                peer_results = measure("llama-cpp-python", peer.url, prompts, a.clients, a.new_tokens)
            finally:
                peer.stop()
    print("\n| clients | ours: concurrent / one at a time (tok/s) | ours / llama-cpp-python, concurrent (tok/s) "
          "| TTFT p50, ours / llama-cpp-python |\n|---|---|---|---|")
    for n in a.clients:
        o_c, o_s = ours_results[(n, True)], ours_results[(n, False)]
        vs = ttft = "skipped"
        if peer_results is not None:
            vs = f"**{o_c['tok/s'] / peer_results[(n, True)]['tok/s']:.2f}×**"
            ttft = f"{o_c['ttft50'] / peer_results[(n, True)]['ttft50']:.2f}×"
        print(f"| {n} | **{o_c['tok/s'] / o_s['tok/s']:.2f}×** | {vs} | {ttft} |")
    if peer_text is not None:  # random weights have near-ties, which a different kernel may break the other way
        common = len(os.path.commonprefix([ours_text, peer_text]))
        print(f"\ngreedy text of the first prompt (16 tokens): {'the same' if peer_text == ours_text else 'differs'} "
              f"on both servers; the first {common} characters agree (ours {ours_text!r:.60}, llama.cpp {peer_text!r:.60})")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

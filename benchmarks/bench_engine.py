"""The engine under load: continuous batching, prefix reuse, chunked prefill and the compiled step, each
against its baseline in the same run.

    python benchmarks/bench_engine.py                  # the 194M-parameter model of bench_generate.py, fp32 and bf16
    python benchmarks/bench_engine.py --dtype bf16 --size small

Figures (ratios are what matter on a shared machine):
  batching    8 concurrent requests against the same 8 one at a time: aggregate decode tokens/s (from the
              first token on: the 8 arrive together and are prefilled in one step before it)
  prefix      time to first token of a 2,000-token prompt that shares all but its last 20 tokens with the
              previous request, against the same prompt on a cold cache
  compile     decode tokens/s of one request, compiled step against eager; and of --batch concurrent
              requests (both on oneDNN's packed weights, as Llama.build lays out more than one slot)
  gap         the worst inter-token gap of a streaming request while a 4,000-token prompt is admitted,
              against its median gap, for each chunk budget (max_tokens_per_step) of --budgets
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import List

import torch

from codellama import ModelArgs
from codellama.cpu import cpu_layout, matvec_layout, optimize_for_cpu
from codellama.engine import Engine, SamplingParams
from codellama.runtime import parse_dtype
from codellama.testing import random_model

SIZES = {  # as bench_generate.py: Code Llama 7B's proportions, scaled down
    "base": dict(dim=1024, n_layers=10, n_heads=8, multiple_of=256, vocab_size=32016, rope_theta=1e6),
    "small": dict(dim=128, n_layers=4, n_heads=1, multiple_of=64, vocab_size=32016, rope_theta=1e6),
}


def prompts(n: int, length: int, seed: int) -> List[List[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (length - 1,), generator=g).tolist() for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def decode_rate(requests) -> float:
    """Aggregate decode tokens/s: tokens after each request's first, over the span from the first first-token
    to the last finish."""
    tokens = sum(len(r.tokens) - 1 for r in requests)
    start = min(r.first_token_at for r in requests)
    end = max(r.finished_at for r in requests)
    return tokens / (end - start)


def bench_batching(model, batch: int, new_tokens: int) -> tuple:
    ps = prompts(batch, 64, seed=1)
    engine = Engine(model, max_batch_size=batch, max_seq_len=256)
    engine.submit(ps[0], greedy(4)).result()  # warm-up
    one_at_a_time = []
    for p in ps:
        r = engine.submit(p[:-1] + [7], greedy(new_tokens)).result()  # change the prompt: no prefix reuse
        one_at_a_time.append((len(r.tokens) - 1) / (r.finished_at - r.first_token_at))
    sequential = statistics.mean(one_at_a_time)
    engine = Engine(model, max_batch_size=batch, max_seq_len=256)
    engine.submit(ps[0], greedy(4)).result()
    requests, arrived = [], threading.Barrier(batch)

    def client(prompt):  # all arrive before the first step, so that step prefills them together: what is timed
        request = engine.submit(prompt, greedy(new_tokens))  # from the first token on is decoding only
        arrived.wait()
        requests.append(request.result())

    threads = [threading.Thread(target=client, args=(p,)) for p in ps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sequential, decode_rate(requests)


def bench_prefix(model, length: int = 2000, changed: int = 20) -> tuple:
    base = prompts(1, length, seed=2)[0]
    edited = base[:-changed] + prompts(1, changed + 1, seed=3)[0][1:]
    engine = Engine(model, max_batch_size=2, max_seq_len=length + 64, max_tokens_per_step=length)
    engine.submit(base[:100], greedy(1)).result()  # warm-up
    cold = Engine(model, max_batch_size=2, max_seq_len=length + 64, max_tokens_per_step=length)
    r = cold.submit(edited, greedy(1)).result()
    t_cold = r.first_token_at - r.submitted
    engine.submit(base, greedy(1)).result()
    r = engine.submit(edited, greedy(1)).result()
    assert r.cached_tokens == length - changed
    return t_cold, r.first_token_at - r.submitted


def bench_compile(model, new_tokens: int) -> tuple:
    """Each step as ``Llama.build`` lays the model out for it: eager on oneDNN's packed weights, compiled (one
    row) on the matvec layout, converted in place and back."""
    p = prompts(1, 64, seed=4)[0]
    rates = []
    for compiled in (False, True):
        (matvec_layout if compiled else cpu_layout)(model)
        engine = Engine(model, max_batch_size=1, max_seq_len=2048, compile=compiled)
        engine.submit(p, greedy(new_tokens)).result()  # warm-up (and compilation)
        r = engine.submit(p[:-1] + [9], greedy(new_tokens)).result()
        rates.append((len(r.tokens) - 1) / (r.finished_at - r.first_token_at))
    cpu_layout(model)
    return tuple(rates)


def bench_compile_batch(model, batch: int, new_tokens: int) -> tuple:
    """``batch`` requests arriving together, decoded by the eager and the compiled all-slots step: aggregate
    decode tokens/s of each (the prompts differ from the warm-up's, so nothing is reused from the cache)."""
    rates = []
    for compiled in (False, True):
        engine = Engine(model, max_batch_size=batch, max_seq_len=256, compile=compiled)
        for seed in (8, 9):  # a warm-up round (and compilation), then the timed one
            requests = [engine.submit(p, greedy(new_tokens)) for p in prompts(batch, 64, seed=seed)]
            done = [r.result() for r in requests]
        rates.append(decode_rate(done))
    return tuple(rates)


def bench_gap(model, long_len: int = 4000, budget: int = 512) -> tuple:
    engine = Engine(model, max_batch_size=2, max_seq_len=long_len + 300, max_tokens_per_step=budget)
    engine.submit(prompts(1, 32, seed=5)[0], greedy(2)).result()  # warm-up
    stream = engine.submit(prompts(1, 32, seed=6)[0], greedy(200))
    times = []
    events = iter(stream)
    for i, _ in enumerate(events):
        times.append(time.perf_counter())
        if i == 20:
            engine.submit(prompts(1, long_len, seed=7)[0], greedy(1))
        if i == 120:
            break
    events.close()
    gaps = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps[:18]), max(gaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--budgets", type=int, nargs="+", default=[512, 64], help="max_tokens_per_step for the gap")
    p.add_argument("--skip", nargs="*", default=[], choices=["batching", "prefix", "compile", "gap"])
    a = p.parse_args()
    torch.manual_seed(0)
    args = ModelArgs(**SIZES[a.size])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.num_params() / 1e6:.0f}M "
          f"parameters ({a.size})")
    print("| dtype | figure | baseline | engine | ratio |\n|---|---|---|---|---|")
    figures = {  # name → (what is measured, the run, how its two numbers read, their ratio)
        "batching": (f"decode tok/s, {a.batch} concurrent vs one at a time",
                     lambda m: bench_batching(m, a.batch, a.new_tokens),
                     lambda x, y: (f"{x:.1f}", f"{y:.1f}", f"**{y / x:.2f}×**")),
        "prefix": ("time to first token, 2,000-token prompt, 20 new (s)", bench_prefix,
                   lambda x, y: (f"{x:.3f} cold", f"{y:.3f} reused", f"**{x / y:.1f}× faster**")),
        "compile": ("decode tok/s at batch 1, compiled vs eager", lambda m: bench_compile(m, a.new_tokens),
                    lambda x, y: (f"{x:.1f}", f"{y:.1f}", f"**{y / x:.2f}×**")),
        f"compile {a.batch}": (f"decode tok/s of {a.batch} concurrent requests, compiled vs eager",
                               lambda m: bench_compile_batch(m, a.batch, a.new_tokens),
                               lambda x, y: (f"{x:.1f}", f"{y:.1f}", f"**{y / x:.2f}×**")),
    }
    for budget in a.budgets:  # the chunk budget bounds the gap: each step prefills at most this many tokens
        figures[f"gap {budget}"] = (
            f"inter-token gap while a 4,000-token prompt is admitted, max_tokens_per_step={budget} (ms)",
            lambda m, budget=budget: bench_gap(m, budget=budget),
            lambda x, y: (f"{x * 1e3:.0f} median", f"{y * 1e3:.0f} worst", f"{y / x:.1f}×"))
    for name in a.dtype:
        model = optimize_for_cpu(random_model(args, seed=0, dtype=parse_dtype(name)))  # what load_model does on CPU
        for key, (what, measure, cells) in figures.items():
            if key.split()[0] not in a.skip:
                print(f"| {name} | {what} | " + " | ".join(cells(*measure(model))) + " |", flush=True)

if __name__ == "__main__":
    main()

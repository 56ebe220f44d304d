"""Speculative decoding against plain decoding, same model, same prompts, same run (greedy: the same tokens).

    python benchmarks/bench_speculative.py                      # bundled model and the 194M random model
    python benchmarks/bench_speculative.py --models tiny --n 8

Prompts come from the tiny model's held-out standard-library files (``training/heldout.txt``):
  editing     a function, then the same function again with a new name and its first lines: the model
              is asked to write it out again (a refactor rewrites most of what it was given)
  open-ended  the first lines of a held-out file, to be continued (nothing to copy)
Printed per model and mode: decode tokens/s of plain decoding and with speculation, their ratio, and the
mean tokens each speculative step produced. Draft speculation pairs each model with its own int8 copy
(``--draft bf16``: its bf16 copy).
"""

from __future__ import annotations

import argparse
import ast
import random
import sysconfig
from pathlib import Path
from typing import List

import torch

from codellama import Llama, ModelArgs, Tokenizer
from codellama.checkpoint import BUNDLED_CKPT_DIR
from codellama.cpu import optimize_for_cpu
from codellama.engine import Engine, SamplingParams
from codellama.quantize import quantize_model
from codellama.engine.speculative import DraftModel, PromptLookup
from codellama.testing import random_model

BASE = dict(dim=1024, n_layers=10, n_heads=8, multiple_of=256, vocab_size=32016, rope_theta=1e6)


def heldout_sources() -> List[str]:
    """The held-out files of this Python's standard library, as training/heldout.txt lists them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    listed = (Path(__file__).resolve().parent.parent / "training" / "heldout.txt").read_text().splitlines()
    paths = [root / line.strip() for line in listed if line.strip() and not line.startswith("#")]
    return [p.read_text(encoding="utf-8") for p in paths if p.is_file()]


def editing_prompts(n: int, seed: int = 0) -> List[str]:
    """Functions of 8–30 lines, each followed by its first two lines again under a new name."""
    funcs = []
    for src in heldout_sources():
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.FunctionDef) and node.col_offset == 0 and 8 <= node.end_lineno - node.lineno <= 30:
                funcs.append((node.name, "\n".join(lines[node.lineno - 1:node.end_lineno]) + "\n"))
    random.Random(seed).shuffle(funcs)
    prompts = []
    for name, text in funcs[:n]:
        head = text.split("\n")[:2]
        head[0] = head[0].replace(f"def {name}(", f"def {name}_v2(", 1)
        prompts.append(text + "\n\n" + "\n".join(head) + "\n")
    return prompts


def open_ended_prompts(n: int, seed: int = 1) -> List[str]:
    sources = heldout_sources()
    random.Random(seed).shuffle(sources)
    return ["\n".join(src.splitlines()[:20]) + "\n" for src in sources[:n]]


def decode_rate(engine: Engine, prompts: List[List[int]], new_tokens: int) -> float:
    """Decode tokens/s over the prompts, one at a time (the latency case speculation is for)."""
    tokens, seconds = 0, 0.0
    for p in prompts:
        r = engine.submit(p, SamplingParams(temperature=0, max_tokens=new_tokens)).result()
        tokens += len(r.tokens) - 1
        seconds += r.finished_at - r.first_token_at
    return tokens / seconds


def draft_copy(model, kind: str):
    """The model's own bf16 or int8 (weight-only, per channel) copy, laid out for this CPU as loading does."""
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    copy = random_model(model.args, dtype=dtype)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return optimize_for_cpu(quantize_model(copy, "int8") if kind == "int8" else copy)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "194M"], choices=["tiny", "194M"])
    p.add_argument("--modes", nargs="+", default=["prompt", "draft"], choices=["prompt", "draft"])
    p.add_argument("--n", type=int, default=6, help="prompts per kind")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--draft", choices=["int8", "bf16"], default="int8", help="the draft: the model's own copy in")
    a = p.parse_args()
    tok = Tokenizer(f"{BUNDLED_CKPT_DIR}/tokenizer.model")
    kinds = {"editing": editing_prompts(a.n), "open-ended": open_ended_prompts(a.n)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, greedy, {a.new_tokens} new tokens, "
          f"{a.n} prompts per kind")
    print("| model | mode | prompts | plain tok/s | speculative tok/s | ratio | tokens per step | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.models:
        if name == "tiny":
            model = Llama.build(device="cpu", max_seq_len=2048).model
        else:
            model = optimize_for_cpu(random_model(ModelArgs(**{**BASE, "vocab_size": tok.n_words}), seed=0))
        max_seq_len = 2048
        for kind, texts in kinds.items():
            prompts = [tok.encode(t, bos=True, eos=False)[-1500:] for t in texts]
            plain = Engine(model, max_batch_size=1, max_seq_len=max_seq_len)
            decode_rate(plain, prompts[:1], 8)  # warm-up
            base = decode_rate(plain, prompts, a.new_tokens)
            want = [plain.submit(q, SamplingParams(temperature=0, max_tokens=a.new_tokens)).result().tokens
                    for q in prompts]
            for mode in a.modes:
                spec = PromptLookup() if mode == "prompt" else DraftModel(draft_copy(model, a.draft), 1, max_seq_len)
                engine = Engine(model, max_batch_size=1, max_seq_len=max_seq_len, speculator=spec)
                decode_rate(engine, prompts[:1], 8)
                engine.speculation.update(steps=0, proposed=0, accepted=0)
                rate = decode_rate(engine, prompts, a.new_tokens)
                got = [engine.submit(q, SamplingParams(temperature=0, max_tokens=a.new_tokens)).result().tokens
                       for q in prompts]
                s = engine.speculation
                per_step = (s["accepted"] + s["steps"]) / max(s["steps"], 1)
                label = mode if mode == "prompt" else f"draft ({a.draft} copy)"
                print(f"| {name} | {label} | {kind} | {base:.1f} | {rate:.1f} | **{rate / base:.2f}×** | "
                      f"{per_step:.2f} | {'yes' if got == want else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

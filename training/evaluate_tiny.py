"""Measure a Code Llama checkpoint on the tiny model's held-out files (``training/heldout.txt``).

    python -m training.evaluate_tiny                           # the bundled model (codellama/assets/tiny)
    python -m training.evaluate_tiny --ckpt_dir runs/tiny/model --json runs/tiny/eval.json
    python -m training.evaluate_tiny --quantize int4 --group_size 32 --bpb_only   # a quantized model's bits per byte

Two measurements, each beside a baseline computed from the training files:

1. **Bits per byte** of the held-out files, read as plain code: each file is cut into runs of whole lines
   of at most ``seq_len - 1`` tokens, each scored as ``<s> chunk`` (every token after ``<s>``). Baseline:
   a unigram model of the library training files' tokens (add-one smoothed), on the same tokens. Bits per byte
   divides the total by the UTF-8 bytes of the text, so it does not depend on the tokenizer.
2. **Single-line infilling exact match**: ``--lines`` non-blank lines drawn with ``random.Random(--seed)``
   from all non-blank lines of the held-out files; each is hidden and infilled greedily from up to
   ``--prefix_tokens`` tokens of whole lines before it and ``--suffix_tokens`` after it, once in each of
   Code Llama's prompt formats (PSM, the library's default, and SPM, ``suffix_first=True``). The
   generation stops at ``<EOT>``, ``</s>`` or a newline; it is right if it equals the hidden line
   (indentation included, trailing whitespace ignored). Baseline: always answering the library training
   files' most common line. Model and baseline answer the same lines, so besides each rate's 95% interval
   the script gives McNemar's exact test of the difference, and two diagnostics: how often the answer has
   the hidden line's indentation, and the teacher-forced loss of the hidden line's tokens by place.

Both baselines are built from the library training files (``Corpus.library``), not the test suites the
model also trains on: the held-out files are library code, so that is the stronger baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python training/evaluate_tiny.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from codellama import Llama, Tokenizer, Transformer, load_model
from codellama.generation import DEFAULT_CKPT_DIR
from codellama.prompts import infilling_prompt_tokens
from codellama.quantize import GROUP_SIZES, SCHEMES, QuantConfig
from codellama.runtime import DTYPES
from training.data import line_chunks, load_corpus


@dataclass
class LossReport:
    tokens: int
    bytes: int
    model_nats_per_token: float
    model_bits_per_byte: float
    unigram_bits_per_byte: float


@dataclass
class InfillReport:
    mode: str  # "PSM" or "SPM"
    lines: int
    model_exact_match: float
    baseline_exact_match: float
    baseline_line: str
    model_hits: int
    baseline_hits: int
    model_only: int  # lines the model gets right and the baseline does not
    baseline_only: int  # and the other way round
    p_value: float  # McNemar's exact test of model against baseline on the same lines (two-sided)
    indent_hits: int  # answers with the hidden line's indentation (the first decision of an infill)
    middle_nlls: Dict[str, float]  # teacher-forced loss of the hidden line's tokens, by place (middle_nlls)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95% by default) of a success rate of ``hits`` out of ``n``."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test: two methods scored on the same items, ``b`` items only
    the first gets right, ``c`` only the second; under "equally good" the ``b + c`` disagreements split
    like fair coin tosses."""
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got {b}, {c}")
    n = b + c
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def rate(hits: int, n: int) -> str:
    """``"3.0% (60/2000, 95% CI 2.3–3.8%)"``."""
    lo, hi = wilson_interval(hits, n)
    return f"{100 * hits / n:.1f}% ({hits}/{n}, 95% CI {100 * lo:.1f}–{100 * hi:.1f}%)"


# ----------------------------------------------------------------------------- bits per byte
def scoring_rows(tok: Tokenizer, texts: Sequence[str], seq_len: int) -> Tuple[List[List[int]], int]:
    """``<s> chunk`` rows covering ``texts`` (whole lines, at most ``seq_len`` tokens) and their UTF-8 byte count."""
    rows, n_bytes = [], 0
    for text in texts:
        for chunk in line_chunks(tok, text, seq_len - 1):
            row = tok.encode(chunk, bos=True, eos=False)[:seq_len]
            rows.append(row)
            n_bytes += len(tok.decode(row[1:]).encode())  # the chunk itself unless a giant line was cut
    return rows, n_bytes


def token_nlls(model: Transformer, rows: List[List[int]], batch_size: int = 8) -> np.ndarray:
    """Negative log-likelihood (nats) of every token after the first of each row, concatenated in order."""
    out = row_nlls(model, rows, batch_size)
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def row_nlls(model: Transformer, rows: List[List[int]], batch_size: int = 8) -> List[np.ndarray]:
    """Negative log-likelihood (nats) of every token after the first of each row, one array per row.
    Frees the model's KV cache, if a generator left one: scoring is a plain causal forward (and a
    ``Llama`` allocates a new cache when it next generates)."""
    model.clear_cache()
    device = model.tok_embeddings.weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
    nll_of: Dict[int, np.ndarray] = {}
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        T = max(len(rows[i]) for i in idx)
        x = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(rows[i])] = torch.tensor(rows[i])
        x = x.to(device)
        logits = model(x)  # (B, T, V) float32
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").cpu().numpy()  # (B, T-1)
        for r, i in enumerate(idx):
            nll_of[i] = nll[r, :len(rows[i]) - 1]
    return [nll_of[i] for i in range(len(rows))]


def unigram_log_probs(tok: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """log p(token) of an add-one smoothed unigram model of ``texts`` encoded as the rows are, (V,)."""
    counts = np.ones(tok.n_words, dtype=np.float64)
    for text in texts:
        counts += np.bincount(tok.encode(text, bos=False, eos=False), minlength=tok.n_words)
    return np.log(counts / counts.sum())


def measure_loss(model: Transformer, tok: Tokenizer, heldout: Sequence[str], train: Sequence[str],
                 seq_len: int, batch_size: int = 8) -> LossReport:
    rows, n_bytes = scoring_rows(tok, heldout, seq_len)
    nll = token_nlls(model, rows, batch_size)
    targets = np.concatenate([np.array(r[1:], dtype=np.int64) for r in rows])
    unigram_nll = -unigram_log_probs(tok, train)[targets]
    to_bpb = 1 / (n_bytes * math.log(2))
    return LossReport(tokens=int(len(targets)), bytes=n_bytes, model_nats_per_token=float(nll.mean()),
                      model_bits_per_byte=float(nll.sum() * to_bpb), unigram_bits_per_byte=float(unigram_nll.sum() * to_bpb))


# ----------------------------------------------------------------------------- single-line infilling
@dataclass
class InfillCase:
    path: str
    line_no: int  # 0-based
    prefix: str
    middle: str  # the hidden line, without its newline
    suffix: str  # starts with the hidden line's newline


def infill_cases(tok: Tokenizer, heldout: Dict[str, str], n: int, seed: int, prefix_tokens: int,
                 suffix_tokens: int) -> List[InfillCase]:
    """``n`` hidden-line cases drawn from the non-blank lines of ``heldout`` (fixed by ``seed``)."""
    candidates = [(path, i) for path, text in heldout.items()
                  for i, line in enumerate(text.splitlines(keepends=True)) if line.strip()]
    if n > len(candidates):
        raise ValueError(f"asked for {n} lines but the held-out files have only {len(candidates)} non-blank lines")
    picks = sorted(random.Random(seed).sample(candidates, n))
    split = {path: text.splitlines(keepends=True) for path, text in heldout.items()}
    cases = []
    for path, i in picks:
        lines = split[path]
        a, used = i, 0  # whole lines before the hidden one, nearest first, within prefix_tokens
        while a > 0:
            cost = len(tok.encode(lines[a - 1], bos=False, eos=False))
            if used + cost > prefix_tokens:
                break
            a, used = a - 1, used + cost
        b, used = i + 1, 0
        while b < len(lines):
            cost = len(tok.encode(lines[b], bos=False, eos=False))
            if used + cost > suffix_tokens:
                break
            b, used = b + 1, used + cost
        middle = lines[i].rstrip("\n")
        cases.append(InfillCase(path, i, "".join(lines[a:i]), middle, lines[i][len(middle):] + "".join(lines[i + 1:b])))
    return cases


def infill_lines(generator: Llama, cases: Sequence[InfillCase], batch_size: int, max_gen_len: int = 64,
                 suffix_first: bool = False) -> List[str]:
    """Greedy infilling (PSM, or SPM with ``suffix_first``) of each case, cut at the first newline (the
    newline piece is also a stop token)."""
    tok = generator.tokenizer
    newline = tok.sp_model.piece_to_id("<0x0A>")
    stops = [tok.eot_id, tok.eos_id, newline]
    out = []
    for k in range(0, len(cases), batch_size):
        part = cases[k:k + batch_size]
        prompts = [infilling_prompt_tokens(tok, c.prefix, c.suffix, suffix_first) for c in part]
        tokens, _ = generator.generate(prompts, max_gen_len=max_gen_len, temperature=0.0, stop_token=stops)
        out += [tok.decode_infilling(t).split("\n", 1)[0] for t in tokens]
    return out


def most_common_line(texts: Sequence[str]) -> str:
    """The most frequent non-blank line (indentation kept, trailing whitespace dropped) of ``texts``."""
    counts = Counter(line.rstrip() for text in texts for line in text.split("\n") if line.strip())
    return counts.most_common(1)[0][0]


def is_exact(case: InfillCase, answer: str) -> bool:
    """Whether ``answer`` is the hidden line (indentation included, trailing whitespace ignored)."""
    return answer.rstrip() == case.middle.rstrip()


def indentation(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def middle_nlls(model: Transformer, tok: Tokenizer, cases: Sequence[InfillCase], suffix_first: bool,
                batch_size: int = 8) -> Dict[str, float]:
    """Mean teacher-forced loss (nats) of the hidden lines' first token (their indentation, or their first
    word), second token, later tokens, and closing ``<EOT>``, given the prompts ``infill_lines`` gives:
    where the model goes wrong in an infill."""
    rows, lengths = [], []
    for c in cases:
        middle = tok.encode_infilling(c.middle) + [tok.eot_id]
        rows.append(infilling_prompt_tokens(tok, c.prefix, c.suffix, suffix_first) + middle)
        lengths.append(len(middle))
    groups: Dict[str, List[float]] = {"first": [], "second": [], "later": [], "<EOT>": []}
    for nll, n in zip(row_nlls(model, rows, batch_size), lengths):
        line, eot = nll[-n:-1], nll[-1]
        groups["first"] += line[:1].tolist()
        groups["second"] += line[1:2].tolist()
        groups["later"] += line[2:].tolist()
        groups["<EOT>"].append(float(eot))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in groups.items()}


def measure_infilling(generator: Llama, cases: Sequence[InfillCase], baseline: str, batch_size: int,
                      suffix_first: bool = False) -> Tuple[InfillReport, List[Tuple[InfillCase, str]]]:
    """Exact match of the model's greedy infills of ``cases`` and of always answering ``baseline``."""
    preds = infill_lines(generator, cases, batch_size, suffix_first=suffix_first)
    nlls = middle_nlls(generator.model, generator.tokenizer, cases, suffix_first, batch_size)
    model_right = [is_exact(c, p) for c, p in zip(cases, preds)]
    base_right = [is_exact(c, baseline) for c in cases]
    model_hits, base_hits = sum(model_right), sum(base_right)
    model_only = sum(m and not b for m, b in zip(model_right, base_right))
    base_only = sum(b and not m for m, b in zip(model_right, base_right))
    indent_hits = sum(indentation(p) == indentation(c.middle) for c, p in zip(cases, preds))
    report = InfillReport(mode="SPM" if suffix_first else "PSM", lines=len(cases), model_exact_match=model_hits / len(cases),
                          baseline_exact_match=base_hits / len(cases), baseline_line=baseline,
                          model_hits=model_hits, baseline_hits=base_hits, model_only=model_only, baseline_only=base_only,
                          p_value=mcnemar_p(model_only, base_only), indent_hits=indent_hits, middle_nlls=nlls)
    return report, list(zip(cases, preds))


# ----------------------------------------------------------------------------- command line
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=DEFAULT_CKPT_DIR, help="checkpoint to measure (default: the bundled tiny model)")
    parser.add_argument("--seq_len", type=int, default=512, help="the context the model was trained on")
    parser.add_argument("--lines", type=int, default=2000, help="hidden lines for the infilling measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix_tokens", type=int, default=128)
    parser.add_argument("--suffix_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--quantize", default=None, choices=SCHEMES, help="weight-only quantization as it loads")
    parser.add_argument("--group_size", type=int, default=None, choices=GROUP_SIZES, help="int4 only")
    parser.add_argument("--bpb_only", action="store_true", help="measure bits per byte only (no infilling)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--show", type=int, default=0, help="print this many infilling cases")
    args = parser.parse_args(argv)
    if args.seq_len < 2 or args.prefix_tokens + args.suffix_tokens + 64 + 4 > args.seq_len:
        raise ValueError(f"--prefix_tokens + --suffix_tokens + 68 must fit in --seq_len={args.seq_len}")

    corpus = load_corpus()
    print(corpus.describe(), file=sys.stderr)
    if corpus.missing_heldout:
        print(f"warning: {len(corpus.missing_heldout)} held-out files are missing from this Python, so the numbers "
              f"differ from the model card's: {corpus.missing_heldout}", file=sys.stderr)
    ckpt_dir = Path(args.ckpt_dir)
    tok = Tokenizer(ckpt_dir / "tokenizer.model")
    quantize = QuantConfig(args.quantize, args.group_size) if args.quantize else None
    model = load_model(ckpt_dir, device=args.device, dtype=args.dtype, quantize=quantize)
    heldout, train = corpus.heldout, list(corpus.library.values())

    loss = measure_loss(model, tok, list(heldout.values()), train, args.seq_len, args.batch_size)
    if args.bpb_only:
        what = f"{args.dtype}" + (f", {quantize.describe()}" if quantize else "")
        print(f"held-out: {len(heldout)} files, {loss.bytes} bytes, {loss.tokens} tokens ({ckpt_dir}, {what})")
        print(f"bits per byte: {loss.model_bits_per_byte:.4f} (unigram baseline {loss.unigram_bits_per_byte:.3f})")
        return
    generator = Llama(model, tok, max_seq_len=args.seq_len, max_batch_size=args.batch_size)
    cases = infill_cases(tok, heldout, args.lines, args.seed, args.prefix_tokens, args.suffix_tokens)
    baseline = most_common_line(train)
    infills = []
    for suffix_first in (False, True):  # the same hidden lines in both orders
        infill, examples = measure_infilling(generator, cases, baseline, args.batch_size, suffix_first=suffix_first)
        infills.append(infill)
        for case, pred in examples[:args.show]:
            mark = "✓" if is_exact(case, pred) else "✗"
            print(f"{mark} {infill.mode} {case.path}:{case.line_no + 1}\n    want {case.middle!r}\n    got  {pred!r}")

    print(f"held-out: {len(heldout)} files, {loss.bytes} bytes, {loss.tokens} tokens ({ckpt_dir})")
    print("| measure | model | baseline |")
    print("|---|---|---|")
    print(f"| bits per byte (lower is better) | {loss.model_bits_per_byte:.3f} | {loss.unigram_bits_per_byte:.3f} (unigram) |")
    print(f"| loss, nats per token | {loss.model_nats_per_token:.3f} | |")
    for infill in infills:
        print(f"| single-line infilling exact match, {infill.mode}, {infill.lines} lines | "
              f"{rate(infill.model_hits, infill.lines)} | {rate(infill.baseline_hits, infill.lines)} "
              f"(always {infill.baseline_line!r}) |")
    for infill in infills:
        print(f"| lines only the model / only the baseline gets right, {infill.mode} | {infill.model_only} / "
              f"{infill.baseline_only} (McNemar exact p = {infill.p_value:.2g}) | |")
    for infill in infills:
        print(f"| answers with the hidden line's indentation, {infill.mode} | {rate(infill.indent_hits, infill.lines)} | |")
    for infill in infills:
        nlls = " / ".join(f"{v:.2f}" for v in infill.middle_nlls.values())
        print(f"| hidden line's loss, {' / '.join(infill.middle_nlls)} token, {infill.mode}, nats | {nlls} | |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ckpt_dir": str(ckpt_dir), "loss": asdict(loss),
                                         "infilling": [asdict(i) for i in infills]}, indent=2))


if __name__ == "__main__":
    main()

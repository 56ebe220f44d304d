"""Train the tiny Code Llama bundled with the package, from nothing, on this machine.

One command builds the corpus (the running CPython's standard library and its test suite, minus
``training/heldout.txt``), trains the SentencePiece tokenizer (on the library files), trains the model and
writes a Meta-layout checkpoint:

    python -m training.train_tiny                      # → runs/tiny/model/{params.json,consolidated.00.pth,tokenizer.model}
    python -m training.evaluate_tiny --ckpt_dir runs/tiny/model
    cp runs/tiny/model/* codellama/assets/tiny/        # to ship it

On a CPU whose cores other programs share, run it as ``OMP_WAIT_POLICY=PASSIVE nice -n 10 python -m
training.train_tiny``: busy-waiting OpenMP threads slow everything down several times when a core is taken.

The recipe is Code Llama's in miniature: next-token prediction where 90% of code examples are turned into
fill-in-the-middle (half PSM, half SPM, split points uniform over characters, widened to whole lines in
half of them, and half of those to a single line: a departure from Code Llama that a model this small
needs, see ``training/data.py``), plus 10% instruction pairs in the ``[INST]`` format. One target is left
out of the loss: the first token after ``<MID>`` in SPM examples, which inference never asks for (see
``training/data.py``); with ``--psm_weight`` the first tokens of PSM middles count more (used by the second
stage: those are what a model this small gets wrong in PSM, see ``TrainConfig``). AdamW with Llama's betas,
weight decay and gradient clipping; linear warm-up then cosine decay; bf16 autocast. The forward pass is the
library's own ``Transformer``.

Seeded: the weights' initialisation comes from ``--seed``, and the batch of step ``s`` is a function of
``(seed, s)`` alone. Resumable: the full training state is saved to ``<out_dir>/state.pt`` every
``--ckpt_every`` steps, and running the same command again continues from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as `python training/train_tiny.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F

from codellama import ModelArgs, Tokenizer, Transformer
from codellama.formats.meta import save_meta
from training.data import ExampleSampler, instruct_pairs, load_corpus, train_tokenizer
from training.evaluate_tiny import scoring_rows, token_nlls

IGNORE = -100  # cross_entropy's ignore_index


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained weights (a resumed run must match it exactly)."""

    # model: Code Llama's architecture at a tiny size
    dim: int = 256
    n_layers: int = 4
    # Head dim 64 and Llama 2's theta (Code Llama 70B-Python/Instruct's too), not 1e6: at this size a
    # head needs several fast-rotating RoPE pairs to attend to "the previous token", and with head dim 32
    # and theta 1e6 it has two; a model trained so had no previous-token heads and never learned PSM infilling.
    n_heads: int = 4
    multiple_of: int = 32
    rope_theta: float = 1e4
    vocab_size: int = 4096
    # data
    seq_len: int = 512
    fim_rate: float = 0.9  # Code Llama's
    spm_rate: float = 0.5
    line_split_rate: float = 0.5  # FIM examples whose middle is widened to whole lines (see training/data.py)
    one_line_share: float = 0.5  # of those, the share whose middle is a single line
    # Loss weight of the first psm_weighted_tokens targets of each PSM middle. In PSM the middle's first
    # tokens (its indentation, then its first word) hang on the line before the hole, which sits before the
    # whole suffix; teacher-forced on held-out lines, this model's loss on them was 1.14 and 3.19 nats in PSM
    # against 0.63 and 2.57 in SPM, while later tokens cost about the same in both orders.
    psm_weight: float = 1.0
    psm_weighted_tokens: int = 3
    instruct_rate: float = 0.1
    long_share: float = 0.2  # examples that fill the rest of their row; the others are ≤ short_max tokens
    short_max: int = 192
    # optimisation
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234
    amp: str = "bf16"  # autocast dtype: "bf16" or "fp32" (no autocast)
    init_from: str = ""  # a previous run's state.pt to start from (its weights; a fresh optimizer)

    def model_args(self) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=self.vocab_size,
                         multiple_of=self.multiple_of, rope_theta=self.rope_theta)


# ----------------------------------------------------------------------------- pieces
def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2-style initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * n_layers).

    PyTorch's defaults (N(0, 1) embeddings, uniform linears) train noticeably worse at this size.
    """
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = residual_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with Llama's betas; weight decay on matrices only (not on the RMSNorm gains)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp not in ("bf16", "fp32"):
        raise ValueError(f"amp must be 'bf16' or 'fp32', got {cfg.amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")


def lm_loss(model: Transformer, rows: torch.Tensor, skip: torch.Tensor, bos_id: int,
            weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy over ``rows`` (B, T+1), leaving out the targets marked in ``skip``
    (B, T) and the ``<s>`` that opens each packed example (nothing before it tells when it comes). With
    ``weight`` (B, T), each target's loss is multiplied by its weight (the mean still divides by the
    number of targets)."""
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[(y == bos_id) | skip] = IGNORE
    logits = model(x)  # (B, T, V) float32
    if weight is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
    nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE, reduction="none")  # (B, T), 0 if ignored
    return (nll * weight).sum() / (y != IGNORE).sum()


def psm_weights(psm_index: torch.Tensor, cfg: "TrainConfig") -> Optional[torch.Tensor]:
    """Per-target loss weights: ``cfg.psm_weight`` for the first ``cfg.psm_weighted_tokens`` targets of
    each PSM middle (``psm_index`` from ``ExampleSampler.batch``), 1 elsewhere; None when all are 1."""
    if cfg.psm_weight == 1.0:
        return None
    head = (psm_index >= 1) & (psm_index <= cfg.psm_weighted_tokens)
    return 1.0 + (cfg.psm_weight - 1.0) * head.float()


def heldout_rows(tok: Tokenizer, texts: Sequence[str], seq_len: int, n: int) -> Tuple[List[List[int]], int]:
    """``n`` of ``evaluate_tiny``'s scoring rows (``<s>`` + whole lines), spread evenly over the held-out
    files, and the number of UTF-8 bytes their tokens after ``<s>`` stand for."""
    rows, _ = scoring_rows(tok, texts, seq_len)
    picks = np.linspace(0, len(rows) - 1, num=min(n, len(rows))).round().astype(int)
    rows = [rows[i] for i in picks]
    return rows, sum(len(tok.decode(r[1:]).encode()) for r in rows)  # decode drops the implicit leading space


def heldout_loss(model: Transformer, rows: List[List[int]], cfg: TrainConfig, device: torch.device) -> float:
    """Mean loss (nats/token) over the tokens after ``<s>`` of ``rows``, under the training autocast."""
    model.eval()
    with autocast(cfg, device):
        nll = token_nlls(model, rows)
    model.train()
    return float(nll.mean())


def export_checkpoint(model: Transformer, tokenizer_path: Path, out_dir: Path) -> None:
    """Write Meta's layout: ``params.json`` (``vocab_size`` -1, as Meta writes it: the tokenizer decides),
    ``consolidated.00.pth`` with bf16 weights (as Meta ships them), and ``tokenizer.model``."""
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    save_meta(state, dataclasses.replace(model.args, vocab_size=-1), out_dir)
    shutil.copyfile(tokenizer_path, Path(out_dir) / "tokenizer.model")


class Progress:
    """A progress bar on a terminal; on a log file, one line every ``every`` steps."""

    def __init__(self, total: int, start: int, every: int):
        self.total, self.start, self.every = total, start, every
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, text: str) -> None:
        done = step + 1
        elapsed = time.time() - self.t0
        eta = elapsed / max(1, done - self.start) * (self.total - done)
        bar = "#" * int(30 * done / self.total)
        line = f"{done:5d}/{self.total} [{bar:<30}] {text} | {_hms(elapsed)} elapsed, {_hms(eta)} left"
        if self.tty:
            print("\r" + line, end="\n" if done == self.total else "", file=sys.stderr, flush=True)
        elif done % self.every == 0 or done == self.total:
            print(line, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        print(("\n" if self.tty else "") + text, file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# ----------------------------------------------------------------------------- training
@functools.lru_cache(maxsize=1)
def training_data():
    """The corpus and its instruction pairs (parsing every file for docstrings takes a while: once per process)."""
    corpus = load_corpus()
    return corpus, instruct_pairs(corpus.train)


def train(cfg: TrainConfig, out_dir: Path, device: torch.device, ckpt_every: int = 50, eval_every: int = 100,
          log_every: int = 10, eval_rows: int = 32, stop_after: Optional[int] = None) -> Optional[Path]:
    """Run (or resume) training into ``out_dir``; return the directory of the exported checkpoint
    (None when ``stop_after`` ended the run early: run again to continue)."""
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise FileNotFoundError(f"--init_from: no such file: {cfg.init_from}")
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, log_path = out_dir / "state.pt", out_dir / "log.jsonl"
    config_path = out_dir / "config.json"
    config = dataclasses.asdict(cfg)
    if config_path.exists():
        # A field added since the run began has its default there (it did not exist, so it did nothing).
        saved = {**{f.name: f.default for f in dataclasses.fields(TrainConfig)}, **json.loads(config_path.read_text())}
        if saved != config:
            changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
            raise ValueError(f"{out_dir} holds a run with a different configuration {changed} (saved, asked); "
                             "use another --out_dir or delete it")
    else:
        config_path.write_text(json.dumps(config, indent=2))

    corpus, pairs = training_data()
    print(corpus.describe(), file=sys.stderr)
    if corpus.missing_heldout:
        print(f"warning: held-out files missing from this Python: {corpus.missing_heldout}", file=sys.stderr)
    if len(corpus.library) == len(corpus.train):
        print("warning: this Python has no test suite (Debian: apt install libpython3-testsuite), so the training "
              "data and the trained model differ from the model card's", file=sys.stderr)
    tok_path = out_dir / "tokenizer.model"
    if not tok_path.exists():
        train_tokenizer(corpus.library.values(), tok_path, cfg.vocab_size)
        print(f"trained the tokenizer: {tok_path}", file=sys.stderr)
    tok = Tokenizer(tok_path)
    if tok.n_words != cfg.vocab_size:
        raise ValueError(f"{tok_path} has {tok.n_words} pieces, the configuration says {cfg.vocab_size}")
    sampler = ExampleSampler(tok, list(corpus.train.values()), pairs, cfg.seq_len,
                             fim_rate=cfg.fim_rate, spm_rate=cfg.spm_rate, instruct_rate=cfg.instruct_rate,
                             long_share=cfg.long_share, short_max=cfg.short_max, line_split_rate=cfg.line_split_rate,
                             one_line_share=cfg.one_line_share)
    eval_set, eval_bytes = heldout_rows(tok, list(corpus.heldout.values()), cfg.seq_len, eval_rows)
    eval_tokens = sum(len(r) - 1 for r in eval_set)

    torch.manual_seed(cfg.seed)
    model = Transformer(cfg.model_args())
    init_weights(model, cfg.seed)
    model.to(device).train()
    opt = make_optimizer(model, cfg)
    start = 0
    if cfg.init_from and not state_path.exists():
        model.load_state_dict(torch.load(cfg.init_from, map_location=device, weights_only=True)["model"])
        print(f"starting from the weights of {cfg.init_from}", file=sys.stderr)
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming from step {start} ({state_path})", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters {cfg.model_args()}; {cfg.steps} steps of "
          f"{cfg.batch_size}×{cfg.seq_len} tokens on {device} ({torch.get_num_threads()} threads)", file=sys.stderr)

    def save(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
        os.replace(tmp, state_path)  # atomic: an interrupted save leaves the previous state intact

    def log(record: Dict) -> None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    progress = Progress(cfg.steps, start, log_every)
    t_last, tokens_since = time.time(), 0
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        tokens, skip, psm_index = (torch.from_numpy(a).to(device) for a in sampler.batch(cfg.seed, step, cfg.batch_size))
        with autocast(cfg, device):
            loss = lm_loss(model, tokens, skip, tok.bos_id, psm_weights(psm_index, cfg))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        tokens_since += tokens.numel() - tokens.shape[0]
        speed = tokens_since / (time.time() - t_last)
        progress.update(step, f"loss {loss.item():.3f} | lr {lr:.2e} | {speed:.0f} tok/s")
        record = {"step": step + 1, "loss": round(loss.item(), 4), "lr": lr, "grad_norm": round(float(grad_norm), 3),
                  "time": time.time()}
        if (step + 1) % eval_every == 0 or step + 1 == cfg.steps:
            h = heldout_loss(model, eval_set, cfg, device)
            bpb = h * eval_tokens / eval_bytes / math.log(2)
            record.update(heldout_loss=round(h, 4), heldout_bits_per_byte=round(bpb, 4))
            progress.message(f"step {step + 1}: held-out loss {h:.3f} nats/token, {bpb:.3f} bits/byte "
                             f"({len(eval_set)} fixed chunks)")
        log(record)
        if (step + 1) % ckpt_every == 0 or step + 1 in (cfg.steps, stop_after):
            save(step + 1)
            t_last, tokens_since = time.time(), 0
        if step + 1 == stop_after and step + 1 < cfg.steps:
            print(f"stopped after step {step + 1}; run the same command again to continue", file=sys.stderr)
            return None

    export_dir = out_dir / "model"
    export_checkpoint(model, tok_path, export_dir)
    print(f"wrote {export_dir} (params.json, consolidated.00.pth, tokenizer.model)", file=sys.stderr)
    return export_dir


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("runs/tiny"), help="run folder (state, log, tokenizer, model)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--ckpt_every", type=int, default=50)
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--stop_after", type=int, default=None,
                        help="save and stop after this step (run the same command again to continue)")
    for f in dataclasses.fields(TrainConfig):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    for name in ("steps", "batch_size", "seq_len", "ckpt_every", "eval_every", "log_every", "psm_weighted_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if not args.psm_weight > 0:
        raise ValueError(f"--psm_weight must be positive (1 weights nothing), got {args.psm_weight}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.time()
    train(cfg, args.out_dir, device, args.ckpt_every, args.eval_every, args.log_every, stop_after=args.stop_after)
    print(f"done in {_hms(time.time() - t0)}", file=sys.stderr)


if __name__ == "__main__":
    main()

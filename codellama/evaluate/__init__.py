"""HumanEval and MBPP pass@k for Code Llama checkpoints, with generated code run in a sandbox.

``python -m codellama.evaluate run|generate|score`` (see ``__main__``) or, from Python::

    from codellama.evaluate import evaluate
    report = evaluate("CodeLlama-7b", "humaneval", out_dir="eval/7b")   # greedy pass@1
    report["pass@1"]

One module per concept: ``data`` (benchmarks), ``prompts`` (prompts, stop sequences, completions),
``sandbox``, ``isolation``, ``seccomp`` and ``runner`` (isolated execution), ``passk`` (the estimator), ``run`` (generate, score,
resume), ``progress`` (the progress bar).
"""

from .data import Benchmark, Task, load_benchmark, load_humaneval, load_mbpp
from .passk import estimate, pass_at_k
from .prompts import build_prompt, completion_from_generation, truncate
from .run import evaluate, generate, generate_samples, llama_sampler, score_samples
from .sandbox import Limits, Outcome, Program, SandboxUnavailable, active_layers, check_isolation, run_program, run_programs

__all__ = ["Benchmark", "Task", "load_benchmark", "load_humaneval", "load_mbpp", "estimate", "pass_at_k",
           "build_prompt", "completion_from_generation", "truncate", "evaluate", "generate", "generate_samples",
           "llama_sampler", "score_samples", "Limits", "Outcome", "Program", "SandboxUnavailable", "active_layers",
           "check_isolation", "run_program", "run_programs"]

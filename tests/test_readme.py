"""The README's Python snippets run as written, in the order written, on a fresh clone (the bundled model)."""

import re

import pytest

from conftest import ROOT

# Sections whose snippets run on the bundled model; the others need a real checkpoint, a GPU or minutes.
RUNNABLE = ["Use it from Python", "The engine: many callers, one model", "The model, directly",
            "The bundled tiny model"]


def snippets(heading: str):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no section {heading!r}"
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.S | re.M)


@pytest.mark.parametrize("heading", RUNNABLE)
def test_readme_snippets_run_as_written(heading, capsys):
    blocks = snippets(heading)
    assert blocks
    namespace = {}
    for code in blocks:
        exec(compile(code, f"README.md: {heading}", "exec"), namespace)

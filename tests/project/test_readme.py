"""The documentation's Python snippets run as written, in the order written, on a fresh clone (the bundled model)."""

import re

import pytest

from conftest import ROOT

# Files (and, for the README, the section) whose snippets run on the bundled model; the other documents'
# snippets need a real checkpoint, a GPU or minutes.
RUNNABLE = [("README.md", "Use it from Python"), ("README.md", "The main uses"), ("docs/engine.md", "The engine: many callers, one model"),
            ("docs/model.md", None), ("docs/tiny-model.md", None)]


def snippets(name: str, heading):
    text = (ROOT / name).read_text(encoding="utf-8")
    if heading is not None:
        match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
        assert match, f"{name} has no section {heading!r}"
        text = match.group(1)
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("name, heading", RUNNABLE)
def test_documented_snippets_run_as_written(name, heading, capsys):
    blocks = snippets(name, heading)
    assert blocks
    namespace = {}
    for code in blocks:
        exec(compile(code, f"{name}: {heading or 'all'}", "exec"), namespace)


def test_every_document_the_readme_points_to_exists():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", readme)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link

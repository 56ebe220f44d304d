"""The package's structure: dependencies point one way, names mean one thing, runtime choices are clear."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

PACKAGE = ROOT / "codellama"

# Who may import whom at module level (``codellama.X`` → the first part of each library import).
# The map of ../shared/docs/style.md: arrows point down only; the model never imports the engine,
# kernels never import the model, nothing imports a command-line module.
ALLOWED = {
    "ops": set(),
    "kernels": {"ops", "kernels"},
    "config": set(),
    "runtime": set(),
    "distributed": {"config"},
    "model": {"config", "distributed", "ops"},
    "tokenizer": set(),
    "prompts": {"tokenizer"},
    "sampling": set(),
    "cpu": set(),
    "engine": {"engine", "model", "distributed", "sampling", "tokenizer"},  # never the server or generation
    # The server stands on generation and the engine; no protocol logic below it (nothing imports serve).
    "serve": {"serve", "engine", "generation", "prompts", "tokenizer", "checkpoint", "ops", "runtime",
              "commands"},
}


def library_imports(path: pathlib.Path) -> set:
    """First components of the codellama modules that ``path`` imports at module level (not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parts[:-1]  # ("codellama",) or ("codellama", "kernels")
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if len(parts) == 1:  # `from . import x`
                    parts += [alias.name for alias in node.names][:1]
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "codellama" and len(parts) > 1:
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "codellama" and len(parts) > 1:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_dependencies_point_one_way(module):
    target = PACKAGE / module
    files = sorted(target.glob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    for path in files:
        stray = library_imports(path) - ALLOWED[module] - {path.stem if target.is_dir() else module}
        assert not stray, f"{path.relative_to(ROOT)} imports codellama.{sorted(stray)} at module level"


def test_nothing_imports_the_server():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "serve" not in path.relative_to(PACKAGE).parts:
            assert "serve" not in library_imports(path), f"{path.relative_to(ROOT)} imports the server"


def test_no_top_level_kernels_package():
    """A top-level ``kernels`` would collide with the PyPI package of that name."""
    assert not (ROOT / "kernels").exists()
    assert (PACKAGE / "kernels" / "triton_ops.py").is_file() and (PACKAGE / "kernels" / "checks.py").is_file()


def test_convert_means_one_thing():
    """``from codellama import convert`` is the command-line module, before and after anything imports it."""
    code = ("import runpy, codellama; from codellama import convert as a; import codellama.convert; "
            "from codellama import convert as b; assert a is b and hasattr(a, 'main'), (a, b); "
            "from codellama import convert_checkpoint; assert callable(convert_checkpoint)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-W", "error", "-m", "codellama.convert", "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, r.stderr


def test_auto_says_once_why_triton_is_not_used(monkeypatch, capsys):
    from codellama import kernels, ops
    monkeypatch.setattr(kernels, "triton_available", lambda: (False, "no GPU driver (test)"))
    monkeypatch.setattr(ops, "_told", set())
    assert ops.select_ops("auto", "cuda") is ops.TorchOps
    assert ops.select_ops("auto", "cuda") is ops.TorchOps
    err = capsys.readouterr().err
    assert err.count("no GPU driver (test)") == 1 and "using PyTorch attention" in err
    with pytest.raises(ValueError, match="attention='triton' is unavailable here: no GPU driver"):
        ops.select_ops("triton", "cuda")
    assert ops.select_ops("auto", "cpu") is ops.TorchOps and capsys.readouterr().err == ""  # CPU: nothing to say


@pytest.mark.parametrize("device, match", [
    ("tpu", "unknown device 'tpu'"),
    (3.5, "device must be a string"),
    pytest.param("cuda", "not available", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_devices_are_named(device, match):
    from codellama.runtime import resolve_device
    with pytest.raises(ValueError, match=match):
        resolve_device(device)


def test_model_dtypes_only():
    from codellama.runtime import parse_dtype
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    for bad in (torch.int8, "int8", 16):
        with pytest.raises(ValueError, match="dtype"):
            parse_dtype(bad)

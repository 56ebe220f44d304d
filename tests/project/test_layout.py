"""The package's structure: dependencies point one way, names mean one thing, runtime choices are clear."""

import ast
import pathlib
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

PACKAGE = ROOT / "codellama"

# Who may import whom (``codellama.X`` → the first part of each library import), at module level and inside
# functions alike. The map of ../shared/docs/style.md: arrows point down only; the model never imports the
# engine, kernels never import the model, the engine never imports the server, no library module imports a
# program (``cli``). Every module of the package is named here: a new one must say what it stands on.
ALLOWED = {
    "ops": {"cpu_kernels"},
    "kernels": {"ops"},
    "config": set(),
    "runtime": set(),
    "distributed": {"config"},
    "model": {"config", "distributed", "ops", "kernels"},
    "tokenizer": set(),
    "prompts": {"tokenizer"},
    "sampling": set(),
    "cpu_kernels": set(),
    "cpu": {"cpu_kernels"},
    "quantize": {"cpu", "kernels"},
    "formats": {"config", "distributed", "model", "quantize", "tokenizer"},  # one module per checkpoint format
    "checkpoint": {"config", "cpu", "cpu_kernels", "distributed", "formats", "model", "runtime", "quantize"},
    "save": {"checkpoint", "config", "formats", "runtime", "tokenizer", "quantize"},
    "testing": {"checkpoint", "config", "formats", "model", "quantize", "save"},
    "engine": {"model", "distributed", "sampling", "tokenizer"},  # never the server, generation or loading
    "options": {"ops", "quantize", "runtime"},
    "build": {"checkpoint", "distributed", "engine", "formats", "kernels", "model", "options", "tokenizer"},
    "generation": {"build", "checkpoint", "engine", "model", "options", "quantize", "prompts", "tokenizer"},
    # The server stands on the engine; no protocol logic below it (nothing imports serve).
    "serve": {"engine", "prompts", "quantize", "tokenizer"},
    "evaluate": {"build", "generation", "options", "tokenizer"},
    # The programs stand on everything; nothing in the library imports them.
    "cli": {"build", "checkpoint", "distributed", "engine", "evaluate", "generation", "options", "quantize",
            "runtime", "save", "serve"},
}
# Modules that only start a program (``python -m codellama.serve`` …): each imports its program and nothing else.
ENTRY_POINTS = {"__main__.py", "serve/__main__.py", "evaluate/__main__.py", "quantize/__main__.py", "convert.py"}


def library_imports(path: pathlib.Path) -> set:
    """First components of the codellama modules that ``path`` imports anywhere (module level or inside a
    function; not under ``if TYPE_CHECKING:``, which never runs)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = path.relative_to(ROOT).parts[:-1]  # ("codellama",) or ("codellama", "kernels")
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if len(parts) == 1:  # `from . import x`
                    parts += [alias.name for alias in node.names][:1]
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "codellama" and len(parts) > 1 and not parts[1].startswith("__"):  # not __version__
                found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "codellama" and len(parts) > 1:
                    found.add(parts[1])
    return found


def modules():
    """``(top-level module name, path)`` for every Python file of the package but its ``__init__.py``."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.as_posix() == "__init__.py":
            continue
        yield rel.parts[0].removesuffix(".py"), path


def test_every_module_is_named_in_the_map():
    unnamed = sorted({name for name, path in modules() if name not in ALLOWED
                      and path.relative_to(PACKAGE).as_posix() not in ENTRY_POINTS})
    assert not unnamed, f"say what these stand on in ALLOWED: {unnamed}"


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_dependencies_point_one_way(module):
    for name, path in modules():
        if name != module or path.relative_to(PACKAGE).as_posix() in ENTRY_POINTS:
            continue
        stray = library_imports(path) - ALLOWED[module] - {module}
        assert not stray, f"{path.relative_to(ROOT)} imports codellama.{sorted(stray)}"


def test_entry_points_only_start_their_program():
    for rel in sorted(ENTRY_POINTS):
        assert library_imports(PACKAGE / rel) <= {"cli"}, rel


def test_the_map_has_no_cycle():
    seen, done = set(), set()

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        if module in done:
            return
        for dep in ALLOWED[module]:
            visit(dep, path + [module])
        done.add(module)

    for module in ALLOWED:
        visit(module, [])


def test_nothing_imports_the_server_or_a_program():
    for name, path in modules():
        if name in ("serve", "cli") or path.relative_to(PACKAGE).as_posix() in ENTRY_POINTS:
            continue
        assert not {"serve", "cli"} & library_imports(path), f"{path.relative_to(ROOT)} imports the server or a program"


def test_no_top_level_kernels_package():
    """A top-level ``kernels`` would collide with the PyPI package of that name."""
    assert not (ROOT / "kernels").exists()
    assert (PACKAGE / "kernels" / "triton_ops.py").is_file() and (PACKAGE / "kernels" / "checks.py").is_file()


def test_convert_means_one_thing():
    """``from codellama import convert`` is the command-line module, before and after anything imports it;
    ``python -m codellama.quantize`` and ``python -m codellama quantize`` start without runpy's warning."""
    code = ("import runpy, codellama; from codellama import convert as a; import codellama.convert; "
            "from codellama import convert as b; assert a is b and hasattr(a, 'main'), (a, b); "
            "from codellama import convert_checkpoint; assert callable(convert_checkpoint)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for command in (["-m", "codellama.convert"], ["-m", "codellama.quantize"], ["-m", "codellama", "quantize"],
                    ["-m", "codellama.serve"], ["-m", "codellama.evaluate", "run"]):
        r = subprocess.run([sys.executable, "-W", "error", *command, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and "RuntimeWarning" not in r.stderr, (command, r.stderr)


def test_auto_says_once_why_triton_is_not_used(monkeypatch, capsys):
    from codellama import kernels, ops
    monkeypatch.setattr(kernels, "triton_available", lambda: (False, "no GPU driver (test)"))
    monkeypatch.setattr(kernels, "_told", set())
    assert kernels.select_ops("auto", "cuda") is ops.TorchOps
    assert kernels.select_ops("auto", "cuda") is ops.TorchOps
    err = capsys.readouterr().err
    assert err.count("no GPU driver (test)") == 1 and "using PyTorch attention" in err
    with pytest.raises(ValueError, match="attention='triton' is unavailable here: no GPU driver"):
        kernels.select_ops("triton", "cuda")
    assert kernels.select_ops("auto", "cpu") is ops.TorchOps and capsys.readouterr().err == ""  # CPU: nothing to say


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

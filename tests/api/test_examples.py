"""The example scripts, run as a user runs them: subprocesses, with python and with torchrun."""

import os
import subprocess
import sys

import pytest

from codellama import ModelArgs

from conftest import ROOT
from helpers import write_checkpoint


def run(script, *args, launcher=None):
    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def code_ckpt(tmp_path_factory):
    """A random model of Code Llama's vocabulary, saved with the Code Llama-like tokenizer."""
    from conftest import shared_path
    tok = shared_path("tokenizers", "codellama-like.model")
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, rope_theta=1e6)
    return write_checkpoint(tmp_path_factory.mktemp("codellama_tiny"), args, "meta", tokenizer=str(tok))


def test_completion_on_stories(stories_dir):
    r = run("example_completion.py", "--ckpt_dir", str(stories_dir / "meta"), "--max_gen_len", "16")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 2 and "def fizzbuzz(n: int):" in r.stdout


def test_completion_streams_on_the_hf_layout(stories_dir):
    r = run("example_completion.py", "--ckpt_dir", str(stories_dir / "hf"), "--max_gen_len", "16", "--stream",
            "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def fizzbuzz(n: int):\n> ") and len(r.stdout.split("> ", 1)[1].strip()) > 10


def test_instruct_on_stories(stories_dir):
    r = run("example_instruct.py", "--ckpt_dir", str(stories_dir / "meta"), "--max_gen_len", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> Assistant:") == 3


def test_infill_on_a_model_that_cannot_infill(stories_dir):
    r = run("example_infill.py", "--ckpt_dir", str(stories_dir / "meta"))
    assert r.returncode == 2
    assert "error: this model cannot infill" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("script, marker, count", [("example_completion.py", "\n" + "=" * 34 + "\n", 2),
                                                   ("example_infill.py", "Filled text", 4),
                                                   ("example_instruct.py", "> Assistant:", 3)])
def test_examples_on_a_code_llama_shaped_checkpoint(code_ckpt, script, marker, count):
    r = run(script, "--ckpt_dir", code_ckpt, "--max_gen_len", "6", "--dtype", "fp32", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(marker) == count
    if script == "example_infill.py":
        assert 'def remove_non_ascii(s: str) -> str:\n    """ ' in r.stdout and "    return result\n" in r.stdout


def test_completion_under_torchrun(stories_dir):
    r = run("example_completion.py", "--ckpt_dir", str(stories_dir / "meta"), "--max_gen_len", "8",
            launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 2


def test_bad_checkpoint_dir_is_one_clear_line(tmp_path):
    r = run("example_completion.py", "--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and r.stderr.startswith("error: --ckpt_dir: checkpoint directory not found") and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the bundled tiny model
@pytest.mark.parametrize("script, marker, count", [("example_completion.py", "\n" + "=" * 34 + "\n", 2),
                                                   ("example_infill.py", "Filled text", 4),
                                                   ("example_instruct.py", "> Assistant:", 3)])
def test_examples_run_with_no_arguments(script, marker, count):
    r = run(script)
    assert r.returncode == 0, r.stderr
    assert "using the bundled tiny demonstration model" in r.stderr and "--ckpt_dir DIR" in r.stderr
    assert r.stdout.count(marker) == count


def test_infill_example_completes_a_missing_return_line_with_valid_python():
    import ast
    prefix = "def total(xs):\n    result = 0\n    for x in xs:\n        result += x\n"  # one of test_tiny_model's cases
    suffix = "\n"
    r = run("example_infill.py", "--prompt", prefix + "<FILL>" + suffix, "--max_gen_len", "32")
    assert r.returncode == 0, r.stderr
    filled = r.stdout.split("================= Filled text =================\n\n", 1)[1]
    full_text = filled[:-1]  # print() added one newline
    assert full_text.startswith(prefix) and full_text.endswith(suffix)
    middle = full_text[len(prefix):len(full_text) - len(suffix)]
    assert middle.strip() == "return result"
    ast.parse(full_text)  # the filled function is valid Python


# ----------------------------------------------------------------------------- python -m codellama
def module(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "codellama", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)


def test_one_entry_point_lists_every_command():
    r = module()
    assert r.returncode == 0
    for name in ("complete", "infill", "chat", "convert", "evaluate"):
        assert f"\n  {name} " in r.stdout
    r = module("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr


def test_help_keeps_the_usage_lines_and_shows_defaults():
    r = module("infill", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m codellama infill")
    assert "\n    python -m codellama infill --prompt $'def area(r):\\n    <FILL>\\n'\n" in r.stdout
    assert "(default: 128)" in r.stdout and "(default: 256)" in r.stdout  # max_gen_len, max_seq_len


def test_the_entry_point_runs_the_programs_and_says_errors_in_one_line():
    r = module("complete", "--prompt", "def add(a, b):", "--max_gen_len", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("def add(a, b):\n> "), r.stderr
    r = module("convert", "--help")
    assert r.returncode == 0 and "--to" in r.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_an_unavailable_device_is_one_line():
    r = run("example_completion.py", "--device", "cuda")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: --device cuda: device 'cuda' is not available")


def test_the_bundled_model_notice_is_said_once_under_torchrun():
    r = run("example_completion.py", "--max_gen_len", "4",
            launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("bundled tiny demonstration model") == 1

"""Every benchmark script runs on any x86-64 CPU: here on an emulated AVX2-only one (no oneDNN bf16), with tiny
settings. The figures themselves come from the README's commands on a quiet machine."""

import os
import py_compile
import subprocess
import sys

import pytest

from conftest import ROOT

BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_every_benchmark_compiles(path):
    py_compile.compile(str(path), doraise=True)


@pytest.mark.slow
@pytest.mark.parametrize("script, args", [
    ("bench_generate.py", ["--size", "small", "--batch", "1", "2", "--new-tokens", "4", "--prompt-len", "8",
                           "--repeat", "1"]),
    ("bench_engine.py", ["--size", "small", "--batch", "2", "--new-tokens", "4", "--skip", "compile"]),
    ("bench_speculative.py", ["--models", "tiny", "--n", "1", "--new-tokens", "8"]),
    ("load_memory.py", ["--size-gb", "0.05"]),
    ("load_memory.py", ["--size-gb", "0.05", "--quantized"]),
    ("bench_7b.py", ["--size", "tiny", "--prompt-len", "16", "--new-tokens", "4", "--repeat", "1"]),
    ("bench_attention.py", ["--cpu", "--cpu-lengths", "16", "--cpu-batch", "2"]),
])
def test_benchmarks_run_on_an_avx2_only_cpu(script, args):
    env = {**os.environ, **AVX2, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       env=env, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr

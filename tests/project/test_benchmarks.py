"""Every benchmark script runs on any x86-64 CPU: here on an emulated AVX2-only one (no oneDNN bf16), with tiny
settings. The figures themselves come from the README's commands on a quiet machine."""

import os
import py_compile
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import benchmark

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


# A child answering bench_7b's serving protocol: a JSON line when ready, a tok/s per batch size sent, and its
# memory after "end"; "fail" in its argv makes it die with a message first.
FAKE_ROW = r"""
import json, sys
speed = float(sys.argv[2])
if speed < 0:
    sys.exit("could not load the row")
print("noise a child may print", flush=True)
print(json.dumps({"load_s": 0.5}), flush=True)
n = 0
for line in sys.stdin:
    if line.strip() == "end":
        break
    n += 1
    print(json.dumps(speed * int(line) * (2 if n == 2 else 1)), flush=True)
print(json.dumps({"rss": n}), flush=True)
"""


def bench_7b():
    return benchmark("bench_7b")


def test_bench_7b_interleaves_two_rows_measurement_by_measurement():
    bench = bench_7b()
    ours, theirs = bench.Served(FAKE_ROW, "3"), bench.Served(FAKE_ROW, "2")
    assert ours.result == {"load_s": 0.5}
    a, b, ratios = bench.interleaved(ours, theirs, [1, 4], rounds=3)
    # each side's second answer is doubled: the medians and the per-round ratios show it
    assert a == {"load_s": 0.5, "rss": 6, "decode1": 3.0, "decode4": 12.0}
    assert b == {"load_s": 0.5, "rss": 6, "decode1": 2.0, "decode4": 8.0}
    assert ratios == {1: [1.5, 1.5, 1.5], 4: [1.5, 1.5, 1.5]}  # (both doubled in the same round: taking turns)
    assert ours.p.returncode == 0 and theirs.p.returncode == 0
    with pytest.raises(RuntimeError, match="could not load the row"):
        bench.Served(FAKE_ROW, "-1")


def test_bench_7b_alternates_whole_runs_and_pairs_each_round():
    bench = bench_7b()
    calls = []

    def row(side, speeds):  # a whole run of a row: its figures, which change from run to run
        def run():
            calls.append(side)
            n = calls.count(side)
            return {"load_s": n, "decode1": speeds[n - 1], "decode4": 4 * speeds[n - 1]}
        return run

    a, b, ratios = bench.alternated(row("ours", [3, 6, 3]), row("theirs", [2, 4, 1]), [1, 4], rounds=3)
    assert calls == ["ours", "theirs", "theirs", "ours", "ours", "theirs"]  # who goes first alternates
    assert a == {"load_s": 2, "decode1": 3, "decode4": 12} and b == {"load_s": 2, "decode1": 2, "decode4": 8}
    assert ratios == {1: [1.5, 1.5, 3.0], 4: [1.5, 1.5, 3.0]}  # each round's two runs against each other


def test_int4_formats_compare_like_llama_cpps_own_quantizers():
    """bench_quant.py --formats: llama.cpp's Q4_0 / Q4_1 through the gguf package's reference quantizers, next to
    this library's group sizes, with the bits a weight each costs."""
    pytest.importorskip("gguf")
    import torch
    bench_quant = benchmark("bench_quant")
    table = bench_quant.int4_formats()
    assert {name: bits for name, (bits, _) in table.items()} == {
        "int4 g32": 5.0, "int4 g64": 4.5, "int4 g128": 4.25, "Q4_0": 4.5, "Q4_1": 5.0}
    exact = torch.arange(-8.0, 8.0).repeat(64, 4)  # 16 integer levels in every block: each format keeps them exactly
    for name, (_, fake) in table.items():
        assert torch.equal(fake(exact), exact), name
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    err = {name: bench_quant.relative_error(fake(w), w) for name, (_, fake) in table.items()}
    assert err["int4 g32"] < err["Q4_0"] < err["int4 g64"] < err["int4 g128"], err  # more bits, less error
    assert abs(err["Q4_1"] / err["int4 g32"] - 1) < 0.02, err  # Q4_1 is int4 g32's scheme (fp16 for bf16)


def test_bench_7b_names_the_librarys_default_int4_row():
    from codellama.quantize import QuantConfig
    rows = bench_7b().OURS
    assert QuantConfig(**rows["int4-g64"][2]) == QuantConfig("int4")  # the row the docs call the default
    assert QuantConfig(**rows["int4"][2]) != QuantConfig("int4")


def test_the_cpu_prompt_attention_table_times_the_kernel_against_torchs(capsys):
    from codellama import cpu_kernels
    if cpu_kernels.native_isa("bf16") != 2:
        pytest.skip("the native prompt attention needs AVX-512 BF16")
    benchmark("bench_attention").main(["--cpu-prefill", "--cpu-prefix", "0", "70", "--chunk", "40"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 194M", "| 7B"))]
    assert [row.split(" | ")[2:4] for row in rows] == [["0", "40"], ["70", "40"]] * 2
    assert all(row.rstrip(" |").endswith("×") for row in rows)


def test_the_bf16_read_order_table_times_the_row_kernels_two_orders(capsys):
    from codellama import cpu_kernels
    if cpu_kernels.native_isa("bf16") != 2:
        pytest.skip("the bf16 row kernel has one read order without AVX-512 BF16")
    benchmark("bench_cpu_kernels").main(["--schemes", "bf16-order", "--rows", "1", "--layers", "1", "--rounds", "2"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| bf16-order")]
    assert len(rows) == 1 and rows[0][1] == "1" and rows[0][4].endswith("×**")
    assert rows[0][5] == rows[0][6].rstrip(" |")  # the same outputs, so the same error against float64


@pytest.mark.slow
def test_the_editor_replay_runs_against_a_random_checkpoint_it_writes(tmp_path):
    """bench_editor end to end at a small random model: the HF checkpoint it writes, our server in three modes,
    every request answered, and the prompt cache's answers the same as without it (it is exact)."""
    tokenizer = ROOT.parent / "shared" / "data" / "tokenizers" / "codellama-like.model"
    if not tokenizer.is_file():
        pytest.skip(f"needs ../shared/data: {tokenizer} is absent")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_editor.py"), "--size", "small", "--requests",
                        "8", "--modes", "base", "cache", "spm+shift", "--skip-llama-cpp", "--ctx", "1024", "--batch",
                        "512", "--key-ms", "20", "--move-ms", "50", "--pause-ms", "1000", "--model-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    table = r.stdout[r.stdout.index("| server |"):]
    cells = [[c.strip("| ") for c in line.split(" | ")] for line in table.splitlines()[2:5]]
    rows = {row[0]: row for row in cells}
    assert sorted(rows) == ["base", "cache", "spm+shift"]
    assert all(row[8] == "8/8" for row in rows.values())  # answered
    assert rows["cache"][10] == "8/8"  # the same answers as without the cache
    assert (tmp_path / "small-bf16" / "ckpt-hf" / "config.json").is_file()

"""The prepared GPU suite runs on the CPU first (``--dry-run``: tiny shapes, Triton's interpreter, the same code
paths), so it is known to work before a GPU ever runs it; and its memory plan adds up."""

import json
import os
import subprocess
import sys

import pytest
import torch

from codellama import ModelArgs

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def dry_run(tmp_path, *skip):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(tmp_path)]
    if skip:
        cmd += ["--skip", *skip]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    records = json.loads((tmp_path / "gpu_suite.json").read_text())
    return records, (tmp_path / "gpu_suite.md").read_text()


def test_dry_run_of_the_fast_sections(tmp_path):
    records, md = dry_run(tmp_path, "decode")
    sections = {r["section"] for r in records}
    assert sections == {"kernels", "attention", "long", "engine"}
    assert all(r["ok"] for r in records if r["section"] == "kernels")  # every kernel within tolerance of float64
    assert {r["kernel"] for r in records if r["section"] == "kernels"} == {
        "rms_norm", "rotary", "flash_attention", "decode_attention (ragged)"}
    assert "failed" not in md and "### 256 tokens on one device" in md


@pytest.mark.slow
def test_dry_run_of_every_section(tmp_path):
    records, md = dry_run(tmp_path)
    decode = [r for r in records if r["section"] == "decode"]
    assert {r["variant"] for r in decode} >= {"eager, PyTorch SDPA attention", "eager, Triton kernels",
                                              "compiled step (CUDA graphs)"}
    assert "failed" not in md


def test_the_memory_plan_of_100k_tokens():
    from gpu_suite import SEVEN_B, planned_bytes
    plan = planned_bytes(ModelArgs(**SEVEN_B), torch.bfloat16, 100_000, 8192)
    assert plan["kv_cache"] == 100_000 * 512 * 1024  # 512 KiB per token for 7B in bf16 (reference.md)
    assert 13.4e9 < plan["weights"] < 13.6e9 and 0.5e9 < plan["activations"] < 2e9  # a chunk of 8k: ~1.3 GB
    assert plan["total"] == plan["weights"] + plan["kv_cache"] + plan["activations"]

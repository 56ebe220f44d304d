"""The engine under torchrun: rank 0 schedules, every rank runs the same steps (gloo, 2 CPU ranks)."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from codellama import ModelArgs
from codellama.engine import Engine, SamplingParams
from codellama.checkpoint import BUNDLED_CKPT_DIR, load_model
from codellama.testing import write_checkpoint

from conftest import ROOT

from engine_tp_worker import MAX_TOKENS, PROMPTS

HERE = pathlib.Path(__file__).resolve().parent  # the torchrun workers live beside their tests

pytestmark = pytest.mark.distributed

GQA = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, multiple_of=64, rope_theta=1e6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_serve_concurrent_requests_like_one_process(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", GQA, "meta", seed=5, shards=2,
                            tokenizer=os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "engine_tp_worker.py"), str(out), ckpt]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    model = load_model(ckpt, device="cpu")
    for i, prompt in enumerate(PROMPTS):
        alone = Engine(model, max_batch_size=1, max_seq_len=64).submit(
            prompt, SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i])).result().tokens
        assert got[i] == alone, i

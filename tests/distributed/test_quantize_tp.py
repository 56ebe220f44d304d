"""Tensor parallelism of quantized models: 2 CPU ranks (torchrun, gloo) against one process.

Each rank reads its block of a quantized checkpoint's integer codes and of their scales together (cut by
``codellama.distributed``'s one table), or quantizes its own block of a full-precision checkpoint.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

from codellama import ModelArgs, Tokenizer, load_model
from codellama.save import quantize_checkpoint

from conftest import ROOT

from helpers import write_checkpoint
from test_distributed import free_port
from tp_worker import PROMPTS, TOKENS

HERE = pathlib.Path(__file__).resolve().parent  # the torchrun workers live beside their tests

pytestmark = pytest.mark.distributed

# dim 128 and FFN 384: 64 and 192 inputs a rank, whole groups of 32 and 64 for the row-parallel layers.
GQA = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64, rope_theta=1e6)


def torchrun(out, tokenizer, specs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(HERE / "quant_tp_worker.py"), str(out), str(tokenizer), *specs]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(HERE)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def single_process(spec, tokenizer):
    from codellama import Llama
    ckpt_dir, _, scheme = spec.partition("@")
    llama = Llama(load_model(ckpt_dir, device="cpu", quantize=scheme or None), Tokenizer(tokenizer), 64, 2)
    with torch.inference_mode():
        logits = llama.model(TOKENS)
    return logits, llama.generate(PROMPTS, 12, temperature=0, stop_token=[])[0]


def test_two_ranks_split_codes_and_scales_together(tmp_path):
    from conftest import shared_path
    tokenizer = shared_path("stories260K", "meta", "tokenizer.model")
    full = write_checkpoint(tmp_path / "full", GQA, "meta", seed=3, shards=2)
    quantize_checkpoint(full, tmp_path / "int8", "int8")
    from codellama.quantize import QuantConfig
    quantize_checkpoint(full, tmp_path / "int4", QuantConfig("int4", 32, include_output=True, include_embeddings=True))
    quantize_checkpoint(full, tmp_path / "mixed", QuantConfig("int4", 64, include_output=True, output_scheme="int8"))
    specs = [str(tmp_path / "int8"), str(tmp_path / "int4"), str(tmp_path / "mixed"), f"{full}@int4"]
    r = torchrun(tmp_path / "out.pt", tokenizer, specs)
    assert r.returncode == 0, r.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for spec in specs:
        logits, greedy = single_process(spec, tokenizer)
        got = results[spec]
        assert got["world"] == 2
        # The integer kernels multiply in bf16: each rank's partial sums are rounded once more than one process's.
        torch.testing.assert_close(got["logits"], logits, atol=2e-2 * float(logits.abs().max()), rtol=0)
        if "@" not in spec:  # quantized on load, near-ties of random weights may go either way after that rounding
            assert got["greedy"] == greedy, spec

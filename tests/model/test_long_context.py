"""Long context on the CPU: Hugging Face's logits past 16k positions through chunked prefill, and prefill
memory that does not grow with the prompt beyond the KV cache."""

import os
import subprocess
import sys

import pytest
import torch

from codellama import ModelArgs, load_model
from codellama.testing import write_checkpoint

from conftest import ROOT

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is the numerical oracle")

# Code Llama's RoPE base; positions past the 16,384 it was fine-tuned on.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=2, vocab_size=256, multiple_of=16, rope_theta=1e6)
LENGTH, CHUNK, TAIL = 16384 + 48, 2048, 48


def test_chunked_prefill_past_16k_gives_hugging_faces_logits(tmp_path):
    ckpt = write_checkpoint(tmp_path / "hf", ARGS, "hf", seed=7)
    tokens = torch.randint(0, ARGS.vocab_size, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    hf = transformers.LlamaForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa")
    with torch.inference_mode():
        expected = hf(tokens, logits_to_keep=TAIL).logits[0]  # (TAIL, V): positions 16384 … 16431
    model = load_model(ckpt, device="cpu", dtype=torch.float32)
    model.setup_cache(1, LENGTH)
    with torch.inference_mode():
        for start in range(0, LENGTH - TAIL, CHUNK):
            model(tokens[:, start:min(start + CHUNK, LENGTH - TAIL)], start, logits_index=-1)
        got = model(tokens[:, LENGTH - TAIL:], LENGTH - TAIL)[0]  # the last positions, fed as one more chunk
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


MEASURE = """
import resource, sys, torch
from codellama import ModelArgs
from codellama.testing import random_model
length, chunk = int(sys.argv[1]), int(sys.argv[2])
args = ModelArgs(dim=128, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, rope_theta=1e6)
model = random_model(args)
cache = model.setup_cache(1, 8192)
cache.k.fill_(1), cache.v.fill_(1)  # the whole cache resident before measuring: what grows is the rest
tokens = torch.randint(0, 512, (1, length))
with torch.inference_mode():
    model(tokens[:, :16], 0, logits_index=-1)  # warm-up: allocator and kernels
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    for s in range(0, length, chunk):
        model(tokens[:, s:s + chunk], s, logits_index=-1)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def peak_mib(length: int, chunk: int) -> float:
    """Peak memory a chunked prefill of ``length`` tokens adds on top of the model and its (resident) cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", MEASURE, str(length), str(chunk)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip())


def test_prefill_memory_does_not_grow_with_the_prompt():
    """With the KV cache already resident, a chunked prefill of 8k tokens peaks no higher than one of 2k: the
    attention of a chunk never holds scores over the whole prompt (1024 queries × 8k keys × 4 heads in
    float32 would be 128 MiB, 96 MiB more than at 2k)."""
    short, long = peak_mib(2048, 1024), peak_mib(8192, 1024)
    assert long - short < 32, (short, long)

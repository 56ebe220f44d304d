"""Tensor parallelism: torchrun with gloo on this CPU against a single process, token for token."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

from codellama import Llama, ModelArgs, Tokenizer, load_model
from codellama.checkpoint import build_on_meta
from codellama.distributed import TensorParallel, check_parallel, local_heads, rank_block, split_dim

from conftest import ROOT

from helpers import write_checkpoint
from tp_worker import PROMPTS, TOKENS

HERE = pathlib.Path(__file__).resolve().parent  # the torchrun workers live beside their tests

pytestmark = pytest.mark.distributed

MHA = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32)
GQA = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64, rope_theta=1e6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, out, tokenizer, dirs, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(HERE / "tp_worker.py"), str(out), str(tokenizer), *map(str, dirs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def single_process(d, tokenizer):
    llama = Llama(load_model(d, device="cpu"), Tokenizer(tokenizer), 64, 2)
    with torch.inference_mode():
        logits = llama.model(TOKENS)
    return logits, llama.generate(PROMPTS, 12, temperature=0, stop_token=[])[0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from conftest import shared_path
    tok = shared_path("stories260K", "meta", "tokenizer.model")
    root = tmp_path_factory.mktemp("tp")
    return tok, {
        "meta-1shard": write_checkpoint(root / "m1", MHA, "meta", seed=1, shards=1),
        "meta-2shards": write_checkpoint(root / "m2", MHA, "meta", seed=2, shards=2),
        "gqa-2shards": write_checkpoint(root / "g2", GQA, "meta", seed=3, shards=2),
        "hf-gqa": write_checkpoint(root / "hf", GQA, "hf", seed=4),
        "stories": str(shared_path("stories260K", "meta")),
    }


def check(results, dirs, tok):
    for d in dirs:
        logits, greedy = single_process(d, tok)
        torch.testing.assert_close(results[d]["logits"], logits, atol=1e-5, rtol=1e-5)
        assert results[d]["greedy"] == greedy


def test_two_ranks_match_one_process(ckpts, tmp_path):
    tok, c = ckpts
    dirs = [c["meta-1shard"], c["meta-2shards"], c["hf-gqa"], c["stories"]]
    r = torchrun(2, tmp_path / "out.pt", tok, dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert all(results[d]["world"] == 2 for d in dirs)
    check(results, dirs, tok)


def test_four_ranks_with_replicated_kv_heads(ckpts, tmp_path):
    """A 2-shard GQA checkpoint with 2 KV heads on 4 ranks: shards re-split, each KV head on two ranks."""
    tok, c = ckpts
    dirs = [c["gqa-2shards"], c["hf-gqa"]]
    r = torchrun(4, tmp_path / "out.pt", tok, dirs)
    assert r.returncode == 0, r.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    assert results[dirs[0]]["local_heads"] == 1 and results[dirs[0]]["world"] == 4
    check(results, dirs, tok)


def test_a_world_size_that_does_not_divide_fails_with_one_clear_line(tmp_path):
    from conftest import shared_path
    tok = shared_path("stories260K", "meta", "tokenizer.model")
    bad = write_checkpoint(tmp_path / "bad", ModelArgs(dim=96, n_layers=1, n_heads=6, vocab_size=512), "meta")
    r = torchrun(4, tmp_path / "out.pt", tok, [bad], timeout=120)
    assert r.returncode != 0
    # Every rank finds the problem before any collective, so none hangs. torchrun stops the other ranks as
    # soon as the first one exits, so how many of them get to print first is a matter of timing.
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(lines) <= 4
    assert all(line.startswith("error: cannot split this model across 4 ranks: n_heads=6 is not divisible by 4")
               for line in lines), lines
    assert "codellama/" not in r.stderr  # no traceback from inside the library: one clear line per rank


def test_shard_plan_follows_meta_layout():
    tp = TensorParallel(rank=1, world=2)
    hd = GQA.head_dim
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(GQA).state_dict().items()}
    block = lambda key: rank_block(key, shapes[key], GQA, tp)  # noqa: E731
    assert block("layers.0.attention.wq.weight") == (0, 4 * hd, 8 * hd)
    assert block("layers.0.attention.wk.weight") == (0, hd, 2 * hd)
    assert block("layers.0.attention.wo.weight") == (1, 4 * hd, 8 * hd)
    assert block("tok_embeddings.weight") == (1, 64, 128) and block("output.weight") == (0, 256, 512)
    assert block("norm.weight") is None
    assert local_heads(GQA, TensorParallel(rank=3, world=4)) == (2, 1, 1)  # ranks 2 and 3 share kv head 1


def test_one_table_splits_every_tensor_of_a_module():
    """A tensor other than the weight (e.g. a quantization scale) follows its module's split in proportion."""
    tp = TensorParallel(rank=1, world=2)
    w2 = "layers.0.feed_forward.w2.weight"
    assert split_dim(w2, 2) == 1 and split_dim("layers.0.feed_forward.w2.scales", 1) is None  # per-row: replicated
    grouped = (GQA.dim, GQA.hidden_dim // 32)  # one scale per 32 inputs of each output row
    assert rank_block("layers.0.feed_forward.w2.scales", grouped, GQA, tp) == (1, grouped[1] // 2, grouped[1])
    assert rank_block("layers.0.feed_forward.w1.scales", (GQA.hidden_dim,), GQA, tp) == (0, GQA.hidden_dim // 2,
                                                                                          GQA.hidden_dim)
    with pytest.raises(ValueError, match="not a Llama weight"):
        split_dim("layers.0.mystery.weight", 2)


def test_check_parallel_names_the_problem():
    with pytest.raises(ValueError, match=r"n_kv_heads=3 neither divides nor is divisible by 2"):
        check_parallel(ModelArgs(dim=96, n_heads=6, n_kv_heads=3, vocab_size=512), 2)
    with pytest.raises(ValueError, match=r"vocab_size=501 is not divisible by 2"):
        check_parallel(ModelArgs(dim=64, n_heads=4, vocab_size=501), 2)
    check_parallel(ModelArgs.from_name("34b"), 16)  # 8 kv heads on 16 ranks: replicated


def test_model_parallel_size_must_match_the_job(stories_dir):
    with pytest.raises(ValueError, match=r"model_parallel_size=2 but this job has WORLD_SIZE=1.*torchrun --nproc_per_node 2"):
        Llama.build(str(stories_dir / "meta"), None, 64, 1, 2, device="cpu")


def test_examples_under_torchrun_two_ranks(stories_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()),
                        str(ROOT / "example_completion.py"), "--ckpt_dir", str(stories_dir / "meta"),
                        "--max_gen_len", "8", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("def fizzbuzz(n: int):") == 1  # printed by rank 0 only

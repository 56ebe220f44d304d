"""The whole model with ``set_attention("triton")`` gives what it gives with ``"torch"``.

stories260K (a real trained GQA model, head_dim 8: padded inside the kernels) must also reproduce its
published greedy tokens; a random GQA model covers head_dim 64 and 128. Float32 throughout, so the
Triton path must match to float32 accuracy, not just in argmax. Runs through Triton's interpreter on CPU.
"""

from __future__ import annotations

import json
from typing import Optional, Tuple

import pytest
import torch

pytest.importorskip("triton")

from codellama import kernels  # noqa: E402
from codellama import ModelArgs, Transformer, load_model  # noqa: E402
from codellama.ops import TorchOps  # noqa: E402

OK, WHY = kernels.triton_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"Triton kernels cannot run here: {WHY}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOGITS_TOL = dict(atol=2e-4, rtol=2e-4)  # float32 logits after several layers


@torch.inference_mode()
def greedy(model: Transformer, prompt: torch.Tensor, steps: int, attention: str,
           chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens (B, steps) after ``prompt`` (B, T), and the logits (B, steps, V) that chose them."""
    model.set_attention(attention)
    B, T = prompt.shape
    model.setup_cache(B, T + steps)
    logits = model.prefill(prompt, chunk_size=chunk_size)  # (B, V)
    tokens, seen = [], []
    for pos in range(T, T + steps):
        seen.append(logits)
        tokens.append(logits.argmax(-1))
        logits = model(tokens[-1][:, None], pos, logits_index=-1)[:, -1]
    return torch.stack(tokens, 1), torch.stack(seen, 1)


@pytest.fixture
def stories(stories_dir):
    """The stories260K model (float32) and its published greedy tokens from [bos]."""
    model = load_model(stories_dir / "meta", device=DEVICE, dtype=torch.float32)
    expected = json.loads((stories_dir / "expected.json").read_text())["greedy_ids"]
    return model, expected


def test_set_attention_selects_triton(stories):
    model, _ = stories
    model.set_attention("triton")
    assert model.ops is kernels.TritonOps
    model.set_attention("torch")
    assert model.ops is TorchOps


def test_stories260k_greedy_matches_torch_and_golden(stories):
    """Prefill (flash kernel, whole and in chunks) then decode (split-KV kernel): llama2.c's greedy tokens."""
    model, expected = stories
    prompt = torch.tensor([[1] + expected[:11]], device=DEVICE)  # bos + 11 tokens: prefill T = 12
    steps = 8
    want_tokens, want_logits = greedy(model, prompt, steps, "torch")
    got_tokens, got_logits = greedy(model, prompt, steps, "triton")
    assert got_tokens[0].tolist() == expected[11:11 + steps]
    assert torch.equal(got_tokens, want_tokens)
    torch.testing.assert_close(got_logits, want_logits, **LOGITS_TOL)
    chunked_tokens, chunked_logits = greedy(model, prompt, 2, "triton", chunk_size=5)
    assert torch.equal(chunked_tokens, want_tokens[:, :2])
    torch.testing.assert_close(chunked_logits, want_logits[:, :2], **LOGITS_TOL)


@torch.inference_mode()
def _ragged_run(model: Transformer, attention: str, rows: list, steps: int):
    """Rows of different prompt lengths in one batch: per-row start_pos tensors through the cache.

    The prompt goes in with PyTorch (an int start_pos, covered above) so both runs start from the same cache.
    """
    model.set_attention("torch")
    lengths = torch.tensor([len(r) for r in rows], device=DEVICE)
    T = int(lengths.max())
    prompt = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=DEVICE)  # padding is overwritten later
    model.setup_cache(len(rows), T + steps + 2)
    logits = model(prompt, 0, logits_index=lengths - 1)[:, -1]  # each row's last prompt position
    outs, pos = [logits], lengths.clone()
    model.set_attention(attention)
    for _ in range(steps):  # decode: row b's query at its own position pos[b]
        tok = logits.argmax(-1)
        logits = model(tok[:, None], pos, logits_index=-1)[:, -1]
        outs.append(logits)
        pos = pos + 1
    # Two tokens per row at different positions: the flash kernel with per-row starts.
    outs.append(model(torch.stack([tok, tok], 1), pos)[:, -1])
    return torch.stack(outs, 1)


def test_stories260k_ragged_batch_matches_torch(stories):
    model, expected = stories
    rows = [[1] + expected[:8], [1] + expected[20:23]]
    got = _ragged_run(model, "triton", rows, steps=2)
    want = _ragged_run(model, "torch", rows, steps=2)
    torch.testing.assert_close(got, want, **LOGITS_TOL)


@pytest.mark.parametrize("dim,n_heads,n_kv_heads", [(256, 4, 1), (1024, 8, 1)], ids=["hd64-gqa4", "hd128-gqa8"])
def test_random_gqa_model_matches_torch(dim, n_heads, n_kv_heads):
    torch.manual_seed(0)
    args = ModelArgs(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=97, rope_theta=1e6)
    model = Transformer(args).to(DEVICE).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong RMSNorm scale shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    prompt = torch.randint(0, args.vocab_size, (2, 11), device=DEVICE)
    want_tokens, want_logits = greedy(model, prompt, 4, "torch")
    got_tokens, got_logits = greedy(model, prompt, 4, "triton", chunk_size=4)
    torch.testing.assert_close(got_logits, want_logits, **LOGITS_TOL)
    assert torch.equal(got_tokens, want_tokens)


def test_llama_build_takes_the_attention_choice(stories_dir):
    from codellama import Llama
    expected = json.loads((stories_dir / "expected.json").read_text())["greedy_ids"][:40]
    llama = Llama.build(str(stories_dir / "meta"), None, 64, 1, device=DEVICE, attention="triton")
    assert llama.model.ops is kernels.TritonOps
    assert llama.generate([[1]], 40, temperature=0)[0][0] == expected

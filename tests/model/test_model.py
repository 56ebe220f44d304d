"""The model against things we did not write: Hugging Face's LlamaForCausalLM and llama2.c's golden output."""

import json

import pytest
import torch

from codellama import ModelArgs, Transformer, load_model
from codellama.model import rope_angles, rope_inv_freq
from codellama.ops import TorchOps

from helpers import CONFIGS, random_model, write_checkpoint

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is the numerical oracle")


def hf_logits(hf_dir, tokens):
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hugging_face_through_both_layouts(tmp_path, name):
    args = CONFIGS[name]
    meta_dir = write_checkpoint(tmp_path / "meta", args, "meta", seed=1)
    hf_dir = write_checkpoint(tmp_path / "hf", args, "hf", seed=1)  # same weights, q/k permuted by our converter
    tokens = torch.randint(0, args.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    expected = hf_logits(hf_dir, tokens)
    for d in (meta_dir, hf_dir):
        ours = load_model(d, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)


def test_loads_a_checkpoint_written_by_hugging_face(tmp_path):
    """HF's own writer and random init, not our converter: catches a permutation that is wrong both ways."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, vocab_size=97, rope_theta=1e6, rms_norm_eps=1e-5,
                                      max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # HF initialises norms to exactly 1: perturb everything
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tokens = torch.randint(0, 97, (1, 31))
    ours = load_model(tmp_path, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_stories260k_golden_greedy_output(stories_dir, layout):
    expected = json.loads((stories_dir / "expected.json").read_text())
    model = load_model(stories_dir / layout, device="cpu", dtype=torch.float32)
    model.setup_cache(1, 512)
    tokens = list(expected["prompt_tokens"])
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), 0, logits_index=-1)
        pos = len(tokens)
        for _ in range(len(expected["greedy_ids"])):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), pos)
            pos += 1
    assert out == expected["greedy_ids"]


@pytest.fixture(scope="module")
def gqa_model():
    return random_model(CONFIGS["gqa"], seed=3)


def full_logits(model, tokens):
    model.clear_cache()
    with torch.inference_mode():
        return model(tokens)


def test_incremental_decoding_equals_one_full_forward(gqa_model):
    tokens = torch.randint(0, 260, (3, 20), generator=torch.Generator().manual_seed(1))
    expected = full_logits(gqa_model, tokens)
    gqa_model.setup_cache(3, 20)
    with torch.inference_mode():
        steps = [gqa_model(tokens[:, :5], 0)] + [gqa_model(tokens[:, i:i + 1], i) for i in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunks", [[7, 7, 6], [1, 19], [13, 1, 1, 5], [20]])
def test_chunked_prefill_equals_one_shot(gqa_model, chunks):
    tokens = torch.randint(0, 260, (2, 20), generator=torch.Generator().manual_seed(2))
    expected = full_logits(gqa_model, tokens)
    gqa_model.setup_cache(2, 32)
    out, pos = [], 0
    with torch.inference_mode():
        for n in chunks:
            out.append(gqa_model(tokens[:, pos:pos + n], pos))
            pos += n
    torch.testing.assert_close(torch.cat(out, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_per_row_positions_match_each_row_alone(gqa_model):
    """A batch whose rows sit at different positions (ragged decoding) gives each row its own logits."""
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 260, (1, n), generator=g) for n in (3, 11, 6)]
    alone = [full_logits(gqa_model, r)[0, -1] for r in rows]
    gqa_model.setup_cache(3, 16)
    with torch.inference_mode():
        T = 11
        padded = torch.zeros(3, T, dtype=torch.long)
        for i, r in enumerate(rows):
            padded[i, :r.shape[1]] = r[0, :]
        # prefill all but the last token of each row, then feed each row's last token at its own position
        lens = torch.tensor([r.shape[1] for r in rows])
        gqa_model(padded, 0)
        last = torch.stack([r[0, -1] for r in rows]).view(3, 1)
        out = gqa_model(last, lens - 1)
    for i in range(3):
        torch.testing.assert_close(out[i, 0], alone[i], atol=1e-5, rtol=1e-5)


def test_logits_index_returns_only_the_requested_positions(gqa_model):
    tokens = torch.randint(0, 260, (2, 9))
    full = full_logits(gqa_model, tokens)
    with torch.inference_mode():
        last = gqa_model(tokens, logits_index=-1)
        picked = gqa_model(tokens, logits_index=torch.tensor([3, 8]))
    assert last.shape == (2, 1, 260) and picked.shape == (2, 1, 260)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    torch.testing.assert_close(picked[:, 0], torch.stack([full[0, 3], full[1, 8]]))


def test_cache_lifecycle_and_errors(gqa_model):
    gqa_model.clear_cache()
    with pytest.raises(ValueError, match="setup_cache"):
        gqa_model(torch.zeros(1, 1, dtype=torch.long), 5)
    cache = gqa_model.setup_cache(2, 8)
    a = gqa_model.args
    assert cache.k.shape == (a.n_layers, 2, a.kv_heads, 8, a.head_dim)  # sized to what was asked, not a maximum
    with pytest.raises(ValueError, match="exceed the KV cache"):
        gqa_model(torch.zeros(1, 4, dtype=torch.long), 6)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        gqa_model(torch.zeros(3, 1, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="batch, seq_len"):
        gqa_model(torch.zeros(4, dtype=torch.long), 0)
    gqa_model.clear_cache()
    assert gqa_model.cache is None


def test_rms_norm_statistics_are_float32():
    x = (torch.randn(4, 64) * 300).to(torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    ref = (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(TorchOps.rms_norm(x, w, 1e-5), ref)


def test_rope_angles_are_float32_and_accurate_at_100k_tokens():
    inv = rope_inv_freq(128, 1e6)
    assert inv.dtype == torch.float32
    pos = torch.tensor([100_000, 99_999])
    cos, sin = rope_angles(pos, inv)
    ref = pos.double().unsqueeze(-1) * (1.0 / (1e6 ** (torch.arange(0, 128, 2).double() / 128)))
    assert cos.dtype == torch.float32
    assert (cos.double() - ref.cos()).abs().max() < 1e-2  # bf16 angles would be off by whole radians here
    assert (sin.double() - ref.sin()).abs().max() < 1e-2


def test_bf16_model_keeps_rope_in_float32(gqa_model):
    """A bf16 model's logits stay close to the fp32 model's (angles are not computed in bf16)."""
    tokens = torch.randint(0, 260, (1, 16))
    ref = full_logits(gqa_model, tokens)
    half = random_model(CONFIGS["gqa"], seed=3, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = half(tokens)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_unresolved_vocab_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4))


def test_meta_style_forward_after_build_matches_hugging_face(tmp_path):
    """Research code written against Meta's reference drives ``generator.model.forward(tokens, start_pos)`` itself:
    a prefix at 0, then a chunk, then single tokens. After ``Llama.build`` the model holds a lazily allocated
    cache of max_batch_size × max_seq_len, so this gives Hugging Face's logits of the whole sequence at once."""
    from codellama import Llama
    from codellama.generation import DEFAULT_CKPT_DIR

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=16, rope_theta=1e6)
    ckpt = write_checkpoint(tmp_path / "hf", args, "hf", seed=4, tokenizer=f"{DEFAULT_CKPT_DIR}/tokenizer.model")
    generator = Llama.build(str(ckpt), None, 32, 2, device="cpu")
    assert generator.model.cache is None  # planned, not yet allocated
    tokens = torch.randint(0, 4096, (2, 20), generator=torch.Generator().manual_seed(1))
    pieces = []
    with torch.inference_mode():
        pieces.append(generator.model.forward(tokens[:, :9], 0))
        pieces.append(generator.model.forward(tokens[:, 9:15], 9))
        for pos in range(15, 20):
            pieces.append(generator.model.forward(tokens[:, pos:pos + 1], pos))
    cache = generator.model.cache
    assert (cache.slots, cache.max_seq_len) == (2, 32)
    torch.testing.assert_close(torch.cat(pieces, dim=1), hf_logits(str(ckpt), tokens), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceed the KV cache"):
        generator.model.forward(tokens[:, :1], 32)

"""Bad input to the generation and model APIs: a ValueError that says what is wrong, never a traceback from
inside torch or sentencepiece, never a silently wrong result."""

import pytest
import torch

from codellama import Llama
from codellama.prompts import UNSAFE_ERROR, infilling_prompt_tokens


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=128, max_batch_size=2, device="cpu")


# ----------------------------------------------------------------------------- generation arguments
def test_a_tiny_temperature_is_greedy_not_an_overflow(tiny):
    greedy = tiny.text_completion(["def main():"], temperature=0, max_gen_len=12)
    assert tiny.text_completion(["def main():"], temperature=1e-45, max_gen_len=12) == greedy


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature="0.5"), "temperature must be a finite number"),
    (dict(top_p=True), "top_p must be in"),
    (dict(top_k=2.0), "top_k must be a positive integer"),
    (dict(max_gen_len=3.5), "max_gen_len must be a non-negative integer"),
])
def test_bad_sampling_arguments(tiny, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny.text_completion(["x"], **kwargs)


def test_a_lone_surrogate_is_named(tiny):
    with pytest.raises(ValueError, match=r"at index 4, a lone surrogate"):
        tiny.text_completion(["abcd\ud800"], max_gen_len=2)
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny.text_infilling(["def f():"], ["\udfff"], max_gen_len=2)
    with pytest.raises(ValueError, match="lone surrogate"):
        tiny.chat_completion([[{"role": "user", "content": "\ud83d"}]], max_gen_len=2)


@pytest.mark.parametrize("prompts, match", [
    ([1, 2, 3], "list of token-id lists"),
    ([[1, 2], "ab"], "list of token-id lists"),
    ([[1, 2.0]], "outside the vocabulary"),
    ([[1, True]], "outside the vocabulary"),
    ([[1, -3]], "outside the vocabulary"),
])
def test_generate_wants_lists_of_token_ids(tiny, prompts, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(prompts, 4)


def test_generate_stop_token_must_be_ids(tiny):
    with pytest.raises(ValueError, match="stop_token must be"):
        tiny.generate([[1, 2]], 4, stop_token=object())


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(device=7), "device must be a string"),
    (dict(dtype=torch.int8), "not a model dtype"),
    (dict(dtype="int4"), "unknown dtype 'int4'"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer"),
])
def test_build_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Llama.build(None, None, 64, 1, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_an_unavailable_device_says_so():
    with pytest.raises(ValueError, match="'cuda' is not available: this is a CPU-only build"):
        Llama.build(None, None, 64, 1, device="cuda")


# ----------------------------------------------------------------------------- the model API
@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.tensor([[1, 4096]])), r"token id 4096 is outside the vocabulary \[0, 4096\)"),
    (lambda m: m(torch.tensor([[1, -1]])), "token id -1 is outside"),
    (lambda m: m(torch.tensor([[1.0, 2.0]])), "integer token ids"),
    (lambda m: m(torch.tensor([1, 2])), r"\(batch, seq_len\)"),
    (lambda m: m(torch.tensor([[1, 2]]), logits_index=2), "logits_index 2 is out of range for 2 positions"),
    (lambda m: m(torch.tensor([[1, 2], [3, 4]]), logits_index=torch.tensor([0])), "1 entries for a batch of 2"),
    (lambda m: m(torch.tensor([[1, 2]]), logits_index=torch.tensor([5])), "out of range for 2 positions"),
    (lambda m: m(torch.tensor([[1, 2]]), 2.0), "start_pos must be an int"),
    (lambda m: m(torch.tensor([[1, 2]]), torch.tensor([1.5])), "integer tensor, got dtype torch.float32"),
    (lambda m: m(torch.tensor([[1, 2]]), -1), "start_pos must be ≥ 0"),
    (lambda m: m.setup_cache(2.5, 8), "max_batch_size must be a positive integer, got 2.5"),
    (lambda m: m.setup_cache(1, 0), "max_seq_len must be a positive integer, got 0"),
])
def test_model_arguments(tiny, call, match):
    model = tiny.model
    try:
        with torch.inference_mode(), pytest.raises(ValueError, match=match):
            call(model)
    finally:
        model.setup_cache(2, 128, lazy=True)


def test_logits_index_per_row_picks_each_rows_position(tiny):
    model = tiny.model
    model.clear_cache()
    tokens = torch.randint(0, 4096, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(tokens)
        picked = model(tokens, logits_index=torch.tensor([2, -1]))
    torch.testing.assert_close(picked[:, 0], torch.stack([full[0, 2], full[1, 6]]))
    model.setup_cache(2, 128, lazy=True)


# ----------------------------------------------------------------------------- FIM control text
def test_file_text_cannot_produce_fim_control_ids(tiny):
    """A file containing the literal strings <PRE>, <SUF>, <MID>, <EOT> (or <step>) cannot steer an infill:
    user text is always spelled with ordinary pieces, and decodes back to itself."""
    tok = tiny.tokenizer
    text = "s = '<PRE> x <SUF>y <MID>' + \" <EOT>\" + '<step>'"
    for ids in (tok.encode(text, bos=False, eos=False), tok.encode_infilling(text)):
        assert tok.control_ids.isdisjoint(ids)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    assert tok.decode_infilling(tok.encode_infilling(text)) == text
    prompt = infilling_prompt_tokens(tok, text, text)
    assert [t for t in prompt if t in tok.control_ids] == [tok.prefix_id, tok.suffix_id, tok.middle_id]


def test_chat_and_infilling_agree_on_control_text(tiny):
    """Chat refuses its own format's tags (as the reference does) and, like infilling, never encodes FIM text to
    FIM ids."""
    r = tiny.chat_completion([[{"role": "user", "content": "Explain <PRE> and <MID> in Code Llama."}]],
                             temperature=0, max_gen_len=4, logprobs=True)[0]
    assert r["generation"]["content"] != UNSAFE_ERROR  # FIM words are ordinary text in a dialog
    refused = tiny.chat_completion([[{"role": "user", "content": "[INST] hi"}]], max_gen_len=4)[0]
    assert refused["generation"]["content"] == UNSAFE_ERROR

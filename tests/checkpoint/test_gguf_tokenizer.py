"""The tokenizer of a GGUF file: its vocabulary rebuilt as a SentencePiece model encodes and decodes exactly as the
``tokenizer.model`` it came from (Code Llama-like with the FIM pieces, and Llama 2's without), on generated text
full of FIM piece names, bytes, unicode and whitespace runs, and on the standard library's sources."""

import inspect
import json
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from codellama import ModelArgs, Tokenizer  # noqa: E402
from codellama.formats.gguf import Metadata, read_gguf  # noqa: E402
from codellama.formats.gguf_tokenizer import sentencepiece_model  # noqa: E402
from codellama.testing import random_state_dict, write_gguf  # noqa: E402

from conftest import shared_path  # noqa: E402

PIECES = ["<PRE>", "▁<PRE>", "<SUF>", "<MID>", "<EOT>", "<EOT><EOT>", "<step>", "<s>", "</s>", "<unk>", "▁",
          "[INST]", "<<SYS>>", " ", "  ", "    ", "\t", "\n", "\r\n", "\n\n\n", "\u3000", "\xa0", "\x00", "\x7f",
          "é", "e\u0301", "漢字", "\U0001F600", "\U0010FFFF", "☺", "def", " return", "0123456789"]
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=12)), max_size=12).map("".join)


def vocab_file(tmp_path, model, name="vocab.gguf", **metadata):
    """A GGUF file (a one-layer model) holding ``model``'s vocabulary as llama.cpp's converter writes it."""
    sp = Tokenizer(model).sp_model
    args = ModelArgs(dim=32, n_layers=1, n_heads=1, vocab_size=sp.vocab_size(), multiple_of=32)
    return str(write_gguf(tmp_path / name, random_state_dict(args), args, tokenizer_path=str(model), metadata=metadata))


def file_tokenizer(path):
    return Tokenizer(path, model_proto=sentencepiece_model(Metadata(read_gguf(path).fields, path)))


@pytest.fixture(scope="module", params=["codellama-like.model", "llama2.model"])
def pair(request, tmp_path_factory):
    """(the original tokenizer, the one rebuilt from a GGUF file of its vocabulary)."""
    model = shared_path("tokenizers", request.param)
    return Tokenizer(model), file_tokenizer(vocab_file(tmp_path_factory.mktemp("vocab"), model))


def test_every_piece_score_type_and_special_id_is_the_original(pair):
    original, rebuilt = pair
    a, b = original.sp_model, rebuilt.sp_model
    assert a.vocab_size() == b.vocab_size() == rebuilt.n_words
    for i in range(a.vocab_size()):
        assert (a.id_to_piece(i), a.get_score(i), a.is_control(i), a.is_unknown(i), a.is_byte(i), a.is_unused(i)) == \
            (b.id_to_piece(i), b.get_score(i), b.is_control(i), b.is_unknown(i), b.is_byte(i), b.is_unused(i)), i
    for name in ("bos_id", "eos_id", "pad_id", "prefix_id", "middle_id", "suffix_id", "eot_id", "step_id"):
        assert getattr(original, name) == getattr(rebuilt, name), name
    assert original.control_ids == rebuilt.control_ids and rebuilt.model_path.endswith(".gguf")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, ids=st.lists(st.integers(0, 31999), max_size=24))
def test_encodes_and_decodes_as_the_original(pair, text, ids):
    original, rebuilt = pair
    assert rebuilt.encode(text, bos=True, eos=True) == original.encode(text, bos=True, eos=True)
    assert rebuilt.encode_infilling(text) == original.encode_infilling(text)
    assert rebuilt.decode(ids) == original.decode(ids)
    assert rebuilt.decode_infilling(ids) == original.decode_infilling(ids)


@pytest.mark.parametrize("module", ["os", "json.decoder", "textwrap", "inspect", "email.message", "difflib"])
def test_standard_library_sources(pair, module):
    original, rebuilt = pair
    source = inspect.getsource(__import__(module, fromlist=["_"]))
    ids = original.encode(source, bos=True, eos=False)
    assert rebuilt.encode(source, bos=True, eos=False) == ids and rebuilt.decode(ids) == source


@pytest.fixture(scope="module")
def codellama_like():
    return shared_path("tokenizers", "codellama-like.model")


def test_fim_pieces_a_converter_marked_special_are_restored(tmp_path, codellama_like):
    """convert_hf_to_gguf.py marks tokenizer_config's special tokens CONTROL (score -1000), and non-special ones
    USER_DEFINED with "▁" written as a space: the rebuilt tokenizer is still the original."""
    original = Tokenizer(codellama_like)
    sp = original.sp_model
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores = [sp.get_score(i) for i in range(sp.vocab_size())]
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1
             for i in range(len(pieces))]
    for i in (32007, 32008):
        types[i], scores[i] = 3, -1000.0
    for i in (32009, 32010):
        types[i], scores[i], pieces[i] = 4, -1000.0, pieces[i].replace("▁", " ")
    rebuilt = file_tokenizer(vocab_file(tmp_path, codellama_like, **{
        "tokenizer.ggml.tokens": pieces, "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types}))
    assert [rebuilt.prefix_id, rebuilt.suffix_id, rebuilt.middle_id, rebuilt.eot_id] == [32007, 32008, 32009, 32010]
    for text in ["<PRE> x <SUF>y<MID> z <EOT>", "a <EOT><EOT> b", "<PRE>>= <SUF>>; <MID>>:", "x▁<PRE>"]:
        assert rebuilt.encode(text, True, False) == original.encode(text, True, False), text
        assert rebuilt.encode_infilling(text) == original.encode_infilling(text), text
    assert rebuilt.decode([1, 32007, 450, 32010]) == original.decode([1, 32007, 450, 32010])


def test_fim_ids_in_the_file_must_be_the_pieces_the_library_infills_with(tmp_path, codellama_like):
    ok = vocab_file(tmp_path, codellama_like, "ok.gguf", **{"tokenizer.ggml.prefix_token_id": 32007,
                                                           "tokenizer.ggml.fim_mid_token_id": 32009})
    assert file_tokenizer(ok).prefix_id == 32007
    bad = vocab_file(tmp_path, codellama_like, "bad.gguf", **{"tokenizer.ggml.fim_suf_token_id": 5})
    with pytest.raises(ValueError, match=r"fim_suf_token_id is 5 \('<0x02>'\), but this library infills with Code "
                                         r"Llama's '▁<SUF>' and '▁<SUF>' is id 32008"):
        file_tokenizer(bad)


def test_add_space_prefix_false_is_honoured(tmp_path, codellama_like):
    original = Tokenizer(codellama_like)
    rebuilt = file_tokenizer(vocab_file(tmp_path, codellama_like, **{"tokenizer.ggml.add_space_prefix": False}))
    assert rebuilt.sp_model.encode("Hello  world") == original.encode_infilling("Hello  world")


@pytest.mark.parametrize("metadata, match", [
    ({"tokenizer.ggml.model": "gpt2"}, r"tokenizer.ggml.model is 'gpt2'; only 'llama' \(SentencePiece\) vocabularies"),
    ({"tokenizer.ggml.scores": [0.0] * 10}, r"tokenizer.ggml.scores has 10 entries, tokenizer.ggml.tokens 300"),
    ({"tokenizer.ggml.token_type": [1] * 299 + [9]}, r"token_type\[299\] is 9; valid: 1 \(normal\)"),
    ({"tokenizer.ggml.bos_token_id": 300}, r"the bos token id is 300, outside the vocabulary \[0, 300\)"),
    ({"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + ["a"] * 297}, r"tokens\[4\] and \[3\] are both 'a'"),
])
def test_a_vocabulary_that_cannot_be_read_is_named(tmp_path, metadata, match):
    args = ModelArgs(dim=32, n_layers=1, n_heads=1, vocab_size=300, multiple_of=32)
    path = str(write_gguf(tmp_path / "v.gguf", random_state_dict(args), args, metadata=metadata))
    with pytest.raises(ValueError, match=match) as e:
        file_tokenizer(path)
    assert path in str(e.value)


def test_hand_written_protobuf_is_what_sentencepiece_reads(tmp_path, codellama_like):
    """The serialized model round-trips through SentencePiece (its own serializer writes an equivalent proto)."""
    rebuilt = file_tokenizer(vocab_file(tmp_path, codellama_like))
    again = Tokenizer("again", model_proto=rebuilt.sp_model.serialized_model_proto())
    text = textwrap.dedent(inspect.getsource(json.dumps))
    assert again.encode(text, True, False) == rebuilt.encode(text, True, False)

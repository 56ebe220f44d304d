import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codellama import Tokenizer
from codellama.tokenizer import decode_after
from codellama.prompts import infilling_prompt_tokens

VECTORS = {  # ../shared/data/README.md: [bos] + encode(s) with either Llama 2 tokenizer
    "This is a test": [1, 910, 338, 263, 1243],
    " Hello": [1, 29871, 15043],
    "Hi   Hello": [1, 6324, 259, 15043],
    "I believe the meaning of life is": [1, 306, 4658, 278, 6593, 310, 2834, 338],
    "def fib(n):\n    return n": [1, 822, 18755, 29898, 29876, 1125, 13, 1678, 736, 302],
}
PSM_VECTOR = [1, 32007, 822, 3349, 29918, 5464, 29918, 294, 18869, 29898, 29879, 29901, 851, 29897, 1599, 851, 29901, 13,
              1678, 9995, 29871, 32008, 13, 1678, 736, 1121, 13, 32009]


@pytest.fixture(scope="module")
def codellama_tok():
    from conftest import shared_path
    return Tokenizer(shared_path("tokenizers", "codellama-like.model"))


@pytest.mark.parametrize("which", ["llama2.model", "codellama-like.model"])
def test_encoding_vectors(which):
    from conftest import shared_path
    tok = Tokenizer(shared_path("tokenizers", which))
    for text, ids in VECTORS.items():
        assert tok.encode(text, bos=True, eos=False) == ids
        assert tok.decode(ids[1:]) == text
    assert tok.encode("x", bos=False, eos=True)[-1] == tok.eos_id == 2
    assert (tok.bos_id, tok.pad_id) == (1, -1)


def test_fim_ids(codellama_tok):
    t = codellama_tok
    assert (t.n_words, t.prefix_id, t.suffix_id, t.middle_id, t.eot_id, t.step_id) == (32016, 32007, 32008, 32009, 32010, None)
    assert t.can_infill


def test_infilling_prompt_vector(codellama_tok):
    prefix = 'def remove_non_ascii(s: str) -> str:\n    """ '
    suffix = "\n    return result\n"
    assert infilling_prompt_tokens(codellama_tok, prefix, suffix) == PSM_VECTOR
    spm = infilling_prompt_tokens(codellama_tok, prefix, suffix, suffix_first=True)
    assert spm == [1, 32007, 32008, 13, 1678, 736, 1121, 13, 32009] + PSM_VECTOR[2:21]


def test_encode_infilling_has_no_leading_space(codellama_tok):
    t = codellama_tok
    assert t.encode_infilling("\n    return result\n") == [13, 1678, 736, 1121, 13]
    assert t.encode("return", bos=False, eos=False) != t.encode_infilling("return")
    assert t.decode_infilling(t.encode_infilling(" x = 1")) == " x = 1"  # a real leading space survives


CODE = st.text(alphabet=st.sampled_from(list("abcdefXYZ_019 \n\t()[]{}:=+-*/'\"#.,é€😀☺\\")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(CODE)
def test_infilling_round_trip_on_random_code(codellama_tok, s):
    assert codellama_tok.decode_infilling(codellama_tok.encode_infilling(s)) == s
    assert codellama_tok.decode(codellama_tok.encode(s, bos=False, eos=False)) == s


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("abcXYZ019()[]:=+-*/'\"#.,é€😀☺")), max_size=40))
def test_infilling_round_trip_with_a_byte_fallback_marker(stories_tokenizer, s):
    """stories260K's 512-piece vocabulary has no '☺' piece: the marker is several byte tokens.

    (Its normalizer collapses whitespace, so the text here has none: that is the vocabulary, not us.)
    """
    assert stories_tokenizer.decode_infilling(stories_tokenizer.encode_infilling(s)) == s


@pytest.fixture(scope="module")
def stories_tokenizer():
    from conftest import shared_path
    return Tokenizer(shared_path("stories260K", "meta", "tokenizer.model"))


def test_tokenizer_without_fim_pieces(llama2_tokenizer_path):
    t = Tokenizer(llama2_tokenizer_path)
    assert (t.prefix_id, t.middle_id, t.suffix_id, t.eot_id, t.step_id) == (None,) * 5
    assert not t.can_infill
    with pytest.raises(ValueError, match=r"cannot infill.*▁<PRE>, ▁<MID>, ▁<SUF>, ▁<EOT>.*Python and 34B"):
        infilling_prompt_tokens(t, "def f():", "\n")


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(junk)


def test_encode_rejects_non_strings(codellama_tok):
    with pytest.raises(ValueError, match="must be a str"):
        codellama_tok.encode(["a"], bos=True, eos=False)


def _llama2() -> Tokenizer:
    from conftest import shared_path
    return Tokenizer(shared_path("tokenizers", "llama2.model"))


def test_decode_after_keeps_the_leading_space_and_splits_inside_a_character():
    tokenizer = _llama2()
    prompt = tokenizer.encode('def f():\n    """€"""\n', bos=True, eos=False)
    body = tokenizer.encode('def f():\n    """€"""\n    return 1\n', bos=True, eos=False)[len(prompt):]
    assert tokenizer.decode(body) == "   return 1\n"  # alone: SentencePiece drops the first space
    assert decode_after(tokenizer.decode, prompt, body) == "    return 1\n"
    # A context ending inside a character (the euro sign's first byte only): the text starts with that
    # character, whose last bytes the new tokens hold, rather than losing it or repeating the prompt.
    euro = [tokenizer.sp_model.piece_to_id(f"<0x{b:02X}>") for b in "€".encode()]
    context, ids = tokenizer.encode("price:", bos=True, eos=False) + euro[:1], euro[1:] + body
    assert decode_after(tokenizer.decode, context, ids) == "€    return 1\n"
    assert decode_after(tokenizer.decode, [tokenizer.bos_id], body) == "   return 1\n"  # no text before it


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab \n\t€é中😀{}()") + ["    ", "def ", "return"]), max_size=30).map("".join),
       st.integers(min_value=1, max_value=60))
def test_decode_after_loses_nothing_at_any_split(text, k):
    # Split the tokens of a text anywhere, even inside a character's bytes: the text after the split is the
    # whole text less what the first part decodes to (its incomplete character, U+FFFD, left out).
    tokenizer = _llama2()
    ids = tokenizer.encode(text, bos=True, eos=False)
    k = min(k, len(ids))
    head, whole = tokenizer.decode(ids[:k]), tokenizer.decode(ids)
    after = decode_after(tokenizer.decode, ids[:k], ids[k:])
    assert whole == head.rstrip("\ufffd") + after

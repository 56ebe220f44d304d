"""Fitting an infilling prompt into the context, on real files (the standard library's sources): nothing cut, it is
exactly ``text_infilling``'s prompt; cut, it is exactly ``text_infilling``'s prompt of the text kept, and what is
kept follows llama.cpp's rules (the prefix's end, the suffix's beginning, 3:1, the extra context last)."""

import functools
import json.decoder
import textwrap

import pytest

from codellama import Llama
from codellama.prompts import infilling_prompt_tokens
from codellama.serve.fitting import fit_infilling, keep_end, keep_start

FILE = open(functools.__file__).read()  # 1012 lines
EXTRA = "".join(open(m.__file__).read()[:3000] + "\n\n" for m in (json.decoder, textwrap))


@pytest.fixture(scope="module")
def t():
    return Llama.build(max_seq_len=64, max_batch_size=1, device="cpu").tokenizer


def split(text: str, line: int):
    lines = text.splitlines(keepends=True)
    return "".join(lines[:line]), "".join(lines[line:])


def between(t, ids, start, end) -> str:
    """The text of the ids between the first ``start`` id and the first ``end`` id after it."""
    i = ids.index(start) + 1
    return t.decode_infilling(ids[i:ids.index(end, i)])


def prefix_side(t, ids) -> str:
    """The prefix side's text (its encoding's implicit leading space removed)."""
    text = between(t, ids, t.prefix_id, t.suffix_id)
    assert text.startswith(" ")
    return text[1:]


def test_a_prompt_that_fits_is_exactly_text_infillings(t):
    prefix, suffix = split(FILE[:2000], 20)
    full = infilling_prompt_tokens(t, EXTRA + prefix, suffix)
    assert fit_infilling(t, EXTRA, prefix, suffix, False, len(full)) == (full, False)
    assert fit_infilling(t, "", prefix, suffix, True, 10_000) == (infilling_prompt_tokens(t, prefix, suffix, True), False)


@pytest.mark.parametrize("budget", [60, 200, 700, 1500])
def test_a_cut_prompt_keeps_the_prefix_end_and_suffix_start_3_to_1(t, budget):
    prefix, suffix = split(FILE, 500)
    ids, truncated = fit_infilling(t, EXTRA, prefix, suffix, False, budget)
    assert truncated and budget - 3 <= len(ids) <= budget  # filled up to the budget, never past it
    kept_prefix, kept_suffix = prefix_side(t, ids), between(t, ids, t.suffix_id, t.middle_id)
    assert prefix.endswith(kept_prefix) and suffix.startswith(kept_suffix)
    assert ids == infilling_prompt_tokens(t, kept_prefix, kept_suffix)  # text_infilling's prompt of what was kept
    n_prefix = len(t.encode_infilling(kept_prefix))
    n_suffix = len(t.encode_infilling(kept_suffix))
    assert abs(n_prefix - 3 * n_suffix) <= 0.1 * budget + 8  # both sides are long: split 3:1
    if budget >= 700:  # whole lines, except the first prefix line and the last suffix line
        assert kept_prefix.count("\n") >= 10 and kept_suffix.count("\n") >= 3


def test_extra_context_fills_what_the_local_context_leaves(t):
    prefix, suffix = split(FILE[:1500], 30)  # a short local context: the budget's rest goes to the extra
    local = len(infilling_prompt_tokens(t, prefix, suffix))
    ids, truncated = fit_infilling(t, EXTRA, prefix, suffix, False, local + 100)
    assert truncated and local + 90 <= len(ids) <= local + 100
    kept = prefix_side(t, ids)
    assert kept.endswith(prefix) and (EXTRA + prefix).endswith(kept)  # the extra's end (its newest chunk) kept
    assert between(t, ids, t.suffix_id, t.middle_id) == suffix
    # a long local context leaves nothing to the extra
    prefix, suffix = split(FILE, 500)
    ids, _ = fit_infilling(t, EXTRA, prefix, suffix, False, 400)
    assert prefix.endswith(prefix_side(t, ids))


def test_a_short_suffix_leaves_its_share_to_the_prefix(t):
    prefix, suffix = FILE[:20_000], "\n    return result\n"
    ids, truncated = fit_infilling(t, "", prefix, suffix, False, 300)
    assert truncated and len(ids) >= 297 and between(t, ids, t.suffix_id, t.middle_id) == suffix


def test_no_room_for_the_fim_pieces_is_an_error(t):
    with pytest.raises(ValueError, match="fewer than"):
        fit_infilling(t, "", "x" * 100, "y", False, 4)


def test_keep_end_and_start_cut_lines_then_characters(t):
    def count(s):
        return len(t.encode_infilling(s)) if s else 0

    text = "alpha = 1\nbeta = 2\ngamma = 3\n"
    assert keep_end(text, count(text), count) == text and keep_start(text, count(text), count) == text
    assert keep_end(text, count("gamma = 3\n"), count) == "gamma = 3\n"
    assert keep_start(text, count("alpha = 1\n"), count) == "alpha = 1\n"
    partial = keep_end(text, count("gamma = 3\n") + 2, count)
    assert partial.endswith("\ngamma = 3\n") and text.endswith(partial) and len(partial) > len("gamma = 3\n")
    assert keep_end(text, 0, count) == "" and keep_start(text, -1, count) == ""

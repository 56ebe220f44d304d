"""Fitting an infilling prompt into the context instead of refusing it, as llama.cpp's server does for editors.

An editor sends the text around the cursor (hundreds of lines) plus extra context from other files; when that
is more than the context holds, the prompt is cut to fit (llama.cpp's ``format_prompt_infill`` rules, in
whole lines where possible):

- room is kept for the answer (``reserve`` tokens);
- the prefix keeps its end (the lines just before the cursor, and the cursor's line itself), the suffix its
  beginning (the lines just after); the prefix may use 3/4 of what is left, the suffix 1/4, and a side that
  needs less leaves the rest to the other;
- the extra context fills whatever the prefix and suffix left, keeping its end (the newest chunks).

Nothing cut, the prompt is exactly the one ``text_infilling(extra + prefix, suffix)`` builds; cut, it is
exactly the one ``text_infilling`` builds for the text that was kept.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

from ..prompts import infilling_prompt_tokens
from ..tokenizer import Tokenizer

PREFIX_SHARE = 0.75  # llama.cpp splits the prefix/suffix budget 3:1


def fit_infilling(tokenizer: Tokenizer, extra: str, prefix: str, suffix: str, suffix_first: bool,
                  budget: int) -> Tuple[List[int], bool]:
    """``(ids, truncated)``: the infilling prompt of ``extra + prefix`` and ``suffix`` in at most ``budget``
    tokens (see the module's rules); ``ValueError`` when not even the FIM pieces fit."""
    ids = infilling_prompt_tokens(tokenizer, extra + prefix, suffix, suffix_first)
    if len(ids) <= budget:
        return ids, False
    fixed = len(infilling_prompt_tokens(tokenizer, "", "", suffix_first))  # BOS and the FIM pieces
    if budget <= fixed:
        raise ValueError(f"the context leaves {budget} tokens for the prompt, fewer than the {fixed + 1} an "
                         "infilling prompt needs")
    count = _counter(tokenizer)
    room = budget - fixed
    n_prefix, n_suffix = count(prefix), count(suffix)
    prefix_room = min(n_prefix, max(int(room * PREFIX_SHARE), room - n_suffix))
    suffix_room = min(n_suffix, room - prefix_room)
    kept_prefix = keep_end(prefix, prefix_room, count)
    kept_suffix = keep_start(suffix, suffix_room, count)
    kept_extra = keep_end(extra, room - count(kept_prefix) - count(kept_suffix), count)
    while True:  # per-piece counts are close to the whole's, not always equal: cut more until it fits
        ids = infilling_prompt_tokens(tokenizer, kept_extra + kept_prefix, kept_suffix, suffix_first)
        over = len(ids) - budget
        if over <= 0:
            return ids, True
        if kept_extra:
            kept_extra = keep_end(kept_extra, count(kept_extra) - over, count)
        elif count(kept_prefix) >= count(kept_suffix):
            kept_prefix = keep_end(kept_prefix, count(kept_prefix) - over, count)
        else:
            kept_suffix = keep_start(kept_suffix, count(kept_suffix) - over, count)


def _counter(tokenizer: Tokenizer) -> Callable[[str], int]:
    """Tokens of a piece of text as it reads inside a prompt (no implicit leading space)."""
    def count(text: str) -> int:
        return len(tokenizer.encode_infilling(text)) if text else 0
    return count


def keep_end(text: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest end of ``text`` of at most ``budget`` tokens: whole lines, then the end of the line before."""
    if budget <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    kept, used = len(lines), 0
    while kept > 0 and used + (n := count(lines[kept - 1])) <= budget:
        kept, used = kept - 1, used + n
    out = "".join(lines[kept:])
    if kept > 0:
        out = _longest(lines[kept - 1], budget - used, count, from_end=True) + out
    return out


def keep_start(text: str, budget: int, count: Callable[[str], int]) -> str:
    """The longest start of ``text`` of at most ``budget`` tokens: whole lines, then the start of the next."""
    if budget <= 0:
        return ""
    lines = text.splitlines(keepends=True)
    kept, used = 0, 0
    while kept < len(lines) and used + (n := count(lines[kept])) <= budget:
        kept, used = kept + 1, used + n
    out = "".join(lines[:kept])
    if kept < len(lines):
        out += _longest(lines[kept], budget - used, count, from_end=False)
    return out


def _longest(line: str, budget: int, count: Callable[[str], int], from_end: bool) -> str:
    """The longest end (or start) of one line within ``budget`` tokens, by bisection on its characters."""
    lo, hi = 0, len(line)  # lo characters always fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        part = line[len(line) - mid:] if from_end else line[:mid]
        if count(part) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return line[len(line) - lo:] if from_end else line[:lo]

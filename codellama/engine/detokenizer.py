"""A request's text as its tokens arrive, cut at its stop strings.

Text that could be the start of a stop string is held back until it cannot, so the streamed pieces always
join to the final text and a stop string never shows, even in part.
"""

from __future__ import annotations

from typing import Sequence, Tuple

from ..tokenizer import TextStream


def check_stop_strings(stop) -> Tuple[str, ...]:
    """``stop`` (a string or a sequence of them) as a tuple of non-empty strings, or ``ValueError``."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be non-empty strings, got {stop!r}")
    return stops


class Detokenizer:
    """Incremental text of a request, with stop strings."""

    def __init__(self, stream: TextStream, stops: Sequence[str]):
        self.stream, self.stops = stream, tuple(stops)
        self.text, self.emitted = "", 0

    def push(self, token: int) -> Tuple[str, bool]:
        """Add a token; return the text that is now safe to show, and whether a stop string was found."""
        self.text += self.stream.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.stream.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> Tuple[str, bool]:
        stopped = False
        if self.stops:
            horizon = max(0, self.emitted - max(map(len, self.stops)))
            hits = [i for i in (self.text.find(s, horizon) for s in self.stops) if i >= 0]
            if hits:
                self.text, stopped = self.text[:min(hits)], True
        safe = len(self.text)
        if self.stops and not (final or stopped):
            safe -= _held_back(self.text, self.stops)
        piece = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece, stopped


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of some stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest

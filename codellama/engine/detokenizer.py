"""A request's text as its tokens arrive, cut at its stop strings.

Text that could be the start of a stop string is held back until it cannot, so the streamed pieces always
join to the final text and a stop string never shows, even in part.
"""

from __future__ import annotations

from collections import deque
from typing import Dict, List, Sequence, Tuple

from ..tokenizer import TextStream


MAX_STOP_STRINGS = 64  # per request; each at most MAX_STOP_CHARS characters
MAX_STOP_CHARS = 512


def check_stop_strings(stop) -> Tuple[str, ...]:
    """``stop`` (a string or a sequence of them) as a tuple of non-empty strings, or ``ValueError``.

    Bounded (``MAX_STOP_STRINGS`` of at most ``MAX_STOP_CHARS`` characters): matching costs the same per
    token whatever the list, but building the matcher costs its total length, on the engine's thread."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be non-empty strings, got {stop!r:.200}")
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"{len(stops)} stop strings: at most {MAX_STOP_STRINGS} are allowed")
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise ValueError(f"a stop string of {len(longest)} characters ({longest[:40]!r}…): at most "
                         f"{MAX_STOP_CHARS} are allowed")
    return stops


class StopMatcher:
    """The Aho–Corasick automaton of a set of stop strings, fed text one character at a time.

    Its state is the longest end of the text fed so far that begins some stop string, so each character
    costs amortised O(1) whatever the number and length of the stop strings: that end is exactly the text
    to hold back, and when it is a whole stop string (or ends in one) a stop was found.
    """

    def __init__(self, stops: Sequence[str]):
        self.goto: List[Dict[str, int]] = [{}]
        self.depth = [0]  # characters of the stop-string beginning that each state stands for
        self.fail = [0]   # the state of its longest proper end that begins a stop string
        self.found = [0]  # length of the longest stop string ending in this state (0: none)
        for s in stops:
            state = 0
            for ch in s:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = self.goto[state][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.fail.append(0)
                    self.found.append(0)
                state = nxt
            self.found[state] = len(s)
        queue = deque(self.goto[0].values())  # breadth first: a state's fail link is shallower than it
        while queue:
            state = queue.popleft()
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[nxt] = self.goto[f].get(ch, 0) if self.goto[f].get(ch) != nxt else 0
                self.found[nxt] = self.found[nxt] or self.found[self.fail[nxt]]
                queue.append(nxt)
        self.state = 0

    def feed(self, ch: str) -> int:
        """Advance by one character; the length of the longest stop string ending with it (0: none)."""
        state = self.state
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        self.state = self.goto[state].get(ch, 0)
        return self.found[self.state]

    @property
    def partial(self) -> int:
        """Characters at the end of the text fed so far that could begin a stop string."""
        return self.depth[self.state]


class Detokenizer:
    """Incremental text of a request, with stop strings."""

    def __init__(self, stream: TextStream, stops: Sequence[str]):
        self.stream = stream
        self.matcher = StopMatcher(stops) if stops else None
        self.text, self.emitted, self.fed = "", 0, 0

    def push(self, token: int) -> Tuple[str, bool]:
        """Add a token; return the text that is now safe to show, and whether a stop string was found."""
        self.text += self.stream.push(token)
        return self._release(final=False)

    def flush(self) -> str:
        self.text += self.stream.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> Tuple[str, bool]:
        stopped = False
        if self.matcher is not None:
            # The new characters, each once; of the stops found among them, the one that starts first wins.
            cut = None
            for i in range(self.fed, len(self.text)):
                n = self.matcher.feed(self.text[i])
                if n and (cut is None or i + 1 - n < cut):
                    cut = i + 1 - n
            self.fed = len(self.text)
            if cut is not None:
                self.text, self.fed, stopped = self.text[:cut], cut, True
        safe = len(self.text)
        if self.matcher is not None and not (final or stopped):
            safe -= self.matcher.partial
        piece = self.text[self.emitted:safe]
        self.emitted = max(self.emitted, safe)
        return piece, stopped

"""A request's life: what a caller asks for (``SamplingParams``), the states it passes through
(``RequestState``), and what it gets back (``Event``s on a ``Request``)."""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Deque, Hashable, Iterator, List, Optional, Tuple

import torch

from ..sampling import TopLogprobs, check_sampling_args
from .detokenizer import check_stop_strings

if TYPE_CHECKING:
    from .detokenizer import Detokenizer
    from .loop import Engine

log = logging.getLogger("codellama.engine")

MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API allows
FINISH_REASONS = ("stop", "length", "cancelled")  # and "error" when the request failed (``Request.error`` says why)


class EngineFull(RuntimeError):
    """The waiting queue is full (``max_waiting``): try again later."""


class EngineStopped(RuntimeError):
    """The engine was stopped; it takes no more requests."""


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    ``temperature`` 0 is greedy; ``top_p``/``top_k`` restrict sampling; ``max_tokens`` bounds the new
    tokens (None: until the context is full); generation stops at any of ``stop_token_ids`` (not
    returned) or when the decoded text contains one of ``stop`` (the text is cut before it).
    ``logprobs`` records each new token's log-probability, ``prompt_logprobs`` those of the prompt's
    tokens (0.0 for the first); ``top_logprobs`` (0 … 20) also records, with either, the most likely tokens at
    each position and their log-probabilities. ``seed`` makes sampling reproducible whatever shares the batch.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: Optional[int] = None
    max_tokens: Optional[int] = None
    stop_token_ids: Tuple[int, ...] = ()
    stop: Tuple[str, ...] = ()
    logprobs: bool = False
    prompt_logprobs: bool = False
    top_logprobs: int = 0
    seed: Optional[int] = None

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_p, self.top_k)
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 0):
            raise ValueError(f"max_tokens must be a non-negative integer or None, got {self.max_tokens!r}")
        ids = tuple(self.stop_token_ids)
        if not all(is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "stop", check_stop_strings(self.stop))
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ValueError("top_logprobs needs logprobs=True or prompt_logprobs=True (it says which tokens were "
                             "likeliest where log-probabilities are recorded)")


class RequestState(enum.Enum):
    """Where a request is. WAITING → PREFILLING → DECODING → FINISHED; any state may go straight to FINISHED
    (cancelled, a zero token budget, an error)."""

    WAITING = "waiting"        # queued: no slot yet
    PREFILLING = "prefilling"  # owns a slot; its prompt is computed chunk by chunk
    DECODING = "decoding"      # one token (or a verified proposal) per step, fed from ``pending``
    FINISHED = "finished"      # ``finish_reason`` says why; its slot (if any) is free, its cached tokens kept


@dataclass
class Event:
    """What one step produced for one request: a token (None on the final event of a request that
    produced none), the new text (may be empty while text that could start a stop string is held
    back), its log-probability and the likeliest tokens there (with ``top_logprobs``), and the finish
    reason on the last event."""

    token: Optional[int]
    text: str
    logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    top_logprobs: Optional[TopLogprobs] = None


class Request:
    """A submitted request: iterate it for its events as they are produced, or call ``result()``.

    After it finishes: ``tokens`` (new tokens, without a stop token), ``text``, ``logprobs``,
    ``prompt_logprobs``, ``top_logprobs`` and ``prompt_top_logprobs`` (None for the first prompt token),
    ``finish_reason`` (one of :data:`FINISH_REASONS`, or ``"error"`` with ``error`` set), ``cached_tokens``
    (prompt tokens whose keys and values it did not compute: the prefix its slot shared, the start restored
    from the prompt cache (``restored_tokens`` of them) and the chunks moved into place by chunk reuse
    (``shifted_tokens``); ``len(prompt) - cached_tokens`` were computed) and timings. Closing the iterator
    early, or ``cancel()``, frees its slot at the next step; so does a newer request of the same ``session``
    (``superseded`` is then True).
    """

    def __init__(self, engine: Optional["Engine"], rid: int, prompt: List[int], params: SamplingParams,
                 detok: Optional["Detokenizer"] = None, generator: Optional[torch.Generator] = None,
                 on_event: Optional[Callable[[Event], None]] = None, limit: int = 0, session: Hashable = None):
        self.engine, self.id, self.prompt, self.params = engine, rid, prompt, params
        self.session, self.superseded = session, False
        self._on_event = on_event
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.prompt_logprobs: Optional[List[float]] = [0.0] if params.prompt_logprobs else None
        self.top_logprobs: List[TopLogprobs] = []
        self.prompt_top_logprobs: Optional[List[Optional[TopLogprobs]]] = (
            [None] if params.prompt_logprobs and params.top_logprobs else None)
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None  # why this request failed (finish reason "error")
        self.cached_tokens = 0
        self.restored_tokens = 0
        self.shifted_tokens = 0
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        # The scheduler's view: its state, its slot, how many of its positions that slot holds, the token
        # fed at the next decode step, and how many new tokens it may produce (max_tokens and the context).
        self.state = RequestState.WAITING
        self.slot: Optional[int] = None
        self.computed = 0
        self.pending: Optional[int] = None
        self.runs: List[Tuple[int, int]] = []  # (start, length) of prompt chunks moved into place, not yet reached
        self.limit = limit
        self.cancel_requested = False
        self._detok = detok
        self._generator = generator
        self._events: Deque[Event] = deque()

    # ----------------------------------------------------------------- consumer side
    @property
    def done(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def text(self) -> str:
        return self._detok.text if self._detok is not None else ""

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                self.engine.wait_for(lambda: bool(self._events) or self.done)
                with self.engine.lock:
                    if not self._events:
                        return
                    event = self._events.popleft()
                if event.finish_reason == "error":
                    self._raise_error()
                yield event
                if event.finish_reason is not None:
                    return
        finally:  # closed early (or abandoned and collected): stop generating for nobody
            if not self.done:
                self.cancel()

    def take_events(self) -> List[Event]:
        """The events produced since the last call, without waiting (for callers that are woken by ``on_event``)."""
        with self.engine.lock:
            events = list(self._events)
            self._events.clear()
        if events and events[-1].finish_reason == "error":
            self._raise_error()
        return events

    def result(self) -> "Request":
        """Wait until the request has finished (running engine steps on this thread when needed); raises
        this request's error if it failed."""
        self.engine.wait_for(lambda: self.done)
        self._raise_error()
        return self

    def _raise_error(self) -> None:
        """Raise this request's own failure: a ``ValueError`` (what it asked for cannot be done, e.g. the KV
        cache does not fit) as such, anything else as ``RuntimeError("generation failed: …")``."""
        if isinstance(self.error, ValueError):
            raise ValueError(str(self.error)) from self.error
        if self.error is not None:
            raise RuntimeError(f"generation failed: {type(self.error).__name__}: {self.error}") from self.error

    def cancel(self) -> None:
        """Stop this request; its slot is freed at the next step and it finishes as ``cancelled``."""
        self.engine.cancel(self)

    # ----------------------------------------------------------------- producer side (the engine, under its lock)
    def emit(self, event: Event) -> None:
        """Queue an event and tell the caller's ``on_event``. A callback that raises fails this request
        alone: it is told no more, and the engine finishes it with ``"error"`` (``error`` is the callback's
        exception) at its next step; on the final event there is nothing left to fail, so it is logged."""
        self._events.append(event)
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception as error:  # the caller's code: its fault is its own request's
            self._on_event = None
            if event.finish_reason is not None:
                log.warning("request %d: on_event raised on its final event: %s: %s", self.id,
                            type(error).__name__, error)
                return
            self.error = error
            self.cancel_requested = True

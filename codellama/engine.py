"""The inference engine: continuous batching over a slot KV cache, shared by many callers at once.

A request is prompt tokens plus its own ``SamplingParams``. The engine owns one KV cache of
``max_batch_size`` slots × ``max_seq_len`` positions, allocated once. Each admitted request owns a slot
(a cache row) for its whole life; nothing is ever copied between slots. One scheduler step (``step``):

1. retire cancelled requests, then admit waiting ones into free slots: the slot whose cached tokens
   share the longest prefix with the prompt (an editor resends nearly the same file on every keystroke),
   else the least recently used one; the shared prefix is not computed again;
2. run one forward for every request that is decoding (one token each, at its own position and slot),
   then prefill waiting prompts in chunks within a per-step token budget, so a long prompt arriving
   delays the tokens of requests already streaming by at most one chunk;
3. sample each row with its own parameters and seeded generator, apply stop tokens, stop strings,
   ``max_tokens`` and the context limit, and hand each request its new tokens and text.

Callers either drive the engine themselves (a thread waiting for its request runs steps when no other
thread is; concurrent callers are batched together) or let a background thread run it (``start`` /
``stop``, for servers). Greedy results in float32 are token-identical to a request run alone, and seeded
sampling draws the same tokens whatever else shares the batch.

Under ``torchrun`` (tensor parallelism) rank 0 schedules; each step's plan is broadcast and every rank
runs the same forwards, so a split model serves concurrent requests too.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .model import KVCache, Transformer
from .distributed import local_heads
from .sampling import TopLogprobs, check_sampling_args, logprobs_and_top, sample
from .tokenizer import TextStream

HEARTBEAT_S = 30.0  # an idle tensor-parallel server sends its followers an empty plan this often
MIN_REUSE = 16  # a cached prefix shorter than this (or than the whole prompt) does not choose the slot
MAX_TOP_LOGPROBS = 20  # as OpenAI's chat API allows
FINISH_REASONS = ("stop", "length", "cancelled")  # and "error" when a step failed (``Request.error`` says why)


class EngineFull(RuntimeError):
    """The waiting queue is full (``max_waiting``): try again later."""


class EngineStopped(RuntimeError):
    """The engine was stopped; it takes no more requests."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------- requests
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
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise ValueError(f"max_tokens must be a non-negative integer or None, got {self.max_tokens!r}")
        ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in ids):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stops)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {self.top_logprobs!r}")
        if self.top_logprobs and not (self.logprobs or self.prompt_logprobs):
            raise ValueError("top_logprobs needs logprobs=True or prompt_logprobs=True (it says which tokens were "
                             "likeliest where log-probabilities are recorded)")


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
    ``finish_reason`` (one of :data:`FINISH_REASONS`), ``cached_tokens`` (the part of
    the prompt reused from the cache) and timings. Closing the iterator early, or ``cancel()``, frees
    its slot at the next step.
    """

    def __init__(self, engine: "Engine", rid: int, prompt: List[int], params: SamplingParams,
                 detok: Optional["_Detokenizer"], generator: Optional[torch.Generator],
                 on_event: Optional[Callable[[Event], None]] = None):
        self.engine, self.id, self.prompt, self.params = engine, rid, prompt, params
        self._on_event = on_event
        self.tokens: List[int] = []
        self.logprobs: List[float] = []
        self.prompt_logprobs: Optional[List[float]] = [0.0] if params.prompt_logprobs else None
        self.top_logprobs: List[TopLogprobs] = []
        self.prompt_top_logprobs: Optional[List[Optional[TopLogprobs]]] = (
            [None] if params.prompt_logprobs and params.top_logprobs else None)
        self.finish_reason: Optional[str] = None
        self.error: Optional[BaseException] = None  # why the engine failed this request (finish reason "error")
        self.cached_tokens = 0
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        # engine-private state
        self._detok = detok
        self._generator = generator
        self._events: Deque[Event] = deque()
        self._cancel = False
        self.slot: Optional[int] = None
        self.computed = 0  # positions of this request already in its slot's cache
        self.pending: Optional[int] = None  # the last sampled token, fed at the next decode step
        self.limit = 0  # new tokens this request may produce (max_tokens and the context)

    # ----------------------------------------------------------------- consumer side
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self._detok.text if self._detok is not None else ""

    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                self.engine._drive(lambda: bool(self._events) or self.done)
                with self.engine._lock:
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
        with self.engine._lock:
            events = list(self._events)
            self._events.clear()
        if events and events[-1].finish_reason == "error":
            self._raise_error()
        return events

    def result(self) -> "Request":
        """Wait until the request has finished (running engine steps on this thread when needed); raises
        the engine's error if a step failed."""
        self.engine._drive(lambda: self.done)
        self._raise_error()
        return self

    def _raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"generation failed: {type(self.error).__name__}: {self.error}") from self.error

    def cancel(self) -> None:
        """Stop this request; its slot is freed at the next step and it finishes as ``cancelled``."""
        with self.engine._lock:
            if not self.done:
                self._cancel = True
                self.engine._wake.notify_all()

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if self._on_event is not None:
            self._on_event(event)


class _Detokenizer:
    """Incremental text of a request, with stop strings: text that might begin a stop string is held
    back until it cannot, so the streamed pieces always join to the final text."""

    def __init__(self, stream, stops: Sequence[str]):
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


# ----------------------------------------------------------------------------- slots and plans
@dataclass
class _Slot:
    cached: List[int] = field(default_factory=list)  # tokens whose keys/values fill positions 0 … len-1
    owner: Optional[Request] = None
    last_used: int = 0


@dataclass
class _Forward:
    """One forward call of a step: rows of (request id, slot, tokens fed at start)."""

    kind: str  # "decode": one token per row; "prefill": one row, a chunk of its prompt
    ids: List[int]
    slots: List[int]
    tokens: List[List[int]]
    starts: List[int]
    all_logits: bool = False  # prompt logprobs need every position's logits
    sample: bool = True  # False for a prefill chunk that does not reach the end of its prompt
    slot_positions: Optional[List[int]] = None  # compiled decode: the position fed in every slot (idle ones too)


@dataclass
class _Plan:
    """Everything one step decides, broadcast from rank 0 under tensor parallelism so every rank does the same."""

    retired: List[int] = field(default_factory=list)  # ids cancelled before this step
    admitted: List[Tuple[int, int, int]] = field(default_factory=list)  # (id, slot, reused prompt tokens)
    forwards: List[_Forward] = field(default_factory=list)
    stop: bool = False  # the leader stopped: followers leave ``follow()``


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ----------------------------------------------------------------------------- the engine
class Engine:
    """Continuous batching of many requests over one model and one slot KV cache."""

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch_size: int = 8, max_seq_len: int = 2048,
                 max_tokens_per_step: int = 512, max_waiting: Optional[int] = None, compile: bool = False,
                 seed: int = 0, speculator=None):
        """``max_batch_size`` slots of ``max_seq_len`` positions; ``max_tokens_per_step`` bounds the tokens of
        one step (decode rows first, then prefill chunks); ``max_waiting`` bounds the queue (``EngineFull``
        past it; None: unbounded); ``compile`` uses a ``torch.compile``d static-shape decode step;
        ``seed`` seeds the generator that gives each unseeded request its own seed, in submission order.
        ``tokenizer`` is needed for text (events' text pieces, stop strings). ``speculator`` (a
        ``codellama.speculative.PromptLookup`` or ``DraftModel``) proposes tokens that each decode step
        verifies in one forward."""
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                            ("max_tokens_per_step", max_tokens_per_step)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_waiting is not None and (not _is_int(max_waiting) or max_waiting < 0):
            raise ValueError(f"max_waiting must be a non-negative integer or None, got {max_waiting!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_tokens_per_step, self.max_waiting = max_tokens_per_step, max_waiting
        self.device = model.tok_embeddings.weight.device
        self.rank, self.world = model.tp.rank, model.tp.world
        self._seeds = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._waiting: Deque[Request] = deque()
        self._running: Dict[int, Request] = {}
        self._requests: Dict[int, Request] = {}  # every unfinished request by id (followers look theirs up)
        self._slots = [_Slot() for _ in range(max_batch_size)]
        self._steps = 0
        self._stepping = False
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._released = False  # rank 0 has told the followers to stop (once: they are gone after it)
        self.cache: Optional[KVCache] = None  # allocated at the first step, once
        self._compiled: Dict[int, Callable] = {}  # compiled decode step per cache-length bucket
        self.compile = compile
        if speculator is not None and (self.world > 1 or compile):
            raise ValueError("speculative decoding runs in one process with the eager step: it cannot be combined "
                             "with tensor parallelism or compile=True")
        self.speculator = speculator
        self.speculation = {"steps": 0, "proposed": 0, "accepted": 0}  # totals, for benchmarks and logs

    # ----------------------------------------------------------------- memory
    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache: slots × max_seq_len × ``KVCache.bytes_per_token``."""
        dtype = self.model.norm.weight.dtype  # a float weight (a quantized embedding holds integer codes)
        return self.max_batch_size * self.max_seq_len * KVCache.bytes_per_token(self.model.args, dtype, self.model.tp)

    def _ensure_cache(self) -> KVCache:
        """The slot cache, allocated once; a clear error (with the sizes) when it does not fit."""
        if self.cache is None:
            a, ref = self.model.args, self.model.norm.weight  # a quantized embedding holds integers
            need = (f"the KV cache needs {self.cache_bytes / 2**30:.2f} GiB ({self.max_batch_size} slots × "
                    f"{self.max_seq_len} positions × {self.cache_bytes // (self.max_batch_size * self.max_seq_len)} "
                    "bytes); lower max_batch_size or max_seq_len")
            free = torch.cuda.mem_get_info(ref.device)[0] if ref.device.type == "cuda" else None
            if free is not None and self.cache_bytes > free:
                raise ValueError(f"{need}: only {free / 2**30:.2f} GiB are free on {ref.device}")
            try:
                self.cache = KVCache(a.n_layers, self.max_batch_size, self.max_seq_len,
                                     local_heads(a, self.model.tp)[1], a.head_dim, ref.dtype, ref.device)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                raise ValueError(f"{need} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        return self.cache

    # ----------------------------------------------------------------- submitting
    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
               decode: Optional[Callable[[List[int]], str]] = None,
               on_event: Optional[Callable[[Event], None]] = None, text: bool = True) -> Request:
        """Queue a request; returns at once. ``decode`` turns the new tokens into text (default: the
        tokenizer's ``decode``; infilling passes ``decode_infilling``). ``on_event`` is called with each
        event as it is produced, on the engine's thread and under its lock: it must be quick and must not
        block (an asyncio server passes ``loop.call_soon_threadsafe``-based wake-ups); the events still
        queue on the request for iteration. ``text=False`` skips the incremental text (events carry tokens
        only), for callers that want token ids; stop strings need it."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self.check_prompt(prompt)
        detok = None
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer (Engine(model, tokenizer))")
        if self.tokenizer is not None and (text or params.stop):
            detok = _Detokenizer(TextStream(self.tokenizer, decode), params.stop)
        with self._lock:
            if self._stopped:
                raise EngineStopped("the engine has been stopped and takes no more requests")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise EngineFull(f"{len(self._waiting)} requests are already waiting (max_waiting={self.max_waiting})")
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            generator = None
            if params.temperature > 0:
                generator = torch.Generator(device=self.device).manual_seed(seed)
            request = Request(self, next(self._ids), prompt, params, detok, generator, on_event)
            max_new = self.max_seq_len - len(prompt)
            request.limit = max_new if params.max_tokens is None else min(params.max_tokens, max_new)
            self._waiting.append(request)
            self._requests[request.id] = request
            self._wake.notify_all()
        return request

    def check_prompt(self, prompt: Sequence[int]) -> List[int]:
        """The prompt as a list of ids, or ``ValueError`` saying why it cannot be served."""
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)):
            raise ValueError(f"a prompt must be a list of token ids, got {type(prompt).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ValueError("a prompt needs at least one token (e.g. BOS)")
        vocab = self.model.args.vocab_size
        bad = [t for t in prompt if not _is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"the prompt holds token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(prompt) > self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than max_seq_len={self.max_seq_len}")
        return prompt

    def slot_states(self) -> List[Tuple[Optional[Request], int]]:
        """Each slot's request (None when idle) and how many tokens its cache holds, read at one instant (a
        server's read-only view of its slots)."""
        with self._lock:
            return [(s.owner, len(s.cached)) for s in self._slots]

    # ----------------------------------------------------------------- driving
    def start(self) -> "Engine":
        """Run the engine on a background thread until ``stop()`` (servers)."""
        with self._lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._loop, name="codellama-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel every request (each ends with a final ``cancelled`` event) and stop the background thread.
        Under tensor parallelism rank 0 also releases the other ranks' ``follow()``."""
        with self._lock:
            self._stopped = True
            for request in list(self._requests.values()):
                request._cancel = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._thread = None
            while self._stepping:  # a caller's thread is mid-step: let it finish
                self._wake.wait()
            self._retire_cancelled()
            self._wake.notify_all()
        if self.world > 1 and self.rank == 0 and not self._released:
            self._released = True
            self.model.tp.broadcast_object(_Plan(stop=True))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._stopped):
                    # Idle. Under tensor parallelism the followers block in a collective until the next
                    # plan: an empty one now and then keeps them inside the collective timeout.
                    if not self._wake.wait(timeout=HEARTBEAT_S) and self.world > 1:
                        break
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as error:  # e.g. a collective timed out: fail what is left, never leave waiters hanging
                with self._lock:
                    for request in list(self._requests.values()):
                        request.error = error
                        self._finish(request, "error")
                    self._thread, self._stopped = None, True
                    self._wake.notify_all()
                return

    def _drive(self, done: Callable[[], bool]) -> None:
        """Block until ``done()``: run steps on this thread while no other thread is (or wait for the
        background thread). Every step wakes every waiter."""
        while True:
            with self._lock:
                while not done() and (self._stepping or self._thread is not None):
                    self._wake.wait()
                if done():
                    return
                self._stepping = True
            try:
                self.step()
            finally:
                with self._lock:
                    self._stepping = False
                    self._wake.notify_all()

    # ----------------------------------------------------------------- one step
    def step(self) -> bool:
        """One scheduler step: admit, run the forwards, hand out tokens. False when there was nothing to do."""
        with self._lock:
            plan = self._plan() if self.rank == 0 else None
        if self.world > 1:
            plan = self.model.tp.broadcast_object(plan)
            if self.rank != 0:
                with self._lock:
                    self._follow_plan(plan)
        if not plan.forwards:
            return False
        try:
            results = self._execute(plan.forwards)
            with self._lock:
                self._apply(plan.forwards, results)
        except Exception as error:  # e.g. out of memory: the slots' contents are unknown now
            with self._lock:
                for request in list(self._running.values()):
                    request.error = error
                    self._finish(request, "error")
                for slot in self._slots:
                    slot.cached = []
                self._wake.notify_all()
            if self._thread is None or threading.current_thread() is not self._thread:
                raise
            return True
        with self._lock:
            self._steps += 1
            self._wake.notify_all()
        return True

    def follow(self) -> None:
        """Ranks other than 0 of a tensor-parallel server: run rank 0's steps until it stops."""
        if self.rank == 0:
            raise ValueError("follow() is for ranks other than 0; rank 0 schedules (start() or drive requests)")
        while True:
            plan = self.model.tp.broadcast_object(None)
            with self._lock:
                self._follow_plan(plan)
            if plan.stop:
                return
            if plan.forwards:
                results = self._execute(plan.forwards)
                with self._lock:
                    self._apply(plan.forwards, results)

    def _plan(self) -> _Plan:
        """Rank 0's decisions for this step: retire cancelled requests, admit waiting ones, lay out forwards."""
        plan = _Plan()
        for request in [r for r in list(self._waiting) + list(self._running.values()) if r._cancel]:
            plan.retired.append(request.id)
            self._finish(request, "cancelled")
        while self._waiting and any(s.owner is None for s in self._slots):
            request = self._waiting.popleft()
            slot, reused = self._choose_slot(request)
            plan.admitted.append((request.id, slot, reused))
            self._place(request, slot, reused)
        decoding = [r for r in self._running.values() if r.pending is not None]
        if decoding:
            plan.forwards.append(_Forward("decode", [r.id for r in decoding], [r.slot for r in decoding],
                                          [[r.pending] for r in decoding], [r.computed for r in decoding],
                                          slot_positions=self._slot_positions(decoding) if self.compile else None))
        budget = max(self.max_tokens_per_step - len(decoding), 1)  # prefill always moves
        for r in self._running.values():
            if r.pending is not None or budget <= 0:
                continue
            n = min(len(r.prompt) - r.computed, budget)
            budget -= n
            plan.forwards.append(_Forward("prefill", [r.id], [r.slot], [r.prompt[r.computed:r.computed + n]],
                                          [r.computed], all_logits=r.prompt_logprobs is not None,
                                          sample=r.computed + n == len(r.prompt)))
        return plan

    def _follow_plan(self, plan: _Plan) -> None:
        """A follower mirrors rank 0's retirements and admissions for the requests it holds itself."""
        for rid in plan.retired:
            if rid in self._requests:
                self._finish(self._requests[rid], "cancelled")
        for rid, slot, reused in plan.admitted:
            request = self._requests.get(rid)
            if request is not None:
                self._waiting.remove(request)
                self._place(request, slot, reused)
        if plan.stop:
            self._stopped = True
            for request in list(self._requests.values()):
                self._finish(request, "cancelled")

    def _retire_cancelled(self) -> None:
        for request in [r for r in list(self._waiting) + list(self._running.values()) if r._cancel]:
            self._finish(request, "cancelled")

    def _choose_slot(self, request: Request) -> Tuple[int, int]:
        """The free slot sharing the longest prefix with the prompt (ties and no match: least recently used),
        and how many prompt tokens it lets the request skip."""
        def reusable(i: int) -> int:
            # At least the last prompt token is computed (its logits start decoding); prompt logprobs need
            # every position's logits, so such a request reuses nothing.
            if request.prompt_logprobs is not None:
                return 0
            return min(_common_prefix(self._slots[i].cached, request.prompt), len(request.prompt) - 1)

        def worth(i: int) -> int:
            # Every prompt shares BOS and a few common tokens: a match that short is not worth evicting a
            # slot's cache for, so such slots compete on recency alone.
            m = reusable(i)
            return m if m >= min(MIN_REUSE, len(request.prompt) - 1) else 0

        free = [i for i, s in enumerate(self._slots) if s.owner is None]
        best = max(free, key=lambda i: (worth(i), -self._slots[i].last_used))
        return best, reusable(best)

    def _place(self, request: Request, slot_index: int, reused: int) -> None:
        slot = self._slots[slot_index]
        slot.owner, slot.cached, slot.last_used = request, slot.cached[:reused], self._steps
        request.slot, request.computed, request.cached_tokens = slot_index, reused, reused
        self._running[request.id] = request
        if self.speculator is not None:
            self.speculator.on_admit(request, slot_index, reused)
        if request.limit <= 0 and request.prompt_logprobs is None:
            self._finish(request, "length")

    def _slot_positions(self, decoding: List[Request]) -> List[int]:
        """Positions the compiled all-slots decode feeds: each row's own, and in an idle slot the first
        position past what it caches (a write there harms nothing; a full slot gives up its last token)."""
        positions = []
        for s in self._slots:
            if len(s.cached) >= self.max_seq_len:
                del s.cached[self.max_seq_len - 1:]
            positions.append(len(s.cached))
        for r in decoding:
            positions[r.slot] = r.computed
        return positions

    def _execute(self, plan: List[_Forward]) -> List[torch.Tensor]:
        """Run the forwards; returns each one's logits (rows, V), or (1, T, V) with ``all_logits``."""
        cache = self._ensure_cache()
        out = []
        with torch.inference_mode():
            for f in plan:
                if f.kind == "decode" and self.speculator is not None:
                    out.append(self._speculative_decode(f, cache))
                    continue
                tokens = torch.tensor(f.tokens, dtype=torch.long, device=self.device)
                if f.kind == "decode" and self.compile:
                    out.append(self._compiled_decode(tokens, f))
                    continue
                index = None if f.all_logits else -1
                logits = self.model(tokens, f.starts, logits_index=index, slots=f.slots, cache=cache)
                out.append(logits if f.all_logits else logits[:, 0])
        return out

    def _apply(self, plan: List[_Forward], results: List[torch.Tensor]) -> None:
        """Sample, record and stop, for every row of the plan (the same on every rank)."""
        for f, logits in zip(plan, results):
            requests = [self._requests.get(i) for i in f.ids]
            if f.kind == "prefill":
                r = requests[0]
                n = len(f.tokens[0])
                if r is not None:
                    self._slots[r.slot].cached.extend(f.tokens[0])
                    r.computed += n
                    if r.prompt_logprobs is not None:
                        nxt = r.prompt[f.starts[0] + 1:f.starts[0] + n + 1]  # the tokens these positions predict
                        if nxt:
                            lps, tops = logprobs_and_top(logits[0, :len(nxt)], torch.tensor(nxt, device=logits.device),
                                                         r.params.top_logprobs)
                            r.prompt_logprobs.extend(lps)
                            if r.prompt_top_logprobs is not None:
                                r.prompt_top_logprobs.extend(tops)
                if not f.sample:
                    continue
                last = logits[:, -1] if f.all_logits else logits  # (1, V)
                self._sample_rows(requests, last)
                continue
            if isinstance(logits, list):  # speculative: each row's verified tokens
                for r, v in zip(requests, logits):
                    if r is None or r.done:
                        continue
                    self._slots[r.slot].cached.extend(v.fed)
                    r.computed += len(v.fed)
                    for token, lp, top in itertools.zip_longest(v.out, v.logprobs, v.top_logprobs):
                        self._accept(r, token, lp, top)
                        if r.done:
                            break
                continue
            for r, token in zip(requests, f.tokens):
                if r is not None:
                    self._slots[r.slot].cached.append(token[0])
                    r.computed += 1
            self._sample_rows(requests, logits)

    def _sample_rows(self, requests: List[Optional[Request]], logits: torch.Tensor) -> None:
        """Next token of each row (rank 0's choice on every rank), then the request's bookkeeping."""
        chosen = []
        for j, r in enumerate(requests):
            if r is None or r.limit <= 0:
                chosen.append(torch.zeros((), dtype=torch.long, device=logits.device))
                continue
            p = r.params
            chosen.append(sample(logits[j:j + 1], p.temperature, p.top_p, p.top_k, r._generator)[0])
        tokens = self.model.tp.broadcast(torch.stack(chosen))  # (rows,)
        lps = tops = None
        recording = [r.params.top_logprobs for r in requests if r is not None and r.params.logprobs]
        if recording:  # one log-softmax for every row; each row keeps as many alternatives as it asked for
            lps, tops = logprobs_and_top(logits, tokens, max(recording))
        for j, (r, t) in enumerate(zip(requests, tokens.tolist())):
            if r is None or r.done:
                continue
            if r.limit <= 0:  # prompt logprobs only: nothing to generate
                self._finish(r, "length")
                continue
            top = tops[j][:r.params.top_logprobs] if tops is not None and r.params.top_logprobs else None
            self._accept(r, t, lps[j] if lps is not None else None, top)

    def _accept(self, r: Request, token: int, logprob: Optional[float], top: Optional[TopLogprobs] = None) -> None:
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token in r.params.stop_token_ids:
            self._finish(r, "stop")
            return
        r.tokens.append(token)
        if r.params.logprobs:
            r.logprobs.append(logprob)
            if r.params.top_logprobs:
                r.top_logprobs.append(top)
        else:
            top = None
        text, stopped = r._detok.push(token) if r._detok is not None else ("", False)
        r._emit(Event(token, text, logprob, top_logprobs=top))
        if stopped:
            self._finish(r, "stop")
            return
        if len(r.tokens) >= r.limit:
            self._finish(r, "length")
            return
        r.pending = token

    def _finish(self, r: Request, reason: str) -> None:
        rest = r._detok.flush() if r._detok is not None and reason != "cancelled" else ""
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        r.pending = None
        r._emit(Event(None, rest, None, reason))
        if r in self._waiting:
            self._waiting.remove(r)
        self._running.pop(r.id, None)
        self._requests.pop(r.id, None)
        if r.slot is not None:
            slot = self._slots[r.slot]
            slot.owner, slot.last_used = None, self._steps  # its cached tokens stay for the next request
        if self.speculator is not None:
            self.speculator.on_finish(r)

    # ----------------------------------------------------------------- speculative decode
    def _speculative_decode(self, f: _Forward, cache: KVCache) -> list:
        """The decode rows with proposals: one verification forward feeds each row's pending token and its
        proposal (padded to the longest), rows without a proposal decode as usual. Returns the speculator's
        verdict per row (the tokens to cache and to output)."""
        requests = [self._requests[i] for i in f.ids]
        # A row may output at most its remaining tokens, and its positions must stay inside the context.
        room = [min(r.limit - len(r.tokens), self.max_seq_len - r.computed) - 1 for r in requests]
        proposals = self.speculator.propose(requests, room)
        T = 1 + max(len(p.tokens) for p in proposals)
        spec = [j for j, r in enumerate(requests) if proposals[j].tokens and r.computed + T <= self.max_seq_len]
        plain = [j for j in range(len(requests)) if j not in spec]
        results = [None] * len(requests)
        for group, width in ((spec, T), (plain, 1)):
            if not group:
                continue
            rows = [requests[j] for j in group]
            props = [proposals[j] if width > 1 else None for j in group]
            feed = [[r.pending] + (p.tokens if p else []) for r, p in zip(rows, props)]
            feed = [t + [t[-1]] * (width - len(t)) for t in feed]  # padding: positions later overwritten
            logits = self.model(torch.tensor(feed, dtype=torch.long, device=self.device), [r.computed for r in rows],
                                slots=[r.slot for r in rows], cache=cache)  # (rows, width, V)
            for j, verdict in zip(group, self.speculator.verify_rows(logits, rows, props)):
                results[j] = verdict
        for r, v in zip(requests, results):
            self.speculator.feedback(r, v.proposed, len(v.out) - 1)
            self.speculation["proposed"] += v.proposed
            self.speculation["accepted"] += len(v.out) - 1
        self.speculation["steps"] += 1
        return results

    # ----------------------------------------------------------------- compiled decode
    def _compiled_decode(self, tokens: torch.Tensor, f: _Forward) -> torch.Tensor:
        """The decode rows through a ``torch.compile``d step over **all** slots with static shapes: the
        cache length is rounded up to a bucket (a power of two), so a few graphs serve every length and
        nothing inside syncs with the host (CUDA graphs on CUDA)."""
        feed = torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=self.device)
        rows = torch.tensor(f.slots, device=self.device)
        feed[rows] = tokens
        positions = torch.tensor(f.slot_positions, device=self.device)
        length = min(self.max_seq_len, max(64, 1 << max(f.slot_positions).bit_length()))
        return self._decode_fn(length)(feed, positions)[rows]

    def _decode_fn(self, length: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        fn = self._compiled.get(length)
        if fn is None:
            model, cache = self.model, self._ensure_cache()
            model.make_step(0, 1, 1, None)  # RoPE frequencies exist before tracing

            def decode(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                step = model.make_step(positions, 1, length, cache)  # (S, 1) tokens, one position per slot
                return model.run(tokens, step)[:, 0]  # (S, V)

            mode = "reduce-overhead" if self.device.type == "cuda" else None
            fn = self._compiled[length] = torch.compile(decode, mode=mode, dynamic=False)
        return fn

"""The engine's loop: requests in, steps run, events out; who runs the steps, and tensor parallelism.

One step: the scheduler plans (rank 0), the plan is broadcast to the other ranks under tensor parallelism,
the runner runs its forwards and samples, and each request takes its new tokens (stop tokens, stop
strings, ``max_tokens`` and the context end it). Callers either drive the engine themselves (a thread
waiting for its request runs steps when no other thread is; concurrent callers are batched together) or
let a background thread run it (``start`` / ``stop``, for servers). Every step, and every change a step
makes without running a forward, wakes every waiter.

A failure is its request's own: a forward that fails fails the requests it ran (a failing decode batch is
retried row by row to find which), a row whose logits are not finite fails alone, a caller's ``on_event``
that raises fails that caller's request, and the engine goes on serving everyone else.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable, Hashable, List, Optional, Sequence, Tuple

import torch

from ..model import Transformer
from ..sampling import TopLogprobs, is_greedy, logprobs_and_top
from ..tokenizer import TextStream
from .detokenizer import Detokenizer
from .prompt_cache import PromptCache, cache_budget
from .request import EngineFull, EngineStopped, Event, Request, SamplingParams, is_int
from .runner import UNUSABLE, ModelRunner
from .scheduler import Forward, Plan, Scheduler

HEARTBEAT_S = 30.0  # an idle tensor-parallel server sends its followers an empty plan this often


class Engine:
    """Continuous batching of many requests over one model and one slot KV cache."""

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch_size: int = 8, max_seq_len: int = 2048,
                 max_tokens_per_step: int = 512, max_waiting: Optional[int] = None, compile: bool = False,
                 seed: int = 0, speculator=None, cache_ram_mb: Optional[float] = None, cache_reuse: int = 0):
        """``max_batch_size`` slots of ``max_seq_len`` positions; ``max_tokens_per_step`` bounds the tokens of
        one step (decode rows first, then prefill chunks); ``max_waiting`` bounds the requests
        waiting for a slot beyond the free ones (``EngineFull`` past it; 0: no more than there are free slots;
        None: unbounded); ``compile`` uses a ``torch.compile``d static-shape decode step;
        ``seed`` seeds the generator that gives each unseeded request its own seed, in submission order.
        ``tokenizer`` is needed for text (events' text pieces, stop strings). ``speculator`` (a
        ``codellama.engine.speculative.PromptLookup`` or ``DraftModel``) proposes tokens that each decode step
        verifies in one forward. ``cache_ram_mb`` is the prompt cache's budget in MiB of host memory (None:
        ``DEFAULT_CACHE_RAM_MB``; 0: no prompt cache): slots' contents are kept there before they are
        overwritten and restored for prompts that start the same way (exact). ``cache_reuse`` > 0 moves
        runs of at least that many prompt tokens found at other positions of a slot instead of computing
        them (not exact; see ``codellama.engine.prompt_cache``)."""
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                            ("max_tokens_per_step", max_tokens_per_step)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if max_waiting is not None and (not is_int(max_waiting) or max_waiting < 0):
            raise ValueError(f"max_waiting must be a non-negative integer or None, got {max_waiting!r}")
        budget = cache_budget(cache_ram_mb, cache_reuse)
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.max_tokens_per_step, self.max_waiting = max_tokens_per_step, max_waiting
        self.rank, self.world = model.tp.rank, model.tp.world
        if speculator is not None and (self.world > 1 or compile):
            raise ValueError("speculative decoding runs in one process with the eager step: it cannot be combined "
                             "with tensor parallelism or compile=True")
        self.runner = ModelRunner(model, max_batch_size, max_seq_len, compile=compile, speculator=speculator)
        prompt_cache = PromptCache(budget, self.runner.bytes_per_token) if budget else None
        self.scheduler = Scheduler(max_batch_size, max_seq_len, max_tokens_per_step, on_finish=self._finished,
                                   on_admit=self.runner.on_admit, all_slot_positions=compile,
                                   prompt_cache=prompt_cache, cache_reuse=cache_reuse)
        self.device = self.runner.device
        self._seeds = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._stepping = False
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._released = False  # rank 0 has told the followers to stop (once: they are gone after it)

    # ----------------------------------------------------------------- what the runner holds
    @property
    def compile(self) -> bool:
        return self.runner.compile

    @property
    def speculator(self):
        return self.runner.speculator

    @property
    def speculation(self) -> dict:
        return self.runner.speculation

    @property
    def cache(self):
        return self.runner.cache

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache: slots × max_seq_len × ``KVCache.bytes_per_token``."""
        return self.runner.cache_bytes

    # ----------------------------------------------------------------- submitting
    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(), *,
               decode: Optional[Callable[[List[int]], str]] = None,
               on_event: Optional[Callable[[Event], None]] = None, text: bool = True,
               session: Hashable = None, supersede: bool = True) -> Request:
        """Queue a request; returns at once. ``decode`` turns the new tokens into text (default: the
        tokenizer's ``decode``; infilling passes ``decode_infilling``). ``on_event`` is called with each
        event as it is produced, on the engine's thread and under its lock: it must be quick and must not
        block (an asyncio server passes ``loop.call_soon_threadsafe``-based wake-ups); the events still
        queue on the request for iteration; if it raises, its request fails (finish reason ``"error"``) and
        nothing else does. ``text=False`` skips the incremental text (events carry tokens only), for callers
        that want token ids; stop strings need it. ``session`` (any hashable key, e.g. a client and its
        document) with ``supersede``: the unfinished requests submitted earlier with the same key are
        superseded, stopped at the next step (finish reason ``"cancelled"``, ``superseded`` True), and what
        they computed stays cached for this one; ``supersede=False`` joins the session without stopping
        anyone (a request that only fills the cache ahead of the editor's next one)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self.check_prompt(prompt)
        detok = None
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer (Engine(model, tokenizer))")
        if self.tokenizer is not None and (text or params.stop):
            detok = Detokenizer(TextStream(self.tokenizer, decode), params.stop)
        with self.lock:
            if self._stopped:
                raise EngineStopped("the engine has been stopped and takes no more requests")
            queued = len(self.scheduler.waiting) - self.scheduler.free_slots  # those no free slot awaits
            if self.max_waiting is not None and queued >= self.max_waiting:
                raise EngineFull(f"all {self.max_batch_size} slots are taken and {queued} requests are already "
                                 f"waiting for one (max_waiting={self.max_waiting})")
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            generator = None
            if not is_greedy(params.temperature):
                generator = torch.Generator(device=self.device).manual_seed(seed)
            max_new = self.max_seq_len - len(prompt)
            limit = max_new if params.max_tokens is None else min(params.max_tokens, max_new)
            request = Request(self, next(self._ids), prompt, params, detok, generator, on_event, limit, session)
            if session is not None and supersede:
                for other in self.scheduler.requests.values():
                    if other.session == session and not other.done:
                        other.superseded = other.cancel_requested = True
            self.scheduler.add(request)
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
        bad = [t for t in prompt if not is_int(t) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"the prompt holds token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        if len(prompt) > self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens, more than max_seq_len={self.max_seq_len}")
        return prompt

    def slot_states(self) -> List[Tuple[Optional[Request], int]]:
        """Each slot's request (None when idle) and how many tokens its cache holds, read at one instant (a
        server's read-only view of its slots)."""
        with self.lock:
            return [(s.owner, len(s.cached)) for s in self.scheduler.slots]

    def cancel(self, request: Request) -> None:
        """Stop ``request``; its slot is freed at the next step and it finishes as ``cancelled``."""
        with self.lock:
            if not request.done:
                request.cancel_requested = True
                self._wake.notify_all()

    # ----------------------------------------------------------------- driving
    def start(self) -> "Engine":
        """Run the engine on a background thread until ``stop()`` (servers)."""
        with self.lock:
            if self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._loop, name="codellama-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Cancel every request (each ends with a final ``cancelled`` event) and stop the background thread.
        Under tensor parallelism rank 0 also releases the other ranks' ``follow()``."""
        with self.lock:
            self._stopped = True
            for request in list(self.scheduler.requests.values()):
                request.cancel_requested = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self.lock:
            self._thread = None
            while self._stepping:  # a caller's thread is mid-step: let it finish
                self._wake.wait()
            self.scheduler.retire_cancelled()
            self._wake.notify_all()
        if self.world > 1 and self.rank == 0 and not self._released:
            self._released = True
            self.model.tp.broadcast_object(Plan(stop=True))

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self.scheduler.busy or self._stopped):
                    # Idle. Under tensor parallelism the followers block in a collective until the next
                    # plan: an empty one now and then keeps them inside the collective timeout.
                    if not self._wake.wait(timeout=HEARTBEAT_S) and self.world > 1:
                        break
                if self._stopped:
                    return
            try:
                self.step()
            except Exception as error:  # e.g. a collective timed out: fail what is left, never leave waiters hanging
                with self.lock:
                    for request in list(self.scheduler.requests.values()):
                        request.error = error
                        self.scheduler.finish(request, "error")
                    self._thread, self._stopped = None, True
                    self._wake.notify_all()
                return

    def wait_for(self, done: Callable[[], bool]) -> None:
        """Block until ``done()``: run steps on this thread while no other thread is (or wait for the
        background thread). Every step wakes every waiter."""
        while True:
            with self.lock:
                while not done() and (self._stepping or self._thread is not None):
                    self._wake.wait()
                if done():
                    return
                self._stepping = True
            try:
                self.step()
            finally:
                with self.lock:
                    self._stepping = False
                    self._wake.notify_all()

    # ----------------------------------------------------------------- one step
    def step(self) -> bool:
        """One scheduler step: admit, run the forwards, hand out tokens. False when there was nothing to do.

        A forward that fails fails only its own requests (which raise it from ``result()``); the thread
        driving the step goes on. Under tensor parallelism a failure fails every request instead (the ranks'
        collectives cannot be trusted after it) and is raised."""
        with self.lock:
            plan = self.scheduler.schedule() if self.rank == 0 else None
        if self.world > 1:
            plan = self.model.tp.broadcast_object(plan)
            if self.rank != 0:
                with self.lock:
                    self.scheduler.follow(plan)
        if not plan.forwards and not plan.cache_ops:
            if plan.changed:  # requests were retired or finished on admission: their waiters must look
                with self.lock:
                    self._wake.notify_all()
            return False
        if self.world > 1:
            try:
                self.runner.apply_cache_ops(plan.cache_ops)
                forwards, results = plan.forwards, self.runner.execute(plan.forwards, self.scheduler.requests)
            except Exception as error:
                with self.lock:
                    for request in list(self.scheduler.running.values()):
                        request.error = error
                        self.scheduler.finish(request, "error")
                    for slot in range(len(self.scheduler.slots)):
                        self.scheduler.forget_slot(slot)
                    self.scheduler.forget_prompt_cache()
                    self._wake.notify_all()
                raise
        else:
            self._apply_cache_ops(plan)
            forwards, results = self._run_isolated(plan.forwards)
        with self.lock:
            self._apply(forwards, results)
            self.scheduler.steps += 1
            self._wake.notify_all()
        return True

    def _apply_cache_ops(self, plan: Plan) -> None:
        """The plan's prompt-cache copies and chunk moves. If they fail, the prompt cache is dropped and the
        requests admitted into the slots they touched fail (those slots' contents are unknown); the others go on."""
        try:
            self.runner.apply_cache_ops(plan.cache_ops)
        except Exception as error:
            with self.lock:
                self.scheduler.forget_prompt_cache()
                for slot in sorted({op.slot for op in plan.cache_ops if hasattr(op, "slot")}):
                    owner = self.scheduler.slots[slot].owner
                    if owner is not None:
                        self._fail(owner, error)
                    self.scheduler.forget_slot(slot)

    def _run_isolated(self, forwards: List[Forward]) -> Tuple[List[Forward], list]:
        """Run each forward on its own, so that one that raises costs only its own requests: its result is the
        exception. A decode batch that raises is run again row by row (eagerly), so the row at fault is found
        and the others go on (a speculative batch fails as a whole: its proposer's state has moved)."""
        done_forwards, results = [], []
        for f in forwards:
            try:
                results.append(self.runner.execute([f], self.scheduler.requests)[0])
                done_forwards.append(f)
                continue
            except Exception as error:
                if f.kind != "decode" or len(f.ids) == 1 or self.speculator is not None:
                    done_forwards.append(f)
                    results.append(error)
                    continue
            for row in f.rows():
                try:
                    results.append(self.runner.execute([row], self.scheduler.requests, eager=True)[0])
                except Exception as error:
                    results.append(error)
                done_forwards.append(row)
        return done_forwards, results

    def follow(self) -> None:
        """Ranks other than 0 of a tensor-parallel server: run rank 0's steps until it stops."""
        if self.rank == 0:
            raise ValueError("follow() is for ranks other than 0; rank 0 schedules (start() or drive requests)")
        while True:
            plan = self.model.tp.broadcast_object(None)
            with self.lock:
                self.scheduler.follow(plan)
            if plan.stop:
                self._stopped = True
                return
            if plan.forwards or plan.cache_ops:
                self.runner.apply_cache_ops(plan.cache_ops)
                results = self.runner.execute(plan.forwards, self.scheduler.requests)
                with self.lock:
                    self._apply(plan.forwards, results)

    # ----------------------------------------------------------------- outputs
    def _apply(self, plan: List[Forward], results: list) -> None:
        """Sample, record and stop, for every row of the plan (the same on every rank)."""
        scheduler = self.scheduler
        for f, logits in zip(plan, results):
            requests = [scheduler.requests.get(i) for i in f.ids]
            if isinstance(logits, Exception):
                for r in requests:
                    if r is not None:
                        self._fail(r, logits)
                continue
            if f.kind == "prefill":
                r = requests[0]
                n = len(f.tokens[0])
                if r is not None:
                    scheduler.prefilled(r, f.tokens[0])
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
                    scheduler.decoded(r, v.fed)
                    for token, lp, top in itertools.zip_longest(v.out, v.logprobs, v.top_logprobs):
                        self._accept(r, token, lp, top)
                        if r.done:
                            break
                continue
            for r, token in zip(requests, f.tokens):
                if r is not None:
                    scheduler.decoded(r, token)
            self._sample_rows(requests, logits)

    def _sample_rows(self, requests: List[Optional[Request]], logits: torch.Tensor) -> None:
        """Next token of each row, then the request's bookkeeping."""
        tokens, lps, tops = self.runner.sample(requests, logits)
        for j, (r, t) in enumerate(zip(requests, tokens)):
            if r is None or r.done:
                continue
            if t == UNUSABLE:
                self._fail(r, FloatingPointError(
                    f"the model's logits at position {r.computed - 1} are not finite (NaN or inf): no token can "
                    "be chosen (numerical overflow in the weights or activations?)"))
                continue
            if r.limit <= 0:  # prompt logprobs only: nothing to generate
                self.scheduler.finish(r, "length")
                continue
            top = tops[j][:r.params.top_logprobs] if tops is not None and r.params.top_logprobs else None
            self._accept(r, t, lps[j] if lps is not None else None, top)

    def _accept(self, r: Request, token: int, logprob: Optional[float], top: Optional[TopLogprobs] = None) -> None:
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if token in r.params.stop_token_ids:
            self.scheduler.finish(r, "stop")
            return
        r.tokens.append(token)
        if r.params.logprobs:
            r.logprobs.append(logprob)
            if r.params.top_logprobs:
                r.top_logprobs.append(top)
        else:
            top = None
        text, stopped = r._detok.push(token) if r._detok is not None else ("", False)
        r.emit(Event(token, text, logprob, top_logprobs=top))
        if stopped:
            self.scheduler.finish(r, "stop")
            return
        if len(r.tokens) >= r.limit:
            self.scheduler.finish(r, "length")
            return
        self.scheduler.set_pending(r, token)

    def _fail(self, r: Request, error: Exception) -> None:
        """``r`` alone failed: it finishes with ``error``, and nothing may be reused from its slot."""
        r.error = error
        if r.slot is not None:
            self.scheduler.forget_slot(r.slot)
        self.scheduler.finish(r, "error")

    def _finished(self, r: Request, reason: str) -> None:
        """The scheduler finishes ``r``: close its text, send its last event, tell the runner."""
        rest = r._detok.flush() if r._detok is not None and reason != "cancelled" else ""
        r.finish_reason = reason
        r.finished_at = time.perf_counter()
        r.emit(Event(None, rest, None, reason))
        self.runner.on_finish(r)


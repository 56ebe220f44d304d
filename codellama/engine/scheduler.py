"""The scheduler: which requests run in the next step, in which cache slot, and with how many tokens.

Pure Python (no tensors, no model), so it can be tested on its own. The state model:

* The KV cache is ``num_slots`` slots of ``max_seq_len`` positions. A slot remembers the tokens whose keys
  and values it holds (``Slot.cached``) even after its request has finished, so a later prompt that starts
  the same way skips that prefix.
* A request is WAITING (queued, no slot), PREFILLING (owns a slot; its prompt is computed chunk by chunk),
  DECODING (one token a step, fed from ``pending``) or FINISHED (see :class:`~.request.RequestState`). A
  request keeps its slot from admission to the end: nothing is ever copied between slots.

One call of :meth:`Scheduler.schedule` (rank 0 only; under tensor parallelism the other ranks replay its
plan with :meth:`Scheduler.follow`):

1. **Retire.** Requests whose caller cancelled them (or whose callback failed) finish now, freeing slots.
2. **Admit.** While a slot is free, the oldest waiting request takes the free slot whose cached tokens
   share the longest prefix with its prompt (at least ``MIN_REUSE`` tokens, or the whole prompt but its
   last token, to count; otherwise the least recently used free slot) and skips that prefix. Its last
   prompt token is always computed, because its logits start decoding; a request asking for prompt
   log-probabilities reuses nothing, because every position's logits are needed. With a prompt cache
   (:mod:`.prompt_cache`), what the slot held is saved to host memory before it is overwritten, and a
   longer start found there is restored into the slot; with chunk reuse, runs of the rest of the prompt that
   the slot holds at other positions are moved into place (and count toward choosing the slot). The copies
   are the plan's ``cache_ops``, carried out before its forwards.
3. **Decode first.** Every DECODING request gets one row of a single decode forward.
4. **Then prefill, within the token budget.** PREFILLING requests, oldest first, get chunks of their
   remaining prompt until ``max_tokens_per_step`` minus the decode rows is spent (at least one token,
   so prefill always moves): a long prompt delays the requests already decoding by one chunk per step,
   not by the whole prompt.

After the runner has run the plan's forwards, the engine reports what each request fed (``prefilled``,
``decoded``) and what it sampled (``set_pending``), and finishes requests (``finish``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from .prompt_cache import CacheOp, PromptCache, ShiftRuns, match_runs
from .request import Request, RequestState

MIN_REUSE = 16  # a cached prefix shorter than this (or than the whole prompt) does not choose the slot


@dataclass
class Slot:
    cached: List[int] = field(default_factory=list)  # tokens whose keys/values fill positions 0 … len-1
    owner: Optional[Request] = None
    last_used: int = 0


@dataclass
class Forward:
    """One forward call of a step: rows of (request id, slot, tokens fed at start)."""

    kind: str  # "decode": one token per row; "prefill": one row, a chunk of its prompt
    ids: List[int]
    slots: List[int]
    tokens: List[List[int]]
    starts: List[int]
    all_logits: bool = False  # prompt logprobs need every position's logits
    sample: bool = True  # False for a prefill chunk that does not reach the end of its prompt
    slot_positions: Optional[List[int]] = None  # compiled decode: the position fed in every slot (idle ones too)

    def rows(self) -> List["Forward"]:
        """This decode forward as one forward per row (to find which row of a failing batch is at fault)."""
        return [Forward(self.kind, [i], [s], [t], [p]) for i, s, t, p in zip(self.ids, self.slots, self.tokens,
                                                                              self.starts)]


@dataclass
class Plan:
    """Everything one step decides, broadcast from rank 0 under tensor parallelism so every rank does the same."""

    retired: List[int] = field(default_factory=list)  # ids cancelled before this step
    admitted: List[Tuple[int, int, int]] = field(default_factory=list)  # (id, slot, reused prompt tokens)
    cache_ops: List[CacheOp] = field(default_factory=list)  # prompt cache copies and chunk moves, in order
    forwards: List[Forward] = field(default_factory=list)
    stop: bool = False  # the leader stopped: followers leave ``follow()``

    @property
    def changed(self) -> bool:
        """Whether the step changed any request (waiters must look again even when nothing ran)."""
        return bool(self.retired or self.admitted or self.forwards or self.stop)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """The waiting queue, the running requests and the slots; see the module docstring for the algorithm.

    ``on_finish(request, reason)`` is called for every request that finishes here (the engine closes its
    text, emits its last event and tells the speculator); ``all_slot_positions`` makes decode forwards
    carry the position of every slot (the compiled step runs all slots at once). ``prompt_cache`` keeps
    slots' contents in host memory; ``cache_reuse`` > 0 moves runs of at least that many tokens
    (:mod:`.prompt_cache`).
    """

    def __init__(self, num_slots: int, max_seq_len: int, max_tokens_per_step: int, *,
                 on_finish: Callable[[Request, str], None] = lambda request, reason: None,
                 on_admit: Callable[[Request, int, int], None] = lambda request, slot, reused: None,
                 all_slot_positions: bool = False, prompt_cache: Optional[PromptCache] = None, cache_reuse: int = 0):
        self.max_seq_len, self.max_tokens_per_step = max_seq_len, max_tokens_per_step
        self.on_finish, self.on_admit = on_finish, on_admit
        self.all_slot_positions = all_slot_positions
        self.prompt_cache, self.cache_reuse = prompt_cache, cache_reuse
        self.waiting: Deque[Request] = deque()
        self.running: Dict[int, Request] = {}
        self.requests: Dict[int, Request] = {}  # every unfinished request by id (followers look theirs up)
        self.slots = [Slot() for _ in range(num_slots)]
        self.steps = 0

    # ----------------------------------------------------------------- queue
    @property
    def free_slots(self) -> int:
        return sum(s.owner is None for s in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.id] = request

    # ----------------------------------------------------------------- planning (rank 0)
    def schedule(self) -> Plan:
        """Retire, admit, and lay out this step's forwards (the module docstring's steps 1–4)."""
        plan = Plan()
        for request in [r for r in list(self.waiting) + list(self.running.values()) if r.cancel_requested]:
            plan.retired.append(request.id)
            self.finish(request, "error" if request.error is not None else "cancelled")
        while self.waiting and self.free_slots:
            request = self.waiting[0]
            slot, reused = self.choose_slot(request)
            ops, reused, runs = self.reuse(request, slot, reused)
            plan.cache_ops.extend(ops)
            plan.admitted.append((request.id, slot, reused))
            self.admit(request, slot, reused, runs)
        decoding = [r for r in self.running.values() if r.state is RequestState.DECODING]
        if decoding:
            plan.forwards.append(Forward("decode", [r.id for r in decoding], [r.slot for r in decoding],
                                         [[r.pending] for r in decoding], [r.computed for r in decoding],
                                         slot_positions=self.slot_positions(decoding) if self.all_slot_positions
                                         else None))
        budget = max(self.max_tokens_per_step - len(decoding), 1)  # prefill always moves
        for r in self.running.values():
            if r.state is not RequestState.PREFILLING or budget <= 0:
                continue
            n = min(len(r.prompt) - r.computed, budget)
            if r.runs:  # up to the next chunk that was moved into place
                n = min(n, r.runs[0][0] - r.computed)
            budget -= n
            plan.forwards.append(Forward("prefill", [r.id], [r.slot], [r.prompt[r.computed:r.computed + n]],
                                         [r.computed], all_logits=r.prompt_logprobs is not None,
                                         sample=r.computed + n == len(r.prompt)))
        return plan

    def follow(self, plan: Plan) -> None:
        """A follower mirrors rank 0's retirements and admissions for the requests it holds itself."""
        for rid in plan.retired:
            if rid in self.requests:
                self.finish(self.requests[rid], "cancelled")
        runs = {op.request: op.runs for op in plan.cache_ops if isinstance(op, ShiftRuns)}
        for rid, slot, reused in plan.admitted:
            request = self.requests.get(rid)
            if request is not None:
                self.admit(request, slot, reused, runs.get(rid, []))
        if plan.stop:
            for request in list(self.requests.values()):
                self.finish(request, "cancelled")

    def retire_cancelled(self) -> None:
        for request in [r for r in list(self.waiting) + list(self.running.values()) if r.cancel_requested]:
            self.finish(request, "error" if request.error is not None else "cancelled")

    @staticmethod
    def reusable_limit(request: Request) -> int:
        """How many prompt tokens a request may take from a cache: at least its last prompt token is computed
        (its logits start decoding); prompt logprobs need every position's logits, so such a request takes none."""
        return 0 if request.prompt_logprobs is not None else len(request.prompt) - 1

    def choose_slot(self, request: Request) -> Tuple[int, int]:
        """The free slot sharing the longest prefix with the prompt (with chunk reuse: the most tokens taken
        from it in all; ties and no match: least recently used), and how many prompt tokens its prefix lets
        the request skip."""
        limit = self.reusable_limit(request)

        def reusable(i: int) -> int:
            return min(common_prefix(self.slots[i].cached, request.prompt), limit)

        def worth(i: int) -> int:
            # Every prompt shares BOS and a few common tokens: a match that short is not worth evicting a
            # slot's cache for, so such slots compete on recency alone.
            m = reusable(i)
            if self.cache_reuse and limit:
                m += sum(n for _, _, n in match_runs(self.slots[i].cached, request.prompt, m, self.cache_reuse))
            return m if m >= min(MIN_REUSE, len(request.prompt) - 1) else 0

        free = [i for i, s in enumerate(self.slots) if s.owner is None]
        best = max(free, key=lambda i: (worth(i), -self.slots[i].last_used))
        return best, reusable(best)

    def reuse(self, request: Request, slot_index: int, reused: int
              ) -> Tuple[List[CacheOp], int, List[Tuple[int, int, int]]]:
        """What a request admitted into ``slot_index`` takes besides the slot's shared prefix of ``reused``
        tokens: the cache operations (saving what the slot holds before it is overwritten, restoring a longer
        start from the prompt cache, moving chunks), the prefix it then skips, and the runs moved into place."""
        ops: List[CacheOp] = []
        slot, limit = self.slots[slot_index], self.reusable_limit(request)
        if request.limit <= 0 and request.prompt_logprobs is None:  # finishes on admission: nothing to copy
            return ops, reused, []
        if self.prompt_cache is not None:
            blocks = self.prompt_cache.match(request.prompt, limit)
            restored = len(blocks) * self.prompt_cache.block_size
            after = (self.prompt_cache.continuation(blocks, self.max_seq_len)
                     if self.cache_reuse and restored > reused else [])  # sources for chunk reuse
            if len(slot.cached) > reused:  # positions past the shared prefix will be overwritten
                ops += self.prompt_cache.save(slot_index, slot.cached, protect=blocks + after)
            if restored > reused:
                start = reused - reused % self.prompt_cache.block_size
                ops.append(self.prompt_cache.restore(slot_index, blocks + after, start))
                slot.cached = request.prompt[:restored] + [t for b in after for t in b.tokens]
                request.restored_tokens, reused = restored - reused, restored
        runs: List[Tuple[int, int, int]] = []
        if self.cache_reuse and limit > reused:  # sources past the prefix: a restore has not touched them
            runs = match_runs(slot.cached, request.prompt, reused, self.cache_reuse)
            if runs:
                ops.append(ShiftRuns(slot_index, request.id, runs))
        return ops, reused, runs

    def admit(self, request: Request, slot_index: int, reused: int, runs: Sequence[Tuple[int, int, int]] = ()) -> None:
        """WAITING → PREFILLING in ``slot_index``, its first ``reused`` prompt tokens taken from the slot's cache
        and the ``(source, destination, length)`` runs moved into place."""
        self.waiting.remove(request)
        slot = self.slots[slot_index]
        slot.owner, slot.cached, slot.last_used = request, request.prompt[:reused], self.steps
        request.slot, request.computed = slot_index, reused
        request.runs = [(d, n) for _, d, n in runs]
        request.shifted_tokens = sum(n for _, _, n in runs)
        request.cached_tokens = reused + request.shifted_tokens
        request.state = RequestState.PREFILLING
        self.running[request.id] = request
        self._skip_moved(request)
        self.on_admit(request, slot_index, reused)
        if request.limit <= 0 and request.prompt_logprobs is None:
            self.finish(request, "length")

    def _skip_moved(self, request: Request) -> None:
        """Past the runs that were moved into place where the computed prompt now reaches them."""
        slot = self.slots[request.slot]
        while request.runs and request.runs[0][0] == request.computed:
            start, n = request.runs.pop(0)
            slot.cached.extend(request.prompt[start:start + n])
            request.computed += n

    def slot_positions(self, decoding: List[Request]) -> List[int]:
        """Positions the compiled all-slots decode feeds: each row's own, and in an idle slot the first
        position past what it caches (a write there harms nothing; a full slot gives up its last token)."""
        positions = []
        for s in self.slots:
            if len(s.cached) >= self.max_seq_len:
                del s.cached[self.max_seq_len - 1:]
            positions.append(len(s.cached))
        for r in decoding:
            positions[r.slot] = r.computed
        return positions

    # ----------------------------------------------------------------- after the forwards
    def prefilled(self, request: Request, tokens: List[int]) -> None:
        """A prefill chunk of ``request`` is now in its slot."""
        self.slots[request.slot].cached.extend(tokens)
        request.computed += len(tokens)
        self._skip_moved(request)

    def decoded(self, request: Request, fed: List[int]) -> None:
        """A decode step fed ``fed`` (the pending token, and accepted proposals) into ``request``'s slot."""
        self.slots[request.slot].cached.extend(fed)
        request.computed += len(fed)

    def set_pending(self, request: Request, token: int) -> None:
        """``token`` was sampled and is fed at the next step: the request decodes."""
        request.pending = token
        request.state = RequestState.DECODING

    def forget_slot(self, slot_index: int) -> None:
        """The slot's cache contents are unknown (a forward into it failed): nothing may be reused from it."""
        self.slots[slot_index].cached = []

    def forget_prompt_cache(self) -> None:
        """The prompt cache's blocks are not trusted (a step failed, perhaps while copying them): drop them all."""
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def finish(self, request: Request, reason: str) -> None:
        """Any state → FINISHED: out of the queues, its slot free (its cached tokens stay for the next request)."""
        if request.state is RequestState.FINISHED:
            return
        self.on_finish(request, reason)
        request.state = RequestState.FINISHED
        request.pending = None
        if request in self.waiting:
            self.waiting.remove(request)
        self.running.pop(request.id, None)
        self.requests.pop(request.id, None)
        if request.slot is not None:
            slot = self.slots[request.slot]
            slot.owner, slot.last_used = None, self.steps

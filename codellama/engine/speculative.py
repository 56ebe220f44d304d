"""Speculative decoding: propose tokens cheaply, verify them all in one forward of the target model.

A decode step normally feeds one token per row. With a speculator, a row feeds its pending token plus
``k`` proposed ones at its own position; the target's logits at those ``k + 1`` positions say which
proposals it would have produced itself. Greedy rows keep the longest prefix equal to the target's
argmax and then take the target's own next token, so the output *is* plain greedy decoding; sampled rows
use the standard rejection rule (accept ``d`` with probability ``min(1, p(d) / q(d))``, else draw from the
normalised residual ``max(0, p - q)``), which leaves the target's distribution unchanged. Rows of one batch
accept different counts; the cache positions past a row's accepted tokens are simply overwritten later.

Two proposers:

* :class:`PromptLookup` (``speculate="prompt"``) copies what followed the most recent earlier occurrence
  of the context's last n-gram: code edits and completions repeat their context. A row whose proposals
  keep failing stops proposing for a while, so open-ended text is not slowed down.
* :class:`DraftModel` (``speculate="draft"``) lets a small model with the same tokenizer propose; it keeps
  its own KV cache, one slot per engine slot, and adapts its proposal length to the acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..distributed import local_heads
from ..model import KVCache, Transformer
from ..sampling import TopLogprobs, is_greedy, logprobs_and_top, sampling_probs
from .request import Request

@dataclass
class Proposal:
    """Tokens proposed for one row, and for a sampled draft the distributions (k, V) they were drawn from
    (None: the proposal is a deterministic function of the context, i.e. ``q`` is one-hot)."""

    tokens: List[int]
    q: Optional[torch.Tensor] = None


@dataclass
class Verified:
    """What the target made of one row's proposal: the tokens to feed into the cache (the pending token and
    the accepted proposals), the tokens it outputs (the accepted ones plus its own next one), their
    log-probabilities and, when the request asks, the likeliest tokens at each."""

    fed: List[int]
    out: List[int]
    logprobs: List[float] = field(default_factory=list)
    top_logprobs: List[TopLogprobs] = field(default_factory=list)
    proposed: int = 0


def verify(logits: torch.Tensor, proposal: Proposal, request: Request) -> Tuple[int, int]:
    """``(accepted, next)`` for one row: logits (k + 1, V) at the pending token and each proposed one."""
    p = request.params
    d = proposal.tokens
    k = len(d)
    if is_greedy(p.temperature):
        best = torch.argmax(logits, dim=-1).tolist()  # (k + 1,)
        n = 0
        while n < k and best[n] == d[n]:
            n += 1
        return n, best[n]
    target = sampling_probs(logits, p.temperature, p.top_p, p.top_k)  # (k + 1, V)
    g = request._generator
    for i in range(k):
        q_d = 1.0 if proposal.q is None else float(proposal.q[i, d[i]])
        p_d = float(target[i, d[i]])
        if q_d > 0 and float(torch.rand((), generator=g, device=target.device)) < min(1.0, p_d / q_d):
            continue
        if proposal.q is None:
            residual = target[i].clone()
            residual[d[i]] = 0.0
        else:
            residual = (target[i] - proposal.q[i].to(target.device)).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # p == q exactly: any draw from p is right
            residual = target[i]
        return i, int(torch.multinomial(residual / residual.sum(), 1, generator=g))
    return k, int(torch.multinomial(target[k], 1, generator=g))


class Speculator:
    """What the engine asks of a proposer: track rows (``on_admit``/``on_finish``), ``propose`` at most
    ``room`` tokens per row, ``verify_rows`` of a verification forward, and ``feedback`` on each verdict."""

    def on_admit(self, request: Request, slot: int, reused: int) -> None:
        pass

    def on_finish(self, request: Request) -> None:
        pass

    def propose(self, requests: Sequence[Request], room: Sequence[int]) -> List[Proposal]:
        raise NotImplementedError

    def feedback(self, request: Request, proposed: int, accepted: int) -> None:
        pass

    @staticmethod
    def verify_rows(logits: torch.Tensor, requests: Sequence[Request],
                    proposals: Sequence[Optional[Proposal]]) -> List[Verified]:
        """Verify every row of a verification forward: logits (B, T, V), T ≥ 1 + each row's proposal
        (None: no proposal, a plain decode row)."""
        out = []
        for j, (r, prop) in enumerate(zip(requests, proposals)):
            prop = prop or Proposal([])
            k = len(prop.tokens)
            n, nxt = verify(logits[j, :k + 1], prop, r)
            emitted = prop.tokens[:n] + [nxt]
            lps, tops = [], []
            if r.params.logprobs:
                lps, tops = logprobs_and_top(logits[j, :n + 1], torch.tensor(emitted, device=logits.device),
                                             r.params.top_logprobs)
            out.append(Verified([r.pending] + prop.tokens[:n], emitted, lps, tops, proposed=k))
        return out


# ----------------------------------------------------------------------------- prompt lookup
@dataclass
class _Lookup:
    ctx: List[int]
    index: Dict[int, Dict[Tuple[int, ...], int]]  # n → n-gram → position right after its latest occurrence
    k: int
    misses: int = 0  # consecutive proposals of which nothing was accepted
    cooldown: int = 0  # steps left without proposing


class PromptLookup(Speculator):
    """Propose the tokens that followed the latest earlier occurrence of the context's last n-gram.

    ``max_ngram`` … ``min_ngram``: the n-gram sizes tried, longest first; ``num_tokens``: the longest
    proposal. A row whose proposals are rejected outright twice in a row pauses for 2, 4, … 32 steps.
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, num_tokens: int = 10):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram={min_ngram} is larger than max_ngram={max_ngram}")
        self.max_ngram, self.min_ngram, self.num_tokens = max_ngram, min_ngram, num_tokens
        self._rows: Dict[int, _Lookup] = {}

    def on_admit(self, request: Request, slot: int, reused: int) -> None:
        self._rows[request.id] = _Lookup([], {n: {} for n in range(self.min_ngram, self.max_ngram + 1)},
                                         self.num_tokens)

    def on_finish(self, request: Request) -> None:
        self._rows.pop(request.id, None)

    def propose(self, requests: Sequence[Request], room: Sequence[int]) -> List[Proposal]:
        return [self._propose(r, n) for r, n in zip(requests, room)]

    def _propose(self, r: Request, room: int) -> Proposal:
        s = self._rows[r.id]
        self._extend(s, r.prompt, r.tokens)
        if s.cooldown > 0:
            s.cooldown -= 1
            return Proposal([])
        k = min(s.k, room)
        if k <= 0:
            return Proposal([])
        ctx = s.ctx
        for n in range(min(self.max_ngram, len(ctx)), self.min_ngram - 1, -1):
            at = s.index[n].get(tuple(ctx[-n:]))
            if at is not None:
                return Proposal(ctx[at:at + k])
        return Proposal([])

    @staticmethod
    def _extend(s: _Lookup, prompt: List[int], tokens: List[int]) -> None:
        """Add the new tokens to the context, indexing every n-gram that now has a continuation."""
        full = len(prompt) + len(tokens)
        if len(s.ctx) == full:
            return
        start = len(s.ctx)
        s.ctx.extend((prompt + tokens)[start:] if start < len(prompt) else tokens[start - len(prompt):])
        ctx = s.ctx
        for end in range(max(start - 1, 0), full - 1):  # an n-gram ending at `end` is continued by end + 1
            for n, table in s.index.items():
                if end + 1 >= n:
                    table[tuple(ctx[end + 1 - n:end + 1])] = end + 1

    def feedback(self, request: Request, proposed: int, accepted: int) -> None:
        s = self._rows.get(request.id)
        if s is None or proposed == 0:
            return
        if accepted == 0:
            s.misses += 1
            if s.misses >= 2:
                s.cooldown = min(2 ** (s.misses - 1), 32)
        else:
            s.misses = 0
        s.k = min(self.num_tokens, s.k + 2) if accepted == proposed else max(2, accepted + 1)


# ----------------------------------------------------------------------------- draft model
@dataclass
class _Draft:
    computed: int  # positions of this request's sequence already in the draft's cache slot
    k: int


class DraftModel(Speculator):
    """A small model with the target's tokenizer proposes ``k`` tokens per step from its own KV cache.

    ``k`` starts at ``num_tokens // 2`` and moves between 1 and ``num_tokens``: up after a fully accepted
    proposal, down after a rejected one.
    """

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, num_tokens: int = 6):
        if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
        if model.tp.world > 1:
            raise ValueError("a draft model cannot be split across ranks: speculative decoding runs in one process")
        self.model, self.num_tokens = model, num_tokens
        a, ref = model.args, model.norm.weight  # a float weight (a quantized embedding holds integer codes)
        self.cache = KVCache(a.n_layers, max_batch_size, max_seq_len, local_heads(a, model.tp)[1], a.head_dim,
                             ref.dtype, ref.device)
        self._cached: List[List[int]] = [[] for _ in range(max_batch_size)]  # tokens in each draft slot
        self._rows: Dict[int, _Draft] = {}
        self.device = ref.device

    def on_admit(self, request: Request, slot: int, reused: int) -> None:
        cached = self._cached[slot]
        n = 0
        while n < min(len(cached), reused) and cached[n] == request.prompt[n]:
            n += 1
        del cached[n:]
        self._rows[request.id] = _Draft(n, max(1, self.num_tokens // 2))

    def on_finish(self, request: Request) -> None:
        self._rows.pop(request.id, None)

    def propose(self, requests: Sequence[Request], room: Sequence[int]) -> List[Proposal]:
        ks = [min(self._rows[r.id].k, n) for r, n in zip(requests, room)]
        active = [j for j, k in enumerate(ks) if k > 0]
        proposals = [Proposal([]) for _ in requests]
        if not active:
            return proposals
        with torch.inference_mode():
            logits = {j: self._catch_up(requests[j]) for j in active}  # (V,) after each row's pending token
            drafts = {j: [] for j in active}
            qs = {j: [] for j in active}
            for step in range(max(ks[j] for j in active)):
                rows = [j for j in active if len(drafts[j]) < ks[j]]
                for j in rows:
                    r = requests[j]
                    q = sampling_probs(logits[j][None], r.params.temperature, r.params.top_p, r.params.top_k)[0]
                    if is_greedy(r.params.temperature):
                        token = int(torch.argmax(logits[j]))
                    else:
                        token = int(torch.multinomial(q, 1, generator=r._generator))
                    drafts[j].append(token)
                    qs[j].append(q)
                feed = [j for j in rows if len(drafts[j]) < ks[j]]  # rows that need another draft token
                if feed:
                    out = self._forward([requests[j] for j in feed], [[drafts[j][-1]] for j in feed])
                    for i, j in enumerate(feed):
                        logits[j] = out[i]
        for j in active:
            r = requests[j]
            q = None if is_greedy(r.params.temperature) else torch.stack(qs[j])
            proposals[j] = Proposal(drafts[j], q)
        return proposals

    def _catch_up(self, r: Request) -> torch.Tensor:
        """Feed the draft every token of the row's sequence it has not seen, through the pending one."""
        s = self._rows[r.id]
        seq = r.prompt + r.tokens  # ends with the pending token
        return self._forward([r], [seq[s.computed:]])[0]

    def _forward(self, requests: Sequence[Request], tokens: List[List[int]]) -> torch.Tensor:
        """One draft forward for rows of equal length; advances their draft positions. Returns (rows, V)."""
        starts = [self._rows[r.id].computed for r in requests]
        for r, t in zip(requests, tokens):
            self._rows[r.id].computed += len(t)
            self._cached[r.slot].extend(t)
        if len({len(t) for t in tokens}) > 1:  # ragged catch-up: one row at a time
            return torch.cat([self._forward_block([r], [t], [s]) for r, t, s in zip(requests, tokens, starts)])
        return self._forward_block(requests, tokens, starts)

    def _forward_block(self, requests, tokens, starts) -> torch.Tensor:
        x = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return self.model(x, starts, logits_index=-1, slots=[r.slot for r in requests], cache=self.cache)[:, 0]

    def feedback(self, request: Request, proposed: int, accepted: int) -> None:
        s = self._rows.get(request.id)
        if s is None or proposed == 0:
            return
        # The draft fed the pending token and all but its last proposal: keep what the target accepted.
        keep = request.computed + 1 + min(accepted, proposed - 1)
        s.computed = min(s.computed, keep)
        del self._cached[request.slot][s.computed:]
        s.k = min(self.num_tokens, s.k + 1) if accepted == proposed else max(1, s.k - 1)


def same_tokenizer(draft, target) -> None:
    """Raise ``ValueError`` unless two tokenizers have the same pieces in the same order."""
    if draft.n_words != target.n_words:
        raise ValueError(f"the draft's tokenizer ({draft.model_path}) has {draft.n_words} pieces, the target's "
                         f"({target.model_path}) {target.n_words}: speculative decoding needs the same tokenizer")
    for i in range(draft.n_words):
        a, b = draft.sp_model.id_to_piece(i), target.sp_model.id_to_piece(i)
        if a != b:
            raise ValueError(f"the draft's tokenizer ({draft.model_path}) differs from the target's "
                             f"({target.model_path}) at id {i} ({a!r} vs {b!r}): they must be the same tokenizer")

"""The model runner: runs a plan's forwards over the slot KV cache and samples the rows.

Three ways to run a decode forward: eager (the model's forward at each row's slot and position), compiled
(a ``torch.compile``d static-shape step over every slot at once, one graph per cache-length bucket) and
speculative (each row's pending token plus its proposal, verified in one forward). Prefill chunks always
run eagerly. Sampling draws each row with its own parameters and generator; under tensor parallelism rank
0's choice is broadcast so that every rank feeds the same token.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..model import KVCache, Transformer, rope_inv_freq
from ..sampling import TopLogprobs, logprobs_and_top, sample, usable_rows
from .host_blocks import HostBlocks, apply_cache_ops
from .prompt_cache import BLOCK_SIZE, CacheOp
from .request import Request
from .scheduler import Forward


progress = logging.getLogger("codellama.progress")

UNUSABLE = -1  # the token "sampled" from a row whose logits are not finite: its request fails


class ModelRunner:
    """The model, its slot cache (allocated at the first forward), the compiled steps and the speculator."""

    def __init__(self, model: Transformer, max_batch_size: int, max_seq_len: int, *, compile: bool = False,
                 speculator=None):
        self.model, self.max_batch_size, self.max_seq_len = model, max_batch_size, max_seq_len
        self.device = model.tok_embeddings.weight.device
        self.compile, self.speculator = compile, speculator
        self.cache: Optional[KVCache] = None
        self.host_blocks: Optional[HostBlocks] = None  # the prompt cache's memory, made with the first block saved
        self._compiled: Dict[int, Callable] = {}  # compiled decode step per cache-length bucket
        self.speculation = {"steps": 0, "proposed": 0, "accepted": 0}  # totals, for benchmarks and logs

    # ----------------------------------------------------------------- memory
    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache: slots × max_seq_len × :attr:`bytes_per_token`."""
        return self.max_batch_size * self.max_seq_len * self.bytes_per_token

    def ensure_cache(self) -> KVCache:
        """The slot cache, allocated once; a clear error (with the sizes) when it does not fit."""
        if self.cache is None:
            ref = self.model.norm.weight  # a float weight (a quantized embedding holds integer codes)
            self.cache = KVCache.allocate(self.model.args, self.max_batch_size, self.max_seq_len, ref.dtype,
                                          ref.device, self.model.tp)
        return self.cache

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one position of one slot takes on this rank (``KVCache.bytes_per_token``; the dtype of a
        float weight: a quantized embedding holds integer codes)."""
        return KVCache.bytes_per_token(self.model.args, self.model.norm.weight.dtype, self.model.tp)

    # ----------------------------------------------------------------- the prompt cache and chunk reuse
    def apply_cache_ops(self, ops: Sequence[CacheOp]) -> None:
        """Copy blocks between the slots and host memory, and move chunks inside slots, as the plan says."""
        if not ops:
            return
        cache = self.ensure_cache()
        if self.host_blocks is None:
            self.host_blocks = HostBlocks(cache, BLOCK_SIZE)
            self._inv_freq = rope_inv_freq(self.model.args.head_dim, self.model.args.rope_theta, self.device)
        with torch.inference_mode():
            apply_cache_ops(ops, cache, self.host_blocks, self._inv_freq)

    # ----------------------------------------------------------------- forwards
    def execute(self, forwards: List[Forward], requests: Dict[int, Request], *, eager: bool = False) -> List:
        """Run the forwards; returns each one's logits (rows, V), or (1, T, V) with ``all_logits``, or for a
        speculative decode the speculator's verdict per row. ``eager`` runs decode rows through the model's
        own forward even when the engine compiles its step."""
        cache = self.ensure_cache()
        out = []
        with torch.inference_mode():
            for f in forwards:
                if f.kind == "decode" and self.speculator is not None:
                    out.append(self._speculative_decode(f, [requests[i] for i in f.ids], cache))
                    continue
                tokens = torch.tensor(f.tokens, dtype=torch.long, device=self.device)
                if f.kind == "decode" and self.compile and not eager:
                    out.append(self._compiled_decode(tokens, f))
                    continue
                index = None if f.all_logits else -1
                logits = self.model(tokens, f.starts, logits_index=index, slots=f.slots, cache=cache)
                out.append(logits if f.all_logits else logits[:, 0])
        return out

    def sample(self, requests: Sequence[Optional[Request]], logits: torch.Tensor
               ) -> Tuple[List[int], Optional[List[float]], Optional[List[TopLogprobs]]]:
        """Next token of each row (rank 0's choice on every rank), and with logprobs one log-softmax for every
        row, each row keeping as many alternatives as the most demanding one asked for."""
        usable = usable_rows(logits).tolist()  # a row of NaN or inf logits fails alone (token UNUSABLE)
        chosen = []
        for j, r in enumerate(requests):
            if r is None or r.limit <= 0 or not usable[j]:
                chosen.append(torch.full((), 0 if usable[j] else UNUSABLE, dtype=torch.long, device=logits.device))
                continue
            p = r.params
            chosen.append(sample(logits[j:j + 1], p.temperature, p.top_p, p.top_k, r._generator)[0])
        tokens = self.model.tp.broadcast(torch.stack(chosen))  # (rows,)
        lps = tops = None
        recording = [r.params.top_logprobs for r in requests if r is not None and r.params.logprobs]
        if recording:
            lps, tops = logprobs_and_top(logits, tokens.clamp(min=0), max(recording))
        return tokens.tolist(), lps, tops

    def on_admit(self, request: Request, slot: int, reused: int) -> None:
        if self.speculator is not None:
            self.speculator.on_admit(request, slot, reused)

    def on_finish(self, request: Request) -> None:
        if self.speculator is not None:
            self.speculator.on_finish(request)

    # ----------------------------------------------------------------- speculative decode
    def _speculative_decode(self, f: Forward, requests: List[Request], cache: KVCache) -> list:
        """The decode rows with proposals: one verification forward feeds each row's pending token and its
        proposal (padded to the longest), rows without a proposal decode as usual. Returns the speculator's
        verdict per row (the tokens to cache and to output)."""
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
    def _compiled_decode(self, tokens: torch.Tensor, f: Forward) -> torch.Tensor:
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
            model, cache = self.model, self.ensure_cache()
            model.make_step(0, 1, 1, None)  # RoPE frequencies exist before tracing

            def decode(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                step = model.make_step(positions, 1, length, cache)  # (S, 1) tokens, one position per slot
                return model.run(tokens, step)[:, 0]  # (S, V)

            mode = "reduce-overhead" if self.device.type == "cuda" else None
            fn = self._compiled[length] = _told_when_compiled(torch.compile(decode, mode=mode, dynamic=False), length)
        return fn


def _told_when_compiled(fn: Callable, length: int) -> Callable:
    """``fn``, whose first call (when ``torch.compile`` really compiles, tens of seconds on a CPU) is announced
    and timed on the ``codellama.progress`` logger (the programs show it on stderr)."""
    first = [True]

    def call(*args):
        if not first[0]:
            return fn(*args)
        progress.info("compiling the decode step for contexts up to %d tokens (once per length; tens of seconds "
                      "the first time, seconds once Inductor's cache has it)…", length)
        start = time.perf_counter()
        out = fn(*args)
        first[0] = False
        progress.info("compiled in %.1f s", time.perf_counter() - start)
        return out

    return call

"""The prompt cache's memory: blocks of keys and values in host memory, copied out of and into the slot cache.

Block ``i`` is row ``i % per_slab`` of slab ``i // per_slab``; a slab holds (per_slab, n_layers, Hkv, block_size,
hd) keys and as many values, about 64 MiB, allocated when a block first lands in it and never moved, so
memory grows with use up to the budget and a block's bytes stay put while it lives. On CUDA the slabs are
pinned, so the copies run at full bus speed. Which block holds what is the scheduler's
:class:`~.prompt_cache.PromptCache`'s business; this only carries out its operations.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..model import KVCache
from .prompt_cache import CacheOp, FreeBlocks, RestoreBlocks, SaveBlocks, ShiftRuns

SLAB_BYTES = 64 * 2**20


class HostBlocks:
    """Slabs of blocks for one slot cache's layout (this rank's heads under tensor parallelism)."""

    def __init__(self, cache: KVCache, block_size: int):
        L, _, Hkv, _, hd = cache.k.shape
        self.shape = (L, Hkv, block_size, hd)
        self.block_size, self.dtype = block_size, cache.k.dtype
        block_bytes = 2 * L * Hkv * block_size * hd * cache.k.element_size()
        self.per_slab = max(1, SLAB_BYTES // block_bytes)
        self.pin = cache.k.device.type == "cuda"
        self.slabs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def allocated_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.slabs.values())

    def _row(self, block: int) -> Tuple[torch.Tensor, torch.Tensor]:
        slab, row = divmod(block, self.per_slab)
        if slab not in self.slabs:
            shape = (self.per_slab, *self.shape)
            self.slabs[slab] = (torch.empty(shape, dtype=self.dtype, pin_memory=self.pin),
                                torch.empty(shape, dtype=self.dtype, pin_memory=self.pin))
        k, v = self.slabs[slab]
        return k[row], v[row]

    def save(self, cache: KVCache, slot: int, blocks: Sequence[Tuple[int, int]]) -> None:
        for block, start in blocks:
            k, v = cache.positions(slot, start, self.block_size)
            hk, hv = self._row(block)
            hk.copy_(k, non_blocking=self.pin)  # on CUDA ordered before the forwards that overwrite the slot
            hv.copy_(v, non_blocking=self.pin)

    def restore(self, cache: KVCache, slot: int, blocks: Sequence[Tuple[int, int]]) -> None:
        for block, start in blocks:
            k, v = cache.positions(slot, start, self.block_size)
            hk, hv = self._row(block)
            k.copy_(hk, non_blocking=self.pin)
            v.copy_(hv, non_blocking=self.pin)

    def free(self, blocks: List[int]) -> None:
        """Nothing to do: a freed block's row is reused by the next block given its id; slabs stay allocated."""


def apply_cache_ops(ops: Sequence[CacheOp], cache: KVCache, store: HostBlocks, inv_freq: torch.Tensor) -> None:
    """Carry out a step's cache operations, in order (see :mod:`.prompt_cache`)."""
    for op in ops:
        if isinstance(op, SaveBlocks):
            store.save(cache, op.slot, op.blocks)
        elif isinstance(op, RestoreBlocks):
            store.restore(cache, op.slot, op.blocks)
        elif isinstance(op, FreeBlocks):
            store.free(op.ids)
        elif isinstance(op, ShiftRuns):
            moving = [(s, d, n) for s, d, n in op.runs if s != d]
            if moving:
                source = torch.cat([torch.arange(s, s + n) for s, _, n in moving])
                destination = torch.cat([torch.arange(d, d + n) for _, d, n in moving])
                cache.move(op.slot, source, destination, inv_freq)
        else:
            raise ValueError(f"unknown cache operation {op!r}")

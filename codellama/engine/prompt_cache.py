"""The prompt cache: the keys and values of earlier prompts kept in host memory, more of them than the slots
hold, within a byte budget; and chunk reuse, which finds a prompt's text at other positions of a slot.

Pure Python (no tensors): the scheduler decides with it, and describes each copy as a cache operation
(:class:`SaveBlocks`, :class:`FreeBlocks`, :class:`RestoreBlocks`, :class:`ShiftRuns`) that the runner carries
out on the tensors, in order, before the step's forwards (on every rank under tensor parallelism).

**The data structure: a radix tree over blocks of tokens.** A node is one block of ``block_size`` tokens
whose keys and values were computed after exactly the tokens on its path from the root, so it holds
positions ``depth · block_size …`` of any prompt that starts with that path. Looking a prompt up walks it a
block at a time (a dict lookup per block); saving a slot walks its tokens the same way and copies only the
blocks the tree lacks, so prompts that share a start share its blocks. This is SGLang's RadixAttention with
pages of ``block_size`` tokens, and what vLLM's hashed prefix blocks amount to (a block's hash chains its
parent's; here the tree's edges are the chain and a dict compares the tokens themselves, so two prompts can
never be confused by a hash collision). Whole blocks only: a prompt's last partial block is recomputed.

**When.** A slot keeps what its last request cached (the scheduler reuses it in place); the moment a new
request is admitted into a slot whose tokens it does not all share, the slot's full blocks are saved into
the tree (only those it lacks), before anything overwrites them. A prompt whose start the tree holds
beyond what any free slot shares gets those blocks restored into its slot. Exact: the bytes restored are
the bytes computed, so greedy output is the output of a cold run.

**Budget and eviction.** The tree holds at most ``budget_bytes // block_bytes`` blocks. To make room it
drops the least recently used leaf (a block no other block continues; a block is used when it is saved,
matched or restored), so the starts that many prompts share go last; blocks on the path being saved or
restored in the same step are never dropped.

**Chunk reuse** (:func:`match_runs`, opt-in): after the shared start, text of the new prompt that the slot
holds at another position (a run of at least ``min_run`` tokens) is moved there, its keys re-rotated by the
position difference, instead of being recomputed. When a start is restored from host memory, the blocks that
last followed it there are restored with it, for chunk reuse to take runs from (a file the editor comes back
to, its window slid by a few lines). Not exact: those keys and values were computed after
other text. llama.cpp's ``--cache-reuse`` takes only runs that keep their order with nothing inserted
between them; this matcher takes every long run, in any order, with new text in between (an edit in the
middle of a prompt, a window that slid by a line).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

BLOCK_SIZE = 16  # tokens per block, as vLLM's default
DEFAULT_CACHE_RAM_MB = 2048  # the host-memory budget when the user sets none


def cache_budget(cache_ram_mb: Optional[float], cache_reuse: int = 0) -> int:
    """The prompt cache's budget in bytes for ``cache_ram_mb`` MiB (None: :data:`DEFAULT_CACHE_RAM_MB`; 0: no
    prompt cache), after checking it and ``cache_reuse``; ``ValueError`` saying what is valid otherwise."""
    if isinstance(cache_reuse, bool) or not isinstance(cache_reuse, int) or cache_reuse < 0:
        raise ValueError(f"cache_reuse must be a non-negative integer (0: off; else the shortest run of prompt "
                         f"tokens moved to a new position instead of computed), got {cache_reuse!r}")
    mb = DEFAULT_CACHE_RAM_MB if cache_ram_mb is None else cache_ram_mb
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb < float("inf"):
        raise ValueError(f"cache_ram_mb must be a non-negative number of MiB (0: no prompt cache), got {cache_ram_mb!r}")
    return int(mb * 2**20)


# ----------------------------------------------------------------------------- operations for the runner
@dataclass
class SaveBlocks:
    """Copy positions ``start … start+block_size-1`` of ``slot`` into block ``id``, for each ``(id, start)``."""
    slot: int
    blocks: List[Tuple[int, int]]


@dataclass
class FreeBlocks:
    """Blocks dropped from the tree: their memory may be reused."""
    ids: List[int]


@dataclass
class RestoreBlocks:
    """Copy block ``id`` into positions ``start …`` of ``slot``, for each ``(id, start)``."""
    slot: int
    blocks: List[Tuple[int, int]]


@dataclass
class ShiftRuns:
    """Move ``(source, destination, length)`` runs of positions inside ``slot`` (all read before any is written),
    rotating the keys by ``destination - source``; ``request`` is the id of the request they serve."""
    slot: int
    request: int
    runs: List[Tuple[int, int, int]]


CacheOp = Union[SaveBlocks, FreeBlocks, RestoreBlocks, ShiftRuns]


# ----------------------------------------------------------------------------- the tree
@dataclass(eq=False)
class Block:
    id: int
    tokens: Tuple[int, ...]
    parent: Optional["Block"]
    depth: int  # this block holds positions depth * block_size … (depth + 1) * block_size - 1
    children: Dict[Tuple[int, ...], "Block"] = field(default_factory=dict)
    last_used: int = 0


class PromptCache:
    """A radix tree of token blocks within a budget (see the module docstring). Block ids are the runner's
    storage rows: ``0 … capacity - 1``, reused once freed."""

    def __init__(self, budget_bytes: int, bytes_per_token: int, block_size: int = BLOCK_SIZE):
        if budget_bytes < 0 or bytes_per_token <= 0 or block_size <= 0:
            raise ValueError(f"the prompt cache needs a budget ≥ 0 and positive sizes, got budget {budget_bytes}, "
                             f"{bytes_per_token} bytes a token, blocks of {block_size}")
        self.block_size, self.block_bytes = block_size, bytes_per_token * block_size
        self.capacity = budget_bytes // self.block_bytes
        self.root = Block(-1, (), None, -1)
        self.blocks: Dict[int, Block] = {}
        self._free_ids: List[int] = []
        self._next_id = itertools.count()
        self._clock = itertools.count(1)
        self.stats = {"saved_blocks": 0, "restored_blocks": 0, "evicted_blocks": 0, "hits": 0}

    @property
    def used_bytes(self) -> int:
        return len(self.blocks) * self.block_bytes

    def match(self, tokens: Sequence[int], limit: Optional[int] = None) -> List[Block]:
        """The blocks that start ``tokens``, in order, covering at most ``limit`` tokens (default: all)."""
        B, node, path = self.block_size, self.root, []
        n = len(tokens) if limit is None else min(limit, len(tokens))
        for start in range(0, n - B + 1, B):
            node = node.children.get(tuple(tokens[start:start + B]))
            if node is None:
                break
            path.append(node)
        return path

    def continuation(self, blocks: Sequence[Block], limit: int) -> List[Block]:
        """The blocks that last followed ``blocks`` (the most recently used child, block after block), within
        ``limit`` positions: the rest of the prompt that was cached after that start, which chunk reuse can take
        runs from when it is restored with it."""
        out: List[Block] = []
        node = blocks[-1] if blocks else None
        while node is not None and node.children and (node.depth + 2) * self.block_size <= limit:
            node = max(node.children.values(), key=lambda b: b.last_used)
            out.append(node)
        return out

    def touch(self, blocks: Sequence[Block]) -> None:
        now = next(self._clock)
        for b in blocks:
            b.last_used = now

    def save(self, slot: int, tokens: Sequence[int], protect: Sequence[Block] = ()) -> List[CacheOp]:
        """The operations that put ``tokens`` (a slot's contents from position 0) into the tree: the evictions
        that make room, then the copies of the blocks it lacks. Past the budget, the end is left out."""
        B, node = self.block_size, self.root
        path: List[Block] = []
        starts = range(0, len(tokens) - B + 1, B)
        for i, start in enumerate(starts):
            child = node.children.get(tuple(tokens[start:start + B]))
            if child is None:
                break
            path.append(child)
            node = child
        missing = len(starts) - len(path)
        if missing == 0:
            self.touch(path)
            return []
        freed = self._make_room(missing, set(map(id, list(protect) + path)))
        new = []
        for start in list(starts)[len(path):len(path) + self.capacity - len(self.blocks)]:
            block = Block(self._new_id(), tuple(tokens[start:start + B]), node, start // B)
            node.children[block.tokens] = block
            self.blocks[block.id] = block
            new.append(block)
            node = block
        self.touch(path + new)
        self.stats["saved_blocks"] += len(new)
        ops: List[CacheOp] = [FreeBlocks(freed)] if freed else []
        if new:
            ops.append(SaveBlocks(slot, [(b.id, b.depth * B) for b in new]))
        return ops

    def restore(self, slot: int, blocks: Sequence[Block], start: int) -> RestoreBlocks:
        """Restoring ``blocks`` (a :meth:`match`) from position ``start`` (a block boundary) on."""
        chosen = [b for b in blocks if b.depth * self.block_size >= start]
        self.touch(blocks)
        self.stats["restored_blocks"] += len(chosen)
        self.stats["hits"] += 1
        return RestoreBlocks(slot, [(b.id, b.depth * self.block_size) for b in chosen])

    def clear(self) -> None:
        """Forget every block (their contents are no longer trusted); the runner's rows are reused from 0."""
        self.root.children.clear()
        self.blocks.clear()
        self._free_ids, self._next_id = [], itertools.count()

    # ------------------------------------------------------------------ internals
    def _new_id(self) -> int:
        return self._free_ids.pop() if self._free_ids else next(self._next_id)

    def _make_room(self, wanted: int, protected: Set[int]) -> List[int]:
        """Drop least recently used leaves (never a protected block) until ``wanted`` blocks fit or none can go."""
        over = len(self.blocks) + wanted - self.capacity
        if over <= 0:
            return []
        leaves = [(b.last_used, b.id) for b in self.blocks.values() if not b.children and id(b) not in protected]
        heapq.heapify(leaves)
        freed = []
        while over > 0 and leaves:
            _, bid = heapq.heappop(leaves)
            block = self.blocks.pop(bid)
            del block.parent.children[block.tokens]
            self._free_ids.append(bid)
            freed.append(bid)
            over -= 1
            parent = block.parent
            if parent is not self.root and not parent.children and id(parent) not in protected:
                heapq.heappush(leaves, (parent.last_used, parent.id))
        self.stats["evicted_blocks"] += len(freed)
        return freed


# ----------------------------------------------------------------------------- chunk reuse
def match_runs(cached: Sequence[int], prompt: Sequence[int], start: int, min_run: int) -> List[Tuple[int, int, int]]:
    """Runs ``(source, destination, length)`` of at least ``min_run`` tokens: ``prompt[destination:…]`` equals
    ``cached[source:…]``, with destinations from ``start`` on, increasing and apart, sources from ``start`` on
    (what is before it stays where it is). Greedy: at each prompt position the longest run found there is
    taken, else the position is left to compute. The prompt's last token is never covered (its logits start
    decoding)."""
    end = len(prompt) - 1
    if min_run < 1 or start >= end or start >= len(cached):
        return []
    k = min(min_run, 16)  # the key each candidate is found by
    where: Dict[Tuple[int, ...], List[int]] = {}
    for i in range(start, len(cached) - k + 1):
        where.setdefault(tuple(cached[i:i + k]), []).append(i)
    runs, p = [], start
    while p + min_run <= end:
        best_n, best_c = 0, -1
        for c in where.get(tuple(prompt[p:p + k]), ())[-32:]:  # the latest occurrences of a repeated key
            n = k
            while p + n < end and c + n < len(cached) and cached[c + n] == prompt[p + n]:
                n += 1
            if n > best_n:
                best_n, best_c = n, c
        if best_n >= min_run:
            runs.append((best_c, p, best_n))
            p += best_n
        else:
            p += 1
    return runs

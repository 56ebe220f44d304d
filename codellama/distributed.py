"""Tensor parallelism on ``torch.distributed`` (NCCL on CUDA, gloo on CPU), laid out as Meta's shards are.

Column-parallel ``wq, wk, wv, w1, w3, output`` (each rank holds a block of output rows), row-parallel
``wo, w2`` (a block of input columns, summed across ranks with an all-reduce), and the token
embedding split along the model dimension as Meta's ``ParallelEmbedding`` does (gathered after the
lookup). Norms are replicated. With fewer KV heads than ranks, each rank holds the one KV head its
query heads use (KV heads are replicated, never split).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .config import ModelArgs


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; ``TensorParallel()`` is a single process."""

    rank: int = 0
    world: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (so all ranks continue with the same sampled tokens)."""
        if self.world > 1:
            dist.broadcast(x, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                           group=self.group)
        return x


SINGLE = TensorParallel()


def env_world() -> Tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the variables ``torchrun`` sets (1, 0, 0 without it)."""
    try:
        return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers: {e}") from None


def init_tensor_parallel(world: int, rank: int, device: torch.device) -> TensorParallel:
    """Join (or create) the default process group: NCCL for CUDA devices, gloo otherwise."""
    if world == 1:
        return SINGLE
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: tensor parallelism is unavailable")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, world_size=world, rank=rank,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(close_process_group)
    if dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but model_parallel_size is {world}")
    return TensorParallel(rank=dist.get_rank(), world=world, group=None)


def close_process_group() -> bool:
    """Tear down the process group (after a barrier, on gloo), if there is one; return whether there was.

    Registered to run at exit by ``init_tensor_parallel``, so a process group left to the interpreter's
    shutdown is still closed in order."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    if dist.get_backend() == "gloo":  # every rank done with its collectives before any connection closes
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))  # gives up on a dead rank instead of hanging
        except RuntimeError:
            pass
    dist.destroy_process_group()
    return True


def check_parallel(args: ModelArgs, world: int) -> None:
    """Raise ``ValueError`` (the same on every rank, before any collective) when ``args`` cannot be split ``world`` ways."""
    if world == 1:
        return
    problems = []
    if args.n_heads % world:
        problems.append(f"n_heads={args.n_heads} is not divisible by {world}")
    kv = args.kv_heads
    if kv % world and world % kv:  # split the kv heads evenly, or give each rank one (replicated)
        problems.append(f"n_kv_heads={kv} neither divides nor is divisible by {world}")
    for name, size in (("dim", args.dim), ("FFN hidden size", args.hidden_dim), ("vocab_size", args.vocab_size)):
        if size % world:
            problems.append(f"{name}={size} is not divisible by {world}")
    if problems:
        raise ValueError(f"cannot split this model across {world} ranks: {'; '.join(problems)}. "
                         f"Valid world sizes divide n_heads={args.n_heads}, dim, the FFN size and the vocabulary.")


def local_heads(args: ModelArgs, tp: TensorParallel) -> Tuple[int, int, int]:
    """``(query heads, kv heads, first kv head)`` held by this rank."""
    hq = args.n_heads // tp.world
    rep = args.n_heads // args.kv_heads  # query heads per kv head
    if args.kv_heads >= tp.world:
        hkv = args.kv_heads // tp.world
        return hq, hkv, tp.rank * hkv
    return hq, 1, (tp.rank * hq) // rep  # fewer kv heads than ranks: one, replicated


def shard_slices(args: ModelArgs, tp: TensorParallel) -> Dict[str, Optional[Tuple[int, int, int]]]:
    """For each parameter kind, ``(dim, start, stop)`` of this rank's block of the full tensor (None: all of it)."""
    if tp.world == 1:
        return {}
    r, w, hd = tp.rank, tp.world, args.head_dim
    hq, hkv, kv0 = local_heads(args, tp)
    block = lambda size: (r * size // w, (r + 1) * size // w)  # noqa: E731
    return {
        "tok_embeddings": (1, *block(args.dim)),
        "wq": (0, r * hq * hd, (r + 1) * hq * hd),
        "wk": (0, kv0 * hd, (kv0 + hkv) * hd),
        "wv": (0, kv0 * hd, (kv0 + hkv) * hd),
        "wo": (1, r * hq * hd, (r + 1) * hq * hd),
        "w1": (0, *block(args.hidden_dim)),
        "w3": (0, *block(args.hidden_dim)),
        "w2": (1, *block(args.hidden_dim)),
        "output": (0, *block(args.vocab_size)),
        "attention_norm": None, "ffn_norm": None, "norm": None,
    }


def slice_for(key: str, slices: Dict[str, Optional[Tuple[int, int, int]]]) -> Optional[Tuple[int, int, int]]:
    return slices.get(key.split(".")[-2]) if slices else None

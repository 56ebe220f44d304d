"""Tensor parallelism on ``torch.distributed`` (NCCL on CUDA, gloo on CPU), laid out as Meta's shards are.

Column-parallel ``wq, wk, wv, w1, w3, output`` (each rank holds a block of output rows), row-parallel
``wo, w2`` (a block of input columns, summed across ranks with an all-reduce), and the token
embedding split along the model dimension as Meta's ``ParallelEmbedding`` does (gathered after the
lookup). Norms are replicated. With fewer KV heads than ranks, each rank holds the one KV head its
query heads use (KV heads are replicated, never split).
"""

from __future__ import annotations

import atexit
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist

from .config import ModelArgs

# How long a rank waits in a collective for the others before it gives up. Ranks meet first in the first
# forward, after each has loaded its weights, so the wait covers the slowest rank's load (minutes for a
# 70B from a slow disk); after that a wait this long means a rank is stuck (stopped, hung, swapping).
TIMEOUT_ENV = "CODELLAMA_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; ``TensorParallel()`` is a single process."""

    rank: int = 0
    world: int = 1
    group: Any = None
    timeout_s: Optional[float] = None  # the process group's collective timeout, for the message when it expires

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks (in place)."""
        if self.world > 1:
            self._collective(dist.all_reduce, x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension."""
        if self.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._collective(dist.all_gather, parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` on every rank (so all ranks continue with the same sampled tokens)."""
        if self.world > 1:
            self._collective(dist.broadcast, x, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0)
        return x

    def _collective(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run ``op`` on this group; gloo's timeout error becomes a ``TimeoutError`` naming this rank and the timeout.

        (NCCL runs collectives asynchronously: its watchdog aborts the process on a timeout and logs the rank
        and the timeout itself.)
        """
        try:
            op(*args, group=self.group, **kwargs)
        except RuntimeError as e:
            if not _is_timeout(e):
                raise
            raise TimeoutError(f"rank {self.rank} of {self.world}: {op.__name__} got no answer from the other rank(s) "
                               f"within {_seconds(self.timeout_s)} ({TIMEOUT_ENV}): a rank is stuck (stopped, hung, "
                               f"swapping) or gone [{_first_line(e)}]") from None

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's picklable ``obj`` on every rank (e.g. the engine's plan for a step)."""
        if self.world == 1:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box,
                         src=dist.get_global_rank(self.group, 0) if self.group is not None else 0)
        return box[0]


SINGLE = TensorParallel()


def env_world() -> Tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the variables ``torchrun`` sets (1, 0, 0 without it)."""
    try:
        return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError as e:
        raise ValueError(f"WORLD_SIZE / RANK / LOCAL_RANK must be integers: {e}") from None


def collective_timeout(seconds: Optional[float] = None) -> float:
    """The collective timeout in seconds: ``seconds`` if given, else ``$CODELLAMA_DIST_TIMEOUT``, else 10 minutes."""
    name = "timeout_s"
    if seconds is None:
        text = os.environ.get(TIMEOUT_ENV)
        if text is None:
            return DEFAULT_TIMEOUT_S
        name = TIMEOUT_ENV
        try:
            seconds = float(text)
        except ValueError:
            seconds = text
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(f"{name} must be a positive number of seconds (e.g. 600), got {seconds!r}")
    return float(seconds)


def init_tensor_parallel(world: int, rank: int, device: torch.device,
                         timeout_s: Optional[float] = None) -> TensorParallel:
    """Join (or create) the default process group: NCCL for CUDA devices, gloo otherwise.

    ``timeout_s`` (default: ``collective_timeout()``) bounds every wait for the other ranks, so a stuck rank
    makes the others fail with a ``TimeoutError`` naming the rank and the timeout instead of blocking forever.
    """
    if world == 1:
        return SINGLE
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: tensor parallelism is unavailable")
    seconds = collective_timeout(timeout_s)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, world_size=world, rank=rank, timeout=timedelta(seconds=seconds),
                                    device_id=device if device.type == "cuda" else None)
        except RuntimeError as e:
            if not _is_timeout(e):
                raise
            raise TimeoutError(f"rank {rank} of {world}: the other ranks did not all join the process group within "
                               f"{_seconds(seconds)} ({TIMEOUT_ENV}) [{_first_line(e)}]") from None
        atexit.register(close_process_group, seconds)
    if dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but model_parallel_size is {world}")
    return TensorParallel(rank=dist.get_rank(), world=world, group=None, timeout_s=seconds)


def close_process_group(timeout_s: Optional[float] = None) -> bool:
    """Tear down the process group (after a barrier, on gloo), if there is one; return whether there was.

    Registered to run at exit by ``init_tensor_parallel``, so a process group left to the interpreter's
    shutdown is still closed in order. The barrier waits at most a minute (less with a shorter collective
    timeout): at exit, a rank that does not answer is given up on rather than waited for."""
    if not dist.is_available() or not dist.is_initialized():
        return False
    if dist.get_backend() == "gloo":  # every rank done with its collectives before any connection closes
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=min(60.0, collective_timeout(timeout_s))))
        except RuntimeError:
            pass
    dist.destroy_process_group()
    return True


def _is_timeout(e: Exception) -> bool:
    """Whether a torch.distributed error is a timeout (gloo: "Timed out waiting …", then "Application timeout …")."""
    return any(word in str(e).lower() for word in ("timed out", "timeout"))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _seconds(timeout_s: Optional[float]) -> str:
    return f"{timeout_s:g} s" if timeout_s is not None else "the process group's timeout"


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


# ----------------------------------------------------------------------------- how each weight is split
@dataclass(frozen=True)
class Split:
    """How one kind of weight is divided across Meta's model-parallel shards, which are also the ranks here.

    ``dim``: the axis that is split (None: replicated, every shard and rank holds all of it); ``unit``: what
    that axis counts, which sets each rank's block (whole heads for attention, even blocks otherwise).
    """

    dim: Optional[int]
    unit: str = ""


REPLICATED = Split(None)
# The one table of the layout, keyed by the module a tensor belongs to (``layers.3.attention.wq.weight`` → wq).
# Every tensor of a module follows its split: a tensor that has the split axis is cut along it in
# proportion (a weight's integer codes or per-group scales), one that lacks it is replicated.
WEIGHT_SPLITS: Dict[str, Split] = {
    "tok_embeddings": Split(1, "dim"),  # Meta's ParallelEmbedding splits the embedding dimension
    "wq": Split(0, "q_heads"), "wk": Split(0, "kv_heads"), "wv": Split(0, "kv_heads"),  # column-parallel
    "w1": Split(0, "hidden"), "w3": Split(0, "hidden"), "output": Split(0, "vocab"),
    "wo": Split(1, "q_heads"), "w2": Split(1, "hidden"),  # row-parallel
    "attention_norm": REPLICATED, "ffn_norm": REPLICATED, "norm": REPLICATED,
}


def split_of(key: str) -> Split:
    """The split of the module that checkpoint tensor ``key`` belongs to; ``ValueError`` for a non-Llama key."""
    parts = key.split(".")
    split = WEIGHT_SPLITS.get(parts[-2]) if len(parts) >= 2 else None
    if split is None:
        raise ValueError(f"unknown parameter {key!r}: not a Llama weight (modules: {', '.join(WEIGHT_SPLITS)})")
    return split


def split_dim(key: str, ndim: int) -> Optional[int]:
    """The axis along which Meta's shards cut tensor ``key`` of ``ndim`` dimensions (None: replicated)."""
    dim = split_of(key).dim
    return dim if dim is not None and dim < ndim else None


def rank_block(key: str, shape: Tuple[int, ...], args: ModelArgs, tp: TensorParallel) -> Optional[Tuple[int, int, int]]:
    """``(dim, start, stop)`` of this rank's block of the full tensor ``key`` of ``shape`` (None: all of it)."""
    if tp.world == 1:
        return None
    dim = split_dim(key, len(shape))
    if dim is None:
        return None
    unit = split_of(key).unit
    r, w, hd = tp.rank, tp.world, args.head_dim
    hq, hkv, kv0 = local_heads(args, tp)
    even = lambda size: (size, r * size // w, (r + 1) * size // w)  # noqa: E731
    total, start, stop = {
        "q_heads": (args.n_heads * hd, r * hq * hd, (r + 1) * hq * hd),
        "kv_heads": (args.kv_heads * hd, kv0 * hd, (kv0 + hkv) * hd),
        "hidden": even(args.hidden_dim), "vocab": even(args.vocab_size), "dim": even(args.dim),
    }[unit]
    # A tensor that is not the weight itself (e.g. per-group scales) is cut in proportion to its size.
    if (shape[dim] * start) % total or (shape[dim] * stop) % total:
        raise ValueError(f"{key}: its {shape[dim]} entries along dim {dim} cannot be split at rank {r} of {w}")
    return dim, shape[dim] * start // total, shape[dim] * stop // total

"""What every checkpoint format is read into: a ``CheckpointSource`` of lazily read tensors under Meta's names
and in Meta's RoPE layout, and the checks of a configuration against the tensors that every format shares."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ..config import ModelArgs
from ..quantize import QuantConfig, stored_embedding_width

_LAYER_KEY = re.compile(r"layers\.(\d+)\.")

Block = Optional[Tuple[int, int, int]]  # (dim, start, stop) of a tensor, or None for all of it

@dataclass
class LazyTensor:
    """A checkpoint tensor in Meta's layout, known by shape and dtype, read only when asked.

    ``read(block)`` returns the whole tensor (``block=None``) or one rank's ``(dim, start, stop)``
    block of it, touching only the bytes that block needs. ``release(block)``, where the format reads
    memory-mapped files, gives back the pages that reading ``block`` mapped in (``release_pages``): the
    loader calls it once what ``read`` returned is no longer needed (converted, packed or quantized).
    """
    shape: Tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[Block], torch.Tensor]
    release: Optional[Callable[[Block], None]] = None

    def load(self) -> torch.Tensor:
        return self.read(None)

    def block_shape(self, block: Block) -> Tuple[int, ...]:
        if block is None:
            return self.shape
        dim, start, stop = block
        return self.shape[:dim] + (stop - start,) + self.shape[dim + 1:]

def read_pieces(parts: List[torch.Tensor], piece_dim: Optional[int], block: Block) -> torch.Tensor:
    """A block of the tensor Meta's shards ``parts`` make when joined along ``piece_dim`` (None: replicated)."""
    if piece_dim is None:
        return parts[0] if block is None else parts[0].narrow(block[0], block[1], block[2] - block[1])
    if block is None or block[0] != piece_dim:
        full = torch.cat(parts, dim=piece_dim)
        return full if block is None else full.narrow(block[0], block[1], block[2] - block[1])
    dim, start, stop = block
    pieces, offset = [], 0
    for part in parts:  # only the shards that overlap [start, stop) are touched
        n = part.shape[dim]
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append(part.narrow(dim, a - offset, b - a))
        offset += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

# ----------------------------------------------------------------------------- pages of mapped files
# A tensor read from a memory-mapped file is a view of the file's pages; once touched they count in the
# process's resident memory until the file is unmapped, which is when its last tensor is gone. Loading a
# model converts (packs, quantizes, casts) most tensors into new memory, so without giving the pages back a
# load would peak at the file's size plus the model's. (llama.cpp unmaps the parts of its mapping it copied
# out, for the same reason.)
_MADV_DONTNEED = 4  # Linux


def release_pages(views: Iterable["torch.Tensor | Tuple[int, int]"], files: Sequence[str]) -> int:
    """Give back the resident pages of ``views``, tensors viewing memory-mapped ``files`` (or their ``byte_span``s);
    the bytes released.

    Only pages of a mapping of one of ``files`` are released (``madvise(MADV_DONTNEED)``), the pages at the
    ends of a view included: they stay in the page cache, and a later read of the same bytes (a neighbouring
    tensor the model keeps in place) maps them in again, so no value ever changes. Anything else (anonymous
    memory, other files) is left alone. Linux only; elsewhere nothing is done.
    """
    if not sys.platform.startswith("linux"):
        return 0
    mapped = _file_mappings({os.path.realpath(f) for f in files})
    if not mapped:
        return 0
    released = 0
    for view in views:
        start, end = view if isinstance(view, tuple) else byte_span(view)
        for lo, hi in mapped:
            a = max(start // mmap.PAGESIZE * mmap.PAGESIZE, lo)  # (a mapping starts and ends on pages)
            b = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, hi)
            if a < b and _libc().madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED) == 0:
                released += b - a
    return released


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap for reuse; loading frees
    such blocks by the thousand (a layer's codes before they are laid out, quantization's chunks), and
    without this they stayed resident: about 1.3 GiB over a 7B model quantized on load.
    """
    if sys.platform.startswith("linux"):
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)


def byte_span(view: torch.Tensor) -> Tuple[int, int]:
    """``(start, end)`` addresses of the bytes ``view`` covers (a strided view: from its first to its last element)."""
    if view.numel() == 0:
        return view.data_ptr(), view.data_ptr()
    span = 1 + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()))  # elements
    return view.data_ptr(), view.data_ptr() + span * view.element_size()


def file_backed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage lies in a memory-mapped file (a view of a checkpoint), not allocated memory.
    Linux only (``/proc/self/maps``); elsewhere False."""
    ptr = tensor.untyped_storage().data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/"):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    if lo <= ptr < hi:
                        return True
    except OSError:
        pass
    return False


def _file_mappings(paths: set) -> List[Tuple[int, int]]:
    """``(start, end)`` of this process's mappings of the files ``paths`` (from ``/proc/self/maps``)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() in paths:
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        return []
    return ranges


_LIBC: List[ctypes.CDLL] = []


def _libc() -> ctypes.CDLL:
    if not _LIBC:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _LIBC.append(libc)
    return _LIBC[0]


@dataclass
class CheckpointSource:
    """What a checkpoint directory holds, with every tensor named and laid out as Meta's model expects."""
    layout: str  # "meta" or "hf"
    path: str
    args: ModelArgs  # vocab_size resolved from the weights
    tensors: Dict[str, LazyTensor]
    num_shards: int = 1
    quantization: Optional["QuantConfig"] = None  # a checkpoint written by ``python -m codellama.quantize``

def match_config(args: ModelArgs, tensors: Dict[str, LazyTensor], where: str,
                  meta_shards: Optional[int] = None, quantization: Optional["QuantConfig"] = None) -> ModelArgs:
    """``args`` with ``vocab_size`` read from the weights, after checking that the config describes these tensors.

    Checked before the model is built, so a config asking for 1000 layers of a 2-layer checkpoint fails now,
    not after building 1000 layers. Only the sizes that say which model this is are compared here; every
    key and shape is checked against the built model by ``materialize``. ``meta_shards``: how many Meta
    shards were merged, to recognise a checkpoint with shards missing (its embedding is too narrow).
    ``quantization``: the scheme of a quantized checkpoint, whose int4 embedding holds two codes a byte.
    """
    emb = tensors.get("tok_embeddings.weight")
    if emb is None:
        raise ValueError(f"{where}: missing key(s) ['tok_embeddings.weight']")
    if len(emb.shape) != 2:
        raise ValueError(f"{where}: tok_embeddings.weight has shape {emb.shape}, expected (vocab_size, dim)")
    vocab, dim = emb.shape
    if quantization is not None and stored_embedding_width(args.dim, quantization) == dim:
        dim = args.dim  # codes of a quantized embedding: checked against the model by materialize
    if args.vocab_size not in (-1, vocab):
        raise ValueError(f"{where}: vocab_size {args.vocab_size} in the config, but tok_embeddings.weight has {vocab} rows")
    if dim != args.dim:
        per_shard = dim // (meta_shards or 1)
        if meta_shards and 0 < per_shard and dim < args.dim and args.dim % per_shard == 0:  # Meta splits it along dim
            missing = [f"consolidated.{i:02d}.pth" for i in range(meta_shards, args.dim // per_shard)]
            raise FileNotFoundError(
                f"{where}: shard(s) {', '.join(missing)} missing: dim is {args.dim} in params.json, and each of the "
                f"{meta_shards} shard(s) found holds {per_shard} columns of tok_embeddings.weight")
        raise ValueError(f"{where}: dim {args.dim} in the config, but tok_embeddings.weight has {dim} columns")
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, tensors) if m}
    if layers != set(range(args.n_layers)):
        gaps = sorted(set(range(max(layers, default=0))) - layers)
        held = "no layers" if not layers else \
            f"{len(layers)} layer(s), numbered {min(layers)}…{max(layers)}" + (f" without {gaps[:5]}" if gaps else "")
        raise ValueError(f"{where}: n_layers {args.n_layers} in the config, but the checkpoint holds {held}")
    return replace(args, vocab_size=vocab)

"""Meta's layout: ``params.json`` + ``consolidated.00.pth … consolidated.NN.pth`` (+ ``tokenizer.model``).

Reading merges the model-parallel shards along the axes Meta splits each weight on (lazily: a rank reading
its block touches only the shards that hold it); writing splits them the same way. ``.pth`` files are
memory-mapped and loaded with ``weights_only=True``: a pickle that tries to build anything but tensors is
refused, never executed.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List

import torch

from ..config import ModelArgs, check_size, write_json
from ..distributed import split_dim
from .source import CheckpointSource, LazyTensor, match_config, read_pieces, release_pages

# Keys real checkpoints carry that the model does not use; dropped by name, nothing else is.
IGNORED_META_KEYS = ("rope.freqs",)

META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

def _meta_shard_paths(ckpt_dir: str) -> List[str]:
    """``consolidated.00.pth … consolidated.NN.pth``, refusing a gap or two files for one shard."""
    shards: Dict[int, List[str]] = {}
    for name in sorted(os.listdir(ckpt_dir)):
        m = META_SHARD.fullmatch(name)
        if m:
            shards.setdefault(int(m.group(1)), []).append(name)
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth files in {ckpt_dir} (next to params.json)")
    doubled = [names for names in shards.values() if len(names) > 1]
    if doubled:
        raise ValueError(f"{ckpt_dir} is ambiguous: {' and '.join(doubled[0])} are the same shard")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(shards) + 1) if i not in shards]
    if missing:
        raise FileNotFoundError(f"{ckpt_dir}: shard(s) {', '.join(missing)} missing; the shards must be numbered "
                                f"00…{max(shards):02d} without gaps (found {[n for ns in shards.values() for n in ns]})")
    return [os.path.join(ckpt_dir, shards[i][0]) for i in sorted(shards)]

def load_pth(path: str) -> Dict[str, torch.Tensor]:
    """A ``.pth`` state dict, memory-mapped, refusing any pickle payload that is not plain tensors.

    A legacy (pre-zip, ``_use_new_zipfile_serialization=False``) file cannot be memory-mapped, so it is read
    whole, under the same ``weights_only`` rule.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        sd = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for a corrupt zip, EOFError, …
        raise ValueError(f"refusing to load {path}: {_describe_pth_error(e, is_zip)}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, expected a dict of tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            nested = " (a nested dict: save the model's state_dict() itself)" if isinstance(v, dict) else ""
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor{nested}")
    return sd

def _describe_pth_error(e: Exception, is_zip: bool) -> str:
    """What a ``.pth`` that ``torch.load(weights_only=True)`` refused is, in one line."""
    kind = "PyTorch zip file" if is_zip else "legacy-format PyTorch file"
    forbidden = re.search(r"GLOBAL ([\w.]+)", str(e))
    if forbidden:
        return (f"not a weights-only state dict: this {kind} pickles {forbidden.group(1)} (an object or a call, "
                "not only tensors), so it was not unpickled; re-save it with torch.save(model.state_dict(), path)")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else "unexpected end of file"
    if is_zip:
        return f"not a weights-only state dict: a corrupt or truncated {kind} ({type(e).__name__}: {first_line})"
    return f"not a weights-only state dict: not a PyTorch file, or a corrupt one ({type(e).__name__}: {first_line})"

def open_meta(ckpt_dir: str) -> CheckpointSource:
    params = ModelArgs.from_params_json(os.path.join(ckpt_dir, "params.json"))
    paths = _meta_shard_paths(ckpt_dir)
    shards = [load_pth(p) for p in paths]
    keys = [k for k in shards[0] if k not in IGNORED_META_KEYS]
    for p, s in zip(paths[1:], shards[1:]):
        diff = set(keys) ^ (set(s) - set(IGNORED_META_KEYS))
        if diff:
            raise ValueError(f"{p} and {paths[0]} hold different keys: {sorted(diff)[:10]}")
    tensors = {k: _merge_meta_shards(k, [s[k] for s in shards], paths) for k in keys}
    args = match_config(params, tensors, ckpt_dir, meta_shards=len(paths))
    return CheckpointSource("meta", ckpt_dir, args, tensors, num_shards=len(paths))

def _merge_meta_shards(key: str, parts: List[torch.Tensor], paths: List[str]) -> LazyTensor:
    """Tensor ``key`` of Meta's model-parallel shards: joined along its split axis, or replicated.

    Shards may differ only along the axis Meta splits ``key`` on; a replicated tensor (the norms) must be
    the same in every shard, or which shard's copy is right is unknowable.
    """
    first = parts[0]
    dim = split_dim(key, first.dim()) if len(parts) > 1 else None
    for part, path in zip(parts[1:], paths[1:]):
        if part.dtype != first.dtype:
            raise ValueError(f"{key} is {part.dtype} in {path} but {first.dtype} in {paths[0]}")
        same_shape = part.dim() == first.dim() and all(
            a == b for i, (a, b) in enumerate(zip(part.shape, first.shape)) if i != dim)
        if not same_shape:
            rule = (f"shards may differ only along dim {dim}, the axis Meta splits it on" if dim is not None else
                    "it is replicated (not split), so every shard must hold the same tensor")
            raise ValueError(f"{key} has shape {tuple(part.shape)} in {path} but {tuple(first.shape)} in {paths[0]}: "
                             + rule)
        if dim is None and not torch.equal(part, first):
            raise ValueError(f"{key} differs between {paths[0]} and {path}: it is replicated (not split), so every "
                             "shard must hold the same values")
    release = lambda block: release_pages(parts, paths)  # noqa: E731 (every shard's piece: only touched pages count)
    if dim is None:
        return LazyTensor(tuple(first.shape), first.dtype, lambda block: read_pieces(parts, None, block), release)
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return LazyTensor(tuple(shape), first.dtype, lambda block: read_pieces(parts, dim, block), release)


def check_num_shards(args: ModelArgs, num_shards: int) -> None:
    """Refuse a Meta shard count that does not split every weight into whole heads and equal blocks."""
    check_size("num_shards", num_shards)
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim, "FFN hidden size": args.hidden_dim}
    if args.vocab_size > 0:  # -1 (from the tokenizer): output.weight's rows are checked when it is split
        sizes["vocab_size"] = args.vocab_size
    bad = [f"{name}={size}" for name, size in sizes.items() if size % num_shards]
    if bad:
        valid = [n for n in range(1, args.kv_heads + 1) if all(size % n == 0 for size in sizes.values())]
        raise ValueError(f"cannot split this model into {num_shards} Meta shards: {', '.join(bad)} not divisible by "
                         f"{num_shards}; valid shard counts: {valid}")

def split_for_shards(key: str, tensor: torch.Tensor, num_shards: int) -> List[torch.Tensor]:
    """Meta's model-parallel pieces of one full tensor."""
    dim = split_dim(key, tensor.dim())
    if num_shards == 1 or dim is None:
        return [tensor] * num_shards
    if tensor.shape[dim] % num_shards:
        raise ValueError(f"{key}: size {tensor.shape[dim]} along dim {dim} does not divide into {num_shards} shards")
    return [t.clone() for t in tensor.chunk(num_shards, dim=dim)]

def save_meta(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike, num_shards: int = 1) -> None:
    """Write ``params.json`` and ``consolidated.{00..}.pth`` split as Meta's model-parallel ranks are.

    Every shard is split before anything is written, so a bad ``num_shards`` leaves no file behind.
    ``out_dir`` is written as it is: use :func:`convert_checkpoint` to replace a checkpoint safely.
    """
    check_num_shards(args, num_shards)
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in state.items():
        for shard, piece in zip(shards, split_for_shards(key, tensor, num_shards)):
            shard[key] = piece.contiguous()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "params.json"), args.to_params())
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))

"""Writing checkpoints in Meta's and Hugging Face's layouts, and converting one into the other.

The reading side, and the names and q/k permutation both layouts share, are in ``checkpoint.py``;
``python -m codellama.convert`` is the command line over :func:`convert_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List

import torch

from .checkpoint import _rope_heads, meta_to_hf_name, open_checkpoint, permute_to_hf
from .config import ModelArgs
from .distributed import split_dim
from .runtime import parse_dtype


def split_for_shards(key: str, tensor: torch.Tensor, num_shards: int) -> List[torch.Tensor]:
    """Meta's model-parallel pieces of one full tensor."""
    dim = split_dim(key, tensor.dim())
    if num_shards == 1 or dim is None:
        return [tensor] * num_shards
    if tensor.shape[dim] % num_shards:
        raise ValueError(f"{key}: size {tensor.shape[dim]} along dim {dim} does not divide into {num_shards} shards")
    return [t.clone() for t in tensor.chunk(num_shards, dim=dim)]


def save_meta(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike, num_shards: int = 1) -> None:
    """Write ``params.json`` and ``consolidated.{00..}.pth`` split as Meta's model-parallel ranks are."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "params.json"), "w", encoding="utf-8") as f:
        json.dump(args.to_params(), f, indent=2)
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in state.items():
        for shard, piece in zip(shards, split_for_shards(key, tensor, num_shards)):
            shard[key] = piece.contiguous()
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))


def to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Meta-named weights → Hugging Face names, with ``wq``/``wk`` rows permuted for rotate-half RoPE."""
    hf_state = {}
    for key, tensor in state.items():
        n = _rope_heads(key, args)
        hf_state[meta_to_hf_name(key)] = (tensor if n is None else permute_to_hf(tensor, n)).contiguous()
    return hf_state


def save_hf(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index past ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = next(iter(state.values())).dtype
    config = args.to_hf_config(torch_dtype=str(dtype).removeprefix("torch."))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    hf_state = to_hf_state_dict(state, args)
    groups: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for name, t in group.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, num_shards: int = 1,
                       dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Convert a checkpoint directory to the ``"meta"`` or ``"hf"`` layout (exact unless ``dtype`` is given)."""
    if to not in ("meta", "hf"):
        raise ValueError(f"unknown target layout {to!r}; valid: 'meta', 'hf'")
    source = open_checkpoint(src)
    dtype = parse_dtype(dtype)
    state = {k: (t.load() if dtype is None else t.load().to(dtype)) for k, t in source.tensors.items()}
    if to == "meta":
        save_meta(state, source.args, dst, num_shards=num_shards)
    else:
        save_hf(state, source.args, dst, max_shard_bytes=max_shard_bytes)
    tok = os.path.join(os.fspath(src), "tokenizer.model")
    if os.path.isfile(tok):
        shutil.copyfile(tok, os.path.join(os.fspath(dst), "tokenizer.model"))

"""Tiny random models and checkpoints, for tests and benchmarks (no downloads).

Random weights with Meta's names; norms random too, so a mis-mapped norm cannot hide behind all-ones.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Iterator, Optional, Tuple

import torch

from .checkpoint import build_on_meta
from .config import ModelArgs
from .model import Transformer
from .formats.hf import write_hf
from .formats.meta import save_meta
from .quantize import QuantizeArg, parse_quantize
from .save import write_quantized_hf


def random_tensors(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[Tuple[str, torch.Tensor]]:
    """``random_state_dict``'s tensors one at a time (the same values), for checkpoints larger than memory."""
    g = torch.Generator().manual_seed(seed)
    for k, t in build_on_meta(args).state_dict().items():
        if k.endswith("norm.weight"):
            yield k, (1.0 + 0.1 * torch.randn(t.shape, generator=g)).to(dtype)
        else:
            yield k, (torch.randn(t.shape, generator=g) * (1.0 / t.shape[-1] ** 0.5)).to(dtype)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights for ``args`` (Meta names), scaled like an initialised model so activations stay O(1)."""
    return dict(random_tensors(args, seed, dtype))


def random_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``Transformer`` holding ``random_state_dict(args, seed, dtype)``, in eval mode."""
    model = build_on_meta(args)
    model.load_state_dict(random_state_dict(args, seed, dtype), assign=True, strict=True)
    return model.eval()


def write_checkpoint(path: str | os.PathLike, args: ModelArgs, layout: str = "meta", *, seed: int = 0,
                     shards: int = 1, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2**30, quantize: "QuantizeArg" = None) -> str:
    """A random checkpoint directory in the Meta or HF layout (with an optional tokenizer.model copied in).

    With ``quantize`` (HF layout only), the weights are written quantized as ``python -m codellama quantize``
    writes them, each quantized as it is made: a checkpoint too large to exist in full precision on this disk.
    """
    path = os.fspath(path)
    config = parse_quantize(quantize)
    if config is not None and layout != "hf":
        raise ValueError(f"a quantized checkpoint is written in the HF layout, not {layout!r}")
    if layout == "meta":
        save_meta(random_state_dict(args, seed, dtype), args, path, num_shards=shards)
    else:  # a tensor at a time: a 7B-sized checkpoint needs no 7B of memory
        plan = {k: (tuple(t.shape), dtype) for k, t in build_on_meta(args).state_dict().items()}
        if config is None:
            write_hf(path, args, plan, random_tensors(args, seed, dtype), max_shard_bytes=max_shard_bytes)
        else:
            write_quantized_hf(path, args, config, plan, random_tensors(args, seed, dtype),
                               max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return path

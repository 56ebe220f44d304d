"""Tiny random models and checkpoints, for tests and benchmarks (no downloads).

Random weights with Meta's names; norms random too, so a mis-mapped norm cannot hide behind all-ones.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import torch

from .checkpoint import build_on_meta
from .config import ModelArgs
from .model import Transformer
from .formats.hf import save_hf
from .formats.meta import save_meta


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights for ``args`` (Meta names), scaled like an initialised model so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in build_on_meta(args).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def random_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``Transformer`` holding ``random_state_dict(args, seed, dtype)``, in eval mode."""
    model = build_on_meta(args)
    model.load_state_dict(random_state_dict(args, seed, dtype), assign=True, strict=True)
    return model.eval()


def write_checkpoint(path: str | os.PathLike, args: ModelArgs, layout: str = "meta", *, seed: int = 0,
                     shards: int = 1, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2**30) -> str:
    """A random checkpoint directory in the Meta or HF layout (with an optional tokenizer.model copied in)."""
    path = os.fspath(path)
    sd = random_state_dict(args, seed, dtype)
    if layout == "meta":
        save_meta(sd, args, path, num_shards=shards)
    else:
        save_hf(sd, args, path, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return path

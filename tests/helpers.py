"""Tiny random models and checkpoints for tests (no downloads)."""

from __future__ import annotations

import os
from typing import Dict

import torch

from codellama import ModelArgs, Transformer
from codellama.checkpoint import save_hf, save_meta


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights with Meta names; norms random too, so a mis-mapped norm cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)
    return {k: v.to(dtype) for k, v in sd.items()}


def random_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed, dtype), assign=True, strict=True)
    return model.eval()


def write_checkpoint(path, args: ModelArgs, layout: str = "meta", *, seed: int = 0, shards: int = 1,
                     dtype: torch.dtype = torch.float32, tokenizer: str | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> str:
    """A random checkpoint directory in the Meta or HF layout (with an optional tokenizer.model copied in)."""
    path = os.fspath(path)
    sd = random_state_dict(args, seed, dtype)
    if layout == "meta":
        save_meta(sd, args, path, num_shards=shards)
    else:
        save_hf(sd, args, path, max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        with open(tokenizer, "rb") as src, open(os.path.join(path, "tokenizer.model"), "wb") as dst:
            dst.write(src.read())
    return path


# Small shapes that still exercise MHA, GQA, odd sizes and Code Llama's rope_theta.
CONFIGS = {
    "mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, multiple_of=16),
    "gqa": ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=260, multiple_of=32, rope_theta=1e6),
    "odd": ModelArgs(dim=120, n_layers=2, n_heads=5, n_kv_heads=1, vocab_size=333, multiple_of=7,
                     ffn_dim_multiplier=1.3, norm_eps=1e-6, rope_theta=1e6),
}

"""int8 weights in 16-row tiles, multiplied with int8-quantized activations (``tiles.cpp``), as llama.cpp's Q8_0.

    tiles, sc = int8_tiles(codes, scales)                  # once, at load
    y = int8_tiles_linear(x, tiles, sc, out_features)      # x (…, K) → (…, N)

Each call quantizes x per block of 32 inputs (``x ≈ d·a``, ``a`` int8, ``d = max|x|/127``), sums ``Σ q·a``
per block in int32 and ``s · Σ_blocks d · Σ q·a`` in float32 (``int8_tiles_reference`` is the same arithmetic
in PyTorch). The activations' rounding, at most half a step of 1/127 of their block's largest value, is of
the order of the weights' own (1/127 of their row's largest); the tests bound it in float64.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import TILE, native_isa

BLOCK = 32  # activations quantized per this many inputs (llama.cpp's Q8_0 block)


def int8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``codellama.quantize``'s int8 weight as the kernels read it: ``(tiles, sc)``.

    ``codes`` (N, K) int8, ``scales`` (N,). ``tiles`` (Nt, Kp/4, 64) uint8, Nt = ⌈N/16⌉, Kp = K rounded up to
    a block (rows and inputs padded with code 0): byte ``4i + j`` of chunk ``c`` of tile ``t`` is row
    ``16t + i``'s code of input ``4c + j`` (as a byte: the kernel flips its sign bit as it reads it). Each
    4-byte run of a row moves whole, so making the tiles is a transpose of int32s. ``sc`` (Nt, 16): the rows'
    scales, in bf16 when they are bf16 and float32 otherwise (so ``untile_int8`` gives back the exact tensors).
    """
    N, K = codes.shape
    Nt, Kp = -(-N // TILE), -(-K // BLOCK) * BLOCK
    if (Nt * TILE, Kp) != (N, K):
        codes = torch.nn.functional.pad(codes, (0, Kp - K, 0, Nt * TILE - N))
    codes = codes.contiguous()
    if codes.storage_offset() % 4:  # (a tensor read from a file may start anywhere: its words must be whole)
        codes = codes.clone()
    words = codes.view(torch.int32)  # (Nt·16, Kp/4): four inputs of a row each
    tiles = words.view(Nt, TILE, Kp // 4).transpose(1, 2).contiguous()  # (Nt, chunks c, rows i)
    sc_dtype = torch.bfloat16 if scales.dtype == torch.bfloat16 else torch.float32
    sc = torch.nn.functional.pad(scales.to(sc_dtype), (0, Nt * TILE - N)).view(Nt, TILE)
    return tiles.view(torch.uint8).view(Nt, Kp // 4, 64), sc


def untile_int8(tiles: torch.Tensor, sc: torch.Tensor, out_features: int, in_features: int,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``int8_tiles``: ``(codes, scales)`` of the first ``out_features`` rows, scales in ``dtype``."""
    Nt, chunks, _ = tiles.shape
    words = tiles.view(torch.int32).view(Nt, chunks, TILE).transpose(1, 2).reshape(Nt * TILE, chunks).contiguous()
    codes = words.view(torch.int8)[:out_features, :in_features]
    return codes.contiguous(), sc.reshape(-1)[:out_features].to(dtype)


def int8_tiles_linear(x: torch.Tensor, tiles: torch.Tensor, sc: torch.Tensor, out_features: int) -> torch.Tensor:
    """``x @ W.T`` for x (…, K) and W in tiles: (…, N) in x's dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    isa = native_isa("int8")  # (loads the extension: the operator exists after this)
    out = torch.ops.codellama_native.int8_tiles_linear(x2.contiguous(), tiles, sc, out_features, isa)
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def int8_tiles_reference(x: torch.Tensor, tiles: torch.Tensor, sc: torch.Tensor, out_features: int) -> torch.Tensor:
    """``int8_tiles_linear`` in PyTorch: the same quantized activations and integer sums (float64 accumulation)."""
    K = x.shape[-1]
    Kp = tiles.shape[1] * 4
    xf = torch.nn.functional.pad(x.reshape(-1, K).float(), (0, Kp - K))
    blocks = xf.view(-1, Kp // BLOCK, BLOCK)  # (M, Kp/B, B)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    a = (blocks * inv).round()  # integers in [-127, 127]
    d = (amax / 127).squeeze(-1).double()  # (M, Kp/B)
    codes, scales = untile_int8(tiles, sc, out_features, Kp, torch.float64)
    q = codes.double().view(out_features, Kp // BLOCK, BLOCK)
    dots = torch.einsum("mbk,nbk->mnb", a.double(), q)  # exact integer sums per block
    out = (dots * d.unsqueeze(1)).sum(-1) * scales
    return out.to(x.dtype).view(*x.shape[:-1], out_features)

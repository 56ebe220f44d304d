"""int4 weights in 16-row tiles, multiplied with int8-quantized activations (``tiles.cpp``).

    tiles, sz = int4_tiles(codes, scales, zeros, group_size)        # once, at load
    y = int4_tiles_linear(x, tiles, sz, group_size, out_features)   # x (…, K) → (…, N)

Each call quantizes x per half group (``G/2`` inputs: ``x ≈ d·a``, ``a`` int8, ``d = max|x|/127``), then sums
``s·(d_lo·Σ(q−8)·a + d_hi·Σ(q−8)·a) + z·Σx`` per group in int32 and float32 (``int4_tiles_reference`` is the
same arithmetic in PyTorch). The activations' rounding, at most half a step of 1/127 of their half group's
largest value, is below the weights' own (int4: 1/15 of their group's range); the tests bound it in float64.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import TILE, native_isa

def quantize_int4(w: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``codellama.quantize.quantize_int4(w, group_size, w.dtype)`` in one pass over a (N, K) CPU weight with
    contiguous rows, K a multiple of ``group_size``, float32, bfloat16 or float16: ``(packed, scales, zeros)``, bit
    for bit the same (tested), without its float32 temporaries (about 20× faster on a 7B's bf16 weights here)."""
    return tuple(torch.ops.codellama_native.quantize_int4(w, group_size, native_isa("int4")))


# ----------------------------------------------------------------------------- the layout
def int4_tiles(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``codellama.quantize``'s int4 weight as the kernels read it: ``(tiles, sz)``.

    ``codes`` (N, Kp/2) uint8, two codes a byte (byte ``j`` of a group: inputs ``j`` and ``j + G/2``);
    ``scales``/``zeros`` (N, Kp/G). ``tiles`` (Nt, Kp/G, G/8, 64) uint8, Nt = ⌈N/16⌉ (rows padded with
    zero codes): byte ``4i + j`` of chunk ``c`` of group ``g`` of tile ``t`` is row ``16t + i``'s byte
    ``g·G/2 + 4c + j``, so each 64-byte chunk is 16 rows × 4 inputs of each nibble plane. ``sz`` (Nt, Kp/G,
    2, 16): the tile's scales, then its zeros, in bf16 when the scales are bf16 and float32 otherwise (so
    ``untile_int4`` gives back the exact tensors).
    """
    N, half = codes.shape
    G = group_size
    groups = scales.shape[1]
    pad = -N % TILE
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, half)))
        scales, zeros = (torch.cat((t, t.new_zeros(pad, groups))) for t in (scales, zeros))
    Nt = (N + pad) // TILE
    # (Nt, 16 rows i, groups g, G/8 chunks c, 4 bytes j) → (Nt, g, c, i, j)
    tiles = codes.view(Nt, TILE, groups, G // 8, 4).permute(0, 2, 3, 1, 4).contiguous()
    sz_dtype = torch.bfloat16 if scales.dtype == torch.bfloat16 else torch.float32
    sz = torch.stack((scales, zeros)).to(sz_dtype).view(2, Nt, TILE, groups).permute(1, 3, 0, 2).contiguous()
    return tiles.view(Nt, groups, G // 8, 64), sz


def untile_int4(tiles: torch.Tensor, sz: torch.Tensor, out_features: int,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of ``int4_tiles``: ``(codes, scales, zeros)`` of the first ``out_features`` rows, scales in ``dtype``."""
    Nt, groups, chunks, _ = tiles.shape
    codes = tiles.view(Nt, groups, chunks, TILE, 4).permute(0, 3, 1, 2, 4).reshape(Nt * TILE, groups * chunks * 4)
    scales, zeros = sz.permute(2, 0, 3, 1).reshape(2, Nt * TILE, groups).to(dtype)
    return codes[:out_features], scales[:out_features], zeros[:out_features]


# ----------------------------------------------------------------------------- the product
def int4_tiles_linear(x: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, group_size: int,
                      out_features: int) -> torch.Tensor:
    """``x @ W.T`` for x (…, Kp) (Kp: the stored inputs, padding included) and W in tiles: (…, N) in x's dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    isa = native_isa("int4")  # (loads the extension: the operator exists after this)
    out = torch.ops.codellama_native.int4_tiles_linear(x2.contiguous(), tiles, sz, group_size, out_features, isa)
    return out.to(x.dtype).view(*x.shape[:-1], out_features)


def int4_tiles_reference(x: torch.Tensor, tiles: torch.Tensor, sz: torch.Tensor, group_size: int,
                         out_features: int) -> torch.Tensor:
    """``int4_tiles_linear`` in PyTorch: the same quantized activations and integer sums (float64 accumulation)."""
    G, H = group_size, group_size // 2
    K = x.shape[-1]
    xf = x.reshape(-1, K).float()
    halves = xf.view(-1, K // H, H)  # (M, K/H, H)
    amax = halves.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    a = (halves * inv).round()  # (M, K/H, H) integers in [-127, 127]
    d = amax / 127
    codes, scales, zeros = untile_int4(tiles, sz, out_features, torch.float64)
    q = torch.cat((codes.view(-1, K // G, H) & 15, codes.view(-1, K // G, H) >> 4), dim=-1)  # (N, K/G, G)
    q = (q.double() - 8).view(-1, K // H, H)  # (N, K/H, H): each half group's codes
    dots = torch.einsum("mhk,nhk->mnh", a.double(), q)  # exact integer sums per half group
    per_half = dots * d.double().squeeze(-1).unsqueeze(1)  # (M, N, K/H)
    per_group = per_half.view(per_half.shape[0], -1, K // G, 2).sum(-1)  # (M, N, K/G)
    sumx = xf.double().view(-1, K // G, G).sum(-1)  # (M, K/G)
    out = (per_group * scales).sum(-1) + sumx @ zeros.T
    return out.to(x.dtype).view(*x.shape[:-1], out_features)

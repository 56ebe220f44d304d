"""int8 weights multiplied where they lie with int8-quantized activations (``tiles.cpp``), as llama.cpp's Q8_0.

    y = int8_rows_linear(x, codes, scales)    # x (…, K), codes (N, K) int8 with contiguous rows, scales (N,)

The codes are read in the checkpoint's own row-major layout, so a layer can stay a view of the memory-mapped
file: loading a pre-quantized checkpoint makes no copy. Each call quantizes x per block of 32 inputs
(``x ≈ d·a``, ``a`` int8, ``d = max|x|/127``), sums ``Σ q·a`` per block in int32 and ``s · Σ_blocks d · Σ q·a``
in float32 (``int8_rows_reference`` is the same arithmetic in PyTorch). Up to 8 rows of x (decoding) stream
each weight row once; more rows (prefill) pack 16 weight rows at a time into a tile in cache and reuse it for
every row of x. The activations' rounding, at most half a step of 1/127 of their block's largest value, is
of the order of the weights' own (1/127 of their row's largest); the tests bound it in float64.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import native_isa

BLOCK = 32  # activations quantized per this many inputs (llama.cpp's Q8_0 block)


def int8_rows_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (scales · codes).T`` for x (…, K), int8 codes (N, K) with contiguous rows and scales (N,): (…, N) in
    x's dtype."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.float32, torch.bfloat16):
        x2 = x2.float()
    if scales.dtype not in (torch.float32, torch.bfloat16):
        scales = scales.float()
    isa = native_isa("int8")  # (loads the extension: the operator exists after this)
    out = torch.ops.codellama_native.int8_rows_linear(x2.contiguous(), codes, scales.contiguous(), isa)
    return out.to(x.dtype).view(*x.shape[:-1], codes.shape[0])


def quantize_int8(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``codellama.quantize.quantize_int8(w, w.dtype)`` in one pass over a (N, K) CPU weight with contiguous rows,
    float32, bfloat16 or float16: ``(codes, scales)``, bit for bit the same (tested), without its float32
    temporaries (about 14× faster on a 7B's bf16 weights here)."""
    return tuple(torch.ops.codellama_native.quantize_int8(w, native_isa("int8")))


def int8_rows_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``int8_rows_linear`` in PyTorch: the same quantized activations and integer sums (float64 accumulation)."""
    K = x.shape[-1]
    N = codes.shape[0]
    Kp = -(-K // BLOCK) * BLOCK
    xf = torch.nn.functional.pad(x.reshape(-1, K).float(), (0, Kp - K))
    blocks = xf.view(-1, Kp // BLOCK, BLOCK)  # (M, Kp/B, B)
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    a = (blocks * inv).round()  # integers in [-127, 127]
    d = (amax / 127).squeeze(-1).double()  # (M, Kp/B)
    q = torch.nn.functional.pad(codes.double(), (0, Kp - K)).view(N, Kp // BLOCK, BLOCK)
    dots = torch.einsum("mbk,nbk->mnb", a.double(), q)  # exact integer sums per block
    out = (dots * d.unsqueeze(1)).sum(-1) * scales.double()
    return out.to(x.dtype).view(*x.shape[:-1], N)

"""A few rows × a bf16 weight read in place (``bf16_rows.cpp``): the matrix–vector products of decoding.

    y = bf16_rows_linear(x, weight)     # x (…, K), weight (N, K) bf16 with contiguous rows → (…, N)

Each output is one weight row's dot product with one activation row (bf16 products, float32 sums), so the
weight keeps the checkpoint's own layout: it can stay a view of the memory-mapped file, and loading it costs
no copy. ``bf16_rows_reference`` computes the same in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native_isa, ops


def bf16_all_finite(t: torch.Tensor) -> bool:
    """Whether a contiguous bf16 tensor holds no NaN or infinity (one pass over its bits, both cores)."""
    return bool(ops().bf16_all_finite(t))


def bf16_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` for x (…, K) and a (N, K) bf16 weight: (…, N) in x's dtype (bf16 products, float32 sums)."""
    K = x.shape[-1]
    isa = native_isa("bf16")  # (loads the extension: the operator exists after this)
    x2 = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    bf16_out = x.dtype == torch.bfloat16  # (the kernel rounds its sums as .to(bf16) would: no separate pass)
    out = torch.ops.codellama_native.bf16_rows_linear(x2, weight, isa, 0, torch.bfloat16 if bf16_out else None)
    return (out if bf16_out else out.to(x.dtype)).view(*x.shape[:-1], weight.shape[0])


def bf16_rows_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``bf16_rows_linear`` in PyTorch: bf16 inputs and weights, sums in float64."""
    return F.linear(x.to(torch.bfloat16).double(), weight.double()).to(x.dtype)

"""Fused RMSNorm: one read of x, one write of the result, statistics in float32.

    out = (x * rsqrt(mean(x², -1) + eps)).type_as(x) * weight

Bytes moved: N·D·(size(x) + size(out)) + D·size(weight) for x viewed as N rows of D. PyTorch's eager
version reads x three times and writes four intermediates; this kernel is memory-bound at one pass.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, device_problem, dtype_problem

MAX_DIM = 65536  # one program holds a whole row in registers


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch reference: x (..., D), weight (D,) → (..., D) in ``promote(x.dtype, weight.dtype)``.

    Statistics in float32 (float64 when x is float64), the normalised x cast back to x's dtype before
    the weight is applied, as Meta's RMSNorm does.
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _rms_norm_kernel(
    X, W, Out,  # X, Out: (N, D) rows, row strides below; W: (D,)
    n_rows, D, eps,
    stride_xn, stride_on,
    BLOCK_D: tl.constexpr,  # next power of two ≥ D: a whole row per program row
    ROWS: tl.constexpr,  # rows per program (several short rows share one program)
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # N·D may pass 2³¹ for long prompts
    x = tl.load(X + rows64[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)  # (ROWS, BLOCK_D)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / D + eps)  # (ROWS,) float32; padding adds zeros
    normed = (xf * rstd[:, None]).to(x.dtype)  # type_as(x), as the reference rounds here
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
    out = normed.to(tl.float32) * w[None, :]  # the product rounds once, into out's dtype
    tl.store(Out + rows64[:, None] * stride_on + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher
def rms_norm_problem(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "x and weight must be tensors"
    problem = dtype_problem("x", x) or dtype_problem("weight", weight, FLOAT_DTYPES)
    if problem:
        return problem
    if x.dim() == 0 or weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        return f"weight must have shape (D,) with D = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    if not 1 <= weight.shape[0] <= MAX_DIM:
        return f"the normalised dimension must be 1 … {MAX_DIM}, got {weight.shape[0]}"
    if not x.is_contiguous() or not weight.is_contiguous():
        return "x and weight must be contiguous (call .contiguous())"
    if not (isinstance(eps, (int, float)) and eps > 0):
        return f"eps must be a positive number, got {eps!r}"
    return device_problem(x, weight)


def rms_norm_config(D: int) -> Tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): a whole row per program row, ≥ 2K elements per program, ~16 per thread."""
    BLOCK_D = triton.next_power_of_2(D)
    rows = max(1, min(16, 2048 // BLOCK_D))
    return BLOCK_D, rows, max(1, min(16, rows * BLOCK_D // 512))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Fused RMSNorm of x (..., D) with weight (D,), statistics in float32.

    Returns (..., D) in ``torch.promote_types(x.dtype, weight.dtype)``, equal to ``rms_norm_reference``.
    Raises ``ValueError`` naming the problem for inputs the kernel cannot take.
    """
    problem = rms_norm_problem(x, weight, eps)
    if problem:
        raise ValueError(f"rms_norm: {problem}")
    return launch_rms_norm(x, weight, eps)


def launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Launch without checks (the caller ran ``rms_norm_problem``)."""
    D = x.shape[-1]
    x2 = x.view(-1, D)  # (N, D)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out
    BLOCK_D, ROWS, num_warps = rms_norm_config(D)
    grid = (triton.cdiv(n_rows, ROWS),)
    _rms_norm_kernel[grid](x2, weight, out, n_rows, D, float(eps), x2.stride(0), D,
                           BLOCK_D=BLOCK_D, ROWS=ROWS, num_warps=num_warps)
    return out

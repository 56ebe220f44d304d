"""Fused rotary position embedding (Meta's interleaved pairs) on q and k in one launch.

Pair i of a head, ``(x[2i], x[2i+1])``, turns by the angle of its position and frequency:

    out[2i]   = x[2i] · cos_i − x[2i+1] · sin_i
    out[2i+1] = x[2i] · sin_i + x[2i+1] · cos_i

with cos/sin given in float32 (angles of long positions need float32) and the math in float32.
Bytes moved: read and write q and k once, read cos/sin once per token (shared by all heads).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import device_problem, head_tensor_problem

MAX_HEAD_DIM = 1024


# ----------------------------------------------------------------------------- reference
def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference: q (B, T, H, hd), k (B, T, Hkv, hd), cos/sin (B|1, T, hd/2) → rotated (q, k).

    Math in float32 (float64 for float64 inputs); results in the inputs' dtypes.
    """
    def rotate(x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        pairs = x.to(ct).unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        c, s = cos.to(ct).unsqueeze(2), sin.to(ct).unsqueeze(2)  # (B|1, T, 1, hd/2)
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)

    return rotate(q), rotate(k)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _rotate_heads(X, Out, stride_xh, stride_oh, n_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rotate all heads of one token: X, Out point at head 0; cos/sin (BLOCK_P,) float32."""
    offs_d = tl.arange(0, 2 * BLOCK_P)  # (2·BLOCK_P,) element index within a head
    d_ok = offs_d < 2 * HALF
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)  # (BLOCK_H,)
        mask = (heads < n_heads)[:, None] & d_ok[None, :]
        x = tl.load(X + heads[:, None] * stride_xh + offs_d[None, :], mask=mask, other=0.0)  # (BLOCK_H, 2·BLOCK_P)
        # Consecutive elements (2i, 2i+1) form pair i: split the last axis into (pair, 2).
        x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_H, BLOCK_P, 2)))  # (BLOCK_H, BLOCK_P) each
        o0 = x0 * cos[None, :] - x1 * sin[None, :]
        o1 = x0 * sin[None, :] + x1 * cos[None, :]
        out = tl.reshape(tl.join(o0, o1), (BLOCK_H, 2 * BLOCK_P))  # pairs back in place
        tl.store(Out + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, Cos, Sin, QOut, KOut,  # Q/QOut (B, T, H, hd), K/KOut (B, T, Hkv, hd), Cos/Sin (B|1, T, hd/2)
    T, H, HKV,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh,
    stride_kob, stride_kot, stride_koh,
    stride_cb, stride_ct,  # stride_cb is 0 when cos/sin are shared by the batch
    HALF: tl.constexpr,  # hd / 2 pairs per head
    BLOCK_P: tl.constexpr,  # next power of two ≥ HALF
    BLOCK_H: tl.constexpr,  # heads per step
):
    # One program per token (b, t): cos/sin are loaded once and applied to all H + Hkv heads.
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = (pid % T).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    p_ok = offs_p < HALF
    cos = tl.load(Cos + b * stride_cb + t * stride_ct + offs_p, mask=p_ok, other=0.0).to(tl.float32)
    sin = tl.load(Sin + b * stride_cb + t * stride_ct + offs_p, mask=p_ok, other=0.0).to(tl.float32)
    _rotate_heads(Q + b * stride_qb + t * stride_qt, QOut + b * stride_qob + t * stride_qot,
                  stride_qh, stride_qoh, H, cos, sin, HALF, BLOCK_H, BLOCK_P)
    _rotate_heads(K + b * stride_kb + t * stride_kt, KOut + b * stride_kob + t * stride_kot,
                  stride_kh, stride_koh, HKV, cos, sin, HALF, BLOCK_H, BLOCK_P)


# ----------------------------------------------------------------------------- launcher
def rotary_problem(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None."""
    for name, t in (("q", q), ("k", k)):
        problem = head_tensor_problem(name, t, "B, T, heads")
        if problem:
            return problem
    B, T, _, hd = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != hd:
        return f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)} (B, T and head_dim must agree)"
    if hd % 2 or not 2 <= hd <= MAX_HEAD_DIM:
        return f"head_dim must be even and 2 … {MAX_HEAD_DIM}, got {hd}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            return f"{name} must be float32 (angles of long positions need it), got {t.dtype}"
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != T or t.shape[2] != hd // 2:
            return f"{name} must have shape ({B} or 1, {T}, {hd // 2}), got {tuple(t.shape)}"
        if t.stride(-1) != 1:
            return f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        return f"cos and sin must have the same shape and strides, got {tuple(cos.shape)} and {tuple(sin.shape)}"
    return device_problem(q, k, cos, sin)


def rotary_config(H: int, Hkv: int, head_dim: int) -> Tuple[int, int, int]:
    """(BLOCK_P, BLOCK_H, num_warps): pairs per head (padded to a power of two), heads per step (~2K elements)."""
    BLOCK_P = triton.next_power_of_2(head_dim // 2)
    BLOCK_H = max(1, min(triton.next_power_of_2(max(H, Hkv)), 2048 // (2 * BLOCK_P)))
    return BLOCK_P, BLOCK_H, max(1, min(8, BLOCK_H * 2 * BLOCK_P // 256))


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, hd) and k (B, T, Hkv, hd) by cos/sin (B|1, T, hd/2) float32, in one launch.

    q and k may be strided views (the last dimension contiguous). Returns new contiguous tensors of
    the same shapes and dtypes, equal to ``rotary_reference``. Raises ``ValueError`` naming the problem.
    """
    problem = rotary_problem(q, k, cos, sin)
    if problem:
        raise ValueError(f"rotary: {problem}")
    return launch_rotary(q, k, cos, sin)


def launch_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch without checks (the caller ran ``rotary_problem``)."""
    B, T, H, hd = q.shape
    Hkv = k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T == 0:
        return q_out, k_out
    BLOCK_P, BLOCK_H, num_warps = rotary_config(H, Hkv, hd)
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    _rope_kernel[(B * T,)](
        q, k, cos, sin, q_out, k_out, T, H, Hkv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        stride_cb, cos.stride(1),
        HALF=hd // 2, BLOCK_P=BLOCK_P, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    return q_out, k_out

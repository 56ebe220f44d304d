"""Flash attention forward for prefill: causal, grouped-query, over a KV cache, any length.

Queries of row b sit at positions ``start_pos[b] + arange(T)`` and attend keys ``0 … start_pos[b]+T-1``
of the row's cache, so a prompt fed in chunks attends what it would attend fed at once. Grouped-query
attention reads query head h's keys from kv head ``h // (H / Hkv)`` directly: no ``repeat_kv`` copy.

One program computes a BLOCK_M tile of queries of one (row, head), streaming BLOCK_N keys at a time
with the online softmax (running max ``m``, running sum ``l``, float32 accumulator), so the T × L score
matrix never exists. Scores use base 2 (``exp2``), with ``log2(e) / sqrt(hd)`` folded into one scale.

    FLOPs (causal, start_pos 0): 2 · 2 · B · H · T² / 2 · hd        bytes: q, out once; k, v once per query tile
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import StartPos, attention_problem, interpreting

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos,
                        sm_scale: Optional[float] = None) -> torch.Tensor:
    """PyTorch reference: q (B, H, T, hd) at positions ``start_pos + arange(T)``, k/v (B, Hkv, L, hd) → (B, H, T, hd).

    Row b's query t sees keys ``0 … start_pos[b] + t``; the softmax runs in float32 (float64 for float64
    inputs). Grouped-query attention by viewing q as (B, Hkv, H/Hkv · T, hd): no copies of k/v.
    """
    B, H, T, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    scale = hd ** -0.5 if sm_scale is None else sm_scale
    qg = q.to(ct).reshape(B, Hkv, (H // Hkv) * T, hd)  # (B, Hkv, rep·T, hd), rows ordered (rep, t)
    scores = qg @ k.to(ct).transpose(-1, -2) * scale  # (B, Hkv, rep·T, L)
    starts = torch.as_tensor(start_pos, device=q.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
    q_pos = starts + torch.arange(T, device=q.device).view(1, T, 1)  # (B|1, T, 1)
    visible = torch.arange(L, device=q.device).view(1, 1, L) <= q_pos  # (B|1, T, L)
    visible = visible.repeat(1, H // Hkv, 1).unsqueeze(1)  # (B|1, 1, rep·T, L)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    # Slots past a row's end may hold anything (even NaN, and 0 · NaN = NaN): zero them before the product.
    in_row = (torch.arange(L, device=q.device).view(1, L) < starts.view(-1, 1) + T).view(-1, 1, L, 1)  # (B|1, 1, L, 1)
    return (probs @ v.to(ct).masked_fill(~in_row, 0.0)).view(B, H, T, hd).to(q.dtype)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _attend_range(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, hi, q_pos, kv_end, qk_scale, offs_d, d_ok,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PAD_D: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Fold keys ``lo … hi-1`` (``lo`` a multiple of BLOCK_N) into the online softmax of the query tile q.

    q: (BLOCK_M, BLOCK_D); acc (BLOCK_M, BLOCK_D), l_i and m_i (BLOCK_M,) float32, returned updated.
    MASKED: keys past ``q_pos`` (causal) or at/after ``kv_end`` (the row's end) are hidden and never read;
    without it every key of the range is visible to every query (blocks left of the diagonal).
    PAD_D: head_dim is narrower than the tile (BLOCK_D), so the padding columns are masked (read as 0).
    """
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
        n_ok = offs_n < kv_end
        k_ptrs = K + offs_n[:, None] * stride_kn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        else:  # unmasked, so the loads vectorise
            k = tl.load(k_ptrs)
        if UPCAST:  # Triton's interpreter mis-multiplies bf16 tiles: multiply in float32 there
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays at zero
        p = tl.exp2(qk - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :]
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        elif PAD_D:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)  # float32 accumulator
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_attn_fwd_kernel(
    Q, K, V, Out, StartPos,  # Q (B, H, T, hd), K/V (B, Hkv, L, hd), Out (B, H, T, hd), StartPos (B,) if PER_ROW
    start_pos, qk_scale, T, L, H,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    GROUP: tl.constexpr,  # H / Hkv query heads per kv head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # max(16, next power of two ≥ HEAD_DIM)
    PER_ROW: tl.constexpr,  # start positions come from StartPos (else the scalar start_pos)
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Later query tiles see more keys: launch them first so the last wave is short.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    if PER_ROW:
        start = tl.load(StartPos + b).to(tl.int32)
    else:
        start = start_pos
    kv_end = tl.minimum(start + T, L)  # keys at or past the row's end are other rows' garbage (never read)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query index in this call
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q_pos = start + offs_m  # absolute positions of the queries
    b64 = b.to(tl.int64)  # cache offsets pass 2³¹ at long lengths
    q_ptrs = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)

    # Stage 1: keys 0 … start+m0 are visible to every query of the tile: whole blocks, no mask.
    first_q = start + pid_m * BLOCK_M
    n_full = tl.minimum((first_q + 1) // BLOCK_N, kv_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, 0, n_full, q_pos, kv_end, qk_scale,
                                  offs_d, d_ok, BLOCK_N, False, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    # Stage 2: the diagonal blocks and the ragged tail, masked.
    n_end = tl.minimum(first_q + BLOCK_M, kv_end)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, n_full, n_end, q_pos, kv_end, qk_scale,
                                  offs_d, d_ok, BLOCK_N, True, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launcher
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (16-bit inputs?, head_dim bucket). Chosen from sm_90 and sm_80
# compile statistics (no register spills, shared memory within an A100's 163 KB), not from timings: no GPU
# was lent when they were picked. `benchmarks/bench_attention.py --sweep` times the alternatives.
FLASH_CONFIGS = {
    (True, 64): (128, 64, 8, 3), (True, 128): (128, 32, 8, 3), (True, 256): (32, 16, 4, 2),
    (False, 64): (32, 32, 4, 2), (False, 128): (32, 32, 4, 2), (False, 256): (16, 16, 4, 1),
}


def head_dim_bucket(head_dim: int) -> int:
    """The row of FLASH_CONFIGS / DECODE_CONFIGS for a head_dim: 64 (≤ 64), 128 or 256."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def flash_config(head_dim: int, T: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head_dim, query count and dtype.

    The interpreter takes small tiles so that the tests cross tile boundaries.
    """
    if interpreting():
        block_m, block_n, warps, stages = 32, 32, 4, 1
    else:
        block_m, block_n, warps, stages = FLASH_CONFIGS[(dtype != torch.float32, head_dim_bucket(head_dim))]
    # Few queries (chunked prefill of a short chunk): don't compute a mostly-empty 128-row tile.
    block_m = min(block_m, max(16, triton.next_power_of_2(T)))
    return block_m, block_n, warps, stages


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos = 0, *,
                    sm_scale: Optional[float] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
                    num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """Causal attention of q (B, H, T, hd) at positions ``start_pos + arange(T)`` over k/v (B, Hkv, L, hd).

    ``start_pos``: an int, or an integer tensor (B,) of per-row positions; row b attends its keys
    ``0 … start_pos[b]+T-1`` (L must cover every row: ``L ≥ start_pos[b] + T``; slots past a row's end are
    never read). q, k, v may be strided views (e.g. of a KV cache) with a contiguous last dimension;
    fp16, bf16 or fp32; any head_dim ≤ 256 (64 and 128 run without padding). Returns (B, H, T, hd) in
    q's dtype (a transposed view of a (B, T, H, hd) buffer, so merging heads afterwards is free).
    Block sizes and launch settings default to ``flash_config``. Raises ``ValueError`` naming the problem.
    """
    problem = attention_problem(q, k, v, start_pos)
    if problem:
        raise ValueError(f"flash_attention: {problem}")
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"flash_attention: {name} must be a power of two ≥ 16, got {value}")
    return launch_flash_attention(q, k, v, start_pos, sm_scale=sm_scale, block_m=block_m, block_n=block_n,
                                  num_warps=num_warps, num_stages=num_stages)


def launch_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos, *,
                           sm_scale: Optional[float] = None, block_m: Optional[int] = None, block_n: Optional[int] = None,
                           num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> torch.Tensor:
    """Launch without checks (the caller ran ``attention_problem``)."""
    B, H, T, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    cfg = flash_config(hd, T, q.dtype)
    BLOCK_M, BLOCK_N = block_m or cfg[0], block_n or cfg[1]
    warps, stages = num_warps or cfg[2], num_stages or cfg[3]
    out = torch.empty((B, T, H, hd), dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, T, hd) view
    per_row = isinstance(start_pos, torch.Tensor)
    qk_scale = (hd ** -0.5 if sm_scale is None else sm_scale) * LOG2E
    interp = interpreting()
    grid = (triton.cdiv(T, BLOCK_M), B * H)
    _flash_attn_fwd_kernel[grid](
        q, k, v, out, start_pos if per_row else q,  # an unused pointer when start_pos is an int
        0 if per_row else start_pos, qk_scale, T, L, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=H // Hkv, HEAD_DIM=hd, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(hd)), PER_ROW=per_row,
        UPCAST=interp and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no silent TF32 rounding
        num_warps=warps, num_stages=stages,
    )
    return out

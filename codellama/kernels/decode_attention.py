"""Flash-decoding: attention of one new query per row over the row's cached keys, split across programs.

At batch 1 a decode step has only ``Hkv`` (row, kv head) pairs, far fewer than a GPU's SMs, and each
must stream the whole cache. So the key sequence is cut into ``num_splits`` chunks: program
(b, kv head, split) attends its chunk for all ``H / Hkv`` query heads of the kv group at once (each k/v
tile is read once for the group), and writes a partial output with its log-sum-exp. A second small
kernel combines the partials: ``out = Σ_s exp(lse_s − lse) · out_s`` with ``lse = log Σ_s exp(lse_s)``.

Row b attends keys ``0 … start_pos[b]`` (its **current** length, not the cache size): chunks past a
row's end exit at once, so rows of different lengths share a batch without reading garbage.

    bytes: 2 · Σ_b len_b · Hkv · hd · size(k)  (k and v once)  +  q, out and the small fp32 partials
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import StartPos, attention_problem, interpreting, sm_count
from .flash_attention import LOG2E, _attend_range, attention_reference, head_dim_bucket

MAX_SPLITS = 128


# ----------------------------------------------------------------------------- reference
def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor:
    """PyTorch reference: q (B, H, 1, hd) at ``start_pos``, k/v (B, Hkv, L, hd) → (B, H, 1, hd); keys 0 … start_pos[b]."""
    return attention_reference(q, k, v, start_pos)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _decode_split_kernel(
    Q, K, V, StartPos, OutPart, LsePart,  # Q (B, H, hd) rows; K/V (B, Hkv, L, hd); OutPart (B, H, S, hd); LsePart (B, H, S)
    start_pos, qk_scale, chunk, L,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_ps,  # OutPart strides (last dim contiguous)
    stride_lb, stride_lh,  # LsePart strides (split dim contiguous)
    GROUP: tl.constexpr,  # query heads per kv head
    BLOCK_G: tl.constexpr,  # max(16, next power of two ≥ GROUP): the query tile's rows (tl.dot needs 16)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PER_ROW: tl.constexpr,  # start positions come from StartPos (else the scalar start_pos)
    DIRECT: tl.constexpr,  # one split: OutPart is the final output (B, H, hd) and no lse is written
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if PER_ROW:
        start = tl.load(StartPos + b).to(tl.int32)
    else:
        start = start_pos
    length = tl.minimum(start + 1, L)  # keys 0 … start
    lo = split * chunk  # this program's keys: lo … hi-1 (chunk is a multiple of BLOCK_N)
    hi = tl.minimum(lo + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,) query head within the group
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = (kvh * GROUP + offs_g).to(tl.int64)  # (BLOCK_G,) query heads of this kv group
    b64 = b.to(tl.int64)  # cache offsets pass 2³¹ at long lengths
    q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    K += b64 * stride_kb + kvh.to(tl.int64) * stride_kh
    V += b64 * stride_vb + kvh.to(tl.int64) * stride_vh

    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    q_pos = tl.zeros((BLOCK_G,), dtype=tl.int32) + start  # every query of the row sits at `start`
    # Whole blocks without a mask, then the chunk's ragged end (the row's last block) with one.
    n_full = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, lo, n_full, q_pos, hi, qk_scale,
                                  offs_d, d_ok, BLOCK_N, False, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    acc, l_i, m_i = _attend_range(acc, l_i, m_i, q, K, V, stride_kn, stride_vn, n_full, hi, q_pos, hi, qk_scale,
                                  offs_d, d_ok, BLOCK_N, True, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)

    # An empty chunk (past the row's end) contributes lse = -inf and a zero output.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = g_ok[:, None] & d_ok[None, :]
    tl.store(OutPart + b64 * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
             out.to(OutPart.dtype.element_ty), mask=mask)
    if not DIRECT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))  # log2 units, like the scores
        tl.store(LsePart + b64 * stride_lb + heads * stride_lh + split, lse, mask=g_ok)


@triton.jit
def _decode_combine_kernel(
    OutPart, LsePart, Out,  # OutPart (B, H, S, hd) fp32, LsePart (B, H, S) fp32, Out (B, H, hd) rows
    H, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program
    BLOCK_S: tl.constexpr,  # next power of two ≥ num_splits
):
    b = tl.program_id(0).to(tl.int64)
    heads = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)  # (BLOCK_H,)
    h_ok = heads < H
    offs_s = tl.arange(0, BLOCK_S)
    lse_base = LsePart + b * stride_lb + heads * stride_lh  # (BLOCK_H,) pointers to split 0
    lse = tl.load(lse_base[:, None] + offs_s[None, :], mask=h_ok[:, None] & (offs_s < num_splits)[None, :],
                  other=float("-inf"))  # (BLOCK_H, BLOCK_S)
    lse_max = tl.max(lse, 1)  # (BLOCK_H,) finite: split 0 always holds key 0
    lse_max = tl.where(h_ok, lse_max, 0.0)
    denom = tl.sum(tl.exp2(lse - lse_max[:, None]), 1)  # (BLOCK_H,)

    offs_d = tl.arange(0, BLOCK_D)
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    part_base = OutPart + b * stride_pb + heads[:, None] * stride_ph + offs_d[None, :]  # (BLOCK_H, BLOCK_D)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for s in range(0, num_splits):  # out = Σ_s 2^(lse_s − max) · out_s / Σ_s 2^(lse_s − max)
        w = tl.exp2(tl.load(lse_base + s, mask=h_ok, other=float("-inf")) - lse_max)  # (BLOCK_H,) 0 if empty
        acc += w[:, None] * tl.load(part_base + s * stride_ps, mask=mask, other=0.0)
    out = acc / tl.where(h_ok, denom, 1.0)[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher
# (BLOCK_N, num_warps, num_stages) by (16-bit inputs?, head_dim bucket), chosen like FLASH_CONFIGS (from
# compile statistics: no spills on sm_90 and sm_80; untimed).
DECODE_CONFIGS = {
    (True, 64): (64, 8, 3), (True, 128): (64, 8, 3), (True, 256): (32, 8, 2),
    (False, 64): (16, 4, 2), (False, 128): (16, 4, 2), (False, 256): (16, 4, 2),
}
MIN_KEYS_PER_SPLIT = 256


def decode_config(batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype,
                  device: torch.device) -> Tuple[int, int, int, int]:
    """(num_splits, BLOCK_N, num_warps, num_stages) for a decode step over up to ``length`` cached keys.

    On a GPU: enough (row, kv head, split) programs for about four per SM, each split at least 256 keys.
    In the interpreter: at most 4 splits of 32-key blocks, so tests cross both boundaries cheaply.
    """
    if interpreting():
        block_n = 32
        return max(1, min(4, triton.cdiv(length, block_n))), block_n, 4, 1
    block_n, warps, stages = DECODE_CONFIGS[(dtype != torch.float32, head_dim_bucket(head_dim))]
    index = device.index if device.index is not None else torch.cuda.current_device()
    want = triton.cdiv(4 * sm_count(index), batch * kv_heads)
    splits = max(1, min(want, triton.cdiv(length, MIN_KEYS_PER_SPLIT), MAX_SPLITS))
    return splits, block_n, warps, stages


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos, *,
                     sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                     block_n: Optional[int] = None, num_warps: Optional[int] = None,
                     num_stages: Optional[int] = None) -> torch.Tensor:
    """Attention of one query per row, q (B, H, 1, hd) at position ``start_pos[b]``, over k/v (B, Hkv, L, hd).

    Row b attends keys ``0 … start_pos[b]`` (``start_pos``: an int, or an integer tensor (B,) for rows of
    different lengths; L ≥ every row's ``start_pos + 1``). k/v may be strided views of a KV cache
    with a contiguous last dimension; fp16, bf16 or fp32; any head_dim ≤ 256. The key sequence is split
    into ``num_splits`` chunks (default from ``decode_config``) combined by log-sum-exp.
    Returns (B, H, 1, hd) in q's dtype. Raises ``ValueError`` naming the problem.
    """
    problem = attention_problem(q, k, v, start_pos)
    if problem:
        raise ValueError(f"decode_attention: {problem}")
    if q.shape[2] != 1:
        raise ValueError(f"decode_attention: q must hold one query per row (B, H, 1, hd), got shape {tuple(q.shape)}; "
                         "use flash_attention for longer queries")
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be 1 … {MAX_SPLITS}, got {num_splits}")
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"decode_attention: block_n must be a power of two ≥ 16, got {block_n}")
    return launch_decode_attention(q, k, v, start_pos, sm_scale=sm_scale, num_splits=num_splits, block_n=block_n,
                                   num_warps=num_warps, num_stages=num_stages)


def launch_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos, *,
                            sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                            block_n: Optional[int] = None, num_warps: Optional[int] = None,
                            num_stages: Optional[int] = None) -> torch.Tensor:
    """Launch without checks (the caller ran ``attention_problem`` and q has T == 1)."""
    B, H, _, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    cfg = decode_config(B, Hkv, L, hd, q.dtype, q.device)
    BLOCK_N = block_n or cfg[1]
    splits = num_splits or cfg[0]
    # Keys per split, a multiple of BLOCK_N; sized by L (the longest row) so no device→host sync is needed.
    chunk = triton.cdiv(triton.cdiv(L, splits), BLOCK_N) * BLOCK_N
    splits = triton.cdiv(L, chunk)  # drop splits that would start past L
    group = H // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(hd))
    interp = interpreting()

    q3 = q[:, :, 0]  # (B, H, hd) view
    out = torch.empty((B, 1, H, hd), dtype=q.dtype, device=q.device)  # returned as a (B, H, 1, hd) view
    direct = splits == 1
    if direct:  # the split kernel writes the answer itself: OutPart := out, viewed as (B, H, 1, hd)
        out_part, lse_part = out.transpose(1, 2), out
    else:
        out_part = torch.empty((B, H, splits, hd), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B, H, splits), dtype=torch.float32, device=q.device)
    per_row = isinstance(start_pos, torch.Tensor)
    qk_scale = (hd ** -0.5 if sm_scale is None else sm_scale) * LOG2E
    _decode_split_kernel[(B, Hkv, splits)](
        q3, k, v, start_pos if per_row else q3, out_part, lse_part,  # unused pointers where not needed
        0 if per_row else start_pos, qk_scale, chunk, L,
        q3.stride(0), q3.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd, BLOCK_D=BLOCK_D,
        BLOCK_N=BLOCK_N, PER_ROW=per_row, DIRECT=direct, UPCAST=interp and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 inputs: no silent TF32 rounding
        num_warps=num_warps or cfg[2], num_stages=num_stages or cfg[3],
    )
    if direct:
        return out.transpose(1, 2)
    BLOCK_H = min(16, triton.next_power_of_2(H))
    _decode_combine_kernel[(B, triton.cdiv(H, BLOCK_H))](
        out_part, lse_part, out, H, splits,
        out_part.stride(0), out_part.stride(1), out_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(2),
        HEAD_DIM=hd, BLOCK_D=BLOCK_D, BLOCK_H=BLOCK_H, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
    )
    return out.transpose(1, 2)

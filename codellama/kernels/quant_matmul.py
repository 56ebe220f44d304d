"""Weight-only int8 / int4 matrix multiplication: ``x @ W.T`` reading the integer codes, never a float W.

    int8:  W[n, k] = scales[n] · q[n, k]                                q int8 (N, K)
    int4:  W[n, k] = scales[n, g] · (q[n, k] − 8) + zeros[n, g]         q 0…15, two a byte (N, Kp/2), g = k // G

(the layouts of ``codellama.quantize``: in each int4 group, byte ``j`` holds inputs ``j`` and ``j + G/2``;
``Kp`` is K rounded up to whole groups). Each program computes a (BLOCK_M, BLOCK_N) tile of the output,
walking K: it loads a tile of codes, turns it into the activations' dtype in registers (int4: with its
group's scale and zero per row, each nibble plane multiplying its own contiguous half of the group's
activations), and accumulates ``tl.dot`` in float32. int8's per-row scale is applied once, at the end. A
decode step (M = 1 … 16 rows) is memory-bound: it reads each code once.

    bytes: N·K (int8) or N·Kp/2 + 2·N·Kp/G·size(scale) (int4)  +  M·K·size(x)  +  M·N·size(out)

The PyTorch references dequantize W and multiply; tests compare the kernel with them in float64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, device_problem, dtype_problem, interpreting


# ----------------------------------------------------------------------------- references
def int8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (…, K) @ (scales[:, None] · weight).T → (…, N), computed in x's dtype."""
    return x @ (weight.to(x.dtype) * scales.to(x.dtype).unsqueeze(1)).T


def int4_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """x (…, K) @ W.T for W = scales · (q − 8) + zeros by group, K ≤ the stored inputs; computed in x's dtype."""
    groups = weight.unflatten(1, (-1, group_size // 2))  # (N, G, group/2): low nibbles, then high nibbles
    codes = torch.cat((groups & 15, groups >> 4), dim=-1).to(x.dtype) - 8  # (N, G, group)
    w = (codes * scales.to(x.dtype).unsqueeze(-1) + zeros.to(x.dtype).unsqueeze(-1)).flatten(1)  # (N, Kp)
    return x @ w[:, :x.shape[-1]].T


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _quant_matmul_kernel(
    X, W, Scales, Zeros, Out,  # X (M, K); W codes (N, K) int8 or (N, Kp/2) uint8; Scales (N,) or (N, G); Out (M, N)
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_om,
    INT4: tl.constexpr,
    GROUP: tl.constexpr,  # int4: inputs per group
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # inputs per step (int4: a divisor of GROUP; half from each nibble plane)
    UPCAST: tl.constexpr,  # multiply in float32 (Triton's interpreter mis-multiplies bf16 tiles)
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1) row pointers
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if INT4:
        HALF: tl.constexpr = GROUP // 2  # bytes per group: byte j holds inputs j (low nibble) and j + HALF (high)
        STEP: tl.constexpr = BLOCK_K // 2  # bytes per step
        offs_b = tl.arange(0, STEP)
        for g in range(0, tl.cdiv(K, GROUP)):
            scale = tl.load(Scales + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            zero = tl.load(Zeros + offs_n * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            for j in tl.static_range(0, HALF, STEP):
                byte = g * HALF + j + offs_b  # (STEP,)
                packed = tl.load(w_rows + byte[None, :], mask=n_ok[:, None], other=0)  # (BLOCK_N, STEP) uint8
                k_lo = g * GROUP + j + offs_b  # the inputs of the low nibbles; the high ones are HALF further
                k_hi = k_lo + HALF
                x_lo = tl.load(x_rows + k_lo[None, :], mask=m_ok[:, None] & (k_lo < K)[None, :], other=0.0)
                x_hi = tl.load(x_rows + k_hi[None, :], mask=m_ok[:, None] & (k_hi < K)[None, :], other=0.0)
                if UPCAST:
                    x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
                w_lo = ((packed & 15).to(tl.float32) - 8) * scale + zero  # (BLOCK_N, STEP)
                acc = tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), acc, input_precision=PRECISION)
                w_hi = ((packed >> 4).to(tl.float32) - 8) * scale + zero
                acc = tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), acc, input_precision=PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            if UPCAST:
                x = x.to(tl.float32)
            q = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)  # (BLOCK_N, BLOCK_K) int8
            acc = tl.dot(x, tl.trans(q.to(x.dtype)), acc, input_precision=PRECISION)
        acc *= tl.load(Scales + offs_n * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- launchers
def quant_matmul_config(M: int, scheme: str, group_size: Optional[int]) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows.

    Decode (M ≤ 16) takes the smallest tile ``tl.dot`` allows in M and narrow N tiles, so a 4096-wide layer
    has enough programs for a GPU's SMs, and long K steps; prefill takes 64 × 64 tiles on 8 warps. Chosen
    from compile statistics (no register spills on sm_90 and sm_80, ``tests/test_quantize_kernels.py``),
    untimed: no GPU was available to tune them. The interpreter gets the smallest tiles, so tests cross
    every boundary cheaply.
    """
    group = group_size or 128
    if interpreting():
        return 16, 16, min(32, group), 1, 1
    if M <= 16:
        return 16, 32, 128 if scheme == "int8" else min(64, group), 4, 4
    return 64, 64, min(32, group), 8, 3


def _matmul_problem(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                    group_size: Optional[int]) -> Optional[str]:
    """Why the kernel cannot take these inputs, or None (shapes as in the module docstring)."""
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, scales)):
        return "x, weight and scales must be tensors"
    problem = dtype_problem("x", x) or dtype_problem("scales", scales, FLOAT_DTYPES)
    if problem:
        return problem
    if x.dim() == 0 or weight.dim() != 2:
        return f"x must be (…, K) and weight 2-D, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    N, K = weight.shape[0], x.shape[-1]
    if zeros is None:
        problem = dtype_problem("weight", weight, (torch.int8,))
        if problem:
            return problem
        if weight.shape[1] != K or scales.shape != (N,):
            return f"int8 needs weight (N, K) and scales (N,) for x (…, {K}); got weight {tuple(weight.shape)}, " \
                   f"scales {tuple(scales.shape)}"
    else:
        problem = dtype_problem("weight", weight, (torch.uint8,)) or dtype_problem("zeros", zeros, FLOAT_DTYPES)
        if problem:
            return problem
        if group_size not in (32, 64, 128, 256):
            return f"group_size must be 32, 64, 128 or 256, got {group_size!r}"
        groups = -(-K // group_size)
        if weight.shape[1] != groups * group_size // 2 or scales.shape != (N, groups) or zeros.shape != (N, groups):
            return (f"int4 needs weight (N, {groups * group_size // 2}) and scales/zeros (N, {groups}) for x (…, {K}) "
                    f"in groups of {group_size}; got weight {tuple(weight.shape)}, scales {tuple(scales.shape)}, "
                    f"zeros {tuple(zeros.shape)}")
    for name, t in (("weight", weight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.stride(-1) != 1:
            return f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
    return device_problem(*[t for t in (x, weight, scales, zeros) if t is not None])


def int8_matmul_problem(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> Optional[str]:
    return _matmul_problem(x, weight, scales, None, None)


def int4_matmul_problem(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int) -> Optional[str]:
    return _matmul_problem(x, weight, scales, zeros, group_size)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (scales · weight).T`` for x (…, K) fp16/bf16/fp32, int8 weight (N, K), scales (N,): (…, N) in x's dtype.

    Raises ``ValueError`` naming the problem for inputs the kernel cannot take.
    """
    problem = int8_matmul_problem(x, weight, scales)
    if problem:
        raise ValueError(f"int8_matmul: {problem}")
    return launch_quant_matmul(x, weight, scales, None, None)


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """``x @ W.T`` for x (…, K) and int4 codes (N, Kp/2) with scales and zeros (N, Kp/group_size): (…, N) in x's dtype.

    Raises ``ValueError`` naming the problem for inputs the kernel cannot take.
    """
    problem = int4_matmul_problem(x, weight, scales, zeros, group_size)
    if problem:
        raise ValueError(f"int4_matmul: {problem}")
    return launch_quant_matmul(x, weight, scales, zeros, group_size)


def launch_quant_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        group_size: Optional[int]) -> torch.Tensor:
    """Launch without checks (the caller ran ``int8_matmul_problem`` / ``int4_matmul_problem``)."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    int4 = zeros is not None
    BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = quant_matmul_config(M, "int4" if int4 else "int8", group_size)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _quant_matmul_kernel[grid](
        x2, weight, scales, zeros if int4 else scales, out,
        M, N, K,
        x2.stride(0), weight.stride(0), scales.stride(0), out.stride(0),
        INT4=int4, GROUP=group_size or BLOCK_K, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 inputs: no silent TF32 rounding
        num_warps=warps, num_stages=stages,
    )
    return out.view(*x.shape[:-1], N)

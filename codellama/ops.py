"""The seam for custom kernels: the three operations a backend may replace, and how one is chosen.

``Ops`` is the interface (RMSNorm, rotary embedding, causal attention); ``TorchOps`` is the PyTorch
implementation every other backend is measured against and falls back to; ``select_ops`` picks one for a
device. ``codellama.kernels.TritonOps`` implements the same interface with Triton kernels. Dependencies
point one way: the model and the kernels import this module; this module imports nothing of the library but
``cpu_kernels`` (the native CPU attention of decode steps and prompt chunks), and ``select_ops`` loads the
Triton side only when it is asked for, never at import time.

Shapes: B batch, T queries in this call, L attended length, H query heads, Hkv key/value heads, hd head dim.
"""

from __future__ import annotations

import threading
from typing import Optional, Protocol, Tuple, Union

import torch
import torch.nn.functional as F

from . import cpu_kernels

StartPos = Union[int, torch.Tensor]  # one position for the whole batch, or a LongTensor[B] (one per row)
ATTENTION_CHOICES = ("auto", "torch", "triton")


class Ops(Protocol):
    """What a kernel backend provides; every method has ``TorchOps``' semantics exactly."""

    name: str

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]: ...

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor: ...


class TorchOps:
    """The reference implementation of the three operations a kernel backend may replace."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., D), weight (D,). Statistics in float32 whatever the model dtype, as Meta does; scale after casting back."""
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return out.type_as(x) * weight

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Meta's interleaved-pair RoPE on q (B, T, H, hd) and k (B, T, Hkv, hd); cos/sin (B|1, T, hd/2) float32."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor:
        """Causal attention of queries at ``start_pos + arange(T)`` over keys ``0 … L-1``.

        q: (B, H, T, hd); k, v: (B, Hkv, L, hd) with L ≥ every row's ``start_pos + T``.
        Returns (B, H, T, hd). Key slots past a row's own end are masked out.
        """
        B, H, T, hd = q.shape
        Hkv, L = k.shape[1], k.shape[2]
        if T == 1 and q.device.type == "cpu" and q.dtype != torch.float32:
            if torch.compiler.is_compiling():
                return _decode_attention_sums(q, k, v, start_pos)
            native = _native_decode_attention(q, k, v, start_pos)
            if native is not None:
                return native
            # A CPU decode step: torch's SDPA is 3-7x faster in float32 than in bf16 here, copies included,
            # when the copies go to memory already mapped (``float_copies``).
            kf, vf = float_copies(k, v)
            return TorchOps.attention(q.float(), kf, vf, start_pos).to(q.dtype)
        if T > 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.compiler.is_compiling():
            native = _native_prefill_attention(q, k, v, start_pos)
            if native is not None:
                return native
        if isinstance(start_pos, int):
            if start_pos == 0 and L == T:  # plain causal self-attention: no mask tensor at all
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
            if T == 1 and L == start_pos + 1:  # decode step: every cached key is visible
                return _grouped_sdpa(q, k, v, None)
            if L == start_pos + T and q.device.type == "cpu" and _CPU_FLASH is not None:
                return _chunk_attention_cpu(q, k, v, start_pos)
        # General case (chunked prefill, ragged rows): a boolean mask of T × L per row.
        starts = torch.as_tensor(start_pos, device=q.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        q_pos = starts + torch.arange(T, device=q.device).view(1, T, 1)
        mask = torch.arange(L, device=q.device).view(1, 1, L) <= q_pos  # (B|1, T, L)
        return _grouped_sdpa(q, k, v, mask.unsqueeze(1))


def _native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             start_pos: StartPos) -> Optional[torch.Tensor]:
    """A CPU decode step over a bf16 cache with the native kernel (``cpu_kernels/attention.cpp``: the
    cache read in place, float32 sums), or None where it does not run (no AVX-512, another dtype or head size,
    a backward pass to come). The float32 copies it replaces wrote and read the cache's bytes twice more: at
    7B and 256 positions about a tenth of an int4 decode step."""
    B, H, _, hd = q.shape
    if (any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in (k, v)) or q.dtype != torch.bfloat16
            or hd not in (16, 32, 64, 128) or cpu_kernels.native_isa("bf16") != 2
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    lengths = torch.as_tensor(start_pos, dtype=torch.int64).reshape(-1).expand(B) + 1
    lengths = lengths.clamp(1, k.shape[2]).contiguous()  # (every key visible past the cache's end, as the mask)
    q2 = q.reshape(B, H, hd).contiguous()
    out = torch.ops.codellama_native.decode_attention_bf16(q2, k, v, lengths, hd ** -0.5)
    return out.to(q.dtype).view(B, H, 1, hd)


def _native_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              start_pos: StartPos) -> Optional[torch.Tensor]:
    """A CPU prompt chunk over a bf16 cache with the native kernel (``cpu_kernels/attention.cpp``: AVX-512 BF16
    dot products, blocks of 64 keys at absolute positions, so a prompt fed in chunks of any size gives the same
    bits), or None where it does not run (no AVX-512 BF16, another dtype or head size, a row whose queries
    pass the cache's end, a backward pass to come). torch's CPU flash attention, which it replaces, ran at a
    third of the machine's bf16 matrix-product rate: 45% of a 2,000-token prefill of the 194M model."""
    B, H, T, hd = q.shape
    if (any(t.dtype != torch.bfloat16 or t.stride(-1) != 1 for t in (q, k, v)) or hd not in (32, 64, 128)
            or cpu_kernels.native_isa("bf16") != 2
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    starts = torch.as_tensor(start_pos, dtype=torch.int64).reshape(-1).expand(B).contiguous()
    if int(starts.min()) < 0 or int(starts.max()) + T > k.shape[2]:
        return None
    return torch.ops.codellama_native.prefill_attention_bf16(q, k, v, starts, hd ** -0.5).to(q.dtype)


_scratch = threading.local()  # per thread: engines on different threads may decode at once


def float_copies(k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of a decode step's keys and values, written into buffers this thread keeps.

    A fresh tensor each layer and step would be fresh pages: the attended length grows by one every step, so
    glibc maps each new, slightly larger block anew and every page of it faults in: 4 layers of a 7B took
    130 ms a step at 2,048 positions that way and 49 ms this way (``benchmarks/bench_long_context.py``). The
    buffers are made half again as large as asked, grow the same way, and are kept while the thread lives:
    about 1.5 times one layer's keys and values of the longest row attended, in float32.
    """
    if k.requires_grad or v.requires_grad:  # (a backward pass needs copies of its own)
        return k.float(), v.float()
    buffers = getattr(_scratch, "buffers", None)
    need = k.numel() + v.numel()
    if buffers is None or buffers.numel() < need or buffers.device != k.device:
        size = max(need, buffers.numel() if buffers is not None and buffers.device == k.device else 0)
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode alike
            buffers = torch.empty(size * 3 // 2, dtype=torch.float32, device=k.device)
        _scratch.buffers = buffers
    kf = buffers[:k.numel()].view(k.shape).copy_(k)
    vf = buffers[k.numel():need].view(v.shape).copy_(v)
    return kf, vf


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA with grouped-query attention done by reshaping q, never by copying k/v per head."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # The `rep` query heads sharing one kv head become `rep * T` query rows of that kv head.
    qg = q.reshape(B, Hkv, rep * T, hd)  # (B, Hkv, rep*T, hd)
    if mask is not None:
        mask = mask.repeat(1, 1, rep, 1)  # (B|1, 1, rep*T, L), row order (rep, t) like qg
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(B, H, T, hd)


def _decode_attention_sums(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor:
    """One query per row (q (B, H, 1, hd)) over a bf16/fp16 cache (B, Hkv, L, hd), written as the sums it is, for
    ``torch.compile`` on the CPU: Inductor reads the cache once in its own dtype and sums in float32.

    The eager path's float32 copies of the cache for SDPA cost more than the attention itself in a compiled
    step: a bf16 step of the 194M model at 8 rows took 34-42 ms that way and 24-30 ms this way (at one row its
    10 layers' attention 0.7 against 0.24 ms; ``benchmarks/bench_attention.py --cpu``). Eager, the products
    would be materialised: only compiled steps come here.
    """
    B, H, _, hd = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    qg = q.float().reshape(B, Hkv, H // Hkv, 1, hd) * hd ** -0.5  # the query heads sharing a kv head together
    scores = (qg * k.unsqueeze(2).float()).sum(-1)  # (B, Hkv, rep, L)
    last = torch.as_tensor(start_pos, device=q.device).reshape(-1, 1, 1, 1)  # (B|1, 1, 1, 1)
    hidden = torch.arange(L, device=q.device) > last  # keys past each row's position (another request's, stale)
    p = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    # a hidden value is left out, not weighted by 0: an inf there (a stale fp16 overflow) would make a NaN
    out = (p.unsqueeze(-1) * v.unsqueeze(2).float()).masked_fill(hidden.unsqueeze(-1), 0).sum(-2)  # (B, Hkv, rep, hd)
    return out.reshape(B, H, 1, hd).to(q.dtype)


# CPU flash attention that also returns the log-sum-exp of each query's scores (an ATen op behind SDPA).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _chunk_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """A prefill chunk (queries at ``start … start+T-1``) over a cache of ``start + T`` keys, with no mask.

    Given a mask, CPU SDPA converts it to a float (T × L) tensor, so the memory of a chunk would grow with
    the whole prompt. Instead: the keys before the chunk are visible to every query (attention without a
    mask), the chunk's own keys causally (``is_causal``, aligned since query i is key i); the two partial
    results are merged by their log-sum-exps. Memory stays that of the chunk, whatever ``start``.
    """
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    qg = q.reshape(B, Hkv, rep * T, hd)  # grouped-query attention over the prefix: no k/v copies
    out_a, lse_a = _CPU_FLASH(qg, k[:, :, :start], v[:, :, :start], 0.0, False)
    kc, vc = k[:, :, start:], v[:, :, start:]
    if rep > 1:  # the chunk's own keys: T of them, cheap to repeat per query head
        kc, vc = kc.repeat_interleave(rep, dim=1), vc.repeat_interleave(rep, dim=1)
    out_b, lse_b = _CPU_FLASH(q, kc, vc, 0.0, True)
    lse_a, lse_b = lse_a.reshape(B, H, T, 1), lse_b.reshape(B, H, T, 1)
    m = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    out = (out_a.reshape(B, H, T, hd).float() * w_a + out_b.float() * w_b) / (w_a + w_b)
    return out.to(q.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of x (B, T, H, hd) by angles given as cos/sin (B|1, T, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B|1, T, 1, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)

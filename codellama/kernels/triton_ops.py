"""``TritonOps``: the Triton kernels behind the model's ``Ops`` seam, falling back to PyTorch per call.

Same three static methods and semantics as ``codellama.ops.TorchOps``. Any input a kernel cannot take
(a head_dim over 256, tensors Triton cannot reach, ...) goes to ``TorchOps`` after a warning that says why,
once per reason.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch

from ..ops import StartPos, TorchOps
from .checks import attention_problem


def _fallback(op: str, reason: str) -> type:
    """TorchOps, after saying once per reason why the Triton kernel is not used."""
    warnings.warn(f"codellama.kernels.TritonOps.{op}: using PyTorch because {reason}", stacklevel=3)
    return TorchOps


class TritonOps:
    """The Triton implementation of ``codellama.ops.TorchOps`` (same static methods and semantics)."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., D), weight (D,): ``(x * rsqrt(mean(x²) + eps)).type_as(x) * weight``, statistics in float32."""
        from . import rmsnorm
        reason = rmsnorm.rms_norm_problem(x, weight, eps)
        if reason:
            return _fallback("rms_norm", reason).rms_norm(x, weight, eps)
        return rmsnorm.launch_rms_norm(x, weight, eps)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Meta's interleaved-pair RoPE on q (B, T, H, hd) and k (B, T, Hkv, hd) in one launch; cos/sin (B|1, T, hd/2)."""
        from . import rope
        reason = rope.rotary_problem(q, k, cos, sin)
        if reason:
            return _fallback("rotary", reason).rotary(q, k, cos, sin)
        return rope.launch_rotary(q, k, cos, sin)

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor:
        """Causal attention of q (B, H, T, hd) at ``start_pos + arange(T)`` over k/v (B, Hkv, L, hd) → (B, H, T, hd).

        T == 1 (decode) takes the split-KV flash-decoding kernel over each row's ``start_pos + 1`` keys;
        longer T takes the flash-attention kernel.
        """
        reason = attention_problem(q, k, v, start_pos)
        if reason:
            return _fallback("attention", reason).attention(q, k, v, start_pos)
        if q.shape[2] == 1:
            from .decode_attention import launch_decode_attention
            return launch_decode_attention(q, k, v, start_pos)
        from .flash_attention import launch_flash_attention
        return launch_flash_attention(q, k, v, start_pos)

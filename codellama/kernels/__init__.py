"""Triton kernels for Code Llama: fused RMSNorm, fused RoPE, flash attention (prefill), flash-decoding.

One file per kernel, each holding the Triton kernel, a launcher that checks its inputs and raises
``ValueError`` naming the problem, and the PyTorch reference the tests compare against:

    rmsnorm.py           rms_norm(x, weight, eps)                 rms_norm_reference
    rope.py              rotary(q, k, cos, sin)                   rotary_reference
    flash_attention.py   flash_attention(q, k, v, start_pos)      attention_reference
    decode_attention.py  decode_attention(q, k, v, start_pos)     decode_attention_reference

``checks.py`` holds what every launcher checks (is Triton usable, can it take these tensors);
``triton_ops.py`` holds ``TritonOps``, which plugs the kernels into the model's ``codellama.ops`` seam.
Importing this package imports neither Triton nor the kernel files; without a working Triton,
``triton_available()`` says why and the model stays on its PyTorch path.

Triton runs on CUDA tensors, and on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1``
is set before ``triton`` is first imported (the tests do that on machines without a GPU).
"""

import sys

import torch

from ..ops import ATTENTION_CHOICES, Ops, TorchOps
from .checks import interpreting, triton_available
from .triton_ops import TritonOps

__all__ = ["TritonOps", "interpreting", "triton_available", "select_ops"]

_told: set = set()  # reasons already printed by select_ops("auto"), so each is said once per process


def select_ops(attention: str, device: torch.device | str) -> Ops:
    """The ``Ops`` implementation for an ``attention=`` choice on ``device``.

    ``"torch"``: PyTorch. ``"triton"``: the Triton kernels, or ``ValueError`` saying why they cannot run here.
    ``"auto"``: Triton on CUDA when it works (saying once on stderr why not, when it does not), else PyTorch.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention implementation {attention!r}; valid: {', '.join(ATTENTION_CHOICES)}")
    device = torch.device(device)
    if attention == "torch" or (attention == "auto" and device.type != "cuda"):
        return TorchOps
    ok, why = triton_available()
    if ok and device.type == "cpu" and not interpreting():
        why = "the model is on the CPU; Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    elif ok:
        return TritonOps
    if attention == "triton":
        raise ValueError(f"attention='triton' is unavailable here: {why}")
    if why not in _told:
        _told.add(why)
        print(f"codellama: using PyTorch attention on {device} because Triton is unavailable: {why}", file=sys.stderr)
    return TorchOps


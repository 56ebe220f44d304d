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

from .checks import interpreting, triton_available
from .triton_ops import TritonOps

__all__ = ["TritonOps", "interpreting", "triton_available"]

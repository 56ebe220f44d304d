"""What every Triton launcher checks before it runs: is Triton usable here, and can it take these tensors.

Each ``*_problem`` function returns ``None`` when a kernel can take its inputs, else the reason in words;
launchers raise it as ``ValueError`` and ``TritonOps`` falls back to PyTorch with it. Nothing here imports
Triton at import time.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

import torch

from ..ops import StartPos


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs  # Triton ≥ 3.4 reads its settings here
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_available() -> Tuple[bool, str]:
    """``(True, what)`` when the kernels can run here, else ``(False, why not)``.

    True on CUDA with an importable Triton, and on CPU tensors when ``TRITON_INTERPRET=1`` is set.
    """
    try:
        import triton
    except Exception as e:  # ImportError, or a broken install failing while it loads
        return False, f"triton cannot be imported ({type(e).__name__}: {e}); pip install triton"
    if torch.cuda.is_available():
        if torch.version.cuda is not None and _capability(torch.cuda.current_device()) < (7, 0):
            return False, f"Triton needs a GPU of compute capability ≥ 7.0, got {torch.cuda.get_device_name()}"
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if interpreting():
        return True, f"triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, "no CUDA GPU here, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (how many programs fill the GPU)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


# ----------------------------------------------------------------------------- shared input checks
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_problem(*tensors: torch.Tensor) -> Optional[str]:
    """Why Triton cannot run on these tensors' device, or None. All tensors must share one device."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            return f"tensors are on different devices ({device} and {t.device})"
    if device.type == "cuda":
        if tensors[0].dtype == torch.bfloat16 and torch.version.cuda is not None and _capability(device.index or 0) < (8, 0):
            return "bfloat16 needs a GPU of compute capability ≥ 8.0 in Triton"
        return None
    if device.type == "cpu" and interpreting():
        return None
    return (f"tensors are on {device}; the Triton kernels need CUDA tensors, or CPU tensors with "
            "TRITON_INTERPRET=1 set before triton is imported")


def dtype_problem(name: str, t: torch.Tensor, allowed: Tuple[torch.dtype, ...] = FLOAT_DTYPES) -> Optional[str]:
    if t.dtype not in allowed:
        valid = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"{name} has dtype {t.dtype}; valid: {valid}"
    return None


def head_tensor_problem(name: str, t: torch.Tensor, dims: str) -> Optional[str]:
    """Checks a 4-D float tensor whose last (head_dim) dimension is contiguous; ``dims`` names the first three."""
    if t.dim() != 4:
        return f"{name} must be 4-D ({dims}, head_dim), got shape {tuple(t.shape)}"
    if t.stride(-1) != 1:
        return f"{name} must be contiguous in its last (head_dim) dimension, got strides {t.stride()}"
    return dtype_problem(name, t)


def start_pos_problem(start_pos: StartPos, batch: int, device: torch.device) -> Optional[str]:
    """Checks an int or a (B,) integer tensor of per-row positions (values of a tensor are not read: no sync)."""
    if isinstance(start_pos, torch.Tensor):
        if start_pos.dtype not in (torch.int32, torch.int64):
            return f"start_pos tensor has dtype {start_pos.dtype}; valid: int32, int64"
        if start_pos.dim() != 1 or start_pos.shape[0] != batch:
            return f"start_pos tensor must have shape ({batch},) (one position per row), got {tuple(start_pos.shape)}"
        if start_pos.device != device:
            return f"start_pos is on {start_pos.device} but q is on {device}"
        return None
    if isinstance(start_pos, bool) or not isinstance(start_pos, int):
        return f"start_pos must be an int or an integer tensor of shape ({batch},), got {type(start_pos).__name__}"
    if start_pos < 0:
        return f"start_pos must be ≥ 0, got {start_pos}"
    return None


def attention_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos,
                      max_head_dim: int = 256) -> Optional[str]:
    """Why the attention kernels cannot take these inputs, or None. Shapes: q (B, H, T, hd), k/v (B, Hkv, L, hd)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        problem = head_tensor_problem(name, t, "B, H, T" if name == "q" else "B, Hkv, L")
        if problem:
            return problem
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    B, H, T, hd = q.shape
    if k.shape != v.shape:
        return f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
    if k.shape[0] != B or k.shape[3] != hd:
        return f"k/v of shape {tuple(k.shape)} do not match q of shape {tuple(q.shape)} (batch and head_dim must agree)"
    Hkv, L = k.shape[1], k.shape[2]
    if Hkv == 0 or H % Hkv:
        return f"query heads ({H}) must be a multiple of key/value heads ({Hkv})"
    if not 1 <= hd <= max_head_dim:
        return f"head_dim {hd} is not supported by the Triton attention kernels (1 … {max_head_dim})"
    if T == 0 or B == 0:
        return f"empty input: q has shape {tuple(q.shape)}"
    problem = start_pos_problem(start_pos, B, q.device) or device_problem(q, k, v)
    if problem:
        return problem
    if isinstance(start_pos, int) and start_pos + T > L:
        return f"queries reach position {start_pos + T - 1} but k/v hold only {L} positions"
    if L < T:
        return f"k/v hold {L} positions, fewer than the {T} queries"
    return None

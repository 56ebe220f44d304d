"""Runtime policy: which device and dtype a model runs on when the caller does not say, and parsing them.

Not model configuration (``config.py``) and not the model (``model.py``): the same weights run on any
device in any float dtype. Every entry point (``load_model``, ``Llama.build``, the command-line programs)
resolves ``device=`` / ``dtype=`` here, so a bad value gets one clear error naming what is valid.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cpu", "cuda", "mps")


def default_device() -> torch.device:
    """CUDA, then MPS, then CPU: the fastest device this machine has."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA where supported, else fp16 on CUDA (and MPS); fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """A float ``torch.dtype`` from a name like ``"bf16"`` or a ``torch.dtype``; ``None`` passes through."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype {dtype} is not a model dtype; valid: float32, float16, bfloat16")
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: Union[None, str, torch.device]) -> torch.device:
    """A ``torch.device`` that exists on this machine (the default when ``None``), else ``ValueError`` saying why."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0' or a torch.device, got {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device {str(device)!r} is not supported; valid: cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of PyTorch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"device {str(device)!r} is not available: this is {build}; use --device cpu "
                             "(or install a CUDA build of torch on a machine with a GPU)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"device {str(device)!r} is not available here (MPS needs Apple silicon and a PyTorch with MPS)")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

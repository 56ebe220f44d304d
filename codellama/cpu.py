"""Weight layouts that make CPU matrix-vector products (batch-1 decoding) run at memory bandwidth.

Decoding one token reads every weight once, so on a CPU its speed is the speed of ``x @ W.T`` for a
single row ``x``. Two facts of torch's CPU kernels, measured by ``benchmarks/bench_generate.py``:

* fp32: BLAS streams a weight stored as (in, out) much faster than Meta's (out, in) when ``in`` is small
  (5× for the 32016 × 128 output layer of a small model, 10-30% for 7B's layers). We keep the Meta shape
  and names but store the data column-major: ``weight`` becomes a transposed view of an (in, out) tensor.
* Fusing ``wq, wk, wv`` (and ``w1, w3``) into one matrix lets the hardware prefetcher run along one
  long weight stream instead of three short ones (about 15% more bandwidth on a 1024-wide model).
* bf16: ``F.linear`` re-lays out the weight on every call; oneDNN with the weight packed once reads it
  at close to bandwidth. ``PackedLinear`` holds only the packed copy and gives the dense weight back
  in ``state_dict`` so checkpoints and conversions see ordinary tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def bf16_packing_supported() -> bool:
    """Whether oneDNN can pack and multiply bf16 weights on this CPU, found by trying it once.

    It needs AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; on an AVX2-only CPU the reorder raises, and bf16
    weights stay ordinary tensors computed with ``F.linear``.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        w = torch.arange(256, dtype=torch.float32).reshape(16, 16).div(256).to(torch.bfloat16)
        x = torch.ones(1, 16, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), F.linear(x, w).float(), atol=0.05, rtol=0.02))
    except RuntimeError:
        return False


def bf16_path() -> str:
    """How bf16 linear layers run here, in words (benchmarks print it)."""
    return "oneDNN packed bf16" if bf16_packing_supported() else "F.linear on bf16 (no oneDNN bf16 on this CPU)"


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a dense (out, in) weight, as bf16."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), 1)


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose bf16 weight lives only in oneDNN's packed format.

    The packed weight is a registered buffer (``packed``), so ``buffers()``, ``state_dict()`` and memory
    accounting see it. Moved or cast away from bf16 on the CPU (``.to("cuda")``, ``.float()``), it holds a
    plain dense weight and computes with ``F.linear``; cast back, it packs again.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_bf16(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return F.linear(x, self.packed)

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight (a copy while packed: for saving and inspection, not for compute)."""
        return self.packed.to_dense() if self.packed.is_mkldnn else self.packed

    def _apply(self, fn, recurse=True):
        dense = fn(self.weight)
        packable = dense.device.type == "cpu" and dense.dtype == torch.bfloat16 and bf16_packing_supported()
        self.packed = pack_bf16(dense) if packable else dense
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: checkpoint {tuple(w.shape)}, "
                              f"model {(self.out_features, self.in_features)}")
            return
        self.packed = pack_bf16(w)

    def extra_repr(self) -> str:
        layout = "packed bf16" if self.packed.is_mkldnn else f"dense {self.packed.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"


def fuse_projections(model: nn.Module) -> nn.Module:
    """Loading step: ``wq|wk|wv`` and ``w1|w3`` as one matmul each (longer weight streams, fewer calls)."""
    if hasattr(model, "fuse"):
        model.fuse()
    return model


def cpu_layout(model: nn.Module) -> nn.Module:
    """Loading step: re-lay out a CPU model's linear weights for fast decoding, in place.

    fp32 weights keep their values and shape but are stored column-major; bf16 weights are packed for
    oneDNN. Results, parameter names and ``state_dict`` values are unchanged.
    """
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or child.bias is not None or child.weight.device.type != "cpu":
                continue
            w = child.weight
            if w.dtype == torch.bfloat16 and bf16_packing_supported():
                setattr(module, name, PackedLinear(w))
            elif w.dtype == torch.float32 and w.stride(0) != 1:
                # Same values and shape; the storage becomes (in, out) so x @ W.T streams contiguous rows.
                child.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return model


CPU_TRANSFORMS = (fuse_projections, cpu_layout)  # what ``load_model`` applies on CPU, in order


def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Apply the CPU loading steps (``CPU_TRANSFORMS``) to a model built some other way."""
    for transform in CPU_TRANSFORMS:
        model = transform(model)
    return model

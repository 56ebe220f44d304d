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

import torch
from torch import nn


def bf16_packing_supported() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose bf16 weight lives only in oneDNN's packed format."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight (a copy: for saving and inspection, not for compute)."""
        return self.packed.to_dense()

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
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16).contiguous(), 1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Fuse a CPU model's input projections and re-lay out its linear weights for fast decoding, in place.

    Results, parameter names and ``state_dict`` values are unchanged.
    """
    if hasattr(model, "fuse"):
        model.fuse()  # wq|wk|wv and w1|w3 as one matmul each: longer weight streams, fewer calls
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

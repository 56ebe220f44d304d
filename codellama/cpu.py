"""CPU weight layouts and kernels that make decoding run near memory bandwidth.

Decoding reads every weight once per token, so on a CPU its speed is the speed of ``x @ W.T`` for a few
rows ``x`` (1 at batch 1, up to 8 in the engine's decode batches). What torch's CPU kernels do with that,
measured here (2 cores of an AVX-512 EPYC) by ``benchmarks/bench_quant.py`` and ``bench_generate.py``:

* fp32 and bf16: oneDNN with the weight packed once (``PackedLinear``) reads it at 25–30 GB/s at batch 1
  and keeps that at batch 8, where BLAS on the plain fp32 weight runs a matrix–vector product on one
  thread (16 GB/s) and gets 3× slower at 8 rows. Where oneDNN cannot pack (bf16 on an AVX2-only CPU),
  fp32 weights are stored column-major (BLAS streams an (in, out) layout faster) and bf16 stays plain.
* Fusing ``wq, wk, wv`` (and ``w1, w3``) into one matrix lets the hardware prefetcher run along one
  long weight stream instead of three short ones, and saves two calls per layer.
* int8 and int4 weights: the native tile kernels (``codellama.cpu_kernels``: integer dot products with
  the activations quantized to int8, as llama.cpp's Q8_0 and Q4_0 paths), which stream the codes at about
  the machine's read bandwidth. Where they cannot run, torch's weight-only kernels, which read the codes
  directly and are fast with bf16 activations only (int8: ``int8_linear``, int4: ``pack_int4`` /
  ``int4_linear``); inside a compiled step, int8 layers of up to 8 rows then use a product-and-sum over the
  codes that Inductor compiles (``int8_rows``), which streams them faster than torch's kernel does.

Every layout keeps the Meta shape and names: ``state_dict`` gives the checkpoint's tensors back.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


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


@functools.lru_cache(maxsize=None)
def fp32_packing_supported() -> bool:
    """Whether oneDNN can pack and multiply fp32 weights here (any x86-64 CPU with a oneDNN build of torch)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        w = torch.arange(256, dtype=torch.float32).reshape(16, 16).div(256)
        x = torch.ones(1, 16)
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, 1), None, "none", [], "")
        return bool(torch.allclose(got, F.linear(x, w), atol=1e-5, rtol=1e-5))
    except RuntimeError:
        return False


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether ``PackedLinear`` can hold a weight of ``dtype`` packed on this CPU."""
    if dtype == torch.float32:
        return fp32_packing_supported()
    return dtype == torch.bfloat16 and bf16_packing_supported()


def bf16_path() -> str:
    """How bf16 linear layers run here, in words (benchmarks print it)."""
    onednn = "oneDNN" if bf16_packing_supported() else "no oneDNN bf16 on this CPU"
    if cpu_kernels.available("bf16"):
        return f"bf16 in place: the native row kernel ({cpu_kernels.isa('bf16')}) to {ROWS_KERNEL_MAX} rows, F.linear above ({onednn})"
    return "oneDNN packed bf16" if bf16_packing_supported() else "F.linear on bf16 (no oneDNN bf16 on this CPU)"


# The batch oneDNN's packed layout is chosen for, by dtype. fp32, measured on the 194M model's layers here: a
# layout for 8 rows is within 10% of one for a single row at batch 1 and 1.5× faster at batch 8 (the engine's
# decode batches). bf16: a layout for one row, which was no slower at 8 rows in the full benchmark.
PACKING_ROWS = {torch.float32: 8, torch.bfloat16: 1}


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a dense (out, in) fp32 or bf16 weight (BLAS on the plain fp32 weight is slower at
    batch 1 and 8: it runs a matrix–vector product on one thread)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKING_ROWS[weight.dtype])


@torch.library.custom_op("codellama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with W packed by ``pack_weight``, as an operator ``torch.compile`` calls but does not look into
    (its compiler would reach for the packed tensor's storage, which oneDNN's opaque tensors do not have)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose fp32 or bf16 weight lives only in oneDNN's packed format.

    The packed weight is a registered buffer (``packed``), so ``buffers()``, ``state_dict()`` and memory
    accounting see it. Moved or cast where it cannot stay packed (``.to("cuda")``, ``.half()``), it holds a
    plain dense weight and computes with ``F.linear``; cast back, it packs again.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", pack_weight(weight))
        self._is_packed = True

    @property
    def is_packed(self) -> bool:
        """Whether the weight is oneDNN's packed copy (a plain attribute check, so ``torch.compile`` sees it too)."""
        return self._is_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_packed:
            return F.linear(x, self.packed)
        if torch.compiler.is_compiling():
            return packed_linear(x, self.packed)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")  # eager: no op dispatch

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out, in) weight (a copy while packed: for saving and inspection, not for compute)."""
        return self.packed.to_dense() if self.is_packed else self.packed

    def _apply(self, fn, recurse=True):
        dense = fn(self.weight)
        self._is_packed = dense.device.type == "cpu" and packing_supported(dense.dtype)
        self.packed = pack_weight(dense) if self._is_packed else dense
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
        self.packed = pack_weight(w.to(self.packed.dtype)) if self.is_packed else w.to(self.packed)

    def extra_repr(self) -> str:
        layout = f"packed {self.packed.dtype}" if self.is_packed else f"dense {self.packed.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"


# ----------------------------------------------------------------------------- bf16 in place
ROWS_KERNEL_MAX = 8  # up to this many rows an in-place bf16 layer takes the native row kernel; above, F.linear


def in_place(weight: torch.Tensor) -> bool:
    """Whether ``cpu_layout`` keeps this weight where it lies (a bf16 CPU weight with rows the native row kernel
    reads), rather than copying it into a packed layout."""
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2
            and weight.stride(-1) == 1 and cpu_kernels.available("bf16"))


class RowsLinear(nn.Linear):
    """A bias-free ``nn.Linear`` whose bf16 weight stays where loading put it: for a checkpoint in bf16, a view of
    the memory-mapped file, so a bf16 model costs no copy and no packing at load time.

    Up to ``ROWS_KERNEL_MAX`` rows (decoding) go through the native row kernel (``codellama.cpu_kernels``:
    each output a weight row's dot product, ``vdpbf16ps``), which reads the weight as fast as oneDNN reads its
    packed copy; more rows (prefill) through ``F.linear`` (oneDNN's matrix multiply). Parameters and
    ``state_dict`` are ``nn.Linear``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        differentiating = torch.is_grad_enabled() and (self.weight.requires_grad or x.requires_grad)
        if x.numel() <= ROWS_KERNEL_MAX * x.shape[-1] and not differentiating and in_place(self.weight):
            return cpu_kernels.bf16_rows_linear(x, self.weight)
        return F.linear(x, self.weight)  # (the kernel has no backward: training takes F.linear)

    @classmethod
    def of(cls, weight: torch.Tensor, requires_grad: bool = False) -> "RowsLinear":
        """A layer over ``weight`` (out, in) itself: no copy."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.detach(), requires_grad=requires_grad)
        return layer


# ----------------------------------------------------------------------------- one row, compiled
# ``stored`` is defined through torch.library's plain registration rather than ``custom_op``: a compiled step
# calls it ~40 times, and custom_op's Python wrapper (alias checks on every output) cost ~0.1 ms a step of the
# ~0.6 ms that is not kernels (measured on a 10-layer model with dim 64).
_LIB = torch.library.Library("codellama", "FRAGMENT")
_LIB.define("stored(Tensor x) -> Tensor")
_LIB.impl("stored", lambda x: x.clone(), "CompositeExplicitAutograd")
torch.library.register_fake("codellama::stored")(lambda x: torch.empty_like(x))


def stored(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x``, as an operator ``torch.compile`` does not look into, so that x is written to memory once.

    Left to itself, Inductor inlines the code computing a matvec's input (the RMSNorm, the residual add, the
    embedding lookup) into the reduction's inner loop, and so recomputes it for every output row: a compiled
    bf16 step of the 194M model took 1.3× as long that way (16–19 ms against 12–14).
    """
    return torch.ops.codellama.stored(x)


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for one row x (…, K) (every leading size 1) and a dense weight (N, K): (…, N) in x's dtype.

    Written as the product-and-sum it is, for ``torch.compile``: Inductor makes it one vectorised loop that
    streams W once with float32 sums (27–30 GB/s here, where oneDNN's packed matrix–vector product reads
    22–28), over an input stored once (``stored``). The compiled one-row step of the 194M model built on it
    is 1.33–1.56× the eager step in fp32 and 1.45–1.49× in bf16 (``benchmarks/bench_engine.py``, this shared
    2-core machine). Eager, it would materialise N × K products: ``MatvecLinear`` calls it only while compiling.
    """
    out = (stored(x).reshape(1, -1).float() * weight.float()).sum(-1)  # (N,) float32
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


class MatvecLinear(nn.Linear):
    """A bias-free ``nn.Linear`` for a CPU model decoded one row at a time by a compiled step (``matvec_layout``).

    Inside ``torch.compile`` a one-row input goes through ``matvec``; anything else (eager prefill, more
    rows) through ``F.linear`` on the same dense (out, in) weight. Parameters and ``state_dict`` are
    ``nn.Linear``'s.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
            return matvec(x, self.weight)
        return F.linear(x, self.weight)

    @classmethod
    def of(cls, weight: torch.Tensor, requires_grad: bool = False) -> "MatvecLinear":
        """A layer holding a dense, row-major copy of ``weight`` (out, in) (no copy when it already is one)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=requires_grad)
        return layer


# ----------------------------------------------------------------------------- integer weights
# torch's weight-only kernels (``aten::_weight_int8pack_mm``, ``aten::_weight_int4pack_mm_for_cpu``) read
# the integer codes directly. Both are fast only with bf16 activations (their fp32 and fp16 paths are 8–15×
# slower here, on AVX-512 and AVX2 alike), so other dtypes are computed in bf16 and cast back.
INT8_BF16_K_MULTIPLE = 16  # the bf16 int8 kernel reads past the row (segfaults) when K is not a multiple of 16
INT8_ALIGNMENT = 64  # ... and when the codes do not start on a 64-byte boundary (a tensor read from a file may not)
INT8_COMPILED_ROWS = 8  # up to this many rows, a compiled int8 layer multiplies with ``int8_rows`` instead


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (scales · weight).T`` for x (…, K), int8 weight (N, K) and scales (N,): (…, N) in x's dtype.

    Activations go to the kernel in bf16; a K that the bf16 kernel cannot take uses its (slower) fp32 path,
    and codes the kernel cannot read safely (not 64-byte aligned: ``aligned`` copies them) the reference.
    Inside ``torch.compile``, up to ``INT8_COMPILED_ROWS`` rows go through ``int8_rows`` instead.
    """
    K = weight.shape[1]
    if torch.compiler.is_compiling() and x.numel() <= INT8_COMPILED_ROWS * K:
        return int8_rows(x, weight, scales)
    # (torch.compile cannot read a data pointer; a compiled step runs on codes ``cpu_layout`` already aligned.)
    if not torch.compiler.is_compiling() and (weight.data_ptr() % INT8_ALIGNMENT or not weight.is_contiguous()):
        return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype).unsqueeze(1))
    compute = torch.bfloat16 if K % INT8_BF16_K_MULTIPLE == 0 else torch.float32
    x2 = x.reshape(-1, K).to(compute).contiguous()
    if scales.dtype != compute:
        scales = scales.to(compute)
        if torch.compiler.is_compiling():  # Inductor's lowering of the kernel takes stored operands only,
            scales = stored(scales)  # not the cast that computes them (an fp32 model's scales)
    out = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def int8_rows(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``int8_linear`` for a few rows x (…, K) inside ``torch.compile``: a product-and-sum over the codes per row.

    Inductor makes the rows' sums one vectorised loop that streams the codes once, converts each to float32
    once, and multiplies it with every row (stored once, in float32, so the loop converts only the codes).
    At one row, a compiled int8 step of the 194M model took 9–13 ms this way against 17–21 ms on torch's
    kernel (``_weight_int8pack_mm`` reads 9–15 GB/s of codes here at one row, this loop 15–23 GB/s).
    """
    K = weight.shape[1]
    rows = stored(x.float()).reshape(-1, K)  # (R, K)
    codes = weight.float()  # (N, K), converted in the loop, never stored
    out = torch.stack([(row * codes).sum(-1) for row in rows.unbind(0)]) * scales.float()  # (R, N)
    return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy of it starting on a 64-byte boundary (what the int8 kernel needs)."""
    if t.data_ptr() % INT8_ALIGNMENT == 0 and t.is_contiguous():
        return t
    return t.clone(memory_format=torch.contiguous_format)  # torch's CPU allocator aligns to 64 bytes


INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel takes
INT4_N_MULTIPLE = 16  # its packing works on blocks of 16 output rows


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """torch's CPU int4 layout of ``codellama.quantize``'s int4 weights: ``(packed codes, scales_and_zeros)``.

    ``codes`` (N, K) 0…15, ``scales``/``zeros`` (N, K/group_size). The kernel computes
    ``(q − 8) · scale + zero`` as ``codellama.quantize`` defines the codes; its scales and zeros are
    (K/group_size, N, 2) in bf16. None when the kernel cannot take this shape (N not a multiple of 16, or
    a group size it lacks): the layer then computes with the PyTorch reference.
    """
    if codes.shape[0] % INT4_N_MULTIPLE or group_size not in INT4_GROUP_SIZES:
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
    scales_and_zeros = torch.stack((scales.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
    return packed, scales_and_zeros


def native_kernel_available(scheme: str = "int4") -> bool:
    """Whether ``scheme``'s layers (``"int4"``, ``"int8"``) take the native kernel here (``codellama.cpu_kernels``:
    built at first use)."""
    return cpu_kernels.available(scheme)


int4_tiles, untile_int4, int4_tiles_linear = cpu_kernels.int4_tiles, cpu_kernels.untile_int4, cpu_kernels.int4_tiles_linear
int8_rows_linear = cpu_kernels.int8_rows_linear


def native_quantizer_takes(w: torch.Tensor, group_size: Optional[int] = None) -> bool:
    """Whether ``quantize_native`` quantizes ``w`` here: a 2-D CPU float weight with contiguous rows (int4: whole
    groups; a padded last group is left to PyTorch)."""
    return (w.device.type == "cpu" and w.dim() == 2 and w.stride(-1) == 1
            and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (group_size is None or w.shape[1] % group_size == 0)
            and native_kernel_available("int8" if group_size is None else "int4"))


def quantize_native(w: torch.Tensor, group_size: Optional[int] = None) -> Tuple[torch.Tensor, ...]:
    """``codellama.quantize``'s int8 (``group_size`` None) or int4 of ``w`` in one native pass, bit for bit."""
    return cpu_kernels.quantize_int8(w) if group_size is None else cpu_kernels.quantize_int4(w, group_size)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x @ W.T`` for x (…, K) and a weight packed by ``pack_int4``: (…, N) in x's dtype (computed in bf16)."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).to(torch.bfloat16).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group_size, scales_and_zeros)
    return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------- loading steps
def fuse_projections(model: nn.Module) -> nn.Module:
    """Loading step: ``wq|wk|wv`` and ``w1|w3`` as one matmul each (longer weight streams, fewer calls)."""
    if hasattr(model, "fuse"):
        model.fuse()
    return model


def fuse_copied_projections(model: nn.Module) -> nn.Module:
    """``fuse_projections`` for ``cpu_layout``: all but the projections whose weights the native kernels read
    where they lie (``kept_in_place``), which fusing would copy (a row kernel reads three weights as fast as one)."""
    for module in model.modules():
        parts = getattr(module, "PARTS", ())
        if parts and getattr(module, "fused_sizes", None) is None and not any(
                kept_in_place(getattr(module, name)) for name in parts):
            module.fuse()
    return model


def kept_in_place(layer: nn.Module) -> bool:
    """Whether ``cpu_layout`` leaves this projection's weight where loading put it: a bf16 weight (``in_place``) or
    int8 codes that the native int8 kernel reads (``codellama.quantize.Int8Linear.reads_in_place``)."""
    if hasattr(layer, "reads_in_place"):
        return layer.reads_in_place()
    weight = getattr(layer, "weight", None)
    return isinstance(weight, torch.Tensor) and in_place(weight)


def cpu_layout(model: nn.Module, *, matvec: bool = False) -> nn.Module:
    """Loading step: re-lay out a CPU model's linear weights for fast decoding, in place.

    fp32 and bf16 weights are packed for oneDNN (``PackedLinear``) where this CPU supports it; otherwise
    fp32 weights keep their values and shape but are stored column-major, and bf16 weights stay plain.
    ``matvec=True`` (``matvec_layout``) keeps them dense and row-major in ``MatvecLinear`` layers instead.
    Quantized layers add the packed copy their CPU kernel reads (``to_cpu_layout``). Results, parameter
    names and ``state_dict`` values are unchanged.
    """
    for module in list(model.modules()):
        if hasattr(module, "to_cpu_layout"):
            module.to_cpu_layout()
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, PackedLinear) and matvec:  # laid out before: back to the dense weight
                setattr(module, name, MatvecLinear.of(child.weight))
                continue
            if not isinstance(child, nn.Linear) or child.bias is not None or child.weight.device.type != "cpu":
                continue
            w = child.weight
            if matvec:
                if not isinstance(child, MatvecLinear):
                    setattr(module, name, MatvecLinear.of(w, w.requires_grad))
            elif isinstance(child, RowsLinear):
                continue
            elif in_place(w):
                setattr(module, name, RowsLinear.of(w, w.requires_grad))
            elif packing_supported(w.dtype):
                setattr(module, name, PackedLinear(w))
            elif w.dtype == torch.float32 and w.stride(0) != 1:
                # Same values and shape; the storage becomes (in, out) so x @ W.T streams contiguous rows.
                child.weight = nn.Parameter(w.detach().t().contiguous().t(), requires_grad=w.requires_grad)
    return model


def matvec_layout(model: nn.Module) -> nn.Module:
    """Loading step for a CPU model whose decoding is a compiled step of one row (``Llama.build(compile=True,
    max_batch_size=1)``): ``cpu_layout`` with dense weights that step multiplies with ``matvec``."""
    return cpu_layout(model, matvec=True)


CPU_TRANSFORMS = (fuse_copied_projections, cpu_layout)  # what ``load_model`` applies on CPU, in order
COMPILED_ONE_ROW_TRANSFORMS = (fuse_projections, matvec_layout)  # ... when a compiled step decodes one row


def optimize_for_cpu(model: nn.Module) -> nn.Module:
    """Apply the CPU loading steps (``CPU_TRANSFORMS``) to a model built some other way."""
    for transform in CPU_TRANSFORMS:
        model = transform(model)
    return model

"""Weight-only int8 and int4 quantization: a module swap, applied as a step of the loading pipeline.

    python -m codellama.quantize SRC DST --int8                  # per-output-channel int8
    python -m codellama.quantize SRC DST --int4 --group-size 32  # grouped int4 (32, 64 or 128 inputs a group)
    python -m codellama.quantize SRC DST --int4 --output-scheme int8  # ... with the output layer in int8

Batch-1 decoding reads every weight once per token, so bytes per weight set its speed: int8 reads half of
bf16, int4 a quarter. Activations stay in the model's dtype; only the weights are integers, and the
kernels read the integers directly (``codellama.cpu`` on CPU, ``codellama.kernels.quant_matmul`` on CUDA).

Schemes, and the names ``state_dict`` holds them under (``W`` is a linear layer's (out, in) weight):

* **int8**, one scale per output channel (symmetric):
  ``<layer>.weight`` int8 (out, in) codes ``q`` and ``<layer>.scales`` (out,) in the model's dtype, with
  ``W[n, k] ≈ scales[n] · q[n, k]``, ``scales[n] = max_k |W[n, k]| / 127``.
* **int4**, one scale and one zero per ``group_size`` consecutive inputs of each row (asymmetric, min–max):
  ``<layer>.weight`` uint8 (out, in/2), two 4-bit codes a byte (byte ``j`` of a group: its inputs ``j`` and
  ``j + group_size/2``, low nibble first, as in llama.cpp's Q4_0), ``<layer>.scales`` and ``<layer>.zeros``
  (out, in/group_size), with
  ``W[n, k] ≈ scales[n, g] · (q[n, k] − 8) + zeros[n, g]`` for ``g = k // group_size``. An ``in`` that is
  not a multiple of ``group_size`` is padded to whole groups (the padding multiplies zero activations).

Every linear layer is quantized except, by default, the output layer (``include_output=True`` takes it
too: it is the largest single matrix of a small model, and the one most sensitive to rounding;
``output_scheme="int8"`` gives it int8 codes in an int4 model, as llama.cpp's Q4_0 files keep it in 6 bits); the token
embedding is quantized on request (``include_embeddings``; its lookup reads one row per token, so this
saves memory, not time). Meta's names are kept, so a quantized model saves, loads and splits across
tensor-parallel ranks like any other (``codellama.distributed`` cuts scales with their weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
CONFIG_KEY = "quantization_config"  # where a quantized checkpoint's config.json records its scheme
QUANT_METHOD = "codellama"  # the ``quant_method`` of that record (transformers refuses it rather than misreading it)


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class QuantConfig:
    """A quantization scheme: ``"int8"`` or ``"int4"`` (with its ``group_size``), and which layers it covers."""

    scheme: str
    group_size: Optional[int] = None  # int4 only; None → DEFAULT_GROUP_SIZE
    include_output: bool = False
    include_embeddings: bool = False
    output_scheme: Optional[str] = None  # with include_output: the output layer's own scheme (None: ``scheme``)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        for name in ("include_output", "include_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.output_scheme is not None:
            if self.output_scheme not in SCHEMES:
                raise ValueError(f"unknown output_scheme {self.output_scheme!r}; valid: {', '.join(SCHEMES)} or None "
                                 "(the output layer in the config's scheme)")
            if not self.include_output:
                raise ValueError(f"output_scheme={self.output_scheme!r} needs include_output=True (by default the "
                                 "output layer is not quantized)")
            if self.output_scheme == self.scheme:
                object.__setattr__(self, "output_scheme", None)  # one spelling for each config
        uses_groups = "int4" in (self.scheme, self.output_scheme)
        if not uses_groups and self.group_size is not None:
            raise ValueError("group_size applies to int4 only (int8 has one scale per output channel); "
                             f"got group_size={self.group_size!r} with int8")
        if uses_groups:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            elif self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
                raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")

    def for_layer(self, name: str) -> "QuantConfig":
        """The config one layer is quantized with: with ``output_scheme`` set, the output layer's scheme or the
        config's, each with a group size only where it is int4 (a mixed config holds one for both)."""
        if self.output_scheme is None:
            return self
        scheme = self.output_scheme if name == "output" else self.scheme
        return QuantConfig(scheme, self.group_size if scheme == "int4" else None)

    def describe(self) -> str:
        """``"int4 g64"``, ``"int8 (+ output layer)"``, ``"int4 g32 (+ output layer in int8)"``: for tables and messages."""
        def named(scheme: str) -> str:
            return scheme + (f" g{self.group_size}" if scheme == "int4" else "")
        output = "output layer" + (f" in {named(self.output_scheme)}" if self.output_scheme else "")
        extra = [name for name, on in ((output, self.include_output), ("embeddings", self.include_embeddings)) if on]
        return named(self.scheme) + (f" (+ {', '.join(extra)})" if extra else "")

    def to_json(self) -> Dict[str, Any]:
        """The record a quantized checkpoint's ``config.json`` holds under ``quantization_config``."""
        record = {"quant_method": QUANT_METHOD, **asdict(self)}
        if record["output_scheme"] is None:  # as records written before the field existed
            del record["output_scheme"]
        return record

    @classmethod
    def from_json(cls, record: Any, where: str = "config.json") -> "QuantConfig":
        """The config of a quantized checkpoint; ``ValueError`` naming ``where`` for a record this library did not write."""
        if not isinstance(record, dict) or record.get("quant_method") != QUANT_METHOD:
            method = record.get("quant_method") if isinstance(record, dict) else record
            raise ValueError(f"{where}: {CONFIG_KEY} has quant_method {method!r}; only checkpoints written by "
                             f"`python -m codellama.quantize` ({QUANT_METHOD!r}) can be read")
        fields = {k: v for k, v in record.items() if k != "quant_method"}
        valid = sorted(asdict(cls("int8")))
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise ValueError(f"{where}: unknown {CONFIG_KEY} key(s) {unknown}; valid: {valid}")
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {CONFIG_KEY}: {e}") from None


QuantizeArg = Union[None, str, QuantConfig]  # what ``quantize=`` accepts: a scheme name or a full config


def parse_quantize(quantize: QuantizeArg) -> Optional[QuantConfig]:
    """``quantize=`` as a ``QuantConfig`` (None stays None); ``ValueError`` naming the valid values."""
    if quantize is None or isinstance(quantize, QuantConfig):
        return quantize
    if isinstance(quantize, str):
        return QuantConfig(quantize)
    raise ValueError(f"quantize must be None, one of {', '.join(map(repr, SCHEMES))} or a QuantConfig, got {quantize!r}")


# ----------------------------------------------------------------------------- the arithmetic
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple:
    """``(q, scales)``: int8 codes (out, in) and one scale per row (out,) in ``scale_dtype``.

    The codes are rounded against the scales as they will be stored (in ``scale_dtype``), so storing them
    adds no second rounding. Rows of zeros get scale 0 (codes 0), which dequantizes exactly.
    """
    wf = w.detach().float()
    scales = (wf.abs().amax(dim=1) / 127).to(scale_dtype)  # (out,)
    s = scales.float().unsqueeze(1)
    q = torch.where(s > 0, wf / s.clamp_min(torch.finfo(torch.float32).tiny), 0).round().clamp(-127, 127)
    return q.to(torch.int8), scales


def padded_inputs(in_features: int, group_size: int) -> int:
    """``in_features`` rounded up to whole groups: int4 layers store that many inputs (the padding multiplies zeros)."""
    return -(-in_features // group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple:
    """``(packed, scales, zeros)``: codes 0…15 two a byte (out, in/2) uint8, and (out, in/group_size) scales and zeros.

    Each group maps its [min, max] onto the 16 codes: ``scale = (max − min) / 15`` and ``zero = min + 8·scale``
    (the value code 8 stands for), both rounded to ``scale_dtype`` before the codes are chosen against them.
    An ``in`` that is not a multiple of ``group_size`` is padded to one by repeating the last input's weights
    (which leaves the last group's range as it is); the padded inputs are multiplied by zeros.
    """
    out_features, in_features = w.shape
    wf = w.detach().float()
    pad = padded_inputs(in_features, group_size) - in_features
    if pad:
        wf = torch.cat((wf, wf[:, -1:].expand(out_features, pad)), dim=1)
    g = wf.unflatten(1, (-1, group_size))  # (out, G, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (out, G)
    scales = ((hi - lo) / 15).to(scale_dtype)
    zeros = (lo + 8 * scales.float()).to(scale_dtype)
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    q = torch.where(s > 0, (g - z) / s.clamp_min(torch.finfo(torch.float32).tiny) + 8, 8).round().clamp(0, 15)
    return pack_int4(q.flatten(1).to(torch.uint8), group_size), scales, zeros


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes 0…15 (…, in) uint8 → (…, in/2) uint8, two a byte within each group (as llama.cpp's Q4_0 does):
    byte ``j`` of a group holds its input ``j`` in the low nibble and input ``j + group_size/2`` in the high one,
    so a kernel multiplies each nibble plane by one contiguous half of the group's activations."""
    g = q.unflatten(-1, (-1, 2, group_size // 2))  # (…, groups, 2, group/2)
    return (g[..., 0, :] | (g[..., 1, :] << 4)).flatten(-2)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(…, in/2) uint8 → codes 0…15 (…, in) uint8; the inverse of ``pack_int4``."""
    g = packed.unflatten(-1, (-1, group_size // 2))  # (…, groups, group/2)
    return torch.cat((g & 15, g >> 4), dim=-1).flatten(-2)


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``scales[n] · q[n, k]`` (out, in) in ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    return q.to(dtype) * scales.to(dtype).unsqueeze(-1)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``scales[n, g] · (q[n, k] − 8) + zeros[n, g]`` (out, in) in ``dtype`` (default: the scales' dtype)."""
    dtype = dtype or scales.dtype
    group_size = 2 * packed.shape[-1] // scales.shape[-1]
    q = unpack_int4(packed, group_size).unflatten(-1, (scales.shape[-1], group_size)).to(dtype) - 8  # (…, G, group)
    return (q * scales.to(dtype).unsqueeze(-1) + zeros.to(dtype).unsqueeze(-1)).flatten(-2)


# ----------------------------------------------------------------------------- layers
def _register_codes(module: nn.Module, scheme: str, rows: int, cols: int, group_size: Optional[int],
                    scale_dtype: torch.dtype, device: Union[None, str, torch.device]) -> None:
    """Empty buffers for ``rows`` × ``cols`` weights of ``scheme`` (their values come from quantizing or loading)."""
    if scheme == "int8":
        module.register_buffer("weight", torch.empty(rows, cols, dtype=torch.int8, device=device))
        module.register_buffer("scales", torch.empty(rows, dtype=scale_dtype, device=device))
        return
    cols = padded_inputs(cols, group_size)
    module.register_buffer("weight", torch.empty(rows, cols // 2, dtype=torch.uint8, device=device))
    module.register_buffer("scales", torch.empty(rows, cols // group_size, dtype=scale_dtype, device=device))
    module.register_buffer("zeros", torch.empty(rows, cols // group_size, dtype=scale_dtype, device=device))


QUANTIZE_CHUNK = 2**24  # weights quantized at a time: bounds the float32 temporaries (64 MiB each)


def quantize_weight(w: torch.Tensor, config: QuantConfig) -> Dict[str, torch.Tensor]:
    """A float (rows, cols) weight as the tensors ``config`` stores it: ``{"weight": codes, "scales": …}`` (int4:
    and ``"zeros"``), the scales in ``w``'s dtype. The module swap, the loader (as each weight arrives) and the
    checkpoint writer all use this. Rows are quantized a chunk at a time (each row on its own), so the
    float32 temporaries stay small whatever the matrix."""
    names = ("weight", "scales") if config.scheme == "int8" else ("weight", "scales", "zeros")
    if cpu.native_quantizer_takes(w, config.group_size):  # the same codes, one pass, no temporaries
        return dict(zip(names, cpu.quantize_native(w.detach(), config.group_size)))
    rows = max(1, QUANTIZE_CHUNK // max(1, w.shape[1]))
    pieces = []
    for chunk in w.detach().split(rows):
        pieces.append(quantize_int8(chunk, w.dtype) if config.scheme == "int8" else
                      quantize_int4(chunk, config.group_size, w.dtype))
    if len(pieces) == 1:
        return dict(zip(names, pieces[0]))
    return {name: torch.cat([p[i] for p in pieces]) for i, name in enumerate(names)}


def _quantize_into(module: nn.Module, w: torch.Tensor, config: QuantConfig) -> None:
    for name, tensor in quantize_weight(w, config).items():
        setattr(module, name, tensor)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer over integer codes; ``Int8Linear`` and ``Int4Linear`` say how they are stored.

    ``forward`` computes ``x @ W.T`` in x's dtype from the codes: on CPU with the native kernels
    (``codellama.cpu_kernels``) or torch's packed integer kernels (``codellama.cpu``), on CUDA with the Triton
    kernel (``codellama.kernels.quant_matmul``), elsewhere with the PyTorch reference (which dequantizes the
    weight per call). Every tensor is a buffer with the output features as dim 0, so fused projections
    concatenate them, and split them back, by rows.

    On CPU, ``to_cpu_layout()`` (a step of ``codellama.cpu.cpu_layout``) lays the weight out for a kernel, in
    the non-persistent buffers ``cpu_weight`` and ``cpu_scales``: int4's 16-row tiles of the native kernel,
    which then hold the only copy of the codes (the ``TENSORS`` are None; ``state_dict``, ``dequantize`` and
    moving the layer give them back exactly), or, where that kernel is unavailable, what torch's kernel reads.
    int8's native kernel reads the codes where they are (``Int8Linear.to_cpu_layout`` lays out nothing).
    """

    scheme: str
    TENSORS: Sequence[str]  # the buffers, in state_dict order

    def __init__(self, in_features: int, out_features: int, group_size: Optional[int] = None, *,
                 scale_dtype: torch.dtype = torch.float32, device: Union[None, str, torch.device] = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        _register_codes(self, self.scheme, out_features, in_features, group_size, scale_dtype, device)
        self.register_buffer("cpu_weight", None, persistent=False)
        self.register_buffer("cpu_scales", None, persistent=False)
        self.tiled: Optional[torch.dtype] = None  # the scales' dtype while the codes live only in tiles

    @classmethod
    def from_float(cls, linear: nn.Linear, config: QuantConfig) -> "QuantizedLinear":
        """``linear`` quantized; a layer on the ``meta`` device gets empty codes of the right shapes."""
        layer = cls(linear.in_features, linear.out_features, config.group_size, scale_dtype=linear.weight.dtype,
                    device="meta")
        if not linear.weight.is_meta:
            _quantize_into(layer, linear.weight, config)
        return layer

    @classmethod
    def cat(cls, parts: Sequence["QuantizedLinear"]) -> "QuantizedLinear":
        """One layer computing ``parts``' outputs side by side (fused projections): tensors joined along the rows."""
        first = parts[0]
        tensors = [p.codes() for p in parts]
        fused = cls(first.in_features, sum(p.out_features for p in parts), first.group_size,
                    scale_dtype=tensors[0][1].dtype, device="meta")
        for i, name in enumerate(cls.TENSORS):
            setattr(fused, name, torch.cat([t[i] for t in tensors]))
        return fused

    def codes(self) -> Tuple[torch.Tensor, ...]:
        """The layer's ``TENSORS`` as ``state_dict`` holds them (the codes and their scales), wherever it keeps them now."""
        if self.tiled is None:
            return tuple(getattr(self, name) for name in self.TENSORS)
        return self._untiled()

    def _untiled(self) -> Tuple[torch.Tensor, ...]:
        """The ``TENSORS`` made back from the tiles (exactly)."""
        raise NotImplementedError

    def _tiles(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cpu_weight, cpu_scales)``: the native kernel's tiles of the codes."""
        raise NotImplementedError

    def _untile(self) -> None:
        """Hold the canonical codes again (before loading new ones into them, moving or casting the layer)."""
        if self.tiled is not None:
            for name, tensor in zip(self.TENSORS, self.codes()):
                setattr(self, name, tensor.contiguous())
            self.cpu_weight = self.cpu_scales = None
            self.tiled = None

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (out, in) weight the codes stand for (for the reference path, tests and inspection)."""
        raise NotImplementedError

    def to_cpu_layout(self) -> None:
        """Lay the codes out for the native kernel (or torch's, where it cannot run); done once."""
        if self.cpu_weight is not None or self.weight is None or self.weight.device.type != "cpu":
            return
        if cpu.native_kernel_available(self.scheme):
            self.cpu_weight, self.cpu_scales = self._tiles()
            self.tiled = self.scales.dtype
            for name in self.TENSORS:
                setattr(self, name, None)  # freed now: the tiles hold the only copy
            return
        self._torch_layout()

    def _torch_layout(self) -> None:
        """Where the native kernel cannot run: what torch's kernel reads."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        self._untile()
        self.cpu_weight = self.cpu_scales = None  # moved or cast: cpu_layout lays them out again
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.tiled is None:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in zip(self.TENSORS, self.codes()):
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        args = (state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not any(prefix + name in state_dict for name in self.TENSORS):
            # a load that holds none of this layer's tensors (the loader fills the model a layer at a time): its
            # layout stays as it is; untiling and tiling it again on every call made loading quadratic in layers
            if self.tiled is not None:
                missing_keys.extend(prefix + name for name in self.TENSORS)  # (a strict load still names them)
                return
            return super()._load_from_state_dict(*args)
        laid_out = self.cpu_weight is not None
        self._untile()
        self.cpu_weight = self.cpu_scales = None
        super()._load_from_state_dict(*args)
        if laid_out:  # new codes: lay them out as the old ones were
            self.to_cpu_layout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return self.cpu_forward(x)
        if x.device.type == "cuda" and _triton_ready():
            return self.triton_forward(x)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        layout = ", CPU tiles" if self.tiled is not None else ", CPU-packed" if self.cpu_weight is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}{layout}"


class Int8Linear(QuantizedLinear):
    """int8 codes (out, in) with one scale per output row: ``W[n, k] ≈ scales[n] · weight[n, k]``.

    On CPU the native kernel multiplies the codes where they lie (for a pre-quantized checkpoint, a view of
    its memory-mapped file: nothing is copied or laid out at load) with the activations quantized to int8 per
    block of 32, as llama.cpp's Q8_0 does; torch's kernel, where it cannot run, with the activations in bf16.
    """

    scheme = "int8"
    TENSORS = ("weight", "scales")

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int8(*self.codes(), dtype)

    def reads_in_place(self) -> bool:
        """Whether the native kernel reads the codes where they are (CPU codes with contiguous rows, the kernel
        built here); ``codellama.cpu`` asks too, to leave such layers unfused."""
        w = self.weight
        return w is not None and w.device.type == "cpu" and w.stride(-1) == 1 and cpu.native_kernel_available("int8")

    def to_cpu_layout(self) -> None:
        """Nothing for the native kernel; for torch's, codes it can read (64-byte aligned: a file's may not be)."""
        if self.weight is not None and self.weight.device.type == "cpu" and not self.reads_in_place():
            self.weight = cpu.aligned(self.weight)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reads_in_place():
            return cpu.int8_rows_linear(x, self.weight, self.scales)
        return cpu.int8_linear(x, self.weight, self.scales)

    def triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.quant_matmul import int8_matmul
        return int8_matmul(x, self.weight, self.scales)


class Int4Linear(QuantizedLinear):
    """4-bit codes two a byte (out, in/2) with a scale and a zero per group of ``group_size`` inputs of each row.

    On CPU the native kernel multiplies the codes with the activations quantized to int8 per half group (as
    llama.cpp's Q4_0 does); torch's kernel, where it cannot run, reads a packed copy of the codes beside the
    canonical ones.
    """

    scheme = "int4"
    TENSORS = ("weight", "scales", "zeros")

    def __init__(self, in_features: int, out_features: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE, *,
                 scale_dtype: torch.dtype = torch.float32, device: Union[None, str, torch.device] = None):
        super().__init__(in_features, out_features, group_size, scale_dtype=scale_dtype, device=device)

    def _untiled(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return cpu.untile_int4(self.cpu_weight, self.cpu_scales, self.out_features, self.tiled)

    def _tiles(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return cpu.int4_tiles(self.weight, self.scales, self.zeros, self.group_size)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_int4(*self.codes(), dtype)[:, :self.in_features]

    def _torch_layout(self) -> None:
        packed = cpu.pack_int4(unpack_int4(self.weight, self.group_size), self.scales, self.zeros, self.group_size)
        self.cpu_weight, self.cpu_scales = packed if packed is not None else (None, None)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_weight is None:
            return F.linear(x, self.dequantize(x.dtype))
        pad = padded_inputs(self.in_features, self.group_size) - self.in_features
        x = F.pad(x, (0, pad)) if pad else x
        if self.tiled is not None:
            return cpu.int4_tiles_linear(x, self.cpu_weight, self.cpu_scales, self.group_size, self.out_features)
        return cpu.int4_linear(x, self.cpu_weight, self.cpu_scales, self.group_size)

    def triton_forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.quant_matmul import int4_matmul
        return int4_matmul(x, self.weight, self.scales, self.zeros, self.group_size)


class QuantizedEmbedding(nn.Module):
    """A token embedding over integer codes stored as the linear layers' are (a row per token).

    The lookup gathers the rows' codes and scales and dequantizes only those: (…) → (…, dim).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, config: QuantConfig, *,
                 scale_dtype: torch.dtype = torch.float32, device: Union[None, str, torch.device] = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.scheme, self.group_size = config.scheme, config.group_size
        _register_codes(self, self.scheme, num_embeddings, embedding_dim, self.group_size, scale_dtype, device)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, config: QuantConfig) -> "QuantizedEmbedding":
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, config, scale_dtype=embedding.weight.dtype,
                    device="meta")
        if not embedding.weight.is_meta:
            _quantize_into(layer, embedding.weight, config)
        return layer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8":
            return dequantize_int8(F.embedding(tokens, self.weight), F.embedding(tokens, self.scales.unsqueeze(1))[..., 0])
        rows = [F.embedding(tokens, t) for t in (self.weight, self.scales, self.zeros)]  # (…, dim/2 | groups)
        return dequantize_int4(*rows)[..., :self.embedding_dim]

    def extra_repr(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme}{group}"


LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


# ----------------------------------------------------------------------------- the module swap
def quantize_model(model: nn.Module, config: QuantizeArg) -> nn.Module:
    """Loading step: replace the model's linear layers (and, if asked, its embedding) by quantized ones, in place.

    Works on a loaded model (the weights are quantized) and on one built on the ``meta`` device (the
    layers get the quantized shapes, for a quantized checkpoint to be loaded into). Layers already
    quantized, and those the config leaves out, are left alone. Returns ``model``.
    """
    config = parse_quantize(config)
    if config is None:
        return model
    for name, parent, child in list(_children(model)):
        if isinstance(child, nn.Embedding) and config.include_embeddings:
            quantized = _swap(name, child, QuantizedEmbedding, config.for_layer(name))
        elif isinstance(child, nn.Linear) and child.bias is None and (config.include_output or name != "output"):
            layer_config = config.for_layer(name)
            quantized = _swap(name, child, LAYERS[layer_config.scheme], layer_config)
        else:
            continue
        setattr(parent, name.rsplit(".", 1)[-1], quantized)
    return model


def _swap(name: str, child: nn.Module, layer_type, config: QuantConfig) -> nn.Module:
    try:
        return layer_type.from_float(child, config)
    except ValueError as e:
        shape = " × ".join(map(str, child.weight.shape))
        raise ValueError(f"cannot quantize {name} ({shape}) as {config.describe()}: {e}") from None


def quantization_step(config: QuantizeArg):
    """``quantize_model`` with ``config`` bound: a ``Transform`` of the loading pipeline."""
    config = parse_quantize(config)
    return lambda model: quantize_model(model, config)


def _children(model: nn.Module):
    """``(qualified name, parent, child)`` for every module below ``model``."""
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            yield (f"{parent_name}.{name}" if parent_name else name), parent, child


def stored_embedding_width(dim: int, config: QuantConfig) -> int:
    """Columns of ``tok_embeddings.weight`` in a checkpoint quantized with ``config`` (int4: two codes a byte)."""
    if config.include_embeddings and config.scheme == "int4":
        return padded_inputs(dim, config.group_size) // 2
    return dim


def check_quantized_split(args, config: QuantConfig, world: int) -> None:
    """Refuse to split an int4 checkpoint across ``world`` ranks where a rank's inputs would not be whole groups.

    Row-parallel layers (``wo``, ``w2``) and the embedding split along their inputs; each rank's block of
    the codes and of the per-group scales must then start and end on a group boundary. (Quantizing on load
    under tensor parallelism has no such limit: each rank quantizes its own block.)
    """
    if world == 1 or config.scheme != "int4":
        return
    split = {"wo": args.dim, "w2": args.hidden_dim, **({"tok_embeddings": args.dim} if config.include_embeddings else {})}
    bad = [f"{name} ({size // world} inputs a rank)" for name, size in split.items()
           if size % world or (size // world) % config.group_size]
    if bad:
        raise ValueError(f"cannot split this {config.describe()} checkpoint across {world} ranks: {', '.join(bad)} "
                         f"would not be whole groups of {config.group_size}; quantize its full-precision checkpoint "
                         "with a group size that divides them, or quantize on load (quantize=...)")


def model_quantization(model: nn.Module) -> Optional[str]:
    """``"int8"``/``"int4"`` when the model holds quantized layers, else None (for messages and benchmarks)."""
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)}
    return "+".join(sorted(schemes)) or None


def _triton_ready() -> bool:
    from ..kernels import triton_available
    return triton_available()[0]

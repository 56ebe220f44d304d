"""Loading a model: ``load_model``'s pipeline from a checkpoint (any format of ``codellama.formats``) to a model
on its device, in its dtype, quantized and laid out for fast decoding.

The formats read a checkpoint into Meta's names and Meta's RoPE layout, at the edge, with tensors read lazily
(``mmap``, safetensors slices); here every tensor is checked against the model, converted (cast, quantized) and
placed into it one at a time, each layer laid out as soon as it is complete, and the file pages behind what was
converted given back, so loading holds about one copy of the weights as they end up.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import ModelArgs
from . import cpu_kernels
from .cpu import COMPILED_ONE_ROW_TRANSFORMS, CPU_TRANSFORMS
from .distributed import SINGLE, TensorParallel, rank_block
from .formats import CheckpointSource, gguf, open_checkpoint
from .formats.source import file_backed, trim_heap
from .model import Transformer, build_on_meta
from .runtime import default_dtype, parse_dtype, resolve_device
from .quantize import (QuantConfig, QuantizeArg, QuantizedEmbedding, QuantizedLinear, check_quantized_split,
                       parse_quantize, quantize_model, quantize_weight)


# ----------------------------------------------------------------------------- loading
BUNDLED_CKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")  # the tiny model
# A step of loading (fuse, CPU layout, …): applied to each layer as it is loaded, then to the whole model.
Transform = Callable[[nn.Module], Optional[nn.Module]]


def check_tokenizer(args: ModelArgs, n_words: int, tokenizer_path: str = "the tokenizer") -> None:
    """Refuse a tokenizer whose vocabulary differs from the model's."""
    if n_words != args.vocab_size:
        raise ValueError(f"{tokenizer_path} has {n_words} pieces but the model's vocab_size is {args.vocab_size}; "
                         "they must match (is this the tokenizer that came with the checkpoint?)")


def load_model(ckpt_dir: "str | os.PathLike | CheckpointSource | None" = None, *, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None, optimize: bool = True, tp: TensorParallel = SINGLE,
               transforms: Optional[List[Transform]] = None, quantize: "QuantizeArg" = None) -> Transformer:
    """Build a ``Transformer`` from a Meta or Hugging Face checkpoint directory or a GGUF file (None: the bundled
    tiny model; GGUF: ``codellama.formats.gguf`` says what each tensor type becomes).

    A short pipeline of named steps: **read** the checkpoint's config and index its tensors
    (``open_checkpoint``), **build** the model on the ``meta`` device (no memory; its linear layers are
    swapped for quantized ones when the checkpoint is quantized or ``quantize`` asks for it), then
    **stream** the weights in, a layer at a time: each tensor is read memory-mapped (this rank's block of it
    under ``tp``), checked, cast to ``dtype`` and moved to ``device``, **quantized** as it arrives when
    ``quantize`` is ``"int8"``, ``"int4"`` or a ``codellama.quantize.QuantConfig`` (group size, output layer,
    embeddings), and placed into the model (strict: missing or unexpected keys and shape mismatches raise
    ``ValueError``); each finished layer goes through the **transforms** (``default_transforms``: on CPU,
    fused projections and the CPU weight layout of ``codellama.cpu``; values, names and shapes stay the
    checkpoint's), which then run once more over the whole model, and the file pages the layer was read
    from are given back. So host memory peaks near the size of the weights as they end up (plus about one
    layer), whatever the file's dtype or the scheme.
    ``device`` defaults to CUDA, then MPS, then CPU; ``dtype`` to bf16 on CUDA (fp16 where bf16 is not
    supported), fp16 on MPS and fp32 on CPU. ``optimize=False`` skips the default transforms;
    ``transforms`` replaces them: each takes a module (a layer, then the whole model), changes it in place or
    returns it, and leaves what it already did alone.
    """
    if ckpt_dir is None:
        ckpt_dir = BUNDLED_CKPT_DIR
    config = parse_quantize(quantize)
    source = ckpt_dir if isinstance(ckpt_dir, CheckpointSource) else open_checkpoint(ckpt_dir)
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    if source.layout == "gguf" and source.quantization is None:  # its blocks become this library's schemes here
        source, config = gguf.as_loaded(source, config, dtype), None
    if source.quantization is not None:
        if config not in (None, source.quantization):
            raise ValueError(f"{source.path} is already quantized ({source.quantization.describe()}); load it with "
                             f"quantize=None, or quantize its full-precision checkpoint as {config.describe()}")
        check_quantized_split(source.args, source.quantization, tp.world)
    model = build_on_meta(source.args, tp)
    quantize_model(model, source.quantization or config)  # on meta: the quantized layers' shapes, no values yet
    steps = default_transforms(device, optimize) if transforms is None else list(transforms)
    return load_weights(model, source, device=device, dtype=dtype, tp=tp, transforms=steps).eval()


def load_weights(model: Transformer, source: CheckpointSource, *, device: torch.device, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE, transforms: Sequence[Transform] = ()) -> Transformer:
    """Stream every tensor of ``source`` into ``model`` (built on ``meta``), a layer at a time; the loaded model.

    Strict, and ``assign``: each tensor read becomes the model's own storage, never a second copy. The float
    weights of layers the model holds quantized (``quantize_model`` on meta) are quantized as they arrive,
    unless the checkpoint is itself quantized. ``transforms`` run on each layer as soon as it is complete,
    then on the whole model; the mapped file pages of each tensor are given back once the model no longer
    holds what was read (``LazyTensor.release``).
    """
    expected = model.state_dict()
    arriving = {} if source.quantization is not None else quantized_layers(model)
    done: List[Loaded] = []

    def finish(unit: str, loaded: List[Loaded]) -> None:
        model.load_state_dict({k: t for r in loaded for k, t in r.tensors.items()}, strict=False, assign=True)
        for r in loaded:
            r.tensors = {}  # the model holds them now; a reference here would keep a replaced tensor alive
        if unit.startswith("layers."):
            layer = model.get_submodule(unit)
            for transform in transforms:
                transform(layer)
            release(loaded, layer)
            trim_heap()
        done.extend(loaded)

    unit, loaded = None, []
    for r in read_tensors(source, expected, device=device, dtype=dtype, tp=tp, quantized=arriving):
        if r.unit != unit and loaded:
            finish(unit, loaded)
            loaded = []
        unit = r.unit
        loaded.append(r)
    if loaded:
        finish(unit, loaded)
    for transform in transforms:
        model = transform(model) or model
    release([r for r in done if not r.released], model)
    trim_heap()
    return model


def default_transforms(device: torch.device, optimize: bool = True, *,
                       compiled_decode_rows: Optional[int] = None) -> List[Transform]:
    """The steps ``load_model`` applies after loading: the CPU layout on CPU, nothing elsewhere.

    ``compiled_decode_rows``: the rows of the compiled decode step that will run the model, if one will
    (``Engine(compile=True)`` decodes all its slots); one row on CPU takes the matvec layout instead.
    """
    if not optimize or device.type != "cpu":
        return []
    return list(COMPILED_ONE_ROW_TRANSFORMS if compiled_decode_rows == 1 else CPU_TRANSFORMS)


# ----------------------------------------------------------------------------- reading tensors
@dataclass
class Loaded:
    """One checkpoint tensor, read: what it became in the model, and how to give back the file pages it came from."""
    key: str  # the checkpoint's name for it
    unit: str  # the part of the model it belongs to: "layers.3", "tok_embeddings", "norm", "output"
    tensors: Dict[str, torch.Tensor]  # model key → tensor: itself, or the codes and scales it was quantized into
    read_storage: Optional[int]  # the address of the file view ``read`` returned (still the model's if nothing
    # converted it); None when ``read`` made a new tensor (Meta shards joined, HF's q/k rows unpermuted)
    release: Optional[Callable[[], None]]
    released: bool = False


def quantized_layers(model: nn.Module) -> Dict[str, Tuple[QuantConfig, Tuple[int, int]]]:
    """The model's quantized layers (name → their scheme and the (rows, cols) of the float weight they stand for)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            found[name] = (QuantConfig(module.scheme, module.group_size), (module.out_features, module.in_features))
        elif isinstance(module, QuantizedEmbedding):
            found[name] = (QuantConfig(module.scheme, module.group_size),
                           (module.num_embeddings, module.embedding_dim))
    return found


def release(loaded: List[Loaded], module: nn.Module) -> None:
    """Give back the file pages of each tensor in ``loaded`` that ``module`` no longer holds as it was read."""
    held = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]
            if not t.is_meta and t.layout == torch.strided and not t.is_mkldnn}  # (oneDNN's packed weights: new memory)
    for r in loaded:
        if r.release is not None and not r.released and (r.read_storage is None or r.read_storage not in held):
            r.release()
            r.released = True


def _unit(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def materialize(source: CheckpointSource, expected: Dict[str, torch.Tensor], *, device: torch.device,
                dtype: torch.dtype, tp: TensorParallel = SINGLE,
                quantized: Optional[Dict[str, Tuple[QuantConfig, Tuple[int, int]]]] = None
                ) -> Iterator[Tuple[str, torch.Tensor]]:
    """Check ``source`` against the model's ``expected`` keys and shapes, then yield each tensor loaded.

    Floating-point tensors are cast to ``dtype``; others (integer codes) keep theirs. Under tensor
    parallelism each tensor is this rank's block of the full one, read on its own. ``quantized``
    (``quantized_layers``): layers whose float weight is quantized as it arrives, into the codes and scales
    ``expected`` holds for them.
    """
    for r in read_tensors(source, expected, device=device, dtype=dtype, tp=tp, quantized=quantized):
        yield from r.tensors.items()


def read_tensors(source: CheckpointSource, expected: Dict[str, torch.Tensor], *, device: torch.device,
                 dtype: torch.dtype, tp: TensorParallel = SINGLE,
                 quantized: Optional[Dict[str, Tuple[QuantConfig, Tuple[int, int]]]] = None) -> Iterator[Loaded]:
    """``materialize``, one checkpoint tensor at a time, in the model's order (so a layer's tensors come together)."""
    quantized = quantized or {}
    derived = {f"{m}.{name}" for m in quantized for name in ("scales", "zeros")}  # made from the float weight
    wanted = [k for k in expected if k not in derived]
    missing = sorted(set(wanted) - set(source.tensors))
    unexpected = sorted(set(source.tensors) - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        raise ValueError(f"{source.path} does not match the model: " + "; ".join(parts))
    blocks = {key: rank_block(key, source.tensors[key].shape, source.args, tp) for key in wanted}
    for key in wanted:
        module = key.rsplit(".", 1)[0]
        want = quantized[module][1] if module in quantized else tuple(expected[key].shape)
        got = source.tensors[key].block_shape(blocks[key])
        if tuple(got) != tuple(want):
            raise ValueError(f"{source.path}: tensor {key} has shape {tuple(got)} in the checkpoint, "
                             f"the model expects {tuple(want)}")
    for key in wanted:
        module = key.rsplit(".", 1)[0]
        lazy, block = source.tensors[key], blocks[key]
        tensor = lazy.read(block)
        storage = tensor.untyped_storage().data_ptr() if lazy.release is not None and file_backed(tensor) else None
        floating = module in quantized or expected[key].is_floating_point()
        if tensor.is_floating_point() != floating or (not floating and tensor.dtype != expected[key].dtype):
            raise ValueError(f"{source.path}: tensor {key} has dtype {tensor.dtype} in the checkpoint, the model "
                             f"expects {'floating-point weights' if floating else expected[key].dtype}")
        if block is not None:
            tensor = tensor.contiguous()  # this rank's block only, not a view pinning the whole tensor
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if tensor.is_floating_point():
            check_finite(tensor, f"{source.path}: tensor {key}", dtype)
        if module in quantized:
            try:
                codes = quantize_weight(tensor, quantized[module][0])
            except ValueError as e:
                raise ValueError(f"cannot quantize {key} as {quantized[module][0].describe()}: {e}") from None
            tensors = {f"{module}.{name}": t for name, t in codes.items()}
        else:
            tensors = {key: tensor}
        del tensor
        yield Loaded(key, _unit(key), tensors, storage,
                     None if lazy.release is None else functools.partial(lazy.release, block))


def check_finite(tensor: torch.Tensor, what: str, dtype: torch.dtype) -> None:
    """``ValueError`` naming ``what`` when ``tensor`` holds NaN or infinite values (one pass: its min and max)."""
    if tensor.numel() == 0:
        return
    if tensor.dtype == torch.bfloat16 and tensor.is_contiguous() and tensor.device.type == "cpu" and \
            cpu_kernels.available("bf16"):
        if cpu_kernels.bf16_all_finite(tensor):  # its exponents, on both cores: ~3× aminmax's rate
            return
    else:
        lo, hi = torch.aminmax(tensor)  # NaN propagates; ±inf shows as a bound
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return
    bad = int((~torch.isfinite(tensor)).sum())
    raise ValueError(f"{what} holds {bad} value(s) that are NaN or infinite (in {dtype}): the checkpoint is "
                     "damaged, or was written in a dtype that overflows")

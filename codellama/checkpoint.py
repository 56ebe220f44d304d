"""Loading a model: ``load_model``'s pipeline from a checkpoint (any format of ``codellama.formats``) to a model
on its device, in its dtype, quantized and laid out for fast decoding.

The formats read a checkpoint into Meta's names and Meta's RoPE layout, at the edge, with tensors read lazily
(``mmap``, safetensors slices); here every tensor is checked against the model and placed into it one at a time,
so loading holds about one copy of the weights.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .config import ModelArgs
from .cpu import COMPILED_ONE_ROW_TRANSFORMS, CPU_TRANSFORMS
from .distributed import SINGLE, TensorParallel, rank_block
from .formats import CheckpointSource, open_checkpoint
from .model import Transformer
from .runtime import default_dtype, parse_dtype, resolve_device
from .quantize import (QuantizeArg, check_quantized_split, parse_quantize, quantization_step,
                       quantize_model)


# ----------------------------------------------------------------------------- q/k permutation


# ----------------------------------------------------------------------------- lazy tensor sources


# ----------------------------------------------------------------------------- loading
BUNDLED_CKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")  # the tiny model
Transform = Callable[[Transformer], Transformer]  # a step applied to the loaded model (fuse, CPU layout, …)


def check_tokenizer(args: ModelArgs, n_words: int, tokenizer_path: str = "the tokenizer") -> None:
    """Refuse a tokenizer whose vocabulary differs from the model's."""
    if n_words != args.vocab_size:
        raise ValueError(f"{tokenizer_path} has {n_words} pieces but the model's vocab_size is {args.vocab_size}; "
                         "they must match (is this the tokenizer that came with the checkpoint?)")


def load_model(ckpt_dir: "str | os.PathLike | CheckpointSource | None" = None, *, device: torch.device | str | None = None,
               dtype: torch.dtype | str | None = None, optimize: bool = True, tp: TensorParallel = SINGLE,
               transforms: Optional[List[Transform]] = None, quantize: "QuantizeArg" = None) -> Transformer:
    """Build a ``Transformer`` from a Meta or Hugging Face checkpoint directory (None: the bundled tiny model).

    A short pipeline of named steps: **read** the checkpoint's config and index its tensors
    (``open_checkpoint``), **build** the model on the ``meta`` device (no memory; a quantized checkpoint's
    layers are swapped for quantized ones here, so its integer codes load as they are), **load** each
    weight (memory-mapped, merged across shards, converted, moved to ``device`` one at a time, so host
    memory peaks near one copy of the weights; strict: missing or unexpected keys and shape mismatches
    raise ``ValueError``), **quantize** when asked (``quantize="int8"``, ``"int4"`` or a
    ``codellama.quantize.QuantConfig``: group size, output layer, embeddings), then apply the
    **transforms** (``default_transforms``: on CPU, fused projections and the CPU weight layout of
    ``codellama.cpu``; values, names and shapes stay the checkpoint's).
    ``device`` defaults to CUDA, then MPS, then CPU; ``dtype`` to bf16 on CUDA (fp16 where bf16 is not
    supported), fp16 on MPS and fp32 on CPU. ``optimize=False`` skips the default transforms;
    ``transforms`` replaces them. With ``tp`` (a rank of a tensor-parallel group) the model holds, and the
    loader reads, this rank's slices (of the integer codes and their scales alike).
    """
    if ckpt_dir is None:
        ckpt_dir = BUNDLED_CKPT_DIR
    config = parse_quantize(quantize)
    source = ckpt_dir if isinstance(ckpt_dir, CheckpointSource) else open_checkpoint(ckpt_dir)
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    if source.quantization is not None:
        if config not in (None, source.quantization):
            raise ValueError(f"{source.path} is already quantized ({source.quantization.describe()}); load it with "
                             f"quantize=None, or quantize its full-precision checkpoint as {config.describe()}")
        check_quantized_split(source.args, source.quantization, tp.world)
    model = build_on_meta(source.args, tp)
    quantize_model(model, source.quantization)
    load_weights(model, source, device=device, dtype=dtype, tp=tp)
    steps = [] if source.quantization is not None or config is None else [quantization_step(config)]
    for transform in steps + (default_transforms(device, optimize) if transforms is None else transforms):
        model = transform(model)
    return model.eval()


def build_on_meta(args: ModelArgs, tp: TensorParallel = SINGLE) -> Transformer:
    """The model's modules with shapes but no memory: weights are assigned by ``load_weights``."""
    with torch.device("meta"):
        return Transformer(args, tp)


def load_weights(model: Transformer, source: CheckpointSource, *, device: torch.device, dtype: torch.dtype,
                 tp: TensorParallel = SINGLE) -> None:
    """Read every tensor of ``source`` into ``model`` (strict, ``assign``: no second copy)."""
    state = dict(materialize(source, model.state_dict(), device=device, dtype=dtype, tp=tp))
    model.load_state_dict(state, strict=True, assign=True)


def default_transforms(device: torch.device, optimize: bool = True, *,
                       compiled_decode_rows: Optional[int] = None) -> List[Transform]:
    """The steps ``load_model`` applies after loading: the CPU layout on CPU, nothing elsewhere.

    ``compiled_decode_rows``: the rows of the compiled decode step that will run the model, if one will
    (``Engine(compile=True)`` decodes all its slots); one row on CPU takes the matvec layout instead.
    """
    if not optimize or device.type != "cpu":
        return []
    return list(COMPILED_ONE_ROW_TRANSFORMS if compiled_decode_rows == 1 else CPU_TRANSFORMS)


def materialize(source: CheckpointSource, expected: Dict[str, torch.Tensor], *, device: torch.device,
                dtype: torch.dtype, tp: TensorParallel = SINGLE) -> Iterator[Tuple[str, torch.Tensor]]:
    """Check ``source`` against the model's ``expected`` keys and shapes, then yield each tensor loaded.

    Floating-point tensors are cast to ``dtype``; others (integer codes) keep theirs. Under tensor
    parallelism each tensor is this rank's block of the full one, read on its own.
    """
    missing = sorted(set(expected) - set(source.tensors))
    unexpected = sorted(set(source.tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {missing[:10]}{' …' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s) {unexpected[:10]}{' …' if len(unexpected) > 10 else ''}")
        raise ValueError(f"{source.path} does not match the model: " + "; ".join(parts))
    blocks = {key: rank_block(key, source.tensors[key].shape, source.args, tp) for key in expected}
    for key, want in expected.items():
        got = source.tensors[key].block_shape(blocks[key])
        if tuple(got) != tuple(want.shape):
            raise ValueError(f"{source.path}: tensor {key} has shape {tuple(got)} in the checkpoint, "
                             f"the model expects {tuple(want.shape)}")
    for key, want in expected.items():
        tensor = source.tensors[key].read(blocks[key])
        if tensor.is_floating_point() != want.is_floating_point() or (
                not tensor.is_floating_point() and tensor.dtype != want.dtype):
            raise ValueError(f"{source.path}: tensor {key} has dtype {tensor.dtype} in the checkpoint, the model "
                             f"expects {'floating-point weights' if want.is_floating_point() else want.dtype}")
        if blocks[key] is not None:
            tensor = tensor.contiguous()  # this rank's block only, not a view pinning the whole tensor
        tensor = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source.path}: tensor {key} holds {bad} value(s) that are NaN or infinite (in "
                             f"{dtype}): the checkpoint is damaged, or was written in a dtype that overflows")
        yield key, tensor

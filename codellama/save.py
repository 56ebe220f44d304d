"""Writing whole checkpoints safely: converting one layout into the other (``convert_checkpoint``) and writing a
quantized one (``quantize_checkpoint``).

Each format writes its own files (``codellama.formats``); here is what every write shares: the source is
only ever read, the destination is checked before anything is written, and the new checkpoint is staged in a
temporary sibling and moved into place only when complete and readable, so a failed or interrupted run
leaves nothing half-written. ``python -m codellama convert`` and ``quantize`` are the command lines.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .checkpoint import build_on_meta, check_tokenizer, quantized_layers
from .formats import check_checkpoint_dir, open_checkpoint
from .formats.hf import HF_INDEX, save_hf, save_hf_tokenizer, write_hf
from .formats.meta import check_num_shards, save_meta
from .config import ModelArgs, check_size
from .runtime import parse_dtype
from .tokenizer import Tokenizer
from .quantize import SCHEMES, QuantConfig, QuantizeArg, parse_quantize, quantize_model, quantize_weight

# Files of either layout that ``convert --force`` replaces in a destination: any of them left behind from an
# older checkpoint would be read with the new one (a stale index wins over a new model.safetensors, a stale
# consolidated.01.pth becomes a shard of the new model, a stale params.json makes an HF directory look Meta).
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "generation_config.json", "model.safetensors",
                    "model-*.safetensors", HF_INDEX, "pytorch_model*.bin", "pytorch_model.bin.index.json",
                    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------- Hugging Face tokenizer files


# ----------------------------------------------------------------------------- converting
def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, num_shards: Optional[int] = None,
                       dtype: torch.dtype | str | None = None, max_shard_bytes: Optional[int] = None,
                       force: bool = False) -> None:
    """Convert a checkpoint directory to the ``"meta"`` or ``"hf"`` layout (exact unless ``dtype`` is given).

    Safe by construction: ``src`` is only read (a ``dst`` that is ``src``, inside it or around it is refused),
    and the new checkpoint is written into a temporary sibling of ``dst`` and moved into place only once it
    is complete and reads back, so a failed run leaves nothing behind. A ``dst`` that is not empty is
    refused unless ``force``, which replaces the checkpoint files in it (``CHECKPOINT_FILES``; other files
    stay). Every argument is checked before anything is written. ``num_shards`` (default 1) is for the Meta
    layout, ``max_shard_bytes`` (default 5 GiB) for HF's. For ``"hf"``, the tokenizer files transformers
    needs are written next to ``tokenizer.model``.
    """
    if to not in ("meta", "hf"):
        raise ValueError(f"unknown target layout {to!r}; valid: 'meta', 'hf'")
    wrong = "num_shards" if to == "hf" and num_shards is not None else \
        "max_shard_bytes" if to == "meta" and max_shard_bytes is not None else None
    if wrong:
        raise ValueError(f"{wrong} does not apply to the {to!r} layout: num_shards (--shards) is for 'meta', "
                         "max_shard_bytes (--max-shard-gb) for 'hf'")
    num_shards = 1 if num_shards is None else num_shards
    max_shard_bytes = 5 * 2**30 if max_shard_bytes is None else max_shard_bytes
    check_size("num_shards", num_shards)
    check_size("max_shard_bytes", max_shard_bytes)
    dtype = parse_dtype(dtype)
    src, dst, source, tokenizer = _open_source(src, dst, force)
    if to == "meta":
        check_num_shards(source.args, num_shards)
    with _staging(dst) as tmp:
        state = {k: (t.load() if dtype is None else t.load().to(dtype)) for k, t in source.tensors.items()}
        if to == "meta":
            save_meta(state, source.args, tmp, num_shards=num_shards)
        else:
            save_hf(state, source.args, tmp, max_shard_bytes=max_shard_bytes)
        del state
        _complete(tmp, dst, tokenizer, hf=to == "hf")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, config: "QuantizeArg", *,
                        dtype: torch.dtype | str | None = None, max_shard_bytes: int = 5 * 2**30,
                        force: bool = False) -> None:
    """Write ``src`` quantized with ``config`` (``"int8"``, ``"int4"`` or a ``QuantConfig``) to ``dst``.

    The result is Hugging Face's layout (``config.json`` with the scheme under ``quantization_config``,
    ``model.safetensors`` holding the integer codes and scales under the names of ``codellama.quantize``,
    the tokenizer files) and loads directly, without the full-precision weights. Each weight is read,
    quantized and written one at a time (the files' headers are known in advance), so memory holds about one
    weight and its codes, whatever the model's size.
    ``dtype`` is that of the scales and of the tensors left in full precision (default: the checkpoint's).
    Safe as ``convert_checkpoint`` is: ``src`` is only read and a failed run leaves nothing behind.
    """
    config = parse_quantize(config)
    if config is None:
        raise ValueError(f"quantize_checkpoint needs a scheme: one of {', '.join(map(repr, SCHEMES))} or a QuantConfig")
    dtype = parse_dtype(dtype)
    check_size("max_shard_bytes", max_shard_bytes)
    src, dst, source, tokenizer = _open_source(src, dst, force)
    shapes = {key: (lazy.shape, dtype or lazy.dtype) for key, lazy in source.tensors.items()}

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for key, lazy in source.tensors.items():  # one at a time: memory holds one weight and its codes
            yield key, lazy.load() if dtype is None else lazy.load().to(dtype)
            if lazy.release is not None:
                lazy.release(None)

    with _staging(dst) as tmp:
        write_quantized_hf(tmp, source.args, config, shapes, tensors(), max_shard_bytes=max_shard_bytes)
        _complete(tmp, dst, tokenizer, hf=True)


def write_quantized_hf(out_dir: str | os.PathLike, args: ModelArgs, config: QuantConfig,
                       shapes: Dict[str, Tuple[tuple, torch.dtype]], tensors: Iterable[Tuple[str, torch.Tensor]], *,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """``tensors`` (Meta names, full precision, one at a time, in the order of ``shapes``) quantized with
    ``config`` as they arrive and written to ``out_dir`` in Hugging Face's layout (``write_hf``): memory holds one
    weight and its codes. ``shapes`` announces each tensor's shape and dtype in advance (the files' headers)."""
    # Which layers become codes, and as what, is what the module swap decides.
    quantized = {name: layer for name, (layer, _) in
                 quantized_layers(quantize_model(build_on_meta(args), config)).items()}
    plan: Dict[str, tuple] = {}
    for key, (shape, dt) in shapes.items():
        module = key.rsplit(".", 1)[0]
        if module in quantized:
            codes = quantize_weight(torch.empty(shape, dtype=dt, device="meta"), quantized[module])
            plan.update({f"{module}.{name}": (tuple(t.shape), t.dtype) for name, t in codes.items()})
        else:
            plan[key] = (tuple(shape), dt)

    def quantized_tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        for key, tensor in tensors:
            module = key.rsplit(".", 1)[0]
            if module not in quantized:
                yield key, tensor
                continue
            try:
                codes = quantize_weight(tensor, quantized[module])
            except ValueError as e:
                raise ValueError(f"cannot quantize {key} as {config.describe()}: {e}") from None
            del tensor
            yield from ((f"{module}.{name}", t) for name, t in codes.items())

    write_hf(out_dir, args, plan, quantized_tensors(), max_shard_bytes=max_shard_bytes, quantization=config)


def _open_source(src: str | os.PathLike, dst: str | os.PathLike, force: bool):
    """``(src, dst, source, tokenizer)`` of a conversion, after every check that needs no writing.

    ``src`` must be a full-precision checkpoint, ``dst`` neither inside nor around it and new or empty
    (unless ``force``); the tokenizer (None when ``src`` has none) must fit the model.
    """
    src, dst = check_checkpoint_dir(src), os.fspath(dst)
    _refuse_overlap(src, dst)
    _check_destination(dst, force)
    source = open_checkpoint(src)
    if source.quantization is not None:
        raise ValueError(f"{src} is already quantized ({source.quantization.describe()}): convert or quantize "
                         "its full-precision checkpoint instead")
    tokenizer_path = os.path.join(src, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path) if os.path.isfile(tokenizer_path) else None
    if source.layout == "gguf":  # its own vocabulary becomes the tokenizer.model written beside the weights
        from .formats.gguf_tokenizer import gguf_tokenizer
        tokenizer = gguf_tokenizer(source)
    if tokenizer is not None:
        check_tokenizer(source.args, tokenizer.n_words, tokenizer.model_path)  # the result must be a usable pair
    return src, dst, source, tokenizer


def _complete(tmp: str, dst: str, tokenizer: Optional[Tokenizer], hf: bool) -> None:
    """Add the tokenizer files to the checkpoint in ``tmp``, check that it reads back, move it to ``dst``."""
    if tokenizer is not None:
        if tokenizer.model_proto is not None:  # built from a GGUF file's vocabulary
            with open(os.path.join(tmp, "tokenizer.model"), "wb") as f:
                f.write(tokenizer.model_proto)
        else:
            shutil.copyfile(tokenizer.model_path, os.path.join(tmp, "tokenizer.model"))
        if hf:
            save_hf_tokenizer(tokenizer, tmp)
    open_checkpoint(tmp)  # what was written reads back, before it replaces anything
    _publish(tmp, dst)


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it, by file identity (so symlinks and bind mounts count)."""
    if not os.path.exists(root):
        return False
    root_stat = os.stat(root)
    p = os.path.realpath(path)
    while True:
        if os.path.exists(p) and os.path.samestat(os.stat(p), root_stat):
            return True
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent


def _refuse_overlap(src: str, dst: str) -> None:
    if _inside(dst, src) or _inside(src, dst):
        raise ValueError(f"refusing to convert {src} into {dst}: they are the same directory or one holds the other, "
                         "and the source must never be modified; choose an output directory outside the source")


def _check_destination(dst: str, force: bool) -> None:
    if not os.path.exists(dst):
        return
    if not os.path.isdir(dst):
        raise ValueError(f"{dst} exists and is not a directory; the output must be a new or empty directory")
    names = sorted(os.listdir(dst))
    if names and not force:
        raise ValueError(f"{dst} is not empty ({', '.join(names[:5])}{', …' if len(names) > 5 else ''}): refusing to "
                         "write a checkpoint over it; pass --force (force=True) to replace the checkpoint files in it")


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKPOINT_FILES)


@contextlib.contextmanager
def _staging(dst: str) -> Iterator[str]:
    """A temporary directory beside ``dst`` (same file system, so moving it in is a rename), removed on any exit.

    Parent directories created for it are removed again (when still empty) if the conversion fails.
    """
    parent = os.path.dirname(os.path.realpath(dst))
    created = _missing_dirs(parent)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.realpath(dst))}.converting-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # empty after _publish, unless it was renamed to dst


def _missing_dirs(path: str) -> List[str]:
    """The directories ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _publish(tmp: str, dst: str) -> None:
    """Move the finished checkpoint in ``tmp`` to ``dst``: a rename when ``dst`` is new, else file by file.

    Into an existing ``dst``, the checkpoint files it held that the new checkpoint does not replace go first,
    then each new file replaces its namesake (``os.replace``: never a half-written file, and the old file's
    data, possibly hard-linked elsewhere, is unlinked, not overwritten).
    """
    target = os.path.realpath(dst)
    _usual_modes(tmp)
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    new = set(os.listdir(tmp))
    for name in os.listdir(target):
        if _is_checkpoint_file(name) and name not in new:
            os.remove(os.path.join(target, name))
    for name in new:
        os.replace(os.path.join(tmp, name), os.path.join(target, name))


def _usual_modes(tmp: str) -> None:
    """Give the staged checkpoint the modes a new directory and new files get (0755 / 0644 under the usual umask):
    ``mkdtemp`` made the directory 0700, and a model folder must stay readable to whoever serves it."""
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o666 & ~mask)


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (``/proc/self/status``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""Checkpoint formats, one module each: ``meta.py`` (``params.json`` + ``consolidated.*.pth``) and ``hf.py``
(``config.json`` + safetensors, with its tokenizer files and quantization record). Each reads a checkpoint
directory into a :class:`~.source.CheckpointSource` (Meta's names, Meta's RoPE layout, tensors read only when
asked) and writes one from a state dict; the model only ever sees one format. Here: which format a
directory holds, and opening it. ``gguf.py`` reads llama.cpp's single file (its tokenizer in
``gguf_tokenizer.py``; the ``gguf`` package it reads with is an optional extra, imported only when a GGUF file
is read; GGUF is read, not written).
"""

from __future__ import annotations

import os

from . import gguf
from .hf import HF_INDEX, open_hf
from .meta import META_SHARD, open_meta
from .source import Block, CheckpointSource, LazyTensor

__all__ = ["Block", "CheckpointSource", "LazyTensor", "check_checkpoint_dir", "detect_layout", "open_checkpoint"]


def check_checkpoint_dir(ckpt_dir: str | os.PathLike) -> str:
    """``ckpt_dir`` as a string, or ``FileNotFoundError`` saying that it does not exist or is not a directory.

    Entry points call it first, so a wrong path is reported as that, not as a missing file inside it.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.exists(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if not os.path.isdir(ckpt_dir) and not gguf.is_gguf_file(ckpt_dir):  # a GGUF checkpoint is one file
        raise FileNotFoundError(f"{ckpt_dir} is a file, not a checkpoint directory (pass the directory that holds "
                                "params.json + consolidated.*.pth or config.json + model.safetensors, or a .gguf file)")
    return ckpt_dir


def detect_layout(ckpt_dir: str | os.PathLike) -> str:
    """``"meta"``, ``"hf"`` or ``"gguf"`` from the files in ``ckpt_dir`` (or ``"gguf"`` for a GGUF file itself); a
    directory holding both Meta and HF checkpoints is refused, not guessed. GGUF files count only where neither
    layout's weights are present (llama.cpp's converter writes its output into the checkpoint directory)."""
    ckpt_dir = check_checkpoint_dir(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        return "gguf"
    names = os.listdir(ckpt_dir)
    meta, hf = "params.json" in names, "config.json" in names
    meta_weights = any(META_SHARD.fullmatch(n) for n in names)
    hf_weights = any(n.endswith(".safetensors") or n == HF_INDEX for n in names)
    if not (meta_weights or hf_weights) and gguf.gguf_files(ckpt_dir):
        return "gguf"
    if meta and hf:
        if meta_weights == hf_weights:
            raise ValueError(f"{ckpt_dir} is ambiguous: it holds params.json (Meta layout) and config.json (Hugging Face "
                             f"layout) and {'weights of both' if meta_weights else 'weights of neither'}; keep one "
                             "checkpoint per directory")
        return "meta" if meta_weights else "hf"
    if meta:
        return "meta"
    if hf:
        return "hf"
    shown = sorted(names)
    raise FileNotFoundError(
        f"{ckpt_dir} is not a checkpoint: expected params.json + consolidated.*.pth (Meta), "
        f"config.json + model.safetensors (Hugging Face) or a .gguf file; found "
        f"{shown[:8] if len(shown) <= 8 else shown[:8] + [f'… {len(shown) - 8} more']}")


def open_checkpoint(ckpt_dir: str | os.PathLike) -> CheckpointSource:
    """Read a checkpoint's configuration and index its tensors (nothing large is read yet).

    Everything that can be checked without reading the weights is checked here: the files are complete
    and consistent with each other, and the config describes the tensors the files hold.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    layout = detect_layout(ckpt_dir)
    if layout == "gguf":
        return gguf.open_gguf(ckpt_dir)
    return open_meta(ckpt_dir) if layout == "meta" else open_hf(ckpt_dir)

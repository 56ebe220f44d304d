"""From options to a serving engine, in one place: ``build(load, engine)``.

``Llama.build``, the server, the evaluator and the benchmarks all start here, so a checkpoint is opened,
checked, placed, laid out and served the same way whoever asks. The order matters for the errors a user
sees: every option is checked when its record is made (before anything is read), the checkpoint before
its tokenizer (an empty directory says it holds no checkpoint, not that a tokenizer is missing), and the
model's split across ``torchrun`` ranks before any collective could hang.

The weights' layout in memory is decided here, once: on a CPU, an engine that compiles a one-slot decode
step gets the matvec layout (dense weights its compiled reduction reads), any other gets oneDNN's packed
weights; elsewhere the checkpoint's layout.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from .checkpoint import BUNDLED_CKPT_DIR, check_tokenizer, default_transforms, load_model
from .distributed import check_parallel, env_world, init_tensor_parallel
from .engine import Engine
from .engine.speculative import DraftModel, PromptLookup, same_tokenizer
from .model import Transformer
from .formats import CheckpointSource, check_checkpoint_dir, open_checkpoint
from .formats.gguf_tokenizer import gguf_tokenizer
from .kernels import select_ops
from .options import EngineOptions, LoadOptions, OptionError, blame
from .tokenizer import Tokenizer

# The bundled model is a demonstration: it rarely stops by itself, so answers are capped unless asked otherwise.
BUNDLED_MAX_GEN_LEN = 128
BUNDLED_CONTEXT_LEN = 512  # the rows it was trained on; past them its output degrades
BUNDLED_NOTICE = ("codellama: no checkpoint given: using the bundled tiny demonstration model (5M parameters, trained "
                  f"on the Python standard library; answers capped at {BUNDLED_MAX_GEN_LEN} new tokens). "
                  "For real work pass a Code Llama checkpoint: Llama.build(ckpt_dir) or --ckpt_dir DIR.")


@dataclass
class Built:
    """What :func:`build` made: the model, its tokenizer, the engine serving it, and the options it came from.
    ``bundled`` says that it is the tiny demonstration model (whose answers callers cap at
    ``BUNDLED_MAX_GEN_LEN`` new tokens unless asked otherwise)."""

    model: Transformer
    tokenizer: Tokenizer
    engine: Engine
    load: LoadOptions
    options: EngineOptions
    bundled: bool


def build(load: LoadOptions = LoadOptions(), options: EngineOptions = EngineOptions()) -> Built:
    """Load the checkpoint ``load`` names and put an engine configured by ``options`` over it.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank joins the process group, takes its GPU (``LOCAL_RANK``)
    and loads only its slices of the weights, whatever the checkpoint's shard count.
    """
    world, rank, local_rank = env_world()
    if load.model_parallel_size is not None and load.model_parallel_size != world:
        raise OptionError("model_parallel_size", load.model_parallel_size,
                          f"but this job has WORLD_SIZE={world}: launch `torchrun --nproc_per_node "
                          f"{load.model_parallel_size} …` (or leave model_parallel_size=None)")
    if options.speculate is not None and world > 1:
        raise OptionError("speculate", options.speculate, "is not supported under tensor "
                                                          "parallelism (torchrun)")
    device = load.torch_device
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", local_rank)  # under torchrun: this rank's GPU
    dtype = load.torch_dtype
    select_ops(load.attention, device)
    bundled = load.ckpt_dir is None
    with blame("ckpt_dir"):
        ckpt_dir = check_checkpoint_dir(BUNDLED_CKPT_DIR if bundled else load.ckpt_dir)
        source = open_checkpoint(ckpt_dir)
    tokenizer = load_tokenizer(load.tokenizer_path, ckpt_dir, source)
    with blame("tokenizer_path"):
        check_tokenizer(source.args, tokenizer.n_words, tokenizer.model_path)
    if bundled and rank == 0:
        print(BUNDLED_NOTICE, file=sys.stderr)
    check_parallel(source.args, world)  # every rank fails alike, before any collective could hang
    tp = init_tensor_parallel(world, rank, device)
    transforms = default_transforms(device, compiled_decode_rows=options.max_batch_size if options.compile else None)
    model = load_model(source, device=device, dtype=dtype, tp=tp, quantize=load.quantize, transforms=transforms)
    model.set_attention(load.attention)
    engine = Engine(model, tokenizer, max_batch_size=options.max_batch_size, max_seq_len=options.max_seq_len,
                    max_tokens_per_step=options.max_tokens_per_step, max_waiting=options.max_waiting,
                    compile=options.compile, seed=options.seed,
                    speculator=make_speculator(options, tokenizer, device, dtype),
                    cache_ram_mb=options.cache_ram_mb, cache_reuse=options.cache_reuse)
    return Built(model, tokenizer, engine, load, options, bundled)


def load_tokenizer(tokenizer_path: Optional[str], ckpt_dir: str, source: CheckpointSource) -> Tokenizer:
    """The tokenizer at ``tokenizer_path``, else the checkpoint's own: its ``tokenizer.model``, or a GGUF file's
    vocabulary."""
    if tokenizer_path is None and source.layout == "gguf":
        return gguf_tokenizer(source)
    path = tokenizer_path if tokenizer_path is not None else os.path.join(ckpt_dir, "tokenizer.model")
    with blame("tokenizer_path"):
        if not os.path.isfile(path):
            hint = "no such file" if tokenizer_path is not None else "the checkpoint has no tokenizer.model; pass its path"
            raise FileNotFoundError(f"tokenizer not found: {path} ({hint})")
        return Tokenizer(path)


def make_speculator(options: EngineOptions, tokenizer: Tokenizer, device: torch.device, dtype=None):
    """The speculator the options ask for (None: plain decoding); a draft model is loaded here."""
    if options.speculate == "prompt":
        return PromptLookup(num_tokens=options.speculate_tokens or 10)
    if options.speculate != "draft":
        return None
    with blame("draft_ckpt_dir"):
        ckpt_dir = check_checkpoint_dir(options.draft_ckpt_dir)
        same_tokenizer(Tokenizer(os.path.join(ckpt_dir, "tokenizer.model")), tokenizer)
        model = load_model(ckpt_dir, device=device, dtype=dtype)
        if model.args.vocab_size != tokenizer.n_words:
            raise ValueError(f"the draft model's vocab_size {model.args.vocab_size} differs from the target "
                             f"tokenizer's {tokenizer.n_words} pieces")
    return DraftModel(model, options.max_batch_size, options.max_seq_len, options.speculate_tokens or 6)

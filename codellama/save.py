"""Writing checkpoints in Meta's and Hugging Face's layouts, and converting one into the other.

The reading side, and the names and q/k permutation both layouts share, are in ``checkpoint.py``;
``python -m codellama.convert`` is the command line over :func:`convert_checkpoint`, which never
modifies its source and never leaves a half-written destination.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional

import torch

from .checkpoint import (HF_INDEX, _rope_heads, build_on_meta, check_checkpoint_dir, check_tokenizer, meta_to_hf_name,
                         open_checkpoint, permute_to_hf)
from .config import ModelArgs, check_size
from .distributed import split_dim
from .runtime import parse_dtype
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .quantize import QuantConfig, QuantizeArg  # imported where used, as checkpoint.py explains

# Files of either layout that ``convert --force`` replaces in a destination: any of them left behind from an
# older checkpoint would be read with the new one (a stale index wins over a new model.safetensors, a stale
# consolidated.01.pth becomes a shard of the new model, a stale params.json makes an HF directory look Meta).
CHECKPOINT_FILES = ("params.json", "consolidated.*.pth", "config.json", "generation_config.json", "model.safetensors",
                    "model-*.safetensors", HF_INDEX, "pytorch_model*.bin", "pytorch_model.bin.index.json",
                    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def check_num_shards(args: ModelArgs, num_shards: int) -> None:
    """Refuse a Meta shard count that does not split every weight into whole heads and equal blocks."""
    check_size("num_shards", num_shards)
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "dim": args.dim, "FFN hidden size": args.hidden_dim}
    if args.vocab_size > 0:  # -1 (from the tokenizer): output.weight's rows are checked when it is split
        sizes["vocab_size"] = args.vocab_size
    bad = [f"{name}={size}" for name, size in sizes.items() if size % num_shards]
    if bad:
        valid = [n for n in range(1, args.kv_heads + 1) if all(size % n == 0 for size in sizes.values())]
        raise ValueError(f"cannot split this model into {num_shards} Meta shards: {', '.join(bad)} not divisible by "
                         f"{num_shards}; valid shard counts: {valid}")


def split_for_shards(key: str, tensor: torch.Tensor, num_shards: int) -> List[torch.Tensor]:
    """Meta's model-parallel pieces of one full tensor."""
    dim = split_dim(key, tensor.dim())
    if num_shards == 1 or dim is None:
        return [tensor] * num_shards
    if tensor.shape[dim] % num_shards:
        raise ValueError(f"{key}: size {tensor.shape[dim]} along dim {dim} does not divide into {num_shards} shards")
    return [t.clone() for t in tensor.chunk(num_shards, dim=dim)]


def save_meta(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike, num_shards: int = 1) -> None:
    """Write ``params.json`` and ``consolidated.{00..}.pth`` split as Meta's model-parallel ranks are.

    Every shard is split before anything is written, so a bad ``num_shards`` leaves no file behind.
    ``out_dir`` is written as it is: use :func:`convert_checkpoint` to replace a checkpoint safely.
    """
    check_num_shards(args, num_shards)
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for key, tensor in state.items():
        for shard, piece in zip(shards, split_for_shards(key, tensor, num_shards)):
            shard[key] = piece.contiguous()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "params.json"), args.to_params())
    for i, shard in enumerate(shards):
        torch.save(shard, os.path.join(out_dir, f"consolidated.{i:02d}.pth"))


def to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Meta-named weights → Hugging Face names, with ``wq``/``wk`` rows permuted for rotate-half RoPE."""
    hf_state = {}
    for key, tensor in state.items():
        n = _rope_heads(key, args)
        hf_state[meta_to_hf_name(key)] = (tensor if n is None else permute_to_hf(tensor, n)).contiguous()
    return hf_state


def save_hf(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30, quantization: Optional["QuantConfig"] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index past ``max_shard_bytes``).

    ``quantization``: the scheme of a quantized ``state`` (integer codes and scales), recorded in ``config.json``.
    """
    from safetensors.torch import save_file

    check_size("max_shard_bytes", max_shard_bytes)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    config = args.to_hf_config(torch_dtype=str(dtype).removeprefix("torch."))
    if quantization is not None:
        from .quantize import CONFIG_KEY
        config[CONFIG_KEY] = quantization.to_json()
    write_json(os.path.join(out_dir, "config.json"), config)
    hf_state = to_hf_state_dict(state, args)
    groups: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for name, t in group.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    write_json(os.path.join(out_dir, HF_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: str, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------- Hugging Face tokenizer files
_FIM_TOKENS = {"prefix_token": "▁<PRE>", "middle_token": "▁<MID>", "suffix_token": "▁<SUF>", "eot_token": "▁<EOT>"}


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write what ``transformers.AutoTokenizer`` needs next to ``tokenizer.model``, and ``generation_config.json``.

    ``tokenizer_config.json`` names ``CodeLlamaTokenizer`` (as Hugging Face's own Code Llama repositories do),
    with its FIM tokens where the vocabulary has them and none where it does not (Python, 34B: no infilling).
    ``tokenizer.json`` holds the vocabulary and BPE merges, so that transformers 5 needs neither protobuf nor
    a conversion of ``tokenizer.model``; with its SentencePiece-exact normalizer it encodes as this library
    does when read by ``tokenizers`` or transformers 4.
    """
    out_dir = os.fspath(out_dir)
    sp = tokenizer.sp_model
    pieces = [sp.id_to_piece(i) for i in range(tokenizer.n_words)]
    bos, eos, unk = pieces[tokenizer.bos_id], pieces[tokenizer.eos_id], pieces[sp.unk_id()]
    fim = {key: piece if piece in pieces else None for key, piece in _FIM_TOKENS.items()}
    special = [bos, eos, unk] + [piece for piece in fim.values() if piece]
    write_json(os.path.join(out_dir, "tokenizer.json"), _tokenizer_json(tokenizer, pieces, special))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "CodeLlamaTokenizer", "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, **fim,
        "fill_token": "<FILL_ME>" if all(fim.values()) else None, "use_default_system_prompt": False,
        "legacy": True})  # transformers 4: encode as SentencePiece does, also after a special token
    write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "additional_special_tokens": [piece for piece in fim.values() if piece]})
    write_json(os.path.join(out_dir, "generation_config.json"),
               {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id})


def _tokenizer_json(tokenizer: Tokenizer, pieces: List[str], special: List[str]) -> Dict[str, Any]:
    """The ``tokenizers`` serialisation of a SentencePiece BPE model (the layout HF's own Llama converter writes)."""
    ids = {piece: i for i, piece in enumerate(pieces)}
    prefix = {"type": "Prepend", "prepend": "▁"}  # SentencePiece's implicit leading space, always added
    spaces = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    bos = pieces[tokenizer.bos_id]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": ids[p], "content": p, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for p in special],
        "normalizer": {"type": "Sequence", "normalizers": [prefix, spaces]},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                     {"type": "ByteFallback"}, {"type": "Fuse"},
                                                     {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[tokenizer.sp_model.unk_id()],
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": ids, "merges": bpe_merges(tokenizer, pieces)},
    }


def bpe_merges(tokenizer: Tokenizer, pieces: List[str]) -> List[List[str]]:
    """The BPE merges that reproduce SentencePiece's encoding, highest-scoring merged piece first.

    SentencePiece stores only scored pieces: at each step it joins the adjacent pair whose concatenation is
    the highest-scoring piece. So every way of splitting a piece into two pieces is a merge, ranked by the
    score of the piece it makes. Control, unknown and byte pieces never come out of a merge.
    """
    sp = tokenizer.sp_model
    mergeable = {p: i for i, p in enumerate(pieces) if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i))}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-sp.GetScore(i), i, mergeable[left], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


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
    quantized and kept as codes one at a time, so memory peaks near the size of the quantized model.
    ``dtype`` is that of the scales and of the tensors left in full precision (default: the checkpoint's).
    Safe as ``convert_checkpoint`` is: ``src`` is only read and a failed run leaves nothing behind.
    """
    from .quantize import SCHEMES, parse_quantize, quantize_model, quantize_weight
    config = parse_quantize(config)
    if config is None:
        raise ValueError(f"quantize_checkpoint needs a scheme: one of {', '.join(map(repr, SCHEMES))} or a QuantConfig")
    dtype = parse_dtype(dtype)
    check_size("max_shard_bytes", max_shard_bytes)
    src, dst, source, tokenizer = _open_source(src, dst, force)
    # Which tensors become codes is what the module swap decides: the keys of a quantized model's state_dict.
    quantized = {k.rsplit(".", 1)[0] for k in quantize_model(build_on_meta(source.args), config).state_dict()
                 if k.endswith(".scales")}
    with _staging(dst) as tmp:
        state: Dict[str, torch.Tensor] = {}
        for key, lazy in source.tensors.items():
            tensor = lazy.load() if dtype is None else lazy.load().to(dtype)
            module = key.rsplit(".", 1)[0]
            if module not in quantized:
                state[key] = tensor
                continue
            try:
                codes = quantize_weight(tensor, config.for_layer(module))
            except ValueError as e:
                raise ValueError(f"cannot quantize {key} as {config.describe()}: {e}") from None
            state.update({f"{module}.{name}": t for name, t in codes.items()})
        save_hf(state, source.args, tmp, max_shard_bytes=max_shard_bytes, quantization=config)
        del state
        _complete(tmp, dst, tokenizer, hf=True)


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
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    new = set(os.listdir(tmp))
    for name in os.listdir(target):
        if _is_checkpoint_file(name) and name not in new:
            os.remove(os.path.join(target, name))
    for name in new:
        os.replace(os.path.join(tmp, name), os.path.join(target, name))


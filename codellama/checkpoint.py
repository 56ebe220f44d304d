"""Checkpoints: Meta (``params.json`` + ``consolidated.*.pth``) and Hugging Face (``config.json`` + safetensors).

Both layouts are read into Meta's names and Meta's RoPE layout here, at the edge; the model only
knows one format. Tensors are read lazily (``mmap``, safetensors slices) so loading holds about one
copy of the weights. ``.pth`` files are loaded with ``weights_only=True``: a pickle that tries to build
anything but tensors is refused, never executed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .config import ModelArgs, read_json
from .cpu import COMPILED_ONE_ROW_TRANSFORMS, CPU_TRANSFORMS
from .distributed import SINGLE, TensorParallel, rank_block, split_dim
from .model import Transformer
from .runtime import default_dtype, parse_dtype, resolve_device

if TYPE_CHECKING:
    from .quantize import QuantConfig, QuantizeArg
# ``codellama.quantize`` is imported where it is used: ``python -m codellama.quantize`` must not find the
# package already holding it (runpy would warn, and run a second copy of its classes).

# Keys real checkpoints carry that the model does not use; dropped by name, nothing else is.
IGNORED_META_KEYS = ("rope.freqs",)
_LAYER_KEY = re.compile(r"layers\.(\d+)\.")
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}


# ----------------------------------------------------------------------------- q/k permutation
def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's interleaved-pair rows of ``wq``/``wk`` → Hugging Face's rotate-half rows.

    Any tensor with one row per output (a weight, or a quantized layer's codes and scales) is permuted alike.
    """
    rows = w.reshape(w.shape[0], -1)  # (out, …): per-row scales (out,) are one column
    hd = rows.shape[0] // n_heads
    return rows.view(n_heads, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows of ``q_proj``/``k_proj`` → Meta's interleaved pairs (any per-row tensor)."""
    rows = w.reshape(w.shape[0], -1)
    hd = rows.shape[0] // n_heads
    return rows.view(n_heads, 2, hd // 2, -1).transpose(1, 2).reshape(w.shape)


def _rope_heads(meta_name: str, args: ModelArgs) -> Optional[int]:
    """The head count to (un)permute ``wq``/``wk`` rows with; None for every other tensor."""
    module = meta_name.rsplit(".", 1)[0]
    if module.endswith("attention.wq"):
        return args.n_heads
    if module.endswith("attention.wk"):
        return args.kv_heads
    return None


# A layer's tensors: its weight, and a quantized layer's scales and zeros (``codellama.quantize``).
_TENSOR_NAMES = "weight|scales|zeros"


def hf_to_meta_name(name: str) -> Optional[str]:
    m = re.fullmatch(rf"(.+)\.({_TENSOR_NAMES})", name)
    if not m:
        return None
    module, tensor = m.groups()
    if module + ".weight" in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[module + ".weight"].removesuffix("weight") + tensor
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in _HF_LAYER_NAMES:
        return f"layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}.{tensor}"
    return None


def meta_to_hf_name(name: str) -> str:
    m = re.fullmatch(rf"(.+)\.({_TENSOR_NAMES})", name)
    module, tensor = m.groups() if m else (name, "")
    for hf, meta in _HF_TOP_NAMES.items():
        if module + ".weight" == meta:
            return hf.removesuffix("weight") + tensor
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", module)
    inverse = {v: k for k, v in _HF_LAYER_NAMES.items()}
    if not tensor or not m or m.group(2) not in inverse:
        raise ValueError(f"unknown parameter {name!r}: not a Llama weight")
    return f"model.layers.{m.group(1)}.{inverse[m.group(2)]}.{tensor}"


# ----------------------------------------------------------------------------- lazy tensor sources
Block = Optional[Tuple[int, int, int]]  # (dim, start, stop) of a tensor, or None for all of it


@dataclass
class LazyTensor:
    """A checkpoint tensor in Meta's layout, known by shape and dtype, read only when asked.

    ``read(block)`` returns the whole tensor (``block=None``) or one rank's ``(dim, start, stop)``
    block of it, touching only the bytes that block needs.
    """
    shape: Tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[Block], torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.read(None)

    def block_shape(self, block: Block) -> Tuple[int, ...]:
        if block is None:
            return self.shape
        dim, start, stop = block
        return self.shape[:dim] + (stop - start,) + self.shape[dim + 1:]


def _read_pieces(parts: List[torch.Tensor], piece_dim: Optional[int], block: Block) -> torch.Tensor:
    """A block of the tensor Meta's shards ``parts`` make when joined along ``piece_dim`` (None: replicated)."""
    if piece_dim is None:
        return parts[0] if block is None else parts[0].narrow(block[0], block[1], block[2] - block[1])
    if block is None or block[0] != piece_dim:
        full = torch.cat(parts, dim=piece_dim)
        return full if block is None else full.narrow(block[0], block[1], block[2] - block[1])
    dim, start, stop = block
    pieces, offset = [], 0
    for part in parts:  # only the shards that overlap [start, stop) are touched
        n = part.shape[dim]
        a, b = max(start, offset), min(stop, offset + n)
        if a < b:
            pieces.append(part.narrow(dim, a - offset, b - a))
        offset += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


@dataclass
class CheckpointSource:
    """What a checkpoint directory holds, with every tensor named and laid out as Meta's model expects."""
    layout: str  # "meta" or "hf"
    path: str
    args: ModelArgs  # vocab_size resolved from the weights
    tensors: Dict[str, LazyTensor]
    num_shards: int = 1
    quantization: Optional["QuantConfig"] = None  # a checkpoint written by ``python -m codellama.quantize``


META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
HF_INDEX = "model.safetensors.index.json"


def check_checkpoint_dir(ckpt_dir: str | os.PathLike) -> str:
    """``ckpt_dir`` as a string, or ``FileNotFoundError`` saying that it does not exist or is not a directory.

    Entry points call it first, so a wrong path is reported as that, not as a missing file inside it.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    if not os.path.exists(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if not os.path.isdir(ckpt_dir) and not _gguf().is_gguf_file(ckpt_dir):  # a GGUF checkpoint is one file
        raise FileNotFoundError(f"{ckpt_dir} is a file, not a checkpoint directory (pass the directory that holds "
                                "params.json + consolidated.*.pth or config.json + model.safetensors, or a .gguf file)")
    return ckpt_dir


def _gguf():
    from .formats import gguf  # imports the gguf package only when a GGUF file is read
    return gguf


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
    if not (meta_weights or hf_weights) and _gguf().gguf_files(ckpt_dir):
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
    raise FileNotFoundError(
        f"{ckpt_dir} is not a checkpoint: expected params.json + consolidated.*.pth (Meta), "
        f"config.json + model.safetensors (Hugging Face) or a .gguf file; found {sorted(names)}")


def open_checkpoint(ckpt_dir: str | os.PathLike) -> CheckpointSource:
    """Read a checkpoint's configuration and index its tensors (nothing large is read yet).

    Everything that can be checked without reading the weights is checked here: the files are complete
    and consistent with each other, and the config describes the tensors the files hold.
    """
    ckpt_dir = os.fspath(ckpt_dir)
    layout = detect_layout(ckpt_dir)
    if layout == "gguf":
        return _gguf().open_gguf(ckpt_dir)
    return _open_meta(ckpt_dir) if layout == "meta" else _open_hf(ckpt_dir)


def _meta_shard_paths(ckpt_dir: str) -> List[str]:
    """``consolidated.00.pth … consolidated.NN.pth``, refusing a gap or two files for one shard."""
    shards: Dict[int, List[str]] = {}
    for name in sorted(os.listdir(ckpt_dir)):
        m = META_SHARD.fullmatch(name)
        if m:
            shards.setdefault(int(m.group(1)), []).append(name)
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth files in {ckpt_dir} (next to params.json)")
    doubled = [names for names in shards.values() if len(names) > 1]
    if doubled:
        raise ValueError(f"{ckpt_dir} is ambiguous: {' and '.join(doubled[0])} are the same shard")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(shards) + 1) if i not in shards]
    if missing:
        raise FileNotFoundError(f"{ckpt_dir}: shard(s) {', '.join(missing)} missing; the shards must be numbered "
                                f"00…{max(shards):02d} without gaps (found {[n for ns in shards.values() for n in ns]})")
    return [os.path.join(ckpt_dir, shards[i][0]) for i in sorted(shards)]


def load_pth(path: str) -> Dict[str, torch.Tensor]:
    """A ``.pth`` state dict, memory-mapped, refusing any pickle payload that is not plain tensors.

    A legacy (pre-zip, ``_use_new_zipfile_serialization=False``) file cannot be memory-mapped, so it is read
    whole, under the same ``weights_only`` rule.
    """
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        sd = torch.load(path, map_location="cpu", mmap=is_zip, weights_only=True)
    except Exception as e:  # UnpicklingError for forbidden globals, RuntimeError for a corrupt zip, EOFError, …
        raise ValueError(f"refusing to load {path}: {_describe_pth_error(e, is_zip)}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, expected a dict of tensors")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            nested = " (a nested dict: save the model's state_dict() itself)" if isinstance(v, dict) else ""
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor{nested}")
    return sd


def _describe_pth_error(e: Exception, is_zip: bool) -> str:
    """What a ``.pth`` that ``torch.load(weights_only=True)`` refused is, in one line."""
    kind = "PyTorch zip file" if is_zip else "legacy-format PyTorch file"
    forbidden = re.search(r"GLOBAL ([\w.]+)", str(e))
    if forbidden:
        return (f"not a weights-only state dict: this {kind} pickles {forbidden.group(1)} (an object or a call, "
                "not only tensors), so it was not unpickled; re-save it with torch.save(model.state_dict(), path)")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else "unexpected end of file"
    if is_zip:
        return f"not a weights-only state dict: a corrupt or truncated {kind} ({type(e).__name__}: {first_line})"
    return f"not a weights-only state dict: not a PyTorch file, or a corrupt one ({type(e).__name__}: {first_line})"


def _open_meta(ckpt_dir: str) -> CheckpointSource:
    params = ModelArgs.from_params_json(os.path.join(ckpt_dir, "params.json"))
    paths = _meta_shard_paths(ckpt_dir)
    shards = [load_pth(p) for p in paths]
    keys = [k for k in shards[0] if k not in IGNORED_META_KEYS]
    for p, s in zip(paths[1:], shards[1:]):
        diff = set(keys) ^ (set(s) - set(IGNORED_META_KEYS))
        if diff:
            raise ValueError(f"{p} and {paths[0]} hold different keys: {sorted(diff)[:10]}")
    tensors = {k: _merge_meta_shards(k, [s[k] for s in shards], paths) for k in keys}
    args = _match_config(params, tensors, ckpt_dir, meta_shards=len(paths))
    return CheckpointSource("meta", ckpt_dir, args, tensors, num_shards=len(paths))


def _merge_meta_shards(key: str, parts: List[torch.Tensor], paths: List[str]) -> LazyTensor:
    """Tensor ``key`` of Meta's model-parallel shards: joined along its split axis, or replicated.

    Shards may differ only along the axis Meta splits ``key`` on; a replicated tensor (the norms) must be
    the same in every shard, or which shard's copy is right is unknowable.
    """
    first = parts[0]
    dim = split_dim(key, first.dim()) if len(parts) > 1 else None
    for part, path in zip(parts[1:], paths[1:]):
        if part.dtype != first.dtype:
            raise ValueError(f"{key} is {part.dtype} in {path} but {first.dtype} in {paths[0]}")
        same_shape = part.dim() == first.dim() and all(
            a == b for i, (a, b) in enumerate(zip(part.shape, first.shape)) if i != dim)
        if not same_shape:
            rule = (f"shards may differ only along dim {dim}, the axis Meta splits it on" if dim is not None else
                    "it is replicated (not split), so every shard must hold the same tensor")
            raise ValueError(f"{key} has shape {tuple(part.shape)} in {path} but {tuple(first.shape)} in {paths[0]}: "
                             + rule)
        if dim is None and not torch.equal(part, first):
            raise ValueError(f"{key} differs between {paths[0]} and {path}: it is replicated (not split), so every "
                             "shard must hold the same values")
    if dim is None:
        return LazyTensor(tuple(first.shape), first.dtype, lambda block: _read_pieces(parts, None, block))
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return LazyTensor(tuple(shape), first.dtype, lambda block: _read_pieces(parts, dim, block))


def _hf_files(ckpt_dir: str) -> Tuple[Dict[str, str], str]:
    """HF tensor name → safetensors file path, and the file that says so (the index or ``model.safetensors``)."""
    index = os.path.join(ckpt_dir, HF_INDEX)
    single = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.isfile(index) and os.path.isfile(single):
        raise ValueError(f"{ckpt_dir} is ambiguous: it holds both model.safetensors and {HF_INDEX} (shards); "
                         "remove the one that is stale")
    if os.path.isfile(index):
        return _read_hf_index(index), index
    if os.path.isfile(single):
        return {name: single for name in _safe_open(single).keys()}, single
    found = sorted(os.listdir(ckpt_dir))
    hint = " (.bin checkpoints are pickles: convert them to safetensors)" if any(f.endswith(".bin") for f in found) else ""
    raise FileNotFoundError(f"{ckpt_dir}: no model.safetensors or {HF_INDEX}{hint}; found {found}")


def _read_hf_index(index: str) -> Dict[str, str]:
    """The ``weight_map`` of a sharded safetensors checkpoint, every value a shard file next to the index."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} is not a safetensors index: it needs a non-empty 'weight_map' object")
    ckpt_dir = os.path.dirname(index)
    files = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or fname in ("", ".", "..") or os.path.basename(fname) != fname:
            raise ValueError(f"{index}: weight_map[{name!r}] is {fname!r}; each value must be the name of a "
                             f"safetensors file in {ckpt_dir} (no directories)")
        files[name] = os.path.join(ckpt_dir, fname)
    for path in sorted(set(files.values())):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {index} but missing")
    return files


def _safe_open(path: str) -> Any:
    """A safetensors file opened lazily (header only); ``ValueError`` naming it when it is truncated or corrupt."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError: bad header length, invalid JSON, data not covering the file, …
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt): {e}") from None


def _open_hf(ckpt_dir: str) -> CheckpointSource:
    from .quantize import CONFIG_KEY, QuantConfig
    config = read_json(os.path.join(ckpt_dir, "config.json"))
    params = ModelArgs.from_hf_config(config)
    quantization = (QuantConfig.from_json(config[CONFIG_KEY], os.path.join(ckpt_dir, "config.json"))
                    if CONFIG_KEY in config else None)
    dtypes = {**_SAFETENSORS_DTYPES, **(_SAFETENSORS_CODES if quantization else {})}
    files, listing = _hf_files(ckpt_dir)
    handles: Dict[str, Any] = {}  # path -> open safetensors file
    held: Dict[str, frozenset] = {}  # path -> the tensor names it holds

    def handle(path: str):
        if path not in handles:
            handles[path] = _safe_open(path)
            held[path] = frozenset(handles[path].keys())
        return handles[path]

    tensors: Dict[str, LazyTensor] = {}
    unexpected = []
    for name, path in files.items():
        if _HF_IGNORED.match(name):
            continue
        meta_name = hf_to_meta_name(name)
        if meta_name is None:
            unexpected.append(name)
            continue
        f = handle(path)
        if name not in held[path]:
            raise ValueError(f"{listing} places tensor {name} in {path}, which does not hold it")
        sl = f.get_slice(name)
        shape = tuple(sl.get_shape())
        dtype = dtypes.get(sl.get_dtype())
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {sl.get_dtype()}; valid: {', '.join(dtypes)}"
                             + ("" if quantization else f" ({', '.join(_SAFETENSORS_CODES)} only in a checkpoint "
                                                        f"whose config.json has a {CONFIG_KEY})"))
        permuted = _rope_heads(meta_name, params) is not None

        def read(block: Block, path=path, name=name, permuted=permuted) -> torch.Tensor:
            f = handle(path)
            if block is None:
                t = f.get_tensor(name)
            else:  # read only the rows / columns of this block
                dim, start, stop = block
                sl = f.get_slice(name)
                t = sl[start:stop] if dim == 0 else sl[:, start:stop]
            # HF permutes rows within each head, so a block of whole heads unpermutes on its own
            return permute_from_hf(t, t.shape[0] // params.head_dim) if permuted else t

        tensors[meta_name] = LazyTensor(shape, dtype, read)
    if unexpected:
        raise ValueError(f"{ckpt_dir}: unexpected tensor(s) {sorted(unexpected)[:10]} (not Llama weights)")
    if "output.weight" not in tensors and config.get("tie_word_embeddings") and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    args = _match_config(params, tensors, ckpt_dir, quantization=quantization)
    return CheckpointSource("hf", ckpt_dir, args, tensors, quantization=quantization)


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_SAFETENSORS_CODES = {"I8": torch.int8, "U8": torch.uint8}  # a quantized checkpoint's integer codes


def _match_config(args: ModelArgs, tensors: Dict[str, LazyTensor], where: str,
                  meta_shards: Optional[int] = None, quantization: Optional["QuantConfig"] = None) -> ModelArgs:
    """``args`` with ``vocab_size`` read from the weights, after checking that the config describes these tensors.

    Checked before the model is built, so a config asking for 1000 layers of a 2-layer checkpoint fails now,
    not after building 1000 layers. Only the sizes that say which model this is are compared here; every
    key and shape is checked against the built model by ``materialize``. ``meta_shards``: how many Meta
    shards were merged, to recognise a checkpoint with shards missing (its embedding is too narrow).
    ``quantization``: the scheme of a quantized checkpoint, whose int4 embedding holds two codes a byte.
    """
    from .quantize import stored_embedding_width
    emb = tensors.get("tok_embeddings.weight")
    if emb is None:
        raise ValueError(f"{where}: missing key(s) ['tok_embeddings.weight']")
    if len(emb.shape) != 2:
        raise ValueError(f"{where}: tok_embeddings.weight has shape {emb.shape}, expected (vocab_size, dim)")
    vocab, dim = emb.shape
    if quantization is not None and stored_embedding_width(args.dim, quantization) == dim:
        dim = args.dim  # codes of a quantized embedding: checked against the model by materialize
    if args.vocab_size not in (-1, vocab):
        raise ValueError(f"{where}: vocab_size {args.vocab_size} in the config, but tok_embeddings.weight has {vocab} rows")
    if dim != args.dim:
        per_shard = dim // (meta_shards or 1)
        if meta_shards and 0 < per_shard and dim < args.dim and args.dim % per_shard == 0:  # Meta splits it along dim
            missing = [f"consolidated.{i:02d}.pth" for i in range(meta_shards, args.dim // per_shard)]
            raise FileNotFoundError(
                f"{where}: shard(s) {', '.join(missing)} missing: dim is {args.dim} in params.json, and each of the "
                f"{meta_shards} shard(s) found holds {per_shard} columns of tok_embeddings.weight")
        raise ValueError(f"{where}: dim {args.dim} in the config, but tok_embeddings.weight has {dim} columns")
    layers = {int(m.group(1)) for m in map(_LAYER_KEY.match, tensors) if m}
    if layers != set(range(args.n_layers)):
        gaps = sorted(set(range(max(layers, default=0))) - layers)
        held = "no layers" if not layers else \
            f"{len(layers)} layer(s), numbered {min(layers)}…{max(layers)}" + (f" without {gaps[:5]}" if gaps else "")
        raise ValueError(f"{where}: n_layers {args.n_layers} in the config, but the checkpoint holds {held}")
    return replace(args, vocab_size=vocab)


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
    """Build a ``Transformer`` from a Meta or Hugging Face checkpoint directory or a GGUF file (None: the bundled
    tiny model; GGUF: ``codellama.formats.gguf`` says what each tensor type becomes).

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
    from .quantize import check_quantized_split, parse_quantize, quantization_step, quantize_model
    if ckpt_dir is None:
        ckpt_dir = BUNDLED_CKPT_DIR
    config = parse_quantize(quantize)
    source = ckpt_dir if isinstance(ckpt_dir, CheckpointSource) else open_checkpoint(ckpt_dir)
    device = resolve_device(device)
    dtype = parse_dtype(dtype) or default_dtype(device)
    if source.layout == "gguf" and source.quantization is None:  # its blocks become this library's schemes here
        source, config = _gguf().as_loaded(source, config, dtype), None
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
    for key in expected:
        tensor = source.tensors[key].read(blocks[key])
        if blocks[key] is not None:
            tensor = tensor.contiguous()  # this rank's block only, not a view pinning the whole tensor
        yield key, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)

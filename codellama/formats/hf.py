"""Hugging Face's layout: ``config.json`` + ``model.safetensors`` (or shards and their index), its tokenizer
files, and the record of a quantized checkpoint.

Everything about this format is here: its names for Meta's parameters, the q/k row permutation of HF's
converter (rotate-half RoPE; undone when reading, redone when writing), ``config.json`` in both directions,
``tokenizer.json`` / ``tokenizer_config.json`` for transformers, and ``quantization_config`` (the scheme of a
checkpoint written by ``python -m codellama.quantize``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..config import (NORM_EPS_RANGE, ROPE_THETA_RANGE, ModelArgs, check_number, check_size, ffn_params_for,
                      read_json, write_json)
from ..quantize import CONFIG_KEY, QuantConfig
from ..tokenizer import Tokenizer
from .source import Block, CheckpointSource, LazyTensor, byte_span, match_config, release_pages

_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}

_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}

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

def rope_heads(meta_name: str, args: ModelArgs) -> Optional[int]:
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

HF_INDEX = "model.safetensors.index.json"

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

def open_hf(ckpt_dir: str) -> CheckpointSource:
    config = read_json(os.path.join(ckpt_dir, "config.json"))
    params = read_config(config)
    quantization = (QuantConfig.from_json(config[CONFIG_KEY], os.path.join(ckpt_dir, "config.json"))
                    if CONFIG_KEY in config else None)
    dtypes = {**_SAFETENSORS_DTYPES, **(_SAFETENSORS_CODES if quantization else {})}
    files, listing = _hf_files(ckpt_dir)
    handles: Dict[str, Any] = {}  # path -> open safetensors file
    held: Dict[str, frozenset] = {}  # path -> the tensor names it holds
    spans: Dict[str, Tuple[int, int]] = {}  # tensor name -> the addresses its last read covered

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
        permuted = rope_heads(meta_name, params) is not None

        def read(block: Block, path=path, name=name, permuted=permuted) -> torch.Tensor:
            f = handle(path)
            if block is None:
                t = f.get_tensor(name)
            else:  # read only the rows / columns of this block
                dim, start, stop = block
                sl = f.get_slice(name)
                t = sl[start:stop] if dim == 0 else sl[:, start:stop]
            spans[name] = byte_span(t)  # where it lies in the mapped file (making the view again would touch it)
            # HF permutes rows within each head, so a block of whole heads unpermutes on its own
            return permute_from_hf(t, t.shape[0] // params.head_dim) if permuted else t

        def release(block: Block, path=path, name=name) -> None:
            if name in spans:
                release_pages([spans.pop(name)], [path])

        tensors[meta_name] = LazyTensor(shape, dtype, read, release)
    if unexpected:
        raise ValueError(f"{ckpt_dir}: unexpected tensor(s) {sorted(unexpected)[:10]} (not Llama weights)")
    if "output.weight" not in tensors and config.get("tie_word_embeddings") and "tok_embeddings.weight" in tensors:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    args = match_config(params, tensors, ckpt_dir, quantization=quantization)
    return CheckpointSource("hf", ckpt_dir, args, tensors, quantization=quantization)

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

_SAFETENSORS_CODES = {"I8": torch.int8, "U8": torch.uint8}  # a quantized checkpoint's integer codes


def to_hf(key: str, tensor: torch.Tensor, args: ModelArgs) -> Tuple[str, torch.Tensor]:
    """One Meta-named tensor under its Hugging Face name, with ``wq``/``wk`` rows permuted for rotate-half RoPE."""
    n = rope_heads(key, args)
    return meta_to_hf_name(key), (tensor if n is None else permute_to_hf(tensor, n)).contiguous()


def to_hf_state_dict(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Meta-named weights → Hugging Face names, with ``wq``/``wk`` rows permuted for rotate-half RoPE."""
    return dict(to_hf(key, tensor, args) for key, tensor in state.items())


Plan = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]  # tensor name → (shape, dtype), in writing order


def save_hf(state: Dict[str, torch.Tensor], args: ModelArgs, out_dir: str | os.PathLike,
            max_shard_bytes: int = 5 * 2**30, quantization: Optional["QuantConfig"] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (sharded with an index past ``max_shard_bytes``).

    ``quantization``: the scheme of a quantized ``state`` (integer codes and scales), recorded in ``config.json``.
    """
    plan = {key: (tuple(t.shape), t.dtype) for key, t in state.items()}
    write_hf(out_dir, args, plan, state.items(), max_shard_bytes=max_shard_bytes, quantization=quantization)


def write_hf(out_dir: str | os.PathLike, args: ModelArgs, plan: Plan, tensors: Iterable[Tuple[str, torch.Tensor]], *,
             max_shard_bytes: int = 5 * 2**30, quantization: Optional["QuantConfig"] = None) -> None:
    """``save_hf`` for tensors that arrive one at a time: each is written to its file as it comes.

    ``plan`` announces every Meta-named tensor's shape and dtype in advance (so the files' headers, shards and
    offsets are known before any data), ``tensors`` yields them, in any order; memory holds one at a time.
    """
    check_size("max_shard_bytes", max_shard_bytes)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = next(d for _, d in plan.values() if d.is_floating_point)
    config = write_config(args, torch_dtype=str(dtype).removeprefix("torch."))
    if quantization is not None:
        config[CONFIG_KEY] = quantization.to_json()
    write_json(os.path.join(out_dir, "config.json"), config)
    names = {key: meta_to_hf_name(key) for key in plan}
    groups: List[List[str]] = [[]]
    size = 0
    for key, (shape, dt) in plan.items():
        nbytes = math.prod(shape) * dt.itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    writers, file_of = [], {}
    try:
        for fname, group in zip(files, groups):
            writers.append(SafetensorsWriter(os.path.join(out_dir, fname), {names[k]: plan[k] for k in group}))
            file_of.update({k: writers[-1] for k in group})
        for key, tensor in tensors:
            if key not in plan:
                raise ValueError(f"tensor {key!r} was not announced in the plan")
            file_of[key].write(*to_hf(key, tensor, args))
    except BaseException:
        for w in writers:
            w.close(check=False)
        raise
    for w in writers:
        w.close()
    if len(groups) > 1:
        weight_map = {names[k]: fname for fname, group in zip(files, groups) for k in group}
        total = sum(math.prod(shape) * dt.itemsize for shape, dt in plan.values())
        write_json(os.path.join(out_dir, HF_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})


_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class SafetensorsWriter:
    """One safetensors file written a tensor at a time: the header (every name, dtype, shape and offset) first,
    then each tensor's bytes where the header puts them, as it arrives.

    Tensors are placed widest element first (as the safetensors library does), so each starts aligned to its
    element size; ``close`` checks that every announced tensor was written.
    """

    def __init__(self, path: str, plan: Plan):
        self.path, self.plan = path, plan
        order = sorted(plan, key=lambda name: -plan[name][1].itemsize)  # stable: plan order within a width
        header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: Dict[str, int] = {}
        offset = 0
        for name in order:
            shape, dtype = plan[name]
            if dtype not in _SAFETENSORS_NAMES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self.start = 8 + len(text)
        self.written: set = set()
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)
        self.file.truncate(self.start + offset)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self.plan[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, announced {tuple(shape)} {dtype}")
        if name in self.written:
            raise ValueError(f"{name} was written twice")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(self.start + self.offsets[name])
        self.file.write(memoryview(data))
        self.written.add(name)

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, ``ValueError`` when an announced tensor was never written."""
        if self.file.closed:
            return
        self.file.close()
        missing = sorted(set(self.plan) - self.written)
        if missing and check:
            raise ValueError(f"{self.path}: tensor(s) {missing[:5]} announced but never written")


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


# ----------------------------------------------------------------------------- config.json
def read_config(config: str | os.PathLike | Dict[str, Any]) -> ModelArgs:
    """From a Hugging Face ``config.json`` (a path or the loaded dict) of a ``LlamaForCausalLM``.

    Every value is checked under HF's own key name; an error names the file, the key and what is valid.
    """
    cfg = config if isinstance(config, dict) else read_json(config)
    where = "config.json" if isinstance(config, dict) else str(config)
    try:
        return _args_from_config(cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

def _args_from_config(cfg: Dict[str, Any]) -> ModelArgs:
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"missing key(s) {missing}; a Llama config needs {required}")
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type {model_type!r} is not supported; only 'llama'")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported; only 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{flag}=true is not supported; Llama layers have no biases")
    for key in required:
        check_size(key, cfg[key])
    n_heads, n_kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads")
    if n_kv_heads is not None:
        check_size("num_key_value_heads", n_kv_heads, also="or null (= num_attention_heads)")
    norm_eps = cfg.get("rms_norm_eps", 1e-6)
    check_number("rms_norm_eps", norm_eps, NORM_EPS_RANGE)
    dim = cfg["hidden_size"]
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"head_dim={cfg['head_dim']!r} differs from hidden_size / num_attention_heads = {dim // n_heads}")
    multiple_of, multiplier = ffn_params_for(dim, cfg["intermediate_size"])
    return ModelArgs(
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads in (None, n_heads) else n_kv_heads,  # as Meta writes params.json without GQA
        vocab_size=cfg["vocab_size"],
        multiple_of=multiple_of,
        ffn_dim_multiplier=multiplier,
        norm_eps=norm_eps,
        rope_theta=_hf_rope_theta(cfg),
    )


def write_config(args: ModelArgs, max_position_embeddings: int = 16384, torch_dtype: str = "bfloat16") -> Dict[str, Any]:
    """A Hugging Face ``LlamaForCausalLM`` ``config.json`` dict for this architecture."""
    if args.vocab_size <= 0:
        raise ValueError("vocab_size must be resolved (not -1) to write a Hugging Face config")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": float(args.rope_theta),
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }


def _hf_rope_theta(cfg: Dict[str, Any]) -> float:
    """RoPE base from a HF config: top-level ``rope_theta`` (transformers 4) or ``rope_parameters`` (5).

    Only plain RoPE is accepted: a scaled variant silently read as plain would give garbage.
    """
    theta = cfg.get("rope_theta")
    if theta is not None:
        check_number("rope_theta", theta, ROPE_THETA_RANGE)
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{key} must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{key} has rope_type {kind!r}; only plain RoPE ('default') is supported")
        if "rope_theta" in params:
            check_number(f"{key}.rope_theta", params["rope_theta"], ROPE_THETA_RANGE)
            if theta is not None and theta != params["rope_theta"]:
                raise ValueError(f"rope_theta {theta} disagrees with {key}.rope_theta {params['rope_theta']}")
            theta = params["rope_theta"]
    return float(theta) if theta is not None else 10000.0


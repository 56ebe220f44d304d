"""GGUF checkpoints, llama.cpp's single-file format, read into Meta's names and this library's schemes.

    llama = Llama.build("codellama-7b.Q4_0.gguf")   # a file, or a folder holding exactly one .gguf file
    model = load_model("codellama-7b.Q4_K_M.gguf", dtype="bf16", quantize="int4")

The file is read with the ``gguf`` package (``pip install -e '.[gguf]'``), memory-mapped copy-on-write: it
is never written, and nothing is read before a tensor is loaded. Its metadata (architecture ``llama``)
becomes ``ModelArgs``, its tensor names (``blk.3.ffn_up.weight``) Meta's (``layers.3.feed_forward.w3.weight``).
The q/k rows need no permutation: llama.cpp's RoPE rotates adjacent channel pairs as Meta's does, so its
converter permutes Hugging Face's rotate-half rows back, and a GGUF file holds Meta's layout.

What each tensor type becomes with ``quantize=None`` (``TYPES``):

* F32, F16, BF16: the model's dtype, as from any checkpoint (an F32 tensor loaded as fp32 is used in place).
* Q4_0 (blocks of 32 weights with one fp16 scale ``d``, ``w = d·(q − 8)``): int4 with group size 32 — the
  file's own 4-bit codes in their own nibble order, ``scales = d``, ``zeros = 0``. Exact where the model's
  dtype holds every fp16 ``d`` (fp32, fp16); in bf16 ``d`` keeps 8 significant bits, the rounding a bf16
  copy of the dequantized weights would have too.
* Q8_0, Q4_1, Q5_0, Q5_1 and the K-quants Q2_K … Q6_K: dequantized to the model's dtype (exact in fp32).
  No scheme here has Q8_0's scale per 32 weights; ``quantize="int8"`` requantizes it with one per row,
  at the same byte per weight and about 1.7 times Q8_0's own error (docs/checkpoints.md).

So without ``quantize=`` no weight is rounded beyond the model's dtype: int4 is used where the file's
linear layers are all Q4_0 (and for the output layer and the token embedding where they are Q4_0 too).
``quantize=`` (``"int8"``, ``"int4"``, a ``QuantConfig``) gives exactly that scheme: Q4_0 codes are kept
where it is int4 with groups of 32, every other weight is dequantized and requantized. Either way tensors
are converted one at a time into the model's own storage, so no second full-precision copy is ever held.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import NORM_EPS_RANGE, ROPE_THETA_RANGE, ModelArgs, check_number, check_size, ffn_params_for
from ..model import build_on_meta
from ..quantize import QuantConfig, quantize_model, quantize_weight
from .source import Block, CheckpointSource, LazyTensor

MAGIC = b"GGUF"
INSTALL = "pip install -e '.[gguf]' (or pip install gguf)"

# Tensor types this library reads (what each becomes: the module docstring).
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
Q4_0_BLOCK = 32  # weights a Q4_0 block holds: 2 bytes of fp16 scale, then 16 bytes of 4-bit codes

# llama.cpp's names (``blk.N.<name>.weight`` and top-level ``<name>.weight``) → Meta's.
LAYER_NAMES = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
TOP_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
LINEAR = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
          "feed_forward.w3")


def require_gguf() -> Any:
    """The ``gguf`` package, or ``ImportError`` saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ImportError(f"reading GGUF files needs the gguf package: {INSTALL}") from None
    return gguf


def meta_name(name: str) -> Optional[str]:
    """Meta's name for a llama.cpp tensor (``blk.3.ffn_up.weight`` → ``layers.3.feed_forward.w3.weight``), or None."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"layers.{int(m.group(1))}.{LAYER_NAMES[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", name)
    return f"{TOP_NAMES[m.group(1)]}.weight" if m and m.group(1) in TOP_NAMES else None


def gguf_name(key: str) -> str:
    """llama.cpp's name for a Meta weight (``layers.3.feed_forward.w3.weight`` → ``blk.3.ffn_up.weight``)."""
    layer_names, top_names = {v: k for k, v in LAYER_NAMES.items()}, {v: k for k, v in TOP_NAMES.items()}
    parts = key.removesuffix(".weight").split(".")
    if parts[0] == "layers" and ".".join(parts[2:]) in layer_names:
        return f"blk.{parts[1]}.{layer_names['.'.join(parts[2:])]}.weight"
    if key.endswith(".weight") and ".".join(parts) in top_names:
        return f"{top_names['.'.join(parts)]}.weight"
    raise ValueError(f"unknown parameter {key!r}: not a Llama weight")


# ----------------------------------------------------------------------------- finding the file
def is_gguf_file(path: str) -> bool:
    """Whether ``path`` is a file starting with GGUF's magic; ``ValueError`` for a ``.gguf`` file that does not."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC and path.lower().endswith(".gguf"):
        raise ValueError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r} (an incomplete "
                         "download, or an error page saved under that name?)")
    return head == MAGIC


def gguf_files(directory: str) -> List[str]:
    """The names of the ``.gguf`` files in ``directory``, sorted."""
    return sorted(n for n in os.listdir(directory) if n.lower().endswith(".gguf"))


def gguf_file(path: str) -> str:
    """The GGUF file ``path`` names: itself, or the one ``.gguf`` file in the directory ``path``."""
    if not os.path.isdir(path):
        return path
    found = gguf_files(path)
    if len(found) != 1:
        listed = ", ".join(found) if found else "none"
        raise ValueError(f"{path} holds {len(found)} GGUF files ({listed}); pass the one to load, e.g. "
                         f"{os.path.join(path, found[0]) if found else path + '/model.gguf'}")
    return os.path.join(path, found[0])


# ----------------------------------------------------------------------------- metadata
class Metadata:
    """A GGUF file's key-value metadata, each value checked for its kind as it is read."""

    def __init__(self, fields: Dict[str, Any], path: str):
        self.fields, self.path = fields, path

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def get(self, key: str, kind: type, default: Any = None, *, required: bool = False) -> Any:
        """The value of ``key`` as ``kind`` (int, float, str, bool, or list for an array); ``default`` if absent."""
        f = self.fields.get(key)
        if f is None:
            if required:
                raise ValueError(f"{self.path}: metadata key {key} is missing")
            return default
        gguf = require_gguf()
        t = gguf.GGUFValueType
        ints = {t.UINT8, t.INT8, t.UINT16, t.INT16, t.UINT32, t.INT32, t.UINT64, t.INT64}
        main = f.types[0] if f.types else None
        ok = {int: main in ints, float: main in ints | {t.FLOAT32, t.FLOAT64}, str: main == t.STRING,
              bool: main == t.BOOL, list: main == t.ARRAY}[kind]
        if not ok:
            raise ValueError(f"{self.path}: metadata {key} is {main.name if main else 'empty'}, expected "
                             f"{'an array' if kind is list else kind.__name__}")
        value = f.contents()
        if kind is float and main == t.FLOAT32:
            value = float(str(np.float32(value)))  # the shortest decimal of a float32: 1e-05, not 9.99999974e-06
        return kind(value) if kind in (int, float) else value


def model_args(meta: Metadata, vocab_size: int) -> Tuple[ModelArgs, int]:
    """``(ModelArgs, context_length)`` from a llama GGUF file's metadata; ``ValueError`` naming the file and key."""
    try:
        return _model_args(meta, vocab_size)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if message.startswith(meta.path) else f"{meta.path}: {message}") from None


def _model_args(meta: Metadata, vocab_size: int) -> Tuple[ModelArgs, int]:
    arch = meta.get("general.architecture", str, required=True)
    if arch != "llama":
        raise ValueError(f"architecture {arch!r} is not supported; only 'llama' (Code Llama, Llama 2)")
    p = "llama."
    sizes = {k: meta.get(p + k, int, required=True) for k in
             ("embedding_length", "block_count", "feed_forward_length", "attention.head_count", "context_length")}
    for k, v in sizes.items():
        check_size(p + k, v)
    dim, n_heads = sizes["embedding_length"], sizes["attention.head_count"]
    n_kv_heads = meta.get(p + "attention.head_count_kv", int, n_heads)
    check_size(p + "attention.head_count_kv", n_kv_heads)
    norm_eps = meta.get(p + "attention.layer_norm_rms_epsilon", float, required=True)
    check_number(p + "attention.layer_norm_rms_epsilon", norm_eps, NORM_EPS_RANGE)
    rope_theta = meta.get(p + "rope.freq_base", float, 10000.0)
    check_number(p + "rope.freq_base", rope_theta, ROPE_THETA_RANGE)
    if meta.get(p + "expert_count", int, 0) > 0:
        raise ValueError(f"{p}expert_count is {meta.get(p + 'expert_count', int)}: mixture-of-experts models "
                         "are not supported, only dense Llama models")
    scaling = meta.get(p + "rope.scaling.type", str, "none")
    if scaling != "none":
        raise ValueError(f"{p}rope.scaling.type is {scaling!r}; only plain RoPE ('none') is supported")
    if n_heads > 0 and dim % n_heads == 0:
        for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
            value = meta.get(p + key, int, dim // n_heads)
            if value != dim // n_heads:
                raise ValueError(f"{p}{key} is {value}, but embedding_length / head_count = {dim // n_heads}; "
                                 "only full-width heads with RoPE on every channel are supported")
    given_vocab = meta.get(p + "vocab_size", int, vocab_size)
    if given_vocab != vocab_size:
        raise ValueError(f"{p}vocab_size is {given_vocab}, but token_embd.weight has {vocab_size} rows")
    multiple_of, multiplier = ffn_params_for(dim, sizes["feed_forward_length"])
    args = ModelArgs(dim=dim, n_layers=sizes["block_count"], n_heads=n_heads,
                     n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads, vocab_size=vocab_size,
                     multiple_of=multiple_of, ffn_dim_multiplier=multiplier, norm_eps=norm_eps, rope_theta=rope_theta)
    return args, sizes["context_length"]


# ----------------------------------------------------------------------------- the source
@dataclass
class GGUFSource(CheckpointSource):
    """A GGUF file's tensors in Meta's names, each read dequantized (``tensors``), with what is needed to read
    them as this library's quantized schemes instead (``as_loaded``) and to build its tokenizer."""
    types: Dict[str, str] = field(default_factory=dict)  # Meta name → GGUF tensor type ("Q4_0", "F16", …)
    raw: Dict[str, np.ndarray] = field(default_factory=dict)  # Meta name → the file's bytes (memory-mapped)
    metadata: Optional[Metadata] = None
    context_length: int = 0  # the context the model was trained for (llama.context_length)


def read_gguf(path: str) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` (copy-on-write map: the file is never written), errors naming the file."""
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(path, "c")
    except Exception as e:  # noqa: BLE001 — the reader raises ValueError, KeyError, IndexError … for a bad file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", detail)
        if unknown:
            raise ValueError(f"{path}: a tensor has type {unknown.group(1)}, which the gguf package does not know (a "
                             f"newer llama.cpp's?); this library reads {', '.join(TYPES)}") from None
        raise ValueError(f"{path} is not a GGUF file this library can read (truncated, corrupt, or of an unsupported "
                         f"version): {type(e).__name__}: {detail}") from None


def open_gguf(path: str) -> GGUFSource:
    """Read a GGUF file's metadata and index its tensors in Meta's names (no weights are read yet).

    Checked here, before anything is built: the architecture and sizes, every tensor's name, type and shape
    against the model the metadata describes, and that no tensor is missing (a file without ``output.weight``
    uses ``token_embd.weight``, as llama.cpp does).
    """
    path = gguf_file(os.fspath(path))
    reader = read_gguf(path)
    meta = Metadata(reader.fields, path)
    if meta.get("split.count", int, 1) > 1:
        raise ValueError(f"{path} is one of {meta.get('split.count', int)} split GGUF files; merge them into one "
                         "first (llama.cpp: llama-gguf-split --merge FIRST-FILE OUT.gguf)")
    by_name = {t.name: t for t in reader.tensors}
    emb = by_name.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ValueError(f"{path}: no 2-D token_embd.weight tensor; a llama GGUF file holds its embedding under "
                         "that name")
    args, context_length = model_args(meta, int(emb.shape[1]))  # GGUF lists dimensions innermost first
    expected = build_on_meta(args).state_dict()
    unexpected = sorted(name for name in by_name if meta_name(name) is None)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor(s) {unexpected[:10]} (not weights of a Llama model)")
    tensors: Dict[str, LazyTensor] = {}
    source = GGUFSource("gguf", path, args, tensors, metadata=meta, context_length=context_length)
    for name, t in by_name.items():
        key = meta_name(name)
        kind = t.tensor_type.name
        if kind not in TYPES:
            raise ValueError(f"{path}: tensor {name} has type {kind}, which this library cannot read; supported: "
                             f"{', '.join(TYPES)}")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if key in expected and shape != tuple(expected[key].shape):
            raise ValueError(f"{path}: tensor {name} ({key}) has shape {shape}, the model its metadata describes "
                             f"expects {tuple(expected[key].shape)}")
        source.types[key], source.raw[key] = kind, t.data
        tensors[key] = LazyTensor(shape, _float_dtype(kind), _whole(lambda t=t: dequantize(t)))
    if "output.weight" not in tensors:  # tied: llama.cpp computes the logits with the embedding
        for d in (tensors, source.types, source.raw):
            d["output.weight"] = d["tok_embeddings.weight"]
    missing = [gguf_name(k) for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {missing[:10]}{' …' if len(missing) > 10 else ''} of the "
                         f"{args.n_layers}-layer model its metadata describes")
    return source


def _float_dtype(kind: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(kind, torch.float32)


def _whole(read: Callable[[], torch.Tensor]) -> Callable[[Block], torch.Tensor]:
    """A ``LazyTensor`` reader from a whole-tensor one: a block (tensor parallelism) is cut from the whole."""
    def read_block(block: Block) -> torch.Tensor:
        t = read()
        return t if block is None else t.narrow(block[0], block[1], block[2] - block[1])
    return read_block


def dequantize(t: Any) -> torch.Tensor:
    """A ``gguf`` reader tensor as a float tensor (out, in) or (n,): float types as they are (a view of the file),
    quantized ones dequantized to fp32 by the ``gguf`` package."""
    kind = t.tensor_type.name
    if kind in ("F32", "F16"):
        return torch.from_numpy(t.data)
    if kind == "BF16":  # stored as raw bytes: two per weight
        return torch.from_numpy(t.data).view(torch.bfloat16)
    # a plain array over the same bytes: numpy's memmap subclass costs a Python call per slice the package takes
    return torch.from_numpy(require_gguf().quants.dequantize(np.asarray(t.data), t.tensor_type))


# ----------------------------------------------------------------------------- quantized schemes
def file_quantization(source: GGUFSource) -> Optional["QuantConfig"]:
    """The scheme a GGUF file loads as without ``quantize=``: int4 g32 when all its linear layers are Q4_0, the
    output layer and the token embedding included where they are Q4_0 too; else None (dequantized)."""
    linear = {source.types[k] for k in source.types if k.startswith("layers.") and k.rsplit(".", 1)[0].endswith(LINEAR)}
    if linear != {"Q4_0"}:
        return None
    return QuantConfig("int4", Q4_0_BLOCK, include_output=source.types["output.weight"] == "Q4_0",
                       include_embeddings=source.types["tok_embeddings.weight"] == "Q4_0")


def as_loaded(source: GGUFSource, quantize: Optional["QuantConfig"], dtype: torch.dtype) -> CheckpointSource:
    """``source`` with each quantized layer's tensors as ``quantize`` stores them (None: ``file_quantization``).

    A layer that the scheme stores as int4 with groups of 32 takes a Q4_0 tensor's codes and scales as they
    are; every other quantized layer is dequantized, cast to ``dtype`` and quantized (``quantize_weight``, the
    arithmetic of quantizing on load), once for its codes and scales together. Layers the scheme leaves in
    full precision are dequantized to ``dtype`` by the loader.
    """
    config = quantize if quantize is not None else file_quantization(source)
    if config is None:
        return source
    expected = quantize_model(build_on_meta(source.args), config).state_dict()  # the codes' names and shapes
    last: Dict[str, Any] = {}  # the module whose codes were computed last, and its codes

    def codes(module: str) -> Dict[str, torch.Tensor]:
        if last.get("module") != module:  # a layer's weight, scales and zeros are read one after another
            w = source.tensors[f"{module}.weight"].load().to(dtype)
            last.update(module=module, codes=quantize_weight(w, config.for_layer(module)))
        return last["codes"]

    tensors: Dict[str, LazyTensor] = {}
    for key, want in expected.items():
        module, part = key.rsplit(".", 1)
        if f"{module}.scales" not in expected:  # left in full precision
            tensors[key] = source.tensors[key]
            continue
        layer = config.for_layer(module)
        raw = source.raw[f"{module}.weight"]
        if source.types[f"{module}.weight"] == "Q4_0" and layer.scheme == "int4" and layer.group_size == Q4_0_BLOCK:
            read = (lambda raw=raw, part=part, want=want: q4_0_part(raw, part, want.shape[0]))
        else:
            read = (lambda module=module, part=part: codes(module)[part])
        tensors[key] = LazyTensor(tuple(want.shape), want.dtype, _whole(read))
    return CheckpointSource("gguf", source.path, source.args, tensors, quantization=config)


def q4_0_part(raw: np.ndarray, part: str, rows: int) -> torch.Tensor:
    """One of a Q4_0 tensor's int4 g32 tensors: ``weight`` (rows, in/2) its codes, ``scales`` (rows, in/32) its
    fp16 ``d``, ``zeros`` (rows, in/32) zeros. Each block is ``d`` (2 bytes) then 16 bytes whose byte ``j`` holds
    weight ``j`` in its low nibble and ``j + 16`` in its high one: the library's int4 packing, code for code."""
    blocks = torch.from_numpy(raw).view(rows, -1, 2 + Q4_0_BLOCK // 2)  # (rows, groups, 18)
    if part == "weight":
        return blocks[..., 2:].reshape(rows, -1)
    scales = blocks[..., :2].contiguous().view(torch.float16).view(rows, -1)
    return scales if part == "scales" else torch.zeros_like(scales)

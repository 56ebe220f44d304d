"""Model configuration: the fields of Meta's ``params.json``, named presets, and conversions.

``ModelArgs`` is the architecture only. Runtime limits (batch size, maximum length, device, dtype)
belong to the KV cache and to generation, not here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

# Valid ranges of the float fields: wide enough for every released Llama-family model, narrow enough that a
# typo (norm_eps 1e5 for 1e-5, a swapped rope_theta) fails here instead of loading a model that prints garbage.
NORM_EPS_RANGE = (1e-12, 1e-2)  # released models: 1e-5 or 1e-6; below 1e-12 it no longer guards the division
ROPE_THETA_RANGE = (10.0, 1e12)  # released models: 1e4 - 1e6, long-context ones up to ~4e9
FFN_MULTIPLIER_RANGE = (1e-2, 1e2)  # released models: 1.0 - 1.3


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of a Llama / Code Llama model, with the same field names as ``params.json``.

    ``vocab_size == -1`` means "take it from the tokenizer" (Meta writes it that way); the checkpoint
    loader resolves it before the model is built. ``n_kv_heads=None`` means ``n_heads`` (no GQA).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of"):
            check_size(name, getattr(self, name))
        if self.n_kv_heads is not None:
            check_size("n_kv_heads", self.n_kv_heads, also="or None (= n_heads)")
        if self.vocab_size != -1:
            check_size("vocab_size", self.vocab_size, also="or -1 (take it from the tokenizer)")
        check_number("norm_eps", self.norm_eps, NORM_EPS_RANGE)
        check_number("rope_theta", self.rope_theta, ROPE_THETA_RANGE)
        if self.ffn_dim_multiplier is not None:
            check_number("ffn_dim_multiplier", self.ffn_dim_multiplier, FFN_MULTIPLIER_RANGE, also="or None")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.hidden_dim < 1:
            raise ValueError(f"the FFN hidden size is {self.hidden_dim} for dim={self.dim}, multiple_of={self.multiple_of}, "
                             f"ffn_dim_multiplier={self.ffn_dim_multiplier}; it must be at least 1")

    # ----------------------------------------------------------------- derived sizes
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU hidden size, computed exactly as Meta's ``FeedForward`` does."""
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def num_params(self) -> int:
        """Parameter count (requires a resolved ``vocab_size``)."""
        d, h, kv = self.dim, self.hidden_dim, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        return self.n_layers * per_layer + 2 * self.vocab_size * d + d

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        """A named Code Llama release, e.g. ``"7b"``, ``"13b-Python"``, ``"70b-Instruct"``."""
        if not isinstance(name, str):
            raise ValueError(f"a preset name is a string, got {name!r}; valid presets: {', '.join(PRESETS)}")
        key = _PRESET_ALIASES.get(name.lower().replace("_", "-").removeprefix("codellama-"))
        if key is None:
            raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[key], **overrides})

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        """From a ``params.json``-style dict; unknown keys are an error naming them."""
        if not isinstance(params, dict):
            raise ValueError(f"model parameters must be a JSON object, got {type(params).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(f"unknown model parameter(s) {unknown}; valid keys: {valid}")
        return cls(**params)

    @classmethod
    def from_params_json(cls, path: str | os.PathLike) -> "ModelArgs":
        """From Meta's ``params.json``; a bad value is a ``ValueError`` naming the file, the key and what is valid."""
        params = read_json(path)
        try:
            return cls.from_dict(params)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from None

    # ----------------------------------------------------------------- serialisation
    def to_params(self) -> Dict[str, Any]:
        """The ``params.json`` dict (``n_kv_heads`` and ``ffn_dim_multiplier`` only when set)."""
        params = dataclasses.asdict(self)
        return {k: v for k, v in params.items() if not (k in ("n_kv_heads", "ffn_dim_multiplier") and v is None)}


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, hidden_dim: int) -> tuple[int, Optional[float]]:
    """``(multiple_of, ffn_dim_multiplier)`` that reproduce ``hidden_dim`` for ``dim``.

    Hugging Face's config.json and GGUF files store only the result; prefer a released preset's values, then the largest power of
    two without a multiplier, then an exact fallback, so ``params.json`` round-trips for real models.
    """
    candidates = [(p["multiple_of"], p.get("ffn_dim_multiplier")) for p in PRESETS.values() if p["dim"] == dim]
    candidates += [(2**k, None) for k in range(14, -1, -1)]
    base = int(2 * 4 * dim / 3)
    if hidden_dim >= base:
        candidates.append((hidden_dim, None))
    else:
        candidates.append((1, (hidden_dim + 0.5) / base))
    for multiple_of, multiplier in candidates:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == hidden_dim:
            return multiple_of, multiplier
    raise ValueError(f"cannot express intermediate_size={hidden_dim} for dim={dim} as Meta FFN parameters")


def check_size(name: str, value: Any, also: str = "") -> None:
    """Refuse a size that is not a positive integer (``"64"``, ``64.0``, ``True``, ``0``), naming it and what is valid."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer{' ' + also if also else ''}, got {value!r}")


def check_number(name: str, value: Any, valid: Tuple[float, float], also: str = "") -> None:
    """Refuse a value that is not a finite number within ``valid`` (NaN, ``true``, ``"1e-5"``, a typo'd exponent)."""
    low, high = valid
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}]{' ' + also if also else ''}, got {value!r}")


def read_json(path: str | os.PathLike) -> Dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file (not JSON, not UTF-8, not an object)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8-sig"))  # decoded here, so an error's offset is the file's
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


# Values as in each release's params.json (vocab_size as the released tokenizer has it).
_7B = dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6)
_13B = dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=1e6)
_34B = dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5,
            rope_theta=1e6, vocab_size=32000)
_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5)

PRESETS: Dict[str, Dict[str, Any]] = {
    "7b": {**_7B, "vocab_size": 32016},
    "7b-python": {**_7B, "vocab_size": 32000},
    "7b-instruct": {**_7B, "vocab_size": 32016},
    "13b": {**_13B, "vocab_size": 32016},
    "13b-python": {**_13B, "vocab_size": 32000},
    "13b-instruct": {**_13B, "vocab_size": 32016},
    "34b": _34B,
    "34b-python": _34B,
    "34b-instruct": _34B,
    "70b": {**_70B, "vocab_size": 32016, "rope_theta": 1e6},
    "70b-python": {**_70B, "vocab_size": 32016, "rope_theta": 1e4},
    "70b-instruct": {**_70B, "vocab_size": 32016, "rope_theta": 1e4},
}
_PRESET_ALIASES = {k: k for k in PRESETS}
_PRESET_ALIASES.update({k.replace("-", ""): k for k in PRESETS})


def write_json(path: str | os.PathLike, data: Dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)

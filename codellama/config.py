"""Model configuration: the fields of Meta's ``params.json``, named presets, and conversions.

``ModelArgs`` is the architecture only. Runtime limits (batch size, maximum length, device, dtype)
belong to the KV cache and to generation, not here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional


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
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (
            not isinstance(self.n_kv_heads, int) or self.n_kv_heads <= 0
        ):
            raise ValueError(f"ModelArgs.n_kv_heads must be a positive integer or None, got {self.n_kv_heads!r}")
        if not isinstance(self.vocab_size, int) or (self.vocab_size <= 0 and self.vocab_size != -1):
            raise ValueError(f"ModelArgs.vocab_size must be positive or -1 (from the tokenizer), got {self.vocab_size!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"ModelArgs.norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            raise ValueError(f"ModelArgs.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.ffn_dim_multiplier is not None and not (
            isinstance(self.ffn_dim_multiplier, (int, float)) and self.ffn_dim_multiplier > 0
        ):
            raise ValueError(f"ModelArgs.ffn_dim_multiplier must be a positive number or None, got {self.ffn_dim_multiplier!r}")

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
        """From Meta's ``params.json``."""
        return cls.from_dict(read_json(path))

    @classmethod
    def from_hf_config(cls, config: str | os.PathLike | Dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face ``config.json`` (a path or the loaded dict) of a ``LlamaForCausalLM``."""
        cfg = config if isinstance(config, dict) else read_json(config)
        where = "config.json" if isinstance(config, dict) else str(config)
        required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; a Llama config needs {required}")
        model_type = cfg.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{where}: model_type {model_type!r} is not supported; only 'llama'")
        rope_theta = _hf_rope_theta(cfg, where)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported; only 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"{where}: {flag}=true is not supported; Llama layers have no biases")
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, dim // n_heads):
            raise ValueError(f"{where}: head_dim={cfg['head_dim']} differs from hidden_size / num_attention_heads = {dim // n_heads}")
        multiple_of, multiplier = _ffn_params_for(dim, cfg["intermediate_size"])
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        n_kv_heads = None if n_kv_heads == n_heads else n_kv_heads  # as Meta writes params.json without GQA
        return cls(
            dim=dim,
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            vocab_size=cfg["vocab_size"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
        )

    # ----------------------------------------------------------------- serialisation
    def to_params(self) -> Dict[str, Any]:
        """The ``params.json`` dict (``n_kv_heads`` and ``ffn_dim_multiplier`` only when set)."""
        params = dataclasses.asdict(self)
        return {k: v for k, v in params.items() if not (k in ("n_kv_heads", "ffn_dim_multiplier") and v is None)}

    def to_hf_config(self, max_position_embeddings: int = 16384, torch_dtype: str = "bfloat16") -> Dict[str, Any]:
        """A Hugging Face ``LlamaForCausalLM`` ``config.json`` dict for this architecture."""
        if self.vocab_size <= 0:
            raise ValueError("vocab_size must be resolved (not -1) to write a Hugging Face config")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": float(self.rope_theta),
            "max_position_embeddings": max_position_embeddings,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": torch_dtype,
        }


def _hf_rope_theta(cfg: Dict[str, Any], where: str) -> float:
    """RoPE base from a HF config: top-level ``rope_theta`` (transformers 4) or ``rope_parameters`` (5).

    Only plain RoPE is accepted: a scaled variant silently read as plain would give garbage.
    """
    theta = cfg.get("rope_theta")
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if not params:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{where}: {key} must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{where}: {key} has rope_type {kind!r}; only plain RoPE ('default') is supported")
        if "rope_theta" in params:
            if theta is not None and float(theta) != float(params["rope_theta"]):
                raise ValueError(f"{where}: rope_theta {theta} disagrees with {key}.rope_theta {params['rope_theta']}")
            theta = params["rope_theta"]
    return float(theta) if theta is not None else 10000.0


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params_for(dim: int, hidden_dim: int) -> tuple[int, Optional[float]]:
    """``(multiple_of, ffn_dim_multiplier)`` that reproduce ``hidden_dim`` for ``dim``.

    Hugging Face stores only the result; prefer a released preset's values, then the largest power of
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


def read_json(path: str | os.PathLike) -> Dict[str, Any]:
    """A JSON object from ``path``, with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
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

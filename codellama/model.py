"""The Code Llama transformer, with Meta's parameter names so checkpoints load key for key.

Shapes: B batch, T tokens in this call, L attended length (cache positions ``0 … end-1``),
H query heads, Hkv key/value heads, hd head dim, D model dim, V vocab.

One seam for custom kernels: ``Ops`` (RMSNorm, rotary embedding, attention). ``TorchOps`` is the
PyTorch implementation; ``kernels.TritonOps`` plugs in the Triton kernels with the same signatures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .distributed import SINGLE, TensorParallel, check_parallel, local_heads

StartPos = Union[int, torch.Tensor]  # one position for the whole batch, or a LongTensor[B] (one per row)


# ----------------------------------------------------------------------------- operations
class TorchOps:
    """The reference implementation of the three operations a kernel backend may replace."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Statistics in float32 whatever the model dtype, as Meta does; scale after casting back.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return out.type_as(x) * weight

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Meta's interleaved-pair RoPE on q (B, T, H, hd) and k (B, T, Hkv, hd); cos/sin (B|1, T, hd/2) float32."""
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    @staticmethod
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos) -> torch.Tensor:
        """Causal attention of queries at ``start_pos + arange(T)`` over keys ``0 … L-1``.

        q: (B, H, T, hd); k, v: (B, Hkv, L, hd) with L ≥ every row's ``start_pos + T``.
        Returns (B, H, T, hd). Key slots past a row's own end are masked out.
        """
        B, H, T, hd = q.shape
        Hkv, L = k.shape[1], k.shape[2]
        if isinstance(start_pos, int):
            if start_pos == 0 and L == T:  # plain causal self-attention: no mask tensor at all
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hkv != H)
            if T == 1 and L == start_pos + 1:  # decode step: every cached key is visible
                return _grouped_sdpa(q, k, v, None)
        # General case (chunked prefill, ragged rows): a boolean mask of T × L per row.
        starts = torch.as_tensor(start_pos, device=q.device).reshape(-1, 1, 1)  # (B|1, 1, 1)
        q_pos = starts + torch.arange(T, device=q.device).view(1, T, 1)
        mask = torch.arange(L, device=q.device).view(1, 1, L) <= q_pos  # (B|1, T, L)
        return _grouped_sdpa(q, k, v, mask.unsqueeze(1))


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA with grouped-query attention done by reshaping q, never by copying k/v per head."""
    B, H, T, hd = q.shape
    Hkv = k.shape[1]
    rep = H // Hkv
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # The `rep` query heads sharing one kv head become `rep * T` query rows of that kv head.
    qg = q.reshape(B, Hkv, rep * T, hd)  # (B, Hkv, rep*T, hd)
    if mask is not None:
        mask = mask.repeat(1, 1, rep, 1)  # (B|1, 1, rep*T, L), row order (rep, t) like qg
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(B, H, T, hd)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` of x (B, T, H, hd) by angles given as cos/sin (B|1, T, hd/2)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B|1, T, 1, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """``1 / theta ** (2i / head_dim)`` in float32, as Meta's ``precompute_freqs_cis``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (…, hd/2) in float32 for integer positions (…)."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # float32 even for bf16 models
    return torch.cos(angles), torch.sin(angles)


# ----------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Keys and values of every layer, (n_layers, B, Hkv, S, hd), for ``B ≤ max_batch_size`` rows.

    Lifecycle: ``Transformer.setup_cache(max_batch_size, max_seq_len)`` allocates it for exactly that
    size; ``reset()`` forgets its contents; ``Transformer.clear_cache()`` frees it. ``keep_rows`` moves
    the rows still being generated to the front so a shrinking batch keeps running on a dense prefix.
    """

    def __init__(self, n_layers: int, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        shape = (n_layers, max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: StartPos, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, hd) at ``start_pos + arange(T)``; return this layer's (B, Hkv, end, hd) views."""
        B, _, T, _ = k.shape
        ck, cv = self.k[layer, :B], self.v[layer, :B]
        if isinstance(start_pos, int):
            ck[:, :, start_pos:start_pos + T] = k
            cv[:, :, start_pos:start_pos + T] = v
        else:
            rows = torch.arange(B, device=k.device).unsqueeze(1)  # (B, 1)
            cols = start_pos.view(B, 1) + torch.arange(T, device=k.device)  # (B, T)
            ck[rows, :, cols] = k.transpose(1, 2)  # advanced indices first: (B, T, Hkv, hd)
            cv[rows, :, cols] = v.transpose(1, 2)
        return ck[:, :, :end], cv[:, :, :end]

    def keep_rows(self, rows: torch.Tensor, length: int) -> None:
        """Move cache rows ``rows`` (LongTensor) to positions ``0 … len(rows)-1``, first ``length`` slots only."""
        n = len(rows)
        self.k[:, :n, :, :length] = self.k[:, rows, :, :length]
        self.v[:, :n, :, :length] = self.v[:, rows, :, :length]


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops=TorchOps) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


@dataclass
class _Step:
    """What every layer of one forward call shares."""
    start_pos: StartPos
    end: int  # attended length: max over rows of start_pos + T
    cos: torch.Tensor  # (B|1, T, hd/2) float32
    sin: torch.Tensor
    cache: Optional[KVCache]
    ops: type


class FusableProjections(nn.Module):
    """A module whose input projections (e.g. ``wq, wk, wv``) can be fused into one matmul.

    ``fuse()`` replaces them by one ``nn.Linear`` over the concatenated rows: one pass over the input and
    one longer weight stream, which matters for memory-bound decoding. ``state_dict`` and
    ``load_state_dict`` keep speaking Meta's names, so a fused model saves and loads like any other.
    """

    FUSED: str  # name of the fused projection
    PARTS: Tuple[str, ...]  # the projections it replaces, in order

    def __init__(self):
        super().__init__()
        self.fused_sizes: Optional[Tuple[int, ...]] = None
        self._register_state_dict_hook(FusableProjections._split_state)
        self._register_load_state_dict_pre_hook(self._join_state)

    def fuse(self) -> None:
        if self.fused_sizes is not None:
            return
        parts = [getattr(self, name) for name in self.PARTS]
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=parts[0].weight.requires_grad)
        self.fused_sizes = tuple(p.out_features for p in parts)
        for name in self.PARTS:
            delattr(self, name)
        setattr(self, self.FUSED, fused)

    def project(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The input projections of x, fused or not."""
        if self.fused_sizes is None:
            return tuple(getattr(self, name)(x) for name in self.PARTS)
        return getattr(self, self.FUSED)(x).split(self.fused_sizes, dim=-1)

    @staticmethod
    def _split_state(module, state, prefix, _):
        if module.fused_sizes is not None:
            weight = state.pop(prefix + module.FUSED + ".weight")
            for name, part in zip(module.PARTS, weight.split(module.fused_sizes)):
                state[prefix + name + ".weight"] = part
        return state

    def _join_state(self, state, prefix, *_):
        keys = [prefix + name + ".weight" for name in self.PARTS]
        if self.fused_sizes is not None and all(k in state for k in keys):
            state[prefix + self.FUSED + ".weight"] = torch.cat([state.pop(k) for k in keys])


class Attention(FusableProjections):
    FUSED, PARTS = "wqkv", ("wq", "wk", "wv")

    def __init__(self, args: ModelArgs, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer_id, self.tp = layer_id, tp
        self.n_heads, self.n_kv_heads, _ = local_heads(args, tp)  # this rank's heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = step.ops.rotary(q, k, step.cos, step.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, hd)
        if step.cache is not None:
            k, v = step.cache.update(self.layer_id, k, v, step.start_pos, step.end)  # (B, Hkv, end, hd)
        out = step.ops.attention(q, k, v, step.start_pos)  # (B, H, T, hd)
        return self.tp.all_reduce(self.wo(out.transpose(1, 2).reshape(B, T, -1)))  # row-parallel: sum the ranks


class FeedForward(FusableProjections):
    FUSED, PARTS = "w13", ("w1", "w3")

    def __init__(self, dim: int, hidden_dim: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        hidden_dim //= tp.world  # column-parallel w1/w3, row-parallel w2
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.tp.all_reduce(self.w2(F.silu(gate) * up))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.attention = Attention(args, layer_id, tp)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim, tp)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x, step.ops), step)
        return h + self.feed_forward(self.ffn_norm(h, step.ops))


# ----------------------------------------------------------------------------- model
class Transformer(nn.Module):
    """Code Llama. ``forward(tokens, start_pos)`` has the semantics of Meta's reference model."""

    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        """``tp``: this rank's place when the model is split across processes (see ``codellama.distributed``)."""
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("ModelArgs.vocab_size must be resolved (the loader takes it from the tokenizer) before building")
        check_parallel(args, tp.world)
        self.args, self.tp = args, tp
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim // tp.world)  # split along dim, as Meta does
        self.layers = nn.ModuleList(TransformerBlock(args, i, tp) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size // tp.world, bias=False)  # column-parallel, gathered
        self.cache: Optional[KVCache] = None
        self.ops = TorchOps
        self._inv_freq: Optional[torch.Tensor] = None

    # --------------------------------------------------------------- cache lifecycle
    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Allocate the KV cache for at most ``max_batch_size`` rows of ``max_seq_len`` positions."""
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size and max_seq_len must be ≥ 1, got {max_batch_size} and {max_seq_len}")
        ref = self.tok_embeddings.weight
        if ref.device.type == "meta":
            raise ValueError("the model's weights are still on the meta device: load a checkpoint before setup_cache")
        self.clear_cache()
        a = self.args
        self.cache = KVCache(a.n_layers, max_batch_size, max_seq_len, local_heads(a, self.tp)[1], a.head_dim,
                             dtype or ref.dtype, ref.device)
        return self.cache

    def clear_cache(self) -> None:
        """Free the KV cache."""
        self.cache = None

    def fuse(self) -> "Transformer":
        """Fuse each layer's ``wq, wk, wv`` and ``w1, w3`` into one projection (names in ``state_dict`` unchanged)."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

    def set_attention(self, attention: str = "auto") -> None:
        """Choose the kernels for RMSNorm, RoPE and attention: ``"torch"``, ``"triton"`` or ``"auto"``.

        ``"auto"`` takes the Triton kernels on CUDA when Triton works, PyTorch otherwise.
        """
        self.ops = select_ops(attention, self.tok_embeddings.weight.device)

    # --------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, start_pos: StartPos = 0, *,
                logits_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) placed at positions ``start_pos … start_pos+T-1``.

        With a KV cache (``setup_cache``) it writes positions ``start_pos … start_pos+T-1`` and attends over
        ``0 … start_pos+T-1``, so a prompt fed in chunks gives the logits it gives fed at once. Without a
        cache it is a plain causal forward over ``tokens`` and ``start_pos`` must be 0 (training, scoring).

        ``start_pos``: an int, or a LongTensor (B,) of per-row positions (ragged batches).
        ``logits_index``: None → logits for every position, (B, T, V); an int (e.g. -1) → that position,
        (B, 1, V); a LongTensor (B,) → one position per row, (B, 1, V). Skipping the others avoids a T × V
        tensor for long prompts. Logits are float32.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a (batch, seq_len) tensor, got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        device = self.tok_embeddings.weight.device
        if isinstance(start_pos, torch.Tensor):
            start_pos = start_pos.to(device=device, dtype=torch.long).reshape(-1)
            if start_pos.numel() != B:
                raise ValueError(f"start_pos has {start_pos.numel()} entries for a batch of {B}")
            if int(start_pos.min()) < 0:
                raise ValueError(f"start_pos must be ≥ 0, got {start_pos.tolist()}")
            end = int(start_pos.max()) + T
            positions = start_pos.view(B, 1) + torch.arange(T, device=device)  # (B, T)
        else:
            if start_pos < 0:
                raise ValueError(f"start_pos must be ≥ 0, got {start_pos}")
            end = start_pos + T
            positions = torch.arange(start_pos, end, device=device).unsqueeze(0)  # (1, T)

        cache = self.cache
        if cache is None:
            if not (isinstance(start_pos, int) and start_pos == 0):
                raise ValueError("start_pos > 0 needs a KV cache: call model.setup_cache(max_batch_size, max_seq_len) first")
        elif B > cache.max_batch_size or end > cache.max_seq_len:
            raise ValueError(f"batch {B} × positions up to {end} exceed the KV cache's "
                             f"{cache.max_batch_size} × {cache.max_seq_len}; call setup_cache with larger limits")

        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.args.head_dim, self.args.rope_theta, device)
        cos, sin = rope_angles(positions, self._inv_freq)  # (B|1, T, hd/2)
        step = _Step(start_pos, end, cos, sin, cache, self.ops)

        h = self.tp.all_gather(self.tok_embeddings(tokens))  # (B, T, D)
        for layer in self.layers:
            h = layer(h, step)
        if logits_index is not None:
            if isinstance(logits_index, int):
                h = h[:, [logits_index]]
            else:
                h = h[torch.arange(B, device=device), logits_index.to(device)].unsqueeze(1)  # (B, 1, D)
        return self.tp.all_gather(self.output(self.norm(h, self.ops))).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int = 0, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Feed a prompt into the cache (optionally in chunks) and return the last position's logits (B, V)."""
        T = tokens.shape[1]
        step = chunk_size or T
        logits = None
        for i in range(0, T, step):
            logits = self(tokens[:, i:i + step], start_pos + i, logits_index=-1)
        return logits[:, -1]


ATTENTION_CHOICES = ("auto", "torch", "triton")


def select_ops(attention: str, device: torch.device | str):
    """The ``Ops`` implementation for an ``attention=`` choice on ``device``."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention implementation {attention!r}; valid: {', '.join(ATTENTION_CHOICES)}")
    if attention == "torch" or (attention == "auto" and torch.device(device).type != "cuda"):
        return TorchOps
    try:
        from kernels import TritonOps, interpreting, triton_available
    except ImportError as e:
        if attention == "auto":
            return TorchOps
        raise ValueError(f"attention='triton' needs the kernels package and Triton: {e}") from None
    ok, why = triton_available()
    if ok and torch.device(device).type == "cpu" and not interpreting():
        ok, why = False, "the model is on the CPU; Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if ok:
        return TritonOps
    if attention == "auto":
        return TorchOps
    raise ValueError(f"attention='triton' is unavailable here: {why}")


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA where supported, else fp16 on CUDA (and MPS); fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: Union[None, str, torch.dtype]) -> Optional[torch.dtype]:
    """``torch.dtype`` from a name like ``"bf16"``; ``None`` passes through."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]

"""The Code Llama transformer, with Meta's parameter names so checkpoints load key for key.

Shapes: B batch, T tokens in this call, L attended length (cache positions ``0 … end-1``),
H query heads, Hkv key/value heads, hd head dim, D model dim, V vocab.

RMSNorm, rotary embedding and attention go through the ``codellama.ops`` seam (``TorchOps``, or the
Triton kernels' ``TritonOps``), chosen with ``Transformer.set_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .distributed import SINGLE, TensorParallel, check_parallel, local_heads
from .kernels import select_ops
from .ops import Ops, StartPos, TorchOps, apply_rotary


def rope_inv_freq(head_dim: int, theta: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """``1 / theta ** (2i / head_dim)`` in float32, as Meta's ``precompute_freqs_cis``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (…, hd/2) in float32 for integer positions (…)."""
    angles = positions.float().unsqueeze(-1) * inv_freq  # float32 even for bf16 models
    return torch.cos(angles), torch.sin(angles)


def rope_shift_angles(old: torch.Tensor, new: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (…, hd/2) in float32 of the rotation that turns a key rotated for integer positions ``old`` (…)
    into the key rotated for ``new``: the difference of the model's own float32 angles (:func:`rope_angles`),
    taken in float64, so that a moved key is the key the model computes at ``new`` up to one rounding."""
    delta = (new.float().unsqueeze(-1) * inv_freq).double() - (old.float().unsqueeze(-1) * inv_freq).double()
    return torch.cos(delta).float(), torch.sin(delta).float()


# ----------------------------------------------------------------------------- KV cache
class KVCache(nn.Module):
    """Keys and values of every layer, (n_layers, slots, Hkv, max_seq_len, hd): one row per slot.

    A slot is a cache row that one sequence owns: a Meta-style batch uses rows ``0 … B-1``; the engine
    gives each request a slot for its whole life and keeps what a finished request cached there for the
    next one to reuse. Nothing is ever copied between slots. Lifecycle: ``Transformer.setup_cache``
    allocates it (or plans it, to be allocated on first use); ``Transformer.clear_cache`` frees it.
    """

    def __init__(self, n_layers: int, slots: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.slots, self.max_seq_len = slots, max_seq_len
        shape = (n_layers, slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # (1, 1) index of each layer (not a 0-d one, which torch.compile would turn into a Python int)
        self.register_buffer("layer_ids", torch.arange(n_layers, device=device).view(-1, 1, 1), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.slots

    @classmethod
    def allocate(cls, args: ModelArgs, slots: int, max_seq_len: int, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallel = SINGLE) -> "KVCache":
        """A cache for ``args`` (this rank's KV heads), or ``ValueError`` with the sizes when it cannot fit."""
        size = slots * max_seq_len * cls.bytes_per_token(args, dtype, tp)
        need = (f"the KV cache needs {size / 2**30:.2f} GiB ({slots} slots × {max_seq_len} positions × "
                f"{cls.bytes_per_token(args, dtype, tp)} bytes); lower max_batch_size or max_seq_len")
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        if free is not None and size > free:
            raise ValueError(f"{need}: only {free / 2**30:.2f} GiB are free on {device}")
        try:
            return cls(args.n_layers, slots, max_seq_len, local_heads(args, tp)[1], args.head_dim, dtype, device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            raise ValueError(f"{need} ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype, tp: TensorParallel = SINGLE) -> int:
        """Cache bytes one position of one slot takes: ``2 · n_layers · Hkv · hd · size(dtype)``."""
        return 2 * args.n_layers * local_heads(args, tp)[1] * args.head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, step: "_Step") -> None:
        """Store k, v (B, Hkv, T, hd) of this call's rows at positions ``start_pos + arange(T)``."""
        T = k.shape[2]
        if step.rows is None and isinstance(step.start_pos, int):  # one block of rows, one position: a slice
            rows = slice(step.first_row, step.first_row + k.shape[0])
            self.k[layer, rows, :, step.start_pos:step.start_pos + T] = k
            self.v[layer, rows, :, step.start_pos:step.start_pos + T] = v
            return
        # Every index a tensor, the layer's too: one in-place index_put_ on the cache itself. Through a view
        # (``self.k[layer][rows, :, cols]``) torch.compile's functionalization copies the whole layer each step.
        at = (self.layer_ids[layer], step.row_index.unsqueeze(1), slice(None), step.positions.expand(k.shape[0], T))
        self.k[at] = k.transpose(1, 2)  # (B, T, Hkv, hd): the advanced indices' (B, T) come first
        self.v[at] = v.transpose(1, 2)

    def block(self, layer: int, first: int, n: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views (n, Hkv, end, hd) of rows ``first … first+n-1``, positions ``0 … end-1`` (no copy)."""
        return self.k[layer, first:first + n, :, :end], self.v[layer, first:first + n, :, :end]

    def positions(self, slot: int, start: int, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Views (n_layers, Hkv, n, hd) of keys and values at positions ``start … start+n-1`` of one slot."""
        return self.k[:, slot, :, start:start + n], self.v[:, slot, :, start:start + n]

    def move(self, slot: int, source: torch.Tensor, destination: torch.Tensor, inv_freq: torch.Tensor) -> None:
        """Move the keys and values at positions ``source`` (T,) of ``slot`` to ``destination`` (T,), every source
        read before any destination is written; keys are re-rotated by the position difference
        (:func:`rope_shift_angles`), values need nothing (RoPE never touches them). One layer at a time, so the
        float32 temporaries are (Hkv, T, hd)."""
        source, destination = source.to(self.k.device), destination.to(self.k.device)
        cos, sin = rope_shift_angles(source, destination, inv_freq.to(self.k.device))  # (T, hd/2)
        for layer in range(self.k.shape[0]):
            k = self.k[layer, slot][:, source]  # (Hkv, T, hd): a copy
            v = self.v[layer, slot][:, source]
            k = apply_rotary(k.transpose(0, 1).unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0))[0].transpose(0, 1)
            self.k[layer, slot][:, destination] = k
            self.v[layer, slot][:, destination] = v


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
    """What every layer of one forward call shares.

    The call's B rows live in cache rows ``first_row … first_row+B-1`` (``rows is None``: a Meta-style
    batch, or one slot), or in the scattered cache rows ``rows`` (the engine's decode batch), in which case
    attention runs row by row over each row's own slot, so no row's keys are ever gathered or copied.
    """
    start_pos: StartPos
    end: int  # attended length: max over rows of start_pos + T
    positions: torch.Tensor  # (B|1, T) long
    cos: torch.Tensor  # (B|1, T, hd/2) float32
    sin: torch.Tensor
    cache: Optional[KVCache]
    ops: Ops
    first_row: int = 0
    rows: Optional[List[int]] = None  # scattered cache rows, one per batch row
    row_index: Optional[torch.Tensor] = None  # (B,) long: the cache row of each batch row
    row_starts: Optional[List[int]] = None  # host copy of per-row start positions (for the scattered path)


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
        if hasattr(type(parts[0]), "cat"):  # a layer type that concatenates itself (codellama.quantize's)
            fused = type(parts[0]).cat(parts)
        else:
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
        """Every tensor of the fused layer (its weight; a quantized layer's scales too) back under the parts' names,
        cut along the output rows."""
        if module.fused_sizes is not None:
            fused = prefix + module.FUSED + "."
            pieces = {key[len(fused):]: state.pop(key).split(module.fused_sizes) for key in list(state)
                      if key.startswith(fused)}
            for i, name in enumerate(module.PARTS):
                for suffix, parts in pieces.items():
                    state[prefix + name + "." + suffix] = parts[i]
        return state

    def _join_state(self, state, prefix, *_):
        if self.fused_sizes is None:
            return
        first = prefix + self.PARTS[0] + "."
        for suffix in [k[len(first):] for k in state if k.startswith(first)]:
            keys = [prefix + name + "." + suffix for name in self.PARTS]
            if all(k in state for k in keys):
                state[prefix + self.FUSED + "." + suffix] = torch.cat([state.pop(k) for k in keys])


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
        cache = step.cache
        if cache is None:
            out = step.ops.attention(q, k, v, step.start_pos)  # (B, H, T, hd)
        else:
            cache.write(self.layer_id, k, v, step)
            if step.rows is None:
                ck, cv = cache.block(self.layer_id, step.first_row, B, step.end)  # (B, Hkv, end, hd)
                out = step.ops.attention(q, ck, cv, step.start_pos)
            else:  # each row over its own slot's keys: (1, Hkv, start + T, hd) views
                out = torch.cat([step.ops.attention(q[b:b + 1], *cache.block(self.layer_id, row, 1, start + T), start)
                                 for b, (row, start) in enumerate(zip(step.rows, step.row_starts))])
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

    def fuse(self) -> "TransformerBlock":
        """Fuse ``wq, wk, wv`` and ``w1, w3`` into one projection each (names in ``state_dict`` unchanged)."""
        self.attention.fuse()
        self.feed_forward.fuse()
        return self

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
        self._cache_plan: Optional[Tuple[int, int, Optional[torch.dtype]]] = None  # allocate on first use
        self.ops: Ops = TorchOps
        self._inv_freq: Optional[torch.Tensor] = None

    # --------------------------------------------------------------- cache lifecycle
    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None, *,
                    lazy: bool = False) -> Optional[KVCache]:
        """A KV cache of ``max_batch_size`` rows × ``max_seq_len`` positions, used by every later ``forward``.

        ``lazy=True`` only plans it: it is allocated by the first ``forward`` (what ``Llama.build`` does,
        as Meta's model holds its cache from the start but memory should not be taken before it is used).
        """
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.tok_embeddings.weight.device.type == "meta":
            raise ValueError("the model's weights are still on the meta device: load a checkpoint before setup_cache")
        self.clear_cache()
        self._cache_plan = (max_batch_size, max_seq_len, dtype)
        return None if lazy else self._allocate_cache()

    def _allocate_cache(self) -> KVCache:
        slots, length, dtype = self._cache_plan
        ref = self.norm.weight  # a float weight (a quantized embedding holds integer codes)
        self.cache = KVCache.allocate(self.args, slots, length, dtype or ref.dtype, ref.device, self.tp)
        return self.cache

    def clear_cache(self) -> None:
        """Free the KV cache (and forget a planned one): ``forward`` is a plain causal forward again."""
        self.cache, self._cache_plan = None, None

    def fuse(self) -> "Transformer":
        """Fuse each layer's ``wq, wk, wv`` and ``w1, w3`` into one projection (names in ``state_dict`` unchanged)."""
        for layer in self.layers:
            layer.fuse()
        return self

    def set_attention(self, attention: str = "auto") -> None:
        """Choose the kernels for RMSNorm, RoPE and attention: ``"torch"``, ``"triton"`` or ``"auto"``.

        ``"auto"`` takes the Triton kernels on CUDA when Triton works, PyTorch otherwise.
        """
        self.ops = select_ops(attention, self.tok_embeddings.weight.device)

    # --------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, start_pos: Union[StartPos, Sequence[int]] = 0, *,
                logits_index: Union[None, int, torch.Tensor] = None,
                slots: Optional[Sequence[int]] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits for ``tokens`` (B, T) placed at positions ``start_pos … start_pos+T-1``.

        With a KV cache (``setup_cache``) it writes positions ``start_pos … start_pos+T-1`` and attends over
        ``0 … start_pos+T-1``, so a prompt fed in chunks gives the logits it gives fed at once. Without a
        cache it is a plain causal forward over ``tokens`` and ``start_pos`` must be 0 (training, scoring).

        ``start_pos``: an int, or one position per row (a LongTensor (B,) or a list of ints: ragged batches).
        ``slots``: the cache row of each batch row (default rows ``0 … B-1``); rows stay where they are.
        ``cache``: a KV cache to use instead of the model's own (the engine keeps its own slot cache).
        ``logits_index``: None → logits for every position, (B, T, V); an int (e.g. -1) → that position,
        (B, 1, V); a LongTensor (B,) → one position per row, (B, 1, V). Skipping the others avoids a T × V
        tensor for long prompts. Logits are float32.
        """
        B, T = _check_tokens(tokens, self.args.vocab_size)
        device = self.tok_embeddings.weight.device
        start_pos, row_starts = _check_start_pos(start_pos, B, device)
        end = (start_pos if isinstance(start_pos, int) else max(row_starts)) + T
        logits_index = _check_logits_index(logits_index, B, T, device)
        if cache is None:
            if self.cache is None and self._cache_plan is not None:
                self._allocate_cache()
            cache = self.cache
        if cache is None:
            if not (isinstance(start_pos, int) and start_pos == 0):
                raise ValueError("start_pos > 0 needs a KV cache: call model.setup_cache(max_batch_size, max_seq_len) first")
            if slots is not None:
                raise ValueError("slots address a KV cache: call model.setup_cache(max_batch_size, max_seq_len) first")
        if end > (cache.max_seq_len if cache is not None else float("inf")):
            raise ValueError(f"positions up to {end} exceed the KV cache's max_seq_len={cache.max_seq_len}; "
                             "call setup_cache with a larger max_seq_len")
        first_row, rows = _check_slots(slots, B, cache)
        if rows is not None and row_starts is None:  # scattered rows all at one position
            row_starts = [start_pos] * B
        step = self.make_step(start_pos, T, end, cache, first_row=first_row, rows=rows, row_starts=row_starts)
        return self.run(tokens.to(device), step, logits_index)

    def make_step(self, start_pos: StartPos, T: int, end: int, cache: Optional[KVCache], *, first_row: int = 0,
                  rows: Optional[List[int]] = None, row_starts: Optional[List[int]] = None) -> _Step:
        """The per-call state of a forward (positions, RoPE angles, cache rows) for already-checked arguments."""
        device = self.tok_embeddings.weight.device
        if isinstance(start_pos, int):
            positions = torch.arange(start_pos, start_pos + T, device=device).unsqueeze(0)  # (1, T)
        else:
            positions = start_pos.view(-1, 1) + torch.arange(T, device=device)  # (B, T)
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.args.head_dim, self.args.rope_theta, device)
        cos, sin = rope_angles(positions, self._inv_freq)  # (B|1, T, hd/2)
        row_index = None
        if cache is not None and (rows is not None or not isinstance(start_pos, int)):
            row_index = (torch.tensor(rows, device=device) if rows is not None
                         else torch.arange(first_row, first_row + positions.shape[0], device=device))
        return _Step(start_pos, end, positions, cos, sin, cache, self.ops, first_row, rows, row_index, row_starts)

    def run(self, tokens: torch.Tensor, step: _Step, logits_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """The forward pass proper, on checked inputs (``forward`` checks; the engine calls this directly)."""
        h = self.tp.all_gather(self.tok_embeddings(tokens))  # (B, T, D)
        for layer in self.layers:
            h = layer(h, step)
        if logits_index is not None:
            if isinstance(logits_index, int):
                h = h[:, [logits_index]]
            else:
                h = h[torch.arange(h.shape[0], device=h.device), logits_index].unsqueeze(1)  # (B, 1, D)
        return self.tp.all_gather(self.output(self.norm(h, self.ops))).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int = 0, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Feed a prompt into the cache (optionally in chunks) and return the last position's logits (B, V)."""
        if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer (tokens per forward) or None, got {chunk_size!r}")
        _check_tokens(tokens, self.args.vocab_size)
        T = tokens.shape[1]
        step = chunk_size or T
        logits = None
        for i in range(0, T, step):
            logits = self(tokens[:, i:i + step], start_pos + i, logits_index=-1)
        return logits[:, -1]


# ----------------------------------------------------------------------------- argument checks
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tokens(tokens: torch.Tensor, vocab: int) -> Tuple[int, int]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (batch, seq_len) integer tensor, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise ValueError(f"tokens must hold at least one row and one position, got shape {(B, T)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {vocab})")
    return B, T


def _check_start_pos(start_pos, B: int, device: torch.device) -> Tuple[StartPos, Optional[List[int]]]:
    """``(int or LongTensor (B,) on device, host list of per-row starts or None)``; rows that all start at one
    position give that int (the unmasked attention paths serve it)."""
    if _is_int(start_pos):
        if start_pos < 0:
            raise ValueError(f"start_pos must be ≥ 0, got {start_pos}")
        return start_pos, None
    if isinstance(start_pos, torch.Tensor):
        if start_pos.dtype.is_floating_point or start_pos.dtype == torch.bool or start_pos.dtype.is_complex:
            raise ValueError(f"start_pos must be an int or an integer tensor, got dtype {start_pos.dtype}")
        starts = start_pos.reshape(-1).tolist()
    elif isinstance(start_pos, (list, tuple)) and all(_is_int(s) for s in start_pos):
        starts = list(start_pos)
    else:
        raise ValueError(f"start_pos must be an int, a list of ints or an integer tensor (one per row), got {start_pos!r:.80}")
    if len(starts) != B:
        raise ValueError(f"start_pos has {len(starts)} entries for a batch of {B}")
    if min(starts) < 0:
        raise ValueError(f"start_pos must be ≥ 0, got {starts}")
    if len(set(starts)) == 1:
        return starts[0], None
    return torch.tensor(starts, dtype=torch.long, device=device), starts


def _check_logits_index(index, B: int, T: int, device: torch.device) -> Union[None, int, torch.Tensor]:
    if index is None:
        return None
    if _is_int(index):
        if not -T <= index < T:
            raise ValueError(f"logits_index {index} is out of range for {T} positions (valid: {-T} … {T - 1})")
        return index
    if not isinstance(index, torch.Tensor) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"logits_index must be None, an int or an integer tensor of shape ({B},), got {index!r:.80}")
    if index.numel() != B:
        raise ValueError(f"logits_index has {index.numel()} entries for a batch of {B} (one position per row)")
    index = index.reshape(-1).to(device=device, dtype=torch.long)
    lo, hi = int(index.min()), int(index.max())
    if lo < -T or hi >= T:
        raise ValueError(f"logits_index holds {lo if lo < -T else hi}, out of range for {T} positions "
                         f"(valid: {-T} … {T - 1})")
    return index % T


def _check_slots(slots: Optional[Sequence[int]], B: int, cache: Optional[KVCache]) -> Tuple[int, Optional[List[int]]]:
    """``(first_row, rows)``: a contiguous block of cache rows, or scattered rows (one per batch row)."""
    if slots is None:
        if cache is not None and B > cache.slots:
            raise ValueError(f"batch {B} would exceed the KV cache's {cache.slots} rows; call setup_cache with a larger "
                             "max_batch_size")
        return 0, None
    slots = list(slots)
    if len(slots) != B or not all(_is_int(s) and 0 <= s < cache.slots for s in slots):
        raise ValueError(f"slots must be {B} cache rows in [0, {cache.slots}), got {slots!r:.80}")
    if len(set(slots)) != B:
        raise ValueError(f"slots must be distinct (one cache row per batch row), got {slots}")
    if slots == list(range(slots[0], slots[0] + B)):
        return slots[0], None
    return 0, slots


def build_on_meta(args: ModelArgs, tp: TensorParallel = SINGLE) -> Transformer:
    """The model's modules with shapes but no memory: weights are assigned by ``load_weights``."""
    with torch.device("meta"):
        return Transformer(args, tp)

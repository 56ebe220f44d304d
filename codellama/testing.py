"""Tiny random models and checkpoints, and a scripted stand-in model, for tests and benchmarks (no downloads).

Random weights with Meta's names; norms random too, so a mis-mapped norm cannot hide behind all-ones.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .config import ModelArgs
from .model import Transformer, _Step, build_on_meta
from .formats.hf import write_hf
from .formats.meta import save_meta
from .quantize import QuantizeArg, parse_quantize
from .save import write_quantized_hf


def random_tensors(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Iterator[Tuple[str, torch.Tensor]]:
    """``random_state_dict``'s tensors one at a time (the same values), for checkpoints larger than memory."""
    g = torch.Generator().manual_seed(seed)
    for k, t in build_on_meta(args).state_dict().items():
        if k.endswith("norm.weight"):
            yield k, (1.0 + 0.1 * torch.randn(t.shape, generator=g)).to(dtype)
        else:
            yield k, (torch.randn(t.shape, generator=g) * (1.0 / t.shape[-1] ** 0.5)).to(dtype)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Random weights for ``args`` (Meta names), scaled like an initialised model so activations stay O(1)."""
    return dict(random_tensors(args, seed, dtype))


def random_model(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``Transformer`` holding ``random_state_dict(args, seed, dtype)``, in eval mode."""
    model = build_on_meta(args)
    model.load_state_dict(random_state_dict(args, seed, dtype), assign=True, strict=True)
    return model.eval()


def write_checkpoint(path: str | os.PathLike, args: ModelArgs, layout: str = "meta", *, seed: int = 0,
                     shards: int = 1, dtype: torch.dtype = torch.float32, tokenizer: Optional[str] = None,
                     max_shard_bytes: int = 5 * 2**30, quantize: "QuantizeArg" = None) -> str:
    """A random checkpoint directory in the Meta or HF layout (with an optional tokenizer.model copied in).

    With ``quantize`` (HF layout only), the weights are written quantized as ``python -m codellama quantize``
    writes them, each quantized as it is made: a checkpoint too large to exist in full precision on this disk.
    """
    path = os.fspath(path)
    config = parse_quantize(quantize)
    if config is not None and layout != "hf":
        raise ValueError(f"a quantized checkpoint is written in the HF layout, not {layout!r}")
    if layout == "meta":
        save_meta(random_state_dict(args, seed, dtype), args, path, num_shards=shards)
    else:  # a tensor at a time: a 7B-sized checkpoint needs no 7B of memory
        plan = {k: (tuple(t.shape), dtype) for k, t in build_on_meta(args).state_dict().items()}
        if config is None:
            write_hf(path, args, plan, random_tensors(args, seed, dtype), max_shard_bytes=max_shard_bytes)
        else:
            write_quantized_hf(path, args, config, plan, random_tensors(args, seed, dtype),
                               max_shard_bytes=max_shard_bytes)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return path


class ScriptedModel(Transformer):
    """A stand-in ``Transformer`` that writes given answers: a model one can score a harness against.

    ``scripts`` are ``(prompt, answer)`` token lists. Wherever the tokens a row holds so far are a
    prompt followed by the start of its answer, the logits put all the weight (+100, the rest 0) on
    the answer's next token, and on ``eos_id`` once the answer is written; anywhere else, on ``eos_id``.
    Greedy decoding, and sampling at any temperature with ``top_p < 1``, thus write exactly the answer.

    It keeps what it has seen where a model keeps it: each position's token id is written into its KV
    cache (the keys of its single layer) at the row and position the caller gives, and the next token is
    looked up from that row's cache. So whatever drives it (the engine's slots, prefix reuse, chunked
    prefill, ragged batches) must feed every row the right tokens at the right positions, or the answer
    goes wrong. Only the layers are replaced: ``forward`` and its checks are the ``Transformer``'s own.
    """

    def __init__(self, scripts: Iterable[Tuple[Sequence[int], Sequence[int]]], vocab_size: int, eos_id: int):
        super().__init__(ModelArgs(dim=2, n_layers=1, n_heads=1, vocab_size=vocab_size, multiple_of=1))
        self.eos_id = eos_id
        self._texts: List[List[int]] = []  # prompt + answer + [eos]
        self._index: Dict[int, List[Tuple[int, int]]] = {}  # hash of the first L tokens -> (text, L)
        for prompt, answer in scripts:
            text = [int(t) for t in prompt] + [int(t) for t in answer] + [eos_id]
            for length in range(len(prompt), len(text)):
                key = hash(tuple(text[:length]))
                for other, n in self._index.get(key, ()):
                    if n == length and self._texts[other][:n] == text[:n] and self._texts[other][n] != text[n]:
                        raise ValueError(f"two scripts continue the same {n} tokens differently")
                self._index.setdefault(key, []).append((len(self._texts), length))
            self._texts.append(text)

    def next_token(self, seen: List[int]) -> int:
        """The token the scripts write after ``seen`` (``eos_id`` where none continues it)."""
        for i, n in self._index.get(hash(tuple(seen)), ()):
            if n == len(seen) and self._texts[i][:n] == seen:
                return self._texts[i][n]
        return self.eos_id

    def run(self, tokens: torch.Tensor, step: _Step, logits_index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """Logits as :meth:`Transformer.run` gives them ((B, T or 1, V), float32), from the scripts."""
        if step.cache is None:
            raise ValueError("ScriptedModel reads what it has seen from a KV cache: give it one (setup_cache)")
        if step.cache.k.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"ScriptedModel keeps token ids in its cache, which needs float32, not {step.cache.k.dtype}")
        B, T = tokens.shape
        rows = step.row_index if step.row_index is not None else torch.arange(step.first_row, step.first_row + B)
        rows = rows.to(tokens.device)
        positions = step.positions.expand(B, T)  # (B, T)
        seen = step.cache.k[0, :, 0, :, 0]  # (slots, max_seq_len): one token id per position
        seen[rows.unsqueeze(1), positions] = tokens.to(seen.dtype)
        if logits_index is None:
            wanted = torch.arange(T).expand(B, T)
        elif isinstance(logits_index, int):
            wanted = torch.full((B, 1), logits_index % T)
        else:
            wanted = logits_index.view(B, 1).cpu()
        logits = torch.zeros(B, wanted.shape[1], self.args.vocab_size)
        for b in range(B):
            row = seen[int(rows[b])]
            for j, t in enumerate(wanted[b].tolist()):
                end = int(positions[b, t]) + 1
                logits[b, j, self.next_token(row[:end].long().tolist())] = 100.0
        return logits.to(tokens.device)


# ----------------------------------------------------------------------------- GGUF files
def write_gguf(path: str | os.PathLike, state: Mapping[str, torch.Tensor], args: ModelArgs, *,
               tokenizer_path: Optional[str] = None, tensor_type: Union[str, Callable[[str], str]] = "F32",
               context: int = 16384, metadata: Optional[Dict[str, Any]] = None) -> str:
    """A GGUF file of Meta-named weights as llama.cpp's converter writes them (architecture ``llama``).

    Matrices are stored as ``tensor_type`` (F32, F16, BF16 or a quantized type such as Q4_0, Q8_0, Q4_K,
    Q6_K; or a function of the Meta name giving each one's type), norms in F32 as llama.cpp requires. Q4_K
    and Q6_K, which the ``gguf`` package cannot quantize, are built by ``quantize_k_blocks``. Tensors are
    taken from ``state`` and written one at a time, so a lazy mapping (one that makes each tensor when asked)
    writes a 7B-sized file holding one tensor in memory. The vocabulary is ``tokenizer_path``'s pieces, or
    without one unk/bos/eos, the 256 byte pieces and fillers (enough when token ids are what is fed).
    ``metadata`` adds or replaces keys (bool, int: UINT32 or INT32, float: FLOAT32, str, or a list of them).
    """
    import numpy as np

    from .formats.gguf import gguf_name, require_gguf
    gguf = require_gguf()
    path = os.fspath(path)
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(args).state_dict().items()}
    types = {k: "F32" if len(shapes[k]) == 1 else tensor_type(k) if callable(tensor_type) else tensor_type
             for k in state.keys()}
    w = gguf.GGUFWriter(path, "llama")
    for add, value in ((w.add_context_length, context), (w.add_embedding_length, args.dim),
                       (w.add_block_count, args.n_layers), (w.add_feed_forward_length, args.hidden_dim),
                       (w.add_rope_dimension_count, args.head_dim), (w.add_head_count, args.n_heads),
                       (w.add_head_count_kv, args.kv_heads), (w.add_layer_norm_rms_eps, args.norm_eps),
                       (w.add_rope_freq_base, args.rope_theta)):
        add(value)
    _add_gguf_vocab(w, tokenizer_path, args.vocab_size)
    for key, value in (metadata or {}).items():
        _add_value(w, key, value)
    for key, kind in types.items():
        qtype = gguf.GGMLQuantizationType[kind]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = (1, *shapes[key])[-2:]
        w.add_tensor_info(gguf_name(key), shapes[key], np.float32, rows * cols // block * type_size, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for key, kind in types.items():
        w.write_tensor_data(encode_gguf_tensor(state[key], kind))
    w.close()
    return path


def encode_gguf_tensor(tensor: torch.Tensor, kind: str):
    """A tensor's bytes as GGUF type ``kind`` stores them (a numpy array the GGUF writer takes)."""
    import numpy as np

    from .formats.gguf import require_gguf
    gguf = require_gguf()
    x = tensor.detach().float().contiguous().numpy()
    if kind == "F32":
        return x
    if kind == "F16":
        return x.astype(np.float16)
    if kind == "BF16":  # the bits of bf16 (rounded to nearest even), two bytes a weight
        return tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if kind in K_QUANTIZERS:
        return quantize_k_blocks(x, kind)
    return gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind])


def quantize_k_blocks(x, kind: str):
    """(rows, cols) float32 → (rows, cols / 256 · block bytes) uint8 of valid ``kind`` (Q4_K or Q6_K) blocks.

    Plain min–max rounding, without llama.cpp's search for the best scales (its files are a little more
    accurate): enough for a file the ``gguf`` package and llama.cpp dequantize, with the error of its type.
    """
    import numpy as np
    rows, cols = x.shape
    blocks = x.reshape(-1, 256).astype(np.float32)
    return K_QUANTIZERS[kind](blocks).reshape(rows, -1)


def _fp16(x):
    """``x`` rounded to fp16, as (the fp16 bytes, the value they hold as float32)."""
    import numpy as np
    half = x.astype(np.float16)
    return half.view(np.uint8), half.astype(np.float32)


def _divide(a, b):
    import numpy as np
    return np.where(b > 0, a / np.where(b > 0, b, 1), 0)


def _q4_k(blocks):
    """Q4_K: 8 sub-blocks of 32, ``w = d·sc[j]·q − dmin·m[j]`` with 6-bit ``sc``, ``m`` and 4-bit ``q``; 144 bytes:
    d, dmin (fp16), 12 bytes of packed ``sc``/``m``, 128 bytes of codes (byte i of chunk c: sub-blocks 2c, 2c+1)."""
    import numpy as np
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, offset = (sub.max(-1) - low) / 15, -low  # (n, 8) each, offset ≥ 0
    d_bytes, d = _fp16(scale.max(-1, keepdims=True) / 63)
    m_bytes, dmin = _fp16(offset.max(-1, keepdims=True) / 63)
    sc = np.round(_divide(scale, d)).clip(0, 63).astype(np.uint8)
    m = np.round(_divide(offset, dmin)).clip(0, 63).astype(np.uint8)
    step, shift = (d * sc)[..., None], (dmin * m)[..., None]
    q = np.round(_divide(sub + shift, step)).clip(0, 15).astype(np.uint8)  # (n, 8, 32)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | (sc[:, 4:] >> 4) << 6
    packed[:, 4:8] = m[:, :4] | (m[:, 4:] >> 4) << 6
    packed[:, 8:12] = (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4
    codes = (q[:, 0::2] | q[:, 1::2] << 4).reshape(n, 128)
    return np.concatenate([d_bytes, m_bytes, packed, codes], axis=1)


def _q6_k(blocks):
    """Q6_K: 16 sub-blocks of 16, ``w = d·sc[j]·(q − 32)`` with int8 ``sc`` and 6-bit ``q``; 210 bytes: 128 of low
    nibbles, 64 of high bit pairs, 16 scales, d (fp16). Element e sits in half e // 128 of both code arrays."""
    import numpy as np
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scale = np.abs(sub).max(-1) / 31  # (n, 16)
    d_bytes, d = _fp16(scale.max(-1, keepdims=True) / 127)
    sc = np.round(_divide(scale, d)).clip(0, 127).astype(np.int8)
    q = (np.round(_divide(sub, (d * sc)[..., None])).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)
    low, high = (q & 15).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(n, 128)
    qh = (high[:, :, 0] | high[:, :, 1] << 2 | high[:, :, 2] << 4 | high[:, :, 3] << 6).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d_bytes], axis=1)


K_QUANTIZERS = {"Q4_K": _q4_k, "Q6_K": _q6_k}


def _add_value(w, key: str, value: Any) -> None:
    for kv in w.kv_data:  # replace a key already set (newer gguf versions refuse a second one)
        kv.pop(key, None)
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_int32 if value < 0 else w.add_uint32)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def _add_gguf_vocab(w, tokenizer_path: Optional[str], vocab_size: int) -> None:
    from .formats.gguf import require_gguf
    gguf = require_gguf()
    kinds = gguf.TokenType
    if tokenizer_path is not None:
        from sentencepiece import SentencePieceProcessor
        sp = SentencePieceProcessor(model_file=tokenizer_path)
        if sp.vocab_size() != vocab_size:
            raise ValueError(f"{tokenizer_path} has {sp.vocab_size()} pieces, the model's vocabulary {vocab_size}")
        pieces = [sp.id_to_piece(i) for i in range(vocab_size)]
        scores = [sp.get_score(i) for i in range(vocab_size)]
        types = [kinds.UNKNOWN if sp.is_unknown(i) else kinds.CONTROL if sp.is_control(i)
                 else kinds.BYTE if sp.is_byte(i) else kinds.NORMAL for i in range(vocab_size)]
        unk, bos, eos = sp.unk_id(), sp.bos_id(), sp.eos_id()
    else:
        pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
        types = [kinds.UNKNOWN, kinds.CONTROL, kinds.CONTROL] + [kinds.BYTE] * 256
        pieces += [f"piece{i}" for i in range(vocab_size - len(pieces))]
        types += [kinds.NORMAL] * (vocab_size - len(types))
        scores, unk, bos, eos = [-float(i) for i in range(vocab_size)], 0, 1, 2
    # Code Llama's FIM pieces as llama.cpp's converter writes them: control tokens (never printed), their ids
    # named, so that llama.cpp infills with them and stops at <EOT> (the reader restores them to pieces).
    fim = {"▁<PRE>": gguf.Keys.Tokenizer.FIM_PRE_ID, "▁<SUF>": gguf.Keys.Tokenizer.FIM_SUF_ID,
           "▁<MID>": gguf.Keys.Tokenizer.FIM_MID_ID, "▁<EOT>": gguf.Keys.Tokenizer.EOT_ID}
    types = [kinds.CONTROL if p in fim else k for p, k in zip(pieces, types)]
    w.add_tokenizer_model("llama")
    w.add_token_list([p.encode() for p in pieces])
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    for piece, key in fim.items():
        if piece in pieces:
            w.add_uint32(key, pieces.index(piece))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

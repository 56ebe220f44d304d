"""A Meta-layout state dict as a GGUF file for llama.cpp (architecture "llama"), for the benchmarks that run
llama.cpp on the same weights as this library (``bench_quant.py``, ``bench_serve.py``). Needs the ``gguf``
package; never a dependency of the library.

Meta's q/k layout is llama.cpp's own (adjacent channel pairs rotate together), so no permutation is needed
(Hugging Face checkpoints are permuted back by llama.cpp's ``convert_hf_to_gguf.py``; this skips that round
trip). Matrices are F32, or BF16 when the state is bf16; norms are always F32, as llama.cpp requires.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Union

import torch

from codellama import ModelArgs
from codellama.checkpoint import build_on_meta

NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "attention.wq": "attn_q",
         "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
         "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
         "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def gguf_name(key: str) -> str:
    """llama.cpp's name for a Meta tensor (``layers.3.feed_forward.w3.weight`` → ``blk.3.ffn_up.weight``)."""
    parts = key.removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{NAMES['.'.join(parts[2:])]}.weight"
    return f"{NAMES['.'.join(parts)]}.weight"


def write_gguf(path: str, state: Mapping[str, Union[torch.Tensor, Callable[[], torch.Tensor]]], args: ModelArgs,
               tokenizer_path: Optional[str] = None, context: int = 4096, bf16: Optional[bool] = None) -> None:
    """Write ``state`` (Meta names) to ``path``. The vocabulary is ``tokenizer_path``'s SentencePiece pieces, or
    without one unk/bos/eos, the 256 byte pieces and fillers (enough when token ids are what is fed).

    A value of ``state`` may be a function that makes its tensor: it is called once, when that tensor is
    written, so a model larger than memory streams through (``bf16`` then says the matrices' dtype)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(context)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    if bf16 is None:
        bf16 = next(iter(state.values())).dtype == torch.bfloat16
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    _add_vocab(w, tokenizer_path, args.vocab_size)
    shapes = {k: tuple(v.shape) for k, v in build_on_meta(args).state_dict().items()}

    def as_bf16(key: str) -> bool:
        return bf16 and len(shapes[key]) > 1

    for key in state:  # first every tensor's name, shape and type; the data follows in the same order
        shape, half = shapes[key], as_bf16(key)
        w.add_tensor_info(gguf_name(key), shape, np.dtype(np.uint16 if half else np.float32),
                          math.prod(shape) * (2 if half else 4),
                          raw_dtype=gguf.GGMLQuantizationType.BF16 if half else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for key, value in state.items():
        tensor = value() if callable(value) else value
        if as_bf16(key):  # bf16 bits as uint16, which is how gguf stores BF16
            w.write_tensor_data(tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16))
        else:
            w.write_tensor_data(np.ascontiguousarray(tensor.float().numpy()))
    w.close()


def _add_vocab(w, tokenizer_path: Optional[str], vocab_size: int) -> None:
    import gguf
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
        scores, unk, bos, eos = [0.0] * vocab_size, 0, 1, 2
    w.add_tokenizer_model("llama")
    w.add_token_list([p.encode() for p in pieces])
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

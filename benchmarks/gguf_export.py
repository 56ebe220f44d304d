"""A Meta-layout state dict as a GGUF file for llama.cpp (architecture "llama"), for the benchmarks that run
llama.cpp on the same weights as this library (``bench_quant.py``, ``bench_serve.py``). Needs the ``gguf``
package; never a dependency of the library.

Meta's q/k layout is llama.cpp's own (adjacent channel pairs rotate together), so no permutation is needed
(Hugging Face checkpoints are permuted back by llama.cpp's ``convert_hf_to_gguf.py``; this skips that round
trip). Matrices are F32, or BF16 when the state is bf16; norms are always F32, as llama.cpp requires.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from codellama import ModelArgs

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


def write_gguf(path: str, state: Dict[str, torch.Tensor], args: ModelArgs, tokenizer_path: Optional[str] = None,
               context: int = 4096) -> None:
    """Write ``state`` (Meta names) to ``path``. The vocabulary is ``tokenizer_path``'s SentencePiece pieces, or
    without one unk/bos/eos, the 256 byte pieces and fillers (enough when token ids are what is fed)."""
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
    bf16 = next(iter(state.values())).dtype == torch.bfloat16
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    _add_vocab(w, tokenizer_path, args.vocab_size)
    for key, tensor in state.items():
        if tensor.dim() == 1 or not bf16:
            w.add_tensor(gguf_name(key), np.ascontiguousarray(tensor.float().numpy()))
        else:  # bf16 bits as uint16, which is how gguf stores BF16
            w.add_tensor(gguf_name(key), tensor.contiguous().view(torch.int16).numpy().view(np.uint16),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
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
    fim_pieces = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # control tokens for llama.cpp: never printed
    types = [kinds.CONTROL if p in fim_pieces else k for p, k in zip(pieces, types)]
    w.add_tokenizer_model("llama")
    w.add_token_list([p.encode() for p in pieces])
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_unk_token_id(unk)
    fim = {"▁<PRE>": gguf.Keys.Tokenizer.FIM_PRE_ID, "▁<SUF>": gguf.Keys.Tokenizer.FIM_SUF_ID,
           "▁<MID>": gguf.Keys.Tokenizer.FIM_MID_ID, "▁<EOT>": gguf.Keys.Tokenizer.EOT_ID}
    for piece, key in fim.items():  # Code Llama's FIM pieces: llama.cpp infills with them and stops at <EOT>
        if piece in pieces:
            w.add_uint32(key, pieces.index(piece))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

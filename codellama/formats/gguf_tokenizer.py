"""The tokenizer of a GGUF file: the SentencePiece model its vocabulary stands for, as this library's ``Tokenizer``.

A llama GGUF file (``tokenizer.ggml.model`` = ``"llama"``) holds a SentencePiece BPE vocabulary as three
arrays, ``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` (SentencePiece's own piece types, by number),
and its special ids. They are written back into a SentencePiece ``ModelProto`` here and handed to
SentencePiece itself, so encoding and decoding are SentencePiece's, exactly as with ``tokenizer.model``.
The proto is serialized by hand: a BPE model needs three messages and a dozen scalar fields, and the
alternative, sentencepiece's generated ``sentencepiece_model_pb2``, would need the protobuf package for
nothing else. What the file does not record is Llama's: BPE with byte fallback, identity normalization,
SentencePiece's leading space (``tokenizer.ggml.add_space_prefix``, default on) and whitespace kept as is.

llama.cpp's converter marks the tokens a Hugging Face repository's ``tokenizer_config.json`` lists as
special as control pieces, and the others as user-defined ones with SentencePiece's ``▁`` written as a
space; both with a placeholder score of -1000. ``tokenizer.model`` holds Code Llama's FIM pieces (``▁<PRE>``,
``▁<SUF>``, ``▁<MID>``, ``▁<EOT>``) and ``<step>`` as ordinary pieces, which text can merge into and which
decode to their text: their type and spelling are restored. (Their scores need no repair: each is reached
only by merging its prefix, ``▁<PRE``, ``▁<SU`` …, which scores below every ordinary merge the following
character could take part in, so by then no merge is left that a placeholder score could reorder.)
"""

from __future__ import annotations

import struct
from typing import List

from ..tokenizer import Tokenizer
from .gguf import GGUFSource, Metadata

# SentencePiece's piece types, which GGUF's token types number alike.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE = 2  # TrainerSpec.model_type
# Pieces the library places itself (codellama.tokenizer): ordinary pieces in tokenizer.model.
LIBRARY_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>", "<step>")
# GGUF keys naming the FIM ids (current and older spellings), and the piece this library infills with.
FIM_KEYS = {"▁<PRE>": ("fim_pre_token_id", "prefix_token_id"), "▁<SUF>": ("fim_suf_token_id", "suffix_token_id"),
            "▁<MID>": ("fim_mid_token_id", "middle_token_id")}


def gguf_tokenizer(source: GGUFSource) -> Tokenizer:
    """The ``Tokenizer`` of a GGUF file's own vocabulary; ``ValueError`` naming the file and key when it has none."""
    return Tokenizer(source.path, model_proto=sentencepiece_model(source.metadata))


def sentencepiece_model(meta: Metadata) -> bytes:
    """A serialized SentencePiece ``ModelProto`` of the llama vocabulary in ``meta`` (checked as it is read)."""
    path, k = meta.path, "tokenizer.ggml."
    model = meta.get(k + "model", str, required=True)
    if model != "llama":
        raise ValueError(f"{path}: {k}model is {model!r}; only 'llama' (SentencePiece) vocabularies can be read — "
                         "pass the model's tokenizer.model as tokenizer_path")
    pieces = meta.get(k + "tokens", list, required=True)
    n = len(pieces)
    scores = [float(s) for s in meta.get(k + "scores", list, required=True)]
    types = [int(t) for t in meta.get(k + "token_type", list, required=True)]
    for key, values in (("scores", scores), ("token_type", types)):
        if len(values) != n:
            raise ValueError(f"{path}: {k}{key} has {len(values)} entries, {k}tokens {n}")
    valid = (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)
    bad = next((i for i, t in enumerate(types) if t not in valid), None)
    if bad is not None:
        raise ValueError(f"{path}: {k}token_type[{bad}] is {types[bad]}; valid: 1 (normal) … 6 (byte)")
    ids = {name: meta.get(k + key, int, default) for name, key, default in
           (("unk", "unknown_token_id", 0), ("bos", "bos_token_id", 1), ("eos", "eos_token_id", 2))}
    for name, i in ids.items():
        if not 0 <= i < n:
            raise ValueError(f"{path}: the {name} token id is {i}, outside the vocabulary [0, {n})")
    _restore_library_pieces(pieces, types)
    types[ids["unk"]] = UNKNOWN  # SentencePiece finds unk, bos and eos by their pieces' types
    types[ids["bos"]] = types[ids["eos"]] = CONTROL
    _check_pieces(pieces, path)
    _check_fim_ids(meta, pieces)
    trainer = (_int(3, BPE) + _int(4, n) + _int(35, BYTE in types)
               + b"".join(_int(f, i) for f, i in zip((40, 41, 42), ids.values())) + _int(43, -1)
               + b"".join(_bytes(f, pieces[i].encode()) for f, i in zip((45, 46, 47), ids.values())))
    normalizer = (_bytes(1, b"identity") + _bytes(2, bytes(meta.get(k + "precompiled_charsmap", list, [])))
                  + _int(3, meta.get(k + "add_space_prefix", bool, True))
                  + _int(4, meta.get(k + "remove_extra_whitespaces", bool, False)) + _int(5, True))
    entries = (_bytes(1, p.encode()) + _float(2, s) + _int(3, t) for p, s, t in zip(pieces, scores, types))
    return b"".join(_bytes(1, entry) for entry in entries) + _bytes(2, trainer) + _bytes(3, normalizer)


def _restore_library_pieces(pieces: List[str], types: List[int]) -> None:
    """Code Llama's FIM pieces and ``<step>`` as ``tokenizer.model`` holds them, whatever a converter made of them."""
    for i, piece in enumerate(pieces):
        if types[i] == USER_DEFINED and " " in piece:  # a converter wrote SentencePiece's "▁" as a space
            pieces[i] = piece = piece.replace(" ", "▁")
        if piece in LIBRARY_PIECES and types[i] in (CONTROL, USER_DEFINED):
            types[i] = NORMAL


def _check_pieces(pieces: List[str], path: str) -> None:
    seen = {}
    for i, piece in enumerate(pieces):
        if not piece:
            raise ValueError(f"{path}: tokenizer.ggml.tokens[{i}] is empty; every SentencePiece piece has text")
        if piece in seen:
            raise ValueError(f"{path}: tokenizer.ggml.tokens[{i}] and [{seen[piece]}] are both {piece!r}; pieces must "
                             "be unique")
        seen[piece] = i


def _check_fim_ids(meta: Metadata, pieces: List[str]) -> None:
    """Refuse a file whose FIM ids are not the pieces this library infills with (its prompts would differ)."""
    for piece, keys in FIM_KEYS.items():
        for key in keys:
            i = meta.get("tokenizer.ggml." + key, int)
            if i is not None and not (0 <= i < len(pieces) and pieces[i] == piece):
                found = repr(pieces[i]) if 0 <= i < len(pieces) else "outside the vocabulary"
                where = f"{piece!r} is id {pieces.index(piece)}" if piece in pieces else f"there is no {piece!r} piece"
                raise ValueError(f"{meta.path}: tokenizer.ggml.{key} is {i} ({found}), but this library infills "
                                 f"with Code Llama's {piece!r} and {where}")


# ----------------------------------------------------------------------------- protobuf, by hand
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 is written as its 64-bit two's complement, in ten bytes
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(number: int, value: int) -> bytes:
    """A varint field (int32, bool, enum)."""
    return _varint(number << 3) + _varint(int(value))


def _float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field (string, bytes, embedded message)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


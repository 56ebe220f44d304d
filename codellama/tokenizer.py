"""SentencePiece tokenizer with Code Llama's fill-in-the-middle (FIM) pieces."""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

from sentencepiece import SentencePieceProcessor

# The piece used to stop SentencePiece from adding its implicit leading space ("▁") to text that
# continues mid-line: encode "☺" + s and drop the ids of "☺"; decode ["☺"] + ids and drop "☺".
_MARKER = "☺"


class Tokenizer:
    """Meta's tokenizer surface: ``encode``/``decode`` plus the infilling helpers and FIM ids.

    ``prefix_id, middle_id, suffix_id, eot_id, step_id`` are ``None`` when the model has no such piece
    (Code Llama Python and 34B cannot infill; only 70B-Instruct has ``<step>``).
    """

    def __init__(self, model_path: str | os.PathLike, *, model_proto: Optional[bytes] = None):
        """``model_path``: a SentencePiece ``tokenizer.model``; or, with ``model_proto`` (a serialized SentencePiece
        model, e.g. the one ``codellama.formats.gguf_tokenizer`` builds from a GGUF file), where it came from."""
        model_path = os.fspath(model_path)
        if model_proto is None and not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        try:
            self.sp_model = (SentencePieceProcessor(model_file=model_path) if model_proto is None else
                             SentencePieceProcessor(model_proto=model_proto))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a SentencePiece model: {e}") from None
        self.model_path = model_path
        self.model_proto = model_proto  # None: the model is the file at model_path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()
        self.prefix_id = self._piece_id("▁<PRE>")
        self.middle_id = self._piece_id("▁<MID>")
        self.suffix_id = self._piece_id("▁<SUF>")
        self.eot_id = self._piece_id("▁<EOT>")
        self.step_id = self._piece_id("<step>")
        # Pieces that only the library places (FIM and <step>): text never encodes to them, see text_ids.
        self.control_ids = frozenset(i for i in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id,
                                                 self.step_id) if i is not None)
        self._marker_ids = self.sp_model.encode(_MARKER)

    def _piece_id(self, piece: str) -> Optional[int]:
        # piece_to_id answers unk for an absent piece.
        i = self.sp_model.piece_to_id(piece)
        return None if i == self.sp_model.unk_id() else i

    @property
    def can_infill(self) -> bool:
        return None not in (self.prefix_id, self.middle_id, self.suffix_id, self.eot_id)

    def require_infilling(self) -> None:
        """Raise a clear error when this tokenizer has no FIM pieces."""
        missing = [name for name, i in (("▁<PRE>", self.prefix_id), ("▁<MID>", self.middle_id),
                                        ("▁<SUF>", self.suffix_id), ("▁<EOT>", self.eot_id)) if i is None]
        if missing:
            raise ValueError(
                f"this model cannot infill: its tokenizer ({self.model_path}) has no {', '.join(missing)} piece(s). "
                "Code Llama Python and 34B variants were not trained for infilling; use a 7B/13B base or Instruct model."
            )

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Ids of text ``s`` (with SentencePiece's implicit leading space), optionally framed by BOS/EOS.

        Text never encodes to a control piece: ``"<PRE>"`` in a file is spelled with ordinary pieces, so
        file content cannot steer an infilling prompt (Meta's reference lets it)."""
        t = self.text_ids(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def text_ids(self, s: str) -> List[int]:
        """SentencePiece ids of user text, with any control piece (``▁<PRE>``, ``▁<SUF>``, ``▁<MID>``,
        ``▁<EOT>``, ``<step>``) the text would merge into replaced by the same characters as ordinary pieces."""
        _check_text(s)
        ids = self.sp_model.encode(s)
        if self.control_ids.isdisjoint(ids):
            return ids
        return [j for i in ids for j in (self._spelled(i) if i in self.control_ids else (i,))]

    def _spelled(self, i: int) -> List[int]:
        """Control piece ``i`` as one ordinary piece per character (UTF-8 byte pieces where there is none)."""
        out = []
        for ch in self.sp_model.id_to_piece(i):
            j = self.sp_model.piece_to_id(ch)
            if j == self.sp_model.unk_id() or j in self.control_ids:
                out += [self.sp_model.piece_to_id(f"<0x{b:02X}>") for b in ch.encode("utf-8")]
            else:
                out.append(j)
        return out

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(list(t))

    def encode_infilling(self, s: str) -> List[int]:
        """Encode text that continues mid-line: no implicit leading space."""
        _check_text(s)
        ids = self.text_ids(_MARKER + s)
        n = len(self._marker_ids)
        if ids[:n] != self._marker_ids:  # the marker merged with what follows: cannot happen with a sane vocab
            raise ValueError(f"cannot encode {s[:20]!r} without a leading space in this vocabulary")
        return ids[n:]

    def decode_infilling(self, t: List[int]) -> str:
        """Decode ids that continue mid-line, keeping a leading space the generation starts with."""
        return self.sp_model.decode(self._marker_ids + list(t))[len(_MARKER):]

    def token_piece(self, i: int) -> str:
        return self.sp_model.id_to_piece(i)


def decode_after(decode: Callable[[List[int]], str], context: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``context``: ``decode(context + ids)`` less ``decode(context)``.

    Decoding ``ids`` alone reads their first piece as the start of a text and drops its leading space
    (SentencePiece's dummy prefix): a function body a model wrote with four spaces comes out with three.
    Where ``decode(context)`` is not a prefix of the whole (the context ends inside a UTF-8 character
    whose last bytes are in ``ids``, so it reads as U+FFFD alone), the text starts where the two stop
    agreeing, so nothing ``ids`` wrote is lost.
    """
    head = decode(list(context))
    whole = decode(list(context) + list(ids))
    if whole.startswith(head):
        return whole[len(head):]
    return whole[len(os.path.commonprefix([head, whole])):]


def _check_text(s) -> None:
    """Text must be a str of valid Unicode: a lone surrogate (e.g. from a bad JSON escape) cannot be encoded."""
    if not isinstance(s, str):
        raise ValueError(f"text to encode must be a str, got {type(s).__name__}")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds {s[e.start:e.end]!r} at index {e.start}, a lone surrogate that is not valid "
                         "Unicode; pass text that encodes as UTF-8") from None


class TextStream:
    """Incremental detokenizer: token ids in, text deltas out, joined exactly equal to decoding all ids at once.

    Two traps: SentencePiece drops the leading space of the first piece it decodes, so a later window
    is decoded behind an *anchor* token whose text is then cut off; and a multi-byte UTF-8 character
    split over byte-fallback tokens reads as U+FFFD until its last byte arrives, so trailing U+FFFD is
    held back.
    """

    WINDOW = 32  # re-anchor after this many tokens so each push decodes a bounded window

    def __init__(self, tokenizer: Tokenizer, decode: Optional[Callable[[List[int]], str]] = None):
        self._decode_first = decode or tokenizer.decode  # how the whole text is decoded (e.g. decode_infilling)
        self._decode = tokenizer.decode
        self.ids: List[int] = []
        self._start = 0  # first token of the current window
        self._emitted = 0  # characters of the window's text already returned

    def _window_text(self) -> str:
        window = self.ids[self._start:]
        if self._start == 0:
            return self._decode_first(window)
        return decode_after(self._decode, self.ids[self._start - 1:self._start], window)

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self._window_text()
        stable = text.rstrip("\ufffd")
        delta = stable[self._emitted:]
        self._emitted = max(self._emitted, len(stable))
        if len(self.ids) - self._start >= self.WINDOW and len(stable) == len(text):
            self._start, self._emitted = len(self.ids), 0
        return delta

    def flush(self) -> str:
        text = self._window_text()
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

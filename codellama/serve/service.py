"""What every protocol adapter shares: the served model, its prompt formats, and engine requests awaited on
the event loop. Nothing here knows HTTP or a protocol's field names.

A request's ``model`` field is only ever compared with the served model's names (never opened as a path): a
name the server does not serve is served anyway, as llama.cpp's server does, unless the server is strict.
Prompt text that spells Code Llama's infilling format, ``<PRE> {prefix} <SUF>{suffix} <MID>`` (what Continue,
llm-vscode and Tabby render for Code Llama), becomes the real FIM prompt: exactly the ids ``text_infilling``
builds, stopping at ``<EOT>``. Everywhere else text stays text (the tokenizer never turns it into control ids).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import AsyncIterator, Callable, Hashable, Iterator, List, Optional, Sequence, Tuple

from ..engine import Engine, EngineFull, EngineStopped, Event, Request, SamplingParams, TopLogprobs
from ..prompts import (UNSAFE_ERROR, Dialog, chat_prompt_tokens, chat_stop_ids, has_special_tags, split_prefill,
                       step_dialog_prompt_tokens, validate_dialog)
from ..tokenizer import TextStream, Tokenizer
from .fitting import fit_infilling

CHAT_FORMATS = ("auto", "inst", "step", "none")
PRE, SUF, MID = "<PRE> ", " <SUF>", " <MID>"  # Code Llama's FIM prompt spelled as text (PSM order)
RETRY_AFTER_S = 1  # what a 503 for a full queue tells the client to wait


class ServiceError(Exception):
    """A request the server does not serve: the HTTP status and a message for the client; ``kind`` and
    ``details`` refine it for protocols whose errors carry them (llama.cpp's ``exceed_context_size_error``
    with ``n_prompt_tokens`` and ``n_ctx``)."""

    def __init__(self, status: int, message: str, retry_after: Optional[int] = None, *, kind: Optional[str] = None,
                 details: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.kind, self.details = kind, details or {}


def context_exceeded(n_prompt: int, n_ctx: int) -> ServiceError:
    """The error for a prompt that leaves no room in the context, in llama.cpp's words and fields."""
    return ServiceError(400, f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
                             "try increasing it (the server's --max_seq_len)", kind="exceed_context_size_error",
                        details={"n_prompt_tokens": n_prompt, "n_ctx": n_ctx})


@contextmanager
def bad_request() -> Iterator[None]:
    """The library's ``ValueError`` (a bad value, a prompt that does not fit, a model that cannot infill) as a 400."""
    try:
        yield
    except ValueError as e:
        raise ServiceError(400, str(e)) from None


def sampling(**fields) -> SamplingParams:
    """``SamplingParams(**fields)``, its ``ValueError`` a 400."""
    with bad_request():
        return SamplingParams(**fields)


def per_position(tops: Optional[List[Optional[TopLogprobs]]], ids: Sequence[int]) -> List[Optional[TopLogprobs]]:
    """A request's likeliest tokens for each of ``ids``' positions, or None at each when none were recorded."""
    return tops if tops else [None] * len(ids)


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine takes it: token ids, how new tokens read as text, the ids that end generation,
    the prompt as the client sent it (for ``echo``), and whether it was cut to fit the context."""

    ids: List[int]
    text: str
    decode: Callable[[List[int]], str]
    stop_ids: Tuple[int, ...]
    truncated: bool = False


def split_fim_text(text: str) -> Optional[Tuple[str, str, bool]]:
    """``(prefix, suffix, suffix_first)`` of text spelling Code Llama's infilling prompt, PSM
    ``<PRE> {prefix} <SUF>{suffix} <MID>`` or SPM ``<PRE> <SUF>{suffix} <MID> {prefix}``; None for other text."""
    if not text.startswith(PRE):
        return None
    body = text[len(PRE):]
    if body.endswith(MID) and SUF in body:
        prefix, suffix = body[:-len(MID)].split(SUF, 1)
        return prefix, suffix, False
    spm_suf, spm_mid = SUF.lstrip(), MID + " "
    if body.startswith(spm_suf) and spm_mid in body:
        suffix, prefix = body[len(spm_suf):].split(spm_mid, 1)
        return prefix, suffix, True
    return None


def resolve_chat_format(tokenizer: Tokenizer, choice: str) -> Optional[str]:
    """The instruct format a model is served with: ``"step"`` (70B-Instruct), ``"inst"`` (``[INST]``) or None.

    ``"auto"`` reads it from the tokenizer: ``<step>`` means 70B-Instruct's format; Code Llama's FIM pieces mean
    a Code Llama tokenizer, which has the ``[INST]`` format; a tokenizer with neither (Llama 2's, a stories
    model's) has none. Code Llama 34B-Instruct and Python-Instruct have no FIM pieces: serve them with ``"inst"``.
    """
    if choice not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {choice!r}; valid: {', '.join(CHAT_FORMATS)}")
    if choice == "step" and tokenizer.step_id is None:
        raise ValueError("chat format 'step' needs a tokenizer with a <step> piece (Code Llama 70B-Instruct)")
    if choice == "auto":
        if tokenizer.step_id is not None:
            return "step"
        return "inst" if tokenizer.can_infill else None
    return None if choice == "none" else choice


class ModelService:
    """The served model for the protocol adapters: its names and context, its prompt formats, and generation."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, name: str, *, chat_format: str = "auto",
                 default_max_tokens: Optional[int] = None, aliases: Sequence[str] = (),
                 strict_model_name: bool = False, tags: Sequence[str] = (), spm_infill: bool = False):
        """``engine`` runs the requests (started and stopped by the app); ``name`` is what clients put in
        ``model``, and so are ``aliases``; ``strict_model_name`` answers a request naming any other model
        with 404 (by default it is served, as llama.cpp's server does); ``tags`` are listed with the model;
        ``chat_format`` is one of :data:`CHAT_FORMATS` (see :func:`resolve_chat_format`);
        ``default_max_tokens`` bounds a request that gives no bound (None: until the context is full);
        ``spm_infill`` lays infilling prompts out suffix first (SPM) where the client does not spell the order,
        so that an editor's keystroke only appends to the cached prompt (as llama-server's ``--spm-infill``)."""
        for n in (name, *aliases):
            if not isinstance(n, str) or not n.strip():
                raise ValueError(f"a model name must be a non-empty string, got {n!r}")
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.aliases = tuple(dict.fromkeys(a for a in aliases if a != name))
        self.strict_model_name, self.tags = strict_model_name, tuple(tags)
        self.spm_infill = spm_infill
        self.chat_format = resolve_chat_format(tokenizer, chat_format)
        self.default_max_tokens = default_max_tokens

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def can_infill(self) -> bool:
        return self.tokenizer.can_infill

    @cached_property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: a digest of what decides the outputs besides the request (the
        library's version, the model's shape, dtype and quantization, a sample of its weights, the context), so
        a client can tell when the backend changed."""
        from .. import __version__
        from ..quantize import model_quantization
        model = self.engine.model
        weights = model.tok_embeddings.weight
        sample = weights.detach().reshape(-1)[:64].float().cpu().numpy().tobytes()
        what = f"{__version__}|{model.args}|{weights.dtype}|{model_quantization(model)}|{self.context_length}"
        return "fp_" + hashlib.sha256(what.encode() + sample).hexdigest()[:10]

    @property
    def names(self) -> Tuple[str, ...]:
        """The names the model answers to: the served name, then the aliases."""
        return (self.name, *self.aliases)

    def check_model(self, name: Optional[str]) -> None:
        """A request's ``model``: empty, one of :attr:`names` (with or without Ollama's ``:latest`` tag), or,
        unless the server is strict, any other name (served all the same: there is one model to serve)."""
        if not name or not self.strict_model_name:
            return
        if name not in self.names and name.removesuffix(":latest") not in self.names:
            known = ", ".join(repr(n) for n in self.names)
            raise ServiceError(404, f"model {name[:100]!r} not found: this server serves {known}")

    # ------------------------------------------------------------------ prompts
    def completion(self, text: str) -> Prompt:
        """Text to continue, after BOS as ``text_completion`` does. The new text keeps the leading space of
        its first token (``decode_infilling``), so that ``prompt + text`` reads as the model meant it
        (``text_completion`` drops that space, as Meta's reference does)."""
        with bad_request():
            ids = self.tokenizer.encode(text, bos=True, eos=False)
        return Prompt(ids, text, self.tokenizer.decode_infilling, (self.tokenizer.eos_id,))

    def raw(self, text: str, reserve: Optional[int] = None) -> Prompt:
        """Prompt text as editors send it: the FIM format spelled as text is infilling (fitted as
        :meth:`infill` fits it, keeping ``reserve`` tokens for the answer), anything else completion."""
        parts = split_fim_text(text)
        if parts is None:
            return self.completion(text)
        prefix, suffix, suffix_first = parts
        return self.infill(prefix, suffix, suffix_first, text=text, reserve=reserve)

    def infill(self, prefix: str, suffix: str, suffix_first: Optional[bool] = None, *, text: Optional[str] = None,
               extra: str = "", reserve: Optional[int] = None) -> Prompt:
        """The prompt ``text_infilling(extra + prefix, suffix)`` builds (``suffix_first`` None: the
        server's order, ``spm_infill``); generation stops at ``<EOT>`` or EOS (a
        400 without FIM pieces). When it leaves fewer than ``reserve`` tokens of the context for the answer, it
        is cut to fit (``codellama.serve.fitting``: the prefix keeps its end, the suffix its beginning, the
        extra context what is left) and marked ``truncated``. ``reserve`` is at least 1 and at most half the
        context; None (no limit on the answer) keeps a quarter."""
        t = self.tokenizer
        if suffix_first is None:
            suffix_first = self.spm_infill
        n_ctx = self.context_length
        room = n_ctx // 4 if reserve is None or reserve < 0 else max(1, min(reserve, n_ctx // 2))
        with bad_request():
            t.require_infilling()
            ids, truncated = fit_infilling(t, extra, prefix, suffix, suffix_first, n_ctx - room)
        return Prompt(ids, prefix if text is None else text, t.decode_infilling, (t.eot_id, t.eos_id), truncated)

    def token_ids(self, ids: List[int]) -> Prompt:
        """A prompt given as token ids, used as given (no BOS added); its new text as :meth:`completion`'s."""
        with bad_request():
            ids = self.engine.check_prompt(ids)
        return Prompt(ids, self.tokenizer.decode(ids), self.tokenizer.decode_infilling, (self.tokenizer.eos_id,))

    def chat(self, dialog: Dialog) -> Prompt:
        """The instruct prompt of a dialog, as ``chat_completion`` builds it; a 400 for a model without an
        instruct format and for a dialog holding the format's own tags."""
        if self.chat_format is None:
            raise ServiceError(400, "this model has no instruct format: its tokenizer has neither Code Llama's FIM "
                                    "pieces nor <step>; start the server with --chat_format inst to use the [INST] "
                                    "format anyway (e.g. Code Llama 34B-Instruct)")
        t = self.tokenizer
        with bad_request():
            asked, so_far = split_prefill(dialog)
            validate_dialog(asked)
            if has_special_tags(dialog):
                raise ValueError(UNSAFE_ERROR)
            step = self.chat_format == "step"
            ids = step_dialog_prompt_tokens(t, dialog) if step else chat_prompt_tokens(t, dialog)
        # An answer continued from the one given (a prefill) keeps its first token's leading space, so that the
        # answer so far followed by the new text reads as the model wrote it; a new answer is decoded alone.
        decode = t.decode_infilling if so_far.strip() else t.decode
        return Prompt(ids, "", decode, chat_stop_ids(t, step))

    def piece_text(self, token: int) -> str:
        """One token's text on its own, the one text every protocol reports for it (as the chosen token and as
        an alternative): its piece with SentencePiece's word marker as a space (``" def"``, also first in an
        answer whose decoded text drops that space); a byte piece is its character, or ``bytes:\\xNN`` when the
        byte is not a whole character (OpenAI's spelling); a control piece (BOS, EOS) is empty, as decoding makes it."""
        sp = self.tokenizer.sp_model
        if sp.is_control(token):
            return ""
        piece = self.tokenizer.token_piece(token)
        byte = _byte_piece(piece)
        if byte is not None:
            return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
        return piece.replace("\u2581", " ")

    def piece_bytes(self, token: int) -> List[int]:
        """The UTF-8 bytes of one token's text: for a byte piece the byte itself, so that the tokens' bytes joined
        are the text's even where one character spans several tokens."""
        byte = _byte_piece(self.tokenizer.token_piece(token))
        return [byte] if byte is not None else list(self.piece_text(token).encode())

    def shown_bytes(self, token: int) -> bytes:
        """One token's bytes as llama.cpp's server shows a token: :meth:`piece_bytes`, but a control piece
        (``<s>``) by its name."""
        sp = self.tokenizer.sp_model
        return sp.id_to_piece(token).encode() if sp.is_control(token) else bytes(self.piece_bytes(token))

    def render(self, ids: Sequence[int]) -> str:
        """Token ids as text with control tokens shown by name (``<s> def f``), as llama.cpp's server shows a
        prompt; every other id reads as it decodes."""
        return b"".join(self.shown_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def logprob_entry(self, token: int, logprob: Optional[float], top: Optional[TopLogprobs]) -> dict:
        """One token's log-probability as OpenAI's chat and Ollama report it: its text, value and bytes, and the
        likeliest alternatives in the same shape."""
        def entry(t: int, value: Optional[float]) -> dict:
            return {"token": self.piece_text(t), "logprob": value, "bytes": self.piece_bytes(t)}

        return {**entry(token, logprob), "top_logprobs": [entry(t, v) for t, v in (top or [])]}

    def logprob_entries(self, r: Request) -> List[dict]:
        """A finished request's :meth:`logprob_entry` for each new token."""
        tops = per_position(r.top_logprobs, r.tokens)
        return [self.logprob_entry(t, lp, top) for t, lp, top in zip(r.tokens, r.logprobs, tops)]

    def token_texts(self, ids: Sequence[int], decode: Optional[Callable[[List[int]], str]] = None) -> List[str]:
        """The text each token adds to the decoded text, in order (they join to it): where each token's text
        begins (``text_offset``)."""
        stream = TextStream(self.tokenizer, decode)
        return [stream.push(i) for i in ids]

    # ------------------------------------------------------------------ generation
    def generate(self, work: Sequence[Tuple[Prompt, SamplingParams]], session: Hashable = None,
                 supersede: bool = True) -> "Generation":
        """Submit each ``(prompt, params)``; must run on the event loop that will await the results. Params
        without ``max_tokens`` get the service's default bound. ``session`` (e.g. a client and the slot it
        names): a newer generation of the same session stops this one unless it says ``supersede=False``
        (see ``Engine.submit``)."""
        if self.default_max_tokens is not None:
            work = [(prompt, params if params.max_tokens is not None else
                     dataclasses.replace(params, max_tokens=self.default_max_tokens)) for prompt, params in work]
        return Generation(self.engine, work, session, supersede)


class Generation:
    """The engine requests of one HTTP request, awaited on the event loop that submitted them.

    The engine calls each request's ``on_event`` on its own thread; that only schedules a wake-up on the loop,
    where :meth:`events` takes what the requests produced. :meth:`cancel` frees their slots at the next step.
    An adapter may also :meth:`cut` one request short (its own stopping rule) and :meth:`add` a request to the
    same generation (a continuation): both must be called on the loop.
    """

    def __init__(self, engine: Engine, work: Sequence[Tuple[Prompt, SamplingParams]], session: Hashable = None,
                 supersede: bool = True):
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()

        def wake(_: Event) -> None:
            try:
                loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

        self._engine, self._wake = engine, wake
        self._session, self._supersede = session, supersede
        self.prompts: List[Prompt] = []
        self.requests: List[Request] = []
        self._running: set = set()
        for prompt, params in work:
            self.add(prompt, params)

    def add(self, prompt: Prompt, params: SamplingParams) -> int:
        """Submit one more request (its events come through :meth:`events`); returns its index. A prompt that
        leaves no room for a new token is llama.cpp's ``exceed_context_size_error`` (400)."""
        n_ctx = self._engine.max_seq_len
        if len(prompt.ids) > n_ctx or (len(prompt.ids) == n_ctx and params.max_tokens != 0):
            self.cancel()
            raise context_exceeded(len(prompt.ids), n_ctx)
        try:
            params = dataclasses.replace(params, stop_token_ids=prompt.stop_ids)
            request = self._engine.submit(prompt.ids, params, decode=prompt.decode, on_event=self._wake,
                                          session=self._session,
                                          supersede=self._supersede and not self.requests)
        except (EngineFull, EngineStopped, ValueError) as e:
            self.cancel()
            raise _submit_error(e) from None
        self.prompts.append(prompt)
        self.requests.append(request)
        self._running.add(len(self.requests) - 1)
        return len(self.requests) - 1

    def cut(self, i: int) -> None:
        """Stop request ``i`` because the caller's own rule says so: it is cancelled and :meth:`events` yields
        nothing more of it (the caller answers with what it has)."""
        self._running.discard(i)
        self.requests[i].cancel()

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the distinct prompts (``n`` choices of one prompt count it once)."""
        return sum(len(p.ids) for p in {id(p): p for p in self.prompts}.values())

    @property
    def cached_tokens(self) -> int:
        return sum(r.cached_tokens for r in self.requests)

    @property
    def prompt_cached_tokens(self) -> int:
        """Of :attr:`prompt_tokens`, those read from the prefix cache: each distinct prompt's first request's."""
        first = {}
        for prompt, request in zip(self.prompts, self.requests):
            first.setdefault(id(prompt), request)
        return sum(r.cached_tokens for r in first.values())

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    async def events(self) -> AsyncIterator[Tuple[int, Event]]:
        """``(request index, event)`` as they are produced, until every request has finished or been cut. A
        request that the server's shutdown cancelled, or that the engine failed, raises :class:`ServiceError`."""
        while self._running:
            self._ready.clear()
            batch = [(i, event) for i in sorted(self._running) for event in self._take(i)]
            for i, event in batch:
                if i not in self._running:  # cut by the caller while this batch was being handed out
                    continue
                if event.finish_reason == "cancelled" and self.requests[i].superseded:
                    raise ServiceError(409, "superseded: a newer request of the same session (a client and the "
                                            "slot it names) arrived, so this one was stopped")
                if event.finish_reason == "cancelled":
                    raise ServiceError(503, "the server is shutting down: generation was stopped")
                if event.finish_reason is not None:
                    self._running.discard(i)
                yield i, event
            if not batch:
                await self._ready.wait()

    async def finish(self) -> List[Request]:
        """Wait for every request to finish; returns them (``text``, ``tokens``, ``finish_reason``, …)."""
        async for _ in self.events():
            pass
        return self.requests

    def cancel(self) -> None:
        """Stop every request that is still running (a no-op for finished ones)."""
        for request in self.requests:
            request.cancel()

    def _take(self, i: int) -> List[Event]:
        try:
            return self.requests[i].take_events()
        except (RuntimeError, ValueError) as e:  # the engine failed this request (e.g. out of memory)
            raise ServiceError(500, str(e)) from None


def _byte_piece(piece: str) -> Optional[int]:
    """The byte of a byte-fallback piece (``<0x0A>``), None for any other piece."""
    found = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    return int(found.group(1), 16) if found else None


def _submit_error(error: Exception) -> ServiceError:
    if isinstance(error, EngineFull):
        return ServiceError(503, f"the server is busy: {error}; retry later", retry_after=RETRY_AFTER_S)
    if isinstance(error, EngineStopped):
        return ServiceError(503, "the server is shutting down")
    return ServiceError(400, str(error))

"""The llama.cpp server protocol as editors use it (llama.vim, llama.vscode, Tabby, Continue, Twinny).

``POST /infill`` (``input_prefix``, ``input_suffix``, ``input_extra``, ``prompt``), ``POST /completion`` and
``/completions`` (``prompt``: text, token ids, a mix, or several prompts), ``POST /tokenize``,
``/detokenize``, ``/apply-template`` and ``/chat/completions/input_tokens``, ``GET /health``, ``/props``,
``/slots`` (read-only) and ``/models``;
streams are server-sent events, one per token, the last one with ``"stop": true``.

Field names, shapes and defaults follow llama.cpp's server (``tools/server``): temperature 0.8 (the server's
``--temp``), top-k 40, top-p 0.95, ``n_predict`` -1 (the server's ``--n_predict``: -1 is until the context
is full). Fields acted on: ``n_predict`` (0 evaluates the prompt into the cache and answers nothing),
``n_indent``, ``t_max_predict_ms``, ``n_cmpl`` (1 … slots, an array of answers), ``response_fields``,
``samplers`` (which of temperature, top-k and top-p apply), ``id_slot`` (checked; the engine picks the slot
whose cache shares the longest prefix, which is what pinning a slot is for), ``n_probs``, ``n_keep`` and
``n_discard`` (with ``--context-shift``), ``return_tokens``, ``stop``, ``seed``. Accepted without effect:
``cache_prompt`` (prefix reuse is always on and never changes a result), ``t_max_prompt_ms`` (llama-server
does not implement it either: cutting the prompt short would leave nothing to suggest and undo the cache
warm-up that editors rely on).

Code Llama has no repository-level FIM tokens, so ``/infill`` puts each ``input_extra`` chunk's text, then a
blank line, before the prefix, and the ``prompt`` (the start of the cursor's line) after it: the request is
``text_infilling(extra + input_prefix + prompt, input_suffix)``, cut to fit the context when it is longer
(``fitting.py``; the answer then says ``truncated: true``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional, Union

from fastapi import APIRouter, Request
from pydantic import Field, model_validator

from ..engine import MAX_TOP_LOGPROBS, SamplingParams
from .llamacpp_completion import LLAMA_DEFAULT_SEED, Completion, Rules, select_fields
from .openai_api import Message, _dialog
from .service import Generation, ModelService, Prompt, ServiceError, sampling
from .web import SSE, Body, Stream, json_body, results, service_of, sse, start

router = APIRouter()
SAMPLERS = ("temperature", "top_k", "top_p")  # the samplers of llama.cpp's chain this engine has
SAMPLER_CHARS = {"t": "temperature", "k": "top_k", "p": "top_p", "i": "infill", "m": "min_p", "y": "typ_p",
                 "s": "top_n_sigma", "x": "xtc", "e": "penalties", "d": "dry", "a": "adaptive_p"}


@dataclass(frozen=True)
class Settings:
    """Server-wide defaults of the llama.cpp endpoints: llama-server's flags of the same names."""

    n_predict: int = -1  # --n_predict: answers' length when a request does not say (-1: until the context is full)
    temperature: float = 0.8  # --temp
    seed: int = -1  # --seed (-1: a fresh one per request)
    context_shift: bool = False  # --context-shift
    slots: bool = True  # --slots / --no-slots: the read-only GET /slots
    model_path: str = ""  # what /props reports


def settings_of(request: Request) -> Settings:
    return getattr(request.app.state, "llamacpp", None) or Settings()


def error_body(status: int, message: str, kind: Optional[str] = None, details: Optional[dict] = None) -> dict:
    """llama.cpp's error object (``exceed_context_size_error`` with ``n_prompt_tokens`` and ``n_ctx``)."""
    kind = kind or {401: "authentication_error", 404: "not_found_error", 501: "not_supported_error",
                    503: "unavailable_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"code": status, "message": message, "type": kind, **(details or {})}}


# ----------------------------------------------------------------------------- request bodies
class CompletionBody(Body):
    model: Optional[str] = None
    prompt: Any = ""
    n_predict: int = Field(-1, ge=-1)  # -1: the server's --n_predict
    temperature: Optional[float] = None  # None: the server's --temp; 0 or less: greedy
    top_k: int = 40  # 0 or less: no top-k
    top_p: float = 0.95
    stop: Union[str, List[str]] = []
    seed: Optional[int] = None  # None: the server's --seed; negative: a fresh seed
    stream: bool = False
    return_tokens: bool = False
    n_indent: int = Field(0, ge=0)
    t_max_predict_ms: int = Field(-1, ge=-1)
    t_max_prompt_ms: int = -1
    n_cmpl: int = 1
    response_fields: List[str] = []
    samplers: Union[List[str], str, None] = None
    id_slot: int = -1
    cache_prompt: bool = True
    n_probs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    post_sampling_probs: bool = False
    n_keep: int = Field(0, ge=-1)
    n_discard: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        """llama.cpp's aliases: ``max_tokens`` for ``n_predict``, ``n`` for ``n_cmpl``, ``logprobs`` for ``n_probs``."""
        if isinstance(data, dict):
            for field, aliases in (("n_predict", ("max_tokens", "max_completion_tokens")), ("n_cmpl", ("n",)),
                                   ("n_probs", ("logprobs",))):
                given = next((a for a in aliases if data.get(a) is not None), None)
                if data.get(field) is None and given is not None:
                    data = {**data, field: data[given]}
        return data


class ExtraChunk(Body):
    text: str
    filename: str = ""


class InfillBody(CompletionBody):
    prompt: str = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: List[ExtraChunk] = []


class TokenizeBody(Body):
    content: Union[str, List[Union[int, str]]] = ""
    add_special: bool = False
    parse_special: bool = True  # text never becomes control tokens here, whatever this says
    with_pieces: bool = False


class DetokenizeBody(Body):
    tokens: List[int] = []


class TemplateBody(Body):
    messages: List[Message]


# ----------------------------------------------------------------------------- endpoints
@router.get("/health")
@router.get("/v1/health")
async def health() -> dict:
    return {"status": "ok"}  # the model is loaded before the server listens


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request, body: CompletionBody = json_body(CompletionBody)):
    service = service_of(request)
    prompts = _prompts(service, body.prompt, _n_predict(body, settings_of(request)))
    return await _respond(request, service, prompts, body)


@router.post("/infill")
async def infill(request: Request, body: InfillBody = json_body(InfillBody)):
    service = service_of(request)
    extra = "".join(chunk.text + "\n\n" for chunk in body.input_extra)
    n_predict = _n_predict(body, settings_of(request))
    prompt = service.infill(body.input_prefix + body.prompt, body.input_suffix, extra=extra,
                            reserve=None if n_predict < 0 else n_predict)
    return await _respond(request, service, [prompt], body)


@router.post("/tokenize")
async def tokenize(request: Request, body: TokenizeBody = json_body(TokenizeBody)) -> dict:
    service = service_of(request)
    ids = _mixed_ids(service, body.content if isinstance(body.content, list) else [body.content], body.add_special)
    if not body.with_pieces:
        return {"tokens": ids}
    out = []
    for i in ids:
        raw = service.shown_bytes(i)
        try:
            piece: Union[str, List[int]] = raw.decode("utf-8")
        except UnicodeDecodeError:  # one byte of a multi-byte character
            piece = list(raw)
        out.append({"id": i, "piece": piece})
    return {"tokens": out}


@router.post("/detokenize")
async def detokenize(request: Request, body: DetokenizeBody = json_body(DetokenizeBody)) -> dict:
    service = service_of(request)
    _check_ids(service, body.tokens)
    return {"content": service.tokenizer.decode(body.tokens)}


@router.post("/apply-template")
async def apply_template(request: Request, body: TemplateBody = json_body(TemplateBody)) -> dict:
    service = service_of(request)
    return {"prompt": service.render(service.chat(_dialog(body.messages)).ids)}


@router.post("/chat/completions/input_tokens")
@router.post("/v1/chat/completions/input_tokens")
async def chat_input_tokens(request: Request, body: TemplateBody = json_body(TemplateBody)) -> dict:
    """How many tokens the instruct prompt of ``messages`` takes (llama-server's count for chat clients)."""
    service = service_of(request)
    return {"input_tokens": len(service.chat(_dialog(body.messages)).ids)}


@router.get("/props")
async def props(request: Request) -> dict:
    service, settings = service_of(request), settings_of(request)
    t = service.tokenizer
    return {"default_generation_settings": {"params": _settings_json(_defaults(settings), settings),
                                            "n_ctx": service.context_length},
            "total_slots": service.engine.max_batch_size, "model_alias": service.name,
            "model_path": settings.model_path, "modalities": {"vision": False, "video": False, "audio": False},
            "endpoint_slots": settings.slots, "endpoint_props": False, "endpoint_metrics": False,
            "chat_template": "", "bos_token": t.token_piece(t.bos_id), "eos_token": t.token_piece(t.eos_id),
            "build_info": "codellama", "is_sleeping": False}


@router.post("/props")
async def set_props() -> dict:
    raise ServiceError(501, "this server's properties cannot be changed over HTTP")


@router.get("/slots")
async def slots(request: Request, fail_on_no_slot: str = "") -> list:
    service, settings = service_of(request), settings_of(request)
    if not settings.slots:
        raise ServiceError(501, "This server does not support slots endpoint. Start it with `--slots`")
    states = service.engine.slot_states()
    if fail_on_no_slot and all(owner is not None for owner, _ in states):
        raise ServiceError(503, "no slot available")
    out = []
    for i, (owner, cached) in enumerate(states):
        slot = {"id": i, "n_ctx": service.context_length, "speculative": service.engine.speculator is not None,
                "is_processing": owner is not None, "n_cached": cached}
        if owner is not None:  # counts only: other clients' prompts are theirs
            left = -1 if owner.params.max_tokens is None else owner.params.max_tokens - len(owner.tokens)
            slot.update({"id_task": owner.id, "n_prompt_tokens": len(owner.prompt),
                         "n_prompt_tokens_cache": owner.cached_tokens,
                         "next_token": [{"has_next_token": not owner.done, "n_remain": left,
                                         "n_decoded": len(owner.tokens)}]})
        out.append(slot)
    return out


@router.get("/models")
async def models(request: Request) -> dict:
    """llama-server's answer for ``/models`` and ``/v1/models``: Ollama's ``models`` and OpenAI's ``data``."""
    service = service_of(request)
    a = service.engine.model.args
    return {"models": [{"name": service.name, "model": service.name, "modified_at": "", "size": "", "digest": "",
                        "type": "model", "description": "", "tags": list(service.tags) or [""],
                        "capabilities": ["completion"] + (["insert"] if service.can_infill else []),
                        "parameters": "", "details": {"parent_model": "", "format": "pytorch", "family": "llama",
                                                      "families": ["llama"], "parameter_size": "",
                                                      "quantization_level": ""}}],
            "object": "list",
            "data": [{"id": service.name, "aliases": list(service.names), "tags": list(service.tags),
                      "object": "model", "created": int(time.time()), "owned_by": "codellama",
                      "meta": {"vocab_type": 1, "n_vocab": a.vocab_size, "n_ctx": service.context_length,
                               "n_embd": a.dim, "n_params": a.num_params()}}]}


# ----------------------------------------------------------------------------- prompts
def _prompts(service: ModelService, given: Any, reserve: int) -> List[Prompt]:
    """llama.cpp's ``prompt``: text, ``{"prompt_string": text}``, token ids, ids and text mixed in one list
    (one prompt), or a list of any of those (one answer each). Text spelling the FIM format is infilling, cut
    to fit with ``reserve`` tokens kept for the answer."""
    if isinstance(given, (str, dict)):
        return [_prompt(service, given, reserve)]
    if not isinstance(given, list) or not given:
        raise ServiceError(400, "prompt: give text, token ids, a list mixing both, or a list of prompts")
    if all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in given) and any(
            isinstance(x, int) for x in given):
        return [_prompt(service, given, reserve)]
    return [_prompt(service, p, reserve) for p in given]


def _prompt(service: ModelService, given: Any, reserve: int) -> Prompt:
    if isinstance(given, dict):
        if given.get("multimodal_data"):
            raise ServiceError(400, "prompt: this model takes text only, not multimodal_data")
        given = given.get("prompt_string")
    if isinstance(given, str):
        return service.raw(given, reserve=reserve)
    if isinstance(given, list) and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in given):
        if all(isinstance(x, int) for x in given):
            return service.token_ids(given)
        return service.token_ids(_mixed_ids(service, given, add_bos=isinstance(given[0], str)))
    raise ServiceError(400, f"prompt: an entry of type {type(given).__name__} is neither text, token ids, nor "
                            "{\"prompt_string\": text}")


def _mixed_ids(service: ModelService, parts: List[Union[int, str]], add_bos: bool) -> List[int]:
    """Token ids of text and ids mixed in one list, each text encoded on its own; BOS first when asked for."""
    t = service.tokenizer
    ids = [t.bos_id] if add_bos else []
    for part in parts:
        ids += t.encode(part, bos=False, eos=False) if isinstance(part, str) else [part]
    _check_ids(service, ids)
    return ids


def _check_ids(service: ModelService, ids: List[int]) -> None:
    vocab = service.engine.model.args.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ServiceError(400, f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")


# ----------------------------------------------------------------------------- answering
def session_of(request: Request, body: CompletionBody) -> Optional[tuple]:
    """The session a request belongs to: its client's address and the slot it names (``id_slot`` ≥ 0, what
    editors send with every request of one document), or None. Its newer request stops it, unless that one
    computes no answer (``n_predict`` 0: editors warm the cache with their extra context so)."""
    if body.id_slot < 0:
        return None
    return ("llama.cpp", request.client.host if request.client else None, body.id_slot)


async def _respond(request: Request, service: ModelService, prompts: List[Prompt], body: CompletionBody):
    settings = settings_of(request)
    service.check_model(body.model)
    n_cmpl = _n_cmpl(body, service)
    if not -1 <= body.id_slot < service.engine.max_batch_size:
        raise ServiceError(400, f"id_slot: {body.id_slot} is not a slot of this server; valid: -1 (any) or 0 … "
                                f"{service.engine.max_batch_size - 1}")
    if body.post_sampling_probs:
        raise ServiceError(400, "post_sampling_probs is not supported: n_probs gives the model's log-probabilities "
                                "before sampling")
    params = [_sampling(body, settings, j) for j in range(n_cmpl)]
    n_predict = _n_predict(body, settings)
    generation = start(request, [(p, params[j]) for p in prompts for j in range(n_cmpl)], session_of(request, body),
                       supersede=n_predict != 0)
    completions = [Completion(service, generation, k, k, _rules(body, settings, n_predict, params[k % n_cmpl],
                                                                      service.context_length))
                   for k in range(len(generation.requests))]
    follow = _Follow(generation, completions)
    if body.stream:
        return Stream(_stream(service, follow, body), SSE, generation)
    await results(request, generation, follow.run())
    answers = [select_fields(c.final(service.name, streamed=False), body.response_fields) for c in completions]
    return answers[0] if len(answers) == 1 else answers


class _Follow:
    """Hands each engine event to the answer it belongs to (a context shift adds engine requests)."""

    def __init__(self, generation: Generation, completions: List[Completion]):
        self.generation, self.completions = generation, completions
        self.owner: Dict[int, Completion] = {c.segments[0]: c for c in completions}

    async def events(self) -> AsyncIterator[tuple]:
        """``(completion, pieces)`` for each event."""
        async for i, event in self.generation.events():
            c = self.owner[i]
            pieces = c.accept(event)
            self.owner[c.segments[-1]] = c
            yield c, pieces

    async def run(self) -> None:
        async for _ in self.events():
            pass


async def _stream(service: ModelService, follow: _Follow, body: CompletionBody) -> AsyncIterator[bytes]:
    """A chunk per token (``content``, ``tokens``, ``stop: false``), then each answer's final object (its
    text released only at the end, e.g. held back for a stop string, in its ``content``); an error is a last
    event with ``"stop": true`` and llama.cpp's error object."""
    tails: Dict[int, str] = {}
    try:
        async for c, pieces in follow.events():
            for piece in pieces:
                if piece.token is None:
                    tails[c.index] = tails.get(c.index, "") + piece.text
                else:
                    yield sse(c.chunk(piece))
            if c.done:
                final = c.final(service.name, streamed=True)
                final["content"] = tails.pop(c.index, "")
                yield sse(select_fields(final, body.response_fields))
    except ServiceError as e:
        yield sse({"content": "", "stop": True, **error_body(e.status, e.message, e.kind, e.details)})


def _n_predict(body: CompletionBody, settings: Settings) -> int:
    return body.n_predict if body.n_predict != -1 else settings.n_predict


def _n_cmpl(body: CompletionBody, service: ModelService) -> int:
    """``n_cmpl`` within 1 … slots, with llama.cpp's message (llama.vscode recognises it) otherwise."""
    top = service.engine.max_batch_size
    if not 1 <= body.n_cmpl <= top:
        raise ServiceError(400, f"Field 'n_cmpl': Value must be between 1 <= value <= {top}, but got {body.n_cmpl}")
    return body.n_cmpl


def _samplers(given: Union[List[str], str, None]) -> Optional[List[str]]:
    """The sampler chain's names (a list, or llama.cpp's one letter each), or None for the default chain.
    Unknown names are left out, as llama.cpp does; so are those this engine lacks (all but :data:`SAMPLERS`)."""
    if given is None:
        return None
    names = [SAMPLER_CHARS.get(ch, "") for ch in given] if isinstance(given, str) else given
    names = [n.lower().replace("-", "_") for n in names]
    aliases = {"temp": "temperature", "topk": "top_k", "topp": "top_p", "nucleus": "top_p"}
    return [aliases.get(n, n) for n in names]


def _sampling(body: CompletionBody, settings: Settings, choice: int) -> SamplingParams:
    """The engine's sampling for answer ``choice``: llama.cpp's chain reduced to what is on in it (a chain
    without ``temperature`` samples the model's distribution as it is); a fixed seed (taken as 32 bits, as
    llama.cpp does) is offset per answer so that ``n_cmpl`` answers differ. ``n_predict`` 0 draws one token
    (the prompt is then in the cache)."""
    temperature = settings.temperature if body.temperature is None else body.temperature
    top_k, top_p = body.top_k, body.top_p
    chain = _samplers(body.samplers)
    if chain is not None:
        temperature = temperature if "temperature" in chain else 1.0
        top_k = top_k if "top_k" in chain else 0
        top_p = top_p if "top_p" in chain else 1.0
    if top_p <= 0:  # llama.cpp keeps at least the likeliest token
        top_k, top_p = 1, 1.0
    seed = settings.seed if body.seed is None else body.seed  # llama.cpp's seeds are 32-bit, -1 a fresh one
    seed = -1 if seed == -1 else (seed + choice) & 0xFFFFFFFF
    n_predict = _n_predict(body, settings)
    return sampling(temperature=max(temperature, 0.0), top_p=min(top_p, 1.0), top_k=top_k if top_k > 0 else None,
                    max_tokens=None if n_predict < 0 else max(n_predict, 1),
                    stop=[s for s in ([body.stop] if isinstance(body.stop, str) else body.stop) if s],
                    seed=seed if seed >= 0 else None, logprobs=body.n_probs > 0, top_logprobs=body.n_probs)


def _rules(body: CompletionBody, settings: Settings, n_predict: int, params: SamplingParams, n_ctx: int) -> Rules:
    return Rules(n_predict=n_predict, n_indent=body.n_indent, t_max_predict_ms=body.t_max_predict_ms,
                 n_probs=body.n_probs, return_tokens=body.return_tokens, context_shift=settings.context_shift,
                 n_keep=body.n_keep, n_discard=body.n_discard,
                 settings={**_settings_json(params, settings, body), "n_predict": n_predict, "max_tokens": n_predict,
                           "n_ctx": n_ctx,
                           "n_indent": body.n_indent, "t_max_predict_ms": body.t_max_predict_ms,
                           "n_keep": body.n_keep, "n_discard": body.n_discard, "stream": body.stream,
                           "n_probs": body.n_probs})


def _defaults(settings: Settings) -> SamplingParams:
    return sampling(temperature=settings.temperature, top_p=0.95, top_k=40,
                    seed=settings.seed if settings.seed >= 0 else None)


def _settings_json(params: SamplingParams, settings: Settings, body: Optional[CompletionBody] = None) -> dict:
    """``generation_settings`` as llama.cpp reports them, with the values this engine applies (the samplers it
    lacks at their "off" value)."""
    return {"n_predict": settings.n_predict, "max_tokens": settings.n_predict,
            "seed": params.seed if params.seed is not None else LLAMA_DEFAULT_SEED,
            "temperature": params.temperature, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
            "top_k": params.top_k or 0, "top_p": params.top_p, "min_p": 0.0, "top_n_sigma": -1.0,
            "xtc_probability": 0.0, "xtc_threshold": 0.1, "typical_p": 1.0, "repeat_last_n": 0,
            "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
            "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 0, "mirostat": 0,
            "mirostat_tau": 5.0, "mirostat_eta": 0.1, "adaptive_target": -1.0, "adaptive_decay": 0.0,
            "stop": list(params.stop), "n_keep": 0, "n_discard": 0, "ignore_eos": False, "stream": False,
            "n_probs": 0, "min_keep": 0, "samplers": [s for s in SAMPLERS if _on(s, params)],
            "timings_per_token": False, "post_sampling_probs": False, "lora": [],
            "id_slot": body.id_slot if body is not None else -1,
            "cache_prompt": body.cache_prompt if body is not None else True}


def _on(sampler: str, params: SamplingParams) -> bool:
    return {"temperature": params.temperature != 1.0, "top_k": params.top_k is not None,
            "top_p": params.top_p < 1.0}[sampler]


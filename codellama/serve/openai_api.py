"""The OpenAI protocol: ``POST /v1/completions`` (with ``suffix``: Code Llama infilling), ``POST
/v1/chat/completions``, ``POST /v1/fim/completions`` (Mistral's and DeepSeek's fill-in-the-middle endpoint, in
the chat shape) and ``GET /v1/models``, streamed as server-sent events ending with ``data: [DONE]``.

Field names and shapes follow OpenAI's API reference. Defaults are OpenAI's (``max_tokens`` 16 for
completions, temperature and top-p 1). Every response names the backend (``system_fingerprint``) and its usage
the prompt tokens read from the prefix cache (``prompt_tokens_details.cached_tokens``). A chat whose last message
is the assistant's continues that answer (a prefill). Log-probabilities are those of the model's raw
distribution: completions' ``logprobs: N`` gives each token's and, in ``top_logprobs``, the N likeliest tokens
at each position (the chosen one added when it is not among them, as OpenAI does); chat's ``logprobs: true``
with ``top_logprobs: N`` (0 … 20) the same in the chat shape. A token's text, chosen or alternative, is its
piece alone (:meth:`ModelService.piece_text`).
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Dict, List, Optional, Union

from fastapi import APIRouter, Request
from pydantic import Field

from ..engine import Request as EngineRequest
from ..engine import MAX_TOP_LOGPROBS, SamplingParams, TopLogprobs
from .service import Generation, ModelService, Prompt, ServiceError, per_position, sampling
from .web import SSE, Body, Stream, json_body, results, service_of, sse, start

router = APIRouter(prefix="/v1")
DONE = b"data: [DONE]\n\n"
MAX_N = 16


def error_body(status: int, message: str) -> dict:
    """OpenAI's error object."""
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


# ----------------------------------------------------------------------------- request bodies
class StreamOptions(Body):
    include_usage: bool = False


class CompletionBody(Body):
    model: Optional[str] = None
    prompt: Union[str, List[str], List[int], List[List[int]]] = ""
    suffix: Optional[str] = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    stop: Union[str, List[str]] = []
    seed: Optional[int] = None


class ContentPart(Body):
    type: str
    text: str = ""


class Message(Body):
    role: str
    content: Union[str, List[ContentPart]] = ""


class ChatBody(Body):
    model: Optional[str] = None
    messages: List[Message]
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stop: Union[str, List[str]] = []
    seed: Optional[int] = None


class FimBody(Body):
    """Mistral's ``/v1/fim/completions`` (what Continue's FIM providers send): the code before and after the hole."""

    model: Optional[str] = None
    prompt: str
    suffix: Optional[str] = None  # none: a plain completion of the prompt, as Mistral does
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stream_options: StreamOptions = StreamOptions()
    stop: Union[str, List[str]] = []
    seed: Optional[int] = None
    random_seed: Optional[int] = None  # Mistral's name for it
    n: int = 1  # accepted for its default only
    logprobs: bool = False  # idem
    top_logprobs: Optional[int] = None


# ----------------------------------------------------------------------------- endpoints
@router.get("/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(service_of(request))]}


@router.get("/models/{model_id:path}")
async def model(request: Request, model_id: str) -> dict:
    service = service_of(request)
    service.check_model(model_id)
    return _model_card(service)


@router.post("/completions")
async def completions(request: Request, body: CompletionBody = json_body(CompletionBody)):
    service = service_of(request)
    service.check_model(body.model)
    prompts = _completion_prompts(service, body)
    choices = [_params(body, body.max_tokens, j, logprobs=body.logprobs is not None, top=body.logprobs or 0)
               for j in range(body.n)]
    generation = start(request, [(p, params) for p in prompts for params in choices])
    reply = _Reply("cmpl", "text_completion", service)
    if body.stream:
        return Stream(_completion_stream(service, reply, generation, body), SSE, generation)
    requests = await results(request, generation)
    return reply.body([_completion_choice(service, k, p, r, body) for k, (p, r) in
                       enumerate(zip(generation.prompts, requests))], usage=_usage(generation))


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatBody = json_body(ChatBody)):
    service = service_of(request)
    service.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise ServiceError(400, "top_logprobs needs logprobs: true")
    prompt = service.chat(_dialog(body.messages))
    return await _chat_response(request, service, prompt, body)


@router.post("/fim/completions")
async def fim_completions(request: Request, body: FimBody = json_body(FimBody)):
    """The text between ``prompt`` and ``suffix``, exactly ``text_infilling``'s; answered as a chat completion
    (``choices[].message.content``, streamed as ``choices[].delta.content``), as Mistral's endpoint is."""
    service = service_of(request)
    service.check_model(body.model)
    if body.n != 1 or body.logprobs or body.top_logprobs:
        raise ServiceError(400, "fim/completions gives one choice without log-probabilities: leave out n, logprobs "
                                "and top_logprobs (or use /v1/completions with suffix)")
    if body.seed is None and body.random_seed is not None:
        body = body.model_copy(update={"seed": body.random_seed})
    reserve = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    prompt = (service.raw(body.prompt, reserve=reserve) if body.suffix is None
              else service.infill(body.prompt, body.suffix, reserve=reserve))  # cut to fit, as the others are
    return await _chat_response(request, service, prompt, body)


async def _chat_response(request: Request, service: ModelService, prompt: Prompt, body: Union[ChatBody, FimBody]):
    """A chat completion of ``prompt``, whole or streamed: ``n`` choices, each with its log-probabilities when
    asked for."""
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    generation = start(request, [(prompt, _params(body, max_tokens, j, logprobs=body.logprobs, top=top))
                                 for j in range(body.n)])
    reply = _Reply("chatcmpl", "chat.completion", service)
    if body.stream:
        return Stream(_chat_stream(service, reply, generation, body), SSE, generation)
    requests = await results(request, generation)
    choices = [{"index": k, "message": {"role": "assistant", "content": r.text},
                "logprobs": {"content": service.logprob_entries(r)} if body.logprobs else None,
                "finish_reason": r.finish_reason} for k, r in enumerate(requests)]
    return reply.body(choices, usage=_usage(generation))


# ----------------------------------------------------------------------------- requests to the engine
def _completion_prompts(service: ModelService, body: CompletionBody) -> List[Prompt]:
    """One prompt per entry of ``prompt``: text (with ``suffix``: infilling; spelled FIM text: infilling too)
    or token ids."""
    given = body.prompt
    if isinstance(given, str):
        given = [given]
    elif given and all(isinstance(t, int) for t in given):
        given = [given]
    if not given:
        raise ServiceError(400, "prompt is an empty list: give a string, strings, token ids or lists of token ids")
    if not isinstance(given[0], str):
        if body.suffix is not None:
            raise ServiceError(400, "suffix needs a text prompt, not token ids")
        return [service.token_ids(ids) for ids in given]
    if body.suffix is not None:
        return [service.infill(text, body.suffix, reserve=body.max_tokens) for text in given]
    return [service.raw(text, reserve=body.max_tokens) for text in given]


def _params(body: Union[CompletionBody, ChatBody, FimBody], max_tokens: Optional[int], choice: int, *,
            logprobs: bool, top: int) -> SamplingParams:
    """Sampling of choice ``choice``: a given seed is offset per choice so that the ``n`` choices differ."""
    seed = None if body.seed is None else body.seed + choice
    echo = isinstance(body, CompletionBody) and body.echo
    return sampling(temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens, stop=body.stop, seed=seed,
                    logprobs=logprobs, prompt_logprobs=logprobs and echo, top_logprobs=top)


def _dialog(messages: List[Message]) -> List[Dict[str, str]]:
    """Messages as the library's dialog: text parts joined; OpenAI's ``developer`` role is the system's."""
    dialog = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            content = m.content
        elif all(part.type == "text" for part in m.content):
            content = "".join(part.text for part in m.content)
        else:
            raise ServiceError(400, f"messages[{i}]: only text content is supported, got parts of type "
                                    f"{sorted({p.type for p in m.content})}")
        dialog.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return dialog


# ----------------------------------------------------------------------------- responses
class _Reply:
    """What every chunk and body of one response shares: its id, object type, creation time, model and backend."""

    def __init__(self, id_prefix: str, kind: str, service: ModelService):
        self.id, self.kind, self.model = f"{id_prefix}-{uuid.uuid4().hex}", kind, service.name
        self.created, self.fingerprint = int(time.time()), service.fingerprint

    def body(self, choices: List[dict], usage: Optional[dict] = None, kind: Optional[str] = None) -> dict:
        out = {"id": self.id, "object": kind or self.kind, "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out


def _model_card(service: ModelService) -> dict:
    return {"id": service.name, "object": "model", "created": 0, "owned_by": "codellama",
            "context_length": service.context_length, "max_model_len": service.context_length}


def _usage(generation: Generation) -> dict:
    p, c = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": generation.prompt_cached_tokens}}


def _completion_choice(service: ModelService, index: int, prompt: Prompt, r: EngineRequest,
                       body: CompletionBody) -> dict:
    logprobs = None
    if body.logprobs is not None:
        ids, texts = list(r.tokens), service.token_texts(r.tokens, prompt.decode)
        values: List[Optional[float]] = list(r.logprobs)
        tops = [_top_dict(service, t, lp, top)
                for t, lp, top in zip(r.tokens, r.logprobs, per_position(r.top_logprobs, r.tokens))]
        if body.echo:
            ids, texts = prompt.ids + ids, service.token_texts(prompt.ids) + texts
            values = [None] + r.prompt_logprobs[1:] + values
            prompt_tops = per_position(r.prompt_top_logprobs, prompt.ids)
            tops = [None] + [_top_dict(service, t, lp, top) for t, lp, top in
                             zip(prompt.ids[1:], r.prompt_logprobs[1:], prompt_tops[1:])] + tops
        logprobs = _logprobs([service.piece_text(t) for t in ids], texts, values, tops)
    return {"index": index, "text": (prompt.text if body.echo else "") + r.text, "logprobs": logprobs,
            "finish_reason": r.finish_reason}


def _logprobs(tokens: List[str], texts: List[str], values: List[Optional[float]],
              tops: List[Optional[Dict[str, float]]], offset: int = 0) -> dict:
    """Completions' ``logprobs``: each token's text (its piece), value, alternatives, and where in the text it
    begins (from ``texts``, what each token adds to the decoded text)."""
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(service: ModelService, token: int, logprob: float, top: Optional[TopLogprobs]) -> Dict[str, float]:
    """Completions' ``top_logprobs`` entry: alternative text → log-probability, the chosen token always in it."""
    out = {service.piece_text(t): v for t, v in (top or [])}
    out.setdefault(service.piece_text(token), logprob)
    return out


async def _completion_stream(service: ModelService, reply: _Reply, generation: Generation, body: CompletionBody) -> AsyncIterator[bytes]:
    def chunk(index: int, text: str, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> bytes:
        return sse(reply.body([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]))

    offsets = [0] * len(generation.requests)
    try:
        if body.echo:
            for k, prompt in enumerate(generation.prompts):
                offsets[k] = len(prompt.text)
                yield chunk(k, prompt.text)
        async for k, event in generation.events():
            logprobs = None
            if body.logprobs is not None and event.token is not None:
                top = _top_dict(service, event.token, event.logprob, event.top_logprobs)
                logprobs = _logprobs([service.piece_text(event.token)], [event.text], [event.logprob], [top],
                                     offsets[k])
            offsets[k] += len(event.text)
            if event.text or event.finish_reason or logprobs:
                yield chunk(k, event.text, event.finish_reason, logprobs)
        if body.stream_options.include_usage:
            yield sse(reply.body([], usage=_usage(generation)))
    except ServiceError as e:
        yield sse(error_body(e.status, e.message))
    yield DONE


async def _chat_stream(service: ModelService, reply: _Reply, generation: Generation,
                       body: Union[ChatBody, FimBody]) -> AsyncIterator[bytes]:
    """The first chunk of each choice gives the role (``content: null``, as OpenAI's does), then the text as it
    comes, then the finish reason; the usage last when asked for."""
    def chunk(index: int, delta: dict, finish: Optional[str] = None, logprobs: Optional[dict] = None) -> bytes:
        return sse(reply.body([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                              kind="chat.completion.chunk"))

    try:
        for k in range(len(generation.requests)):
            yield chunk(k, {"role": "assistant", "content": None})
        async for k, event in generation.events():
            logprobs = None
            if body.logprobs and event.token is not None:
                logprobs = {"content": [service.logprob_entry(event.token, event.logprob, event.top_logprobs)]}
            if event.text or logprobs:
                yield chunk(k, {"content": event.text}, logprobs=logprobs)
            if event.finish_reason:
                yield chunk(k, {}, event.finish_reason)
        if body.stream_options.include_usage:
            yield sse(reply.body([], usage=_usage(generation), kind="chat.completion.chunk"))
    except ServiceError as e:
        yield sse(error_body(e.status, e.message))
    yield DONE

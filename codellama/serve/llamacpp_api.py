"""The llama.cpp server protocol: ``POST /infill`` (``input_prefix``, ``input_suffix``, ``input_extra``),
``POST /completion`` and ``GET /health``; streams are server-sent events whose last one has ``"stop": true``.

Field names and shapes follow llama.cpp's server README; defaults are its own (temperature 0.8, top-k 40,
top-p 0.95, ``n_predict`` -1: until the context is full). Code Llama has no repository-level FIM tokens, so
``/infill`` puts each ``input_extra`` chunk's text, then a blank line, before the prefix, and the ``prompt``
(the start of the cursor's line) after it: the request is ``text_infilling(extra + input_prefix + prompt,
input_suffix)``. ``/completion`` takes text or token ids; text spelling the FIM format is infilling.
"""

from __future__ import annotations

from typing import AsyncIterator, List, Optional, Union

from fastapi import APIRouter, Request

from ..engine import Request as EngineRequest
from ..engine import SamplingParams
from .service import Generation, ModelService, Prompt, ServiceError, sampling
from .web import SSE, Body, Stream, json_body, results, service_of, sse, start

router = APIRouter()


def error_body(status: int, message: str) -> dict:
    """llama.cpp's error object."""
    kind = {401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"code": status, "message": message, "type": kind}}


# ----------------------------------------------------------------------------- request bodies
class CompletionBody(Body):
    prompt: Union[str, List[int]] = ""
    n_predict: int = -1  # negative: until the context is full
    temperature: float = 0.8  # 0 or less: greedy
    top_k: int = 40  # 0 or less: no top-k
    top_p: float = 0.95
    stop: Union[str, List[str]] = []
    seed: int = -1  # negative: a fresh seed
    stream: bool = False
    return_tokens: bool = False
    id_slot: int = -1  # a client's slot: its newer request supersedes the one in flight (see session_of)


class ExtraChunk(Body):
    text: str = ""
    filename: str = ""


class InfillBody(CompletionBody):
    prompt: str = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: List[ExtraChunk] = []


# ----------------------------------------------------------------------------- endpoints
@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.post("/completion")
async def completion(request: Request, body: CompletionBody = json_body(CompletionBody)):
    service = service_of(request)
    if isinstance(body.prompt, str):
        prompt = service.raw(body.prompt)
    else:
        prompt = service.token_ids(body.prompt)
    return await _respond(request, service, prompt, body)


@router.post("/infill")
async def infill(request: Request, body: InfillBody = json_body(InfillBody)):
    service = service_of(request)
    prefix = "".join(chunk.text + "\n\n" for chunk in body.input_extra) + body.input_prefix + body.prompt
    return await _respond(request, service, service.infill(prefix, body.input_suffix), body)


# ----------------------------------------------------------------------------- helpers
def session_of(request: Request, body: CompletionBody) -> Optional[tuple]:
    """The session a request belongs to: its client's address and the slot it names (``id_slot`` ≥ 0, what editors
    send with every request of one document), or None. Its newer request stops it, unless that one computes no
    answer (``n_predict`` 0: editors warm the cache with their extra context so)."""
    if body.id_slot < 0:
        return None
    return ("llama.cpp", request.client.host if request.client else None, body.id_slot)


async def _respond(request: Request, service: ModelService, prompt: Prompt, body: CompletionBody):
    generation = start(request, [(prompt, _params(body))], session_of(request, body), supersede=body.n_predict != 0)
    if body.stream:
        return Stream(_stream(service, generation, body), SSE, generation)
    [r] = await results(request, generation)
    return _final(service, prompt, r, body, r.text)


def _params(body: CompletionBody) -> SamplingParams:
    # n_predict 0 still evaluates the prompt into the cache, as llama-server does (editors warm the cache so):
    # one token is drawn and not answered.
    return sampling(temperature=max(body.temperature, 0.0), top_p=body.top_p,
                    top_k=body.top_k if body.top_k > 0 else None,
                    max_tokens=max(body.n_predict, 1) if body.n_predict >= 0 else None, stop=body.stop,
                    seed=body.seed if body.seed >= 0 else None)


async def _stream(service: ModelService, generation: Generation, body: CompletionBody) -> AsyncIterator[bytes]:
    """``{"content", "stop": false}`` per piece, then the full final object; an error is a last event with
    ``"stop": true`` and llama.cpp's error object."""
    try:
        async for _, event in generation.events():
            if event.finish_reason is not None:
                yield sse(_final(service, generation.prompts[0], generation.requests[0], body, event.text))
            elif event.text and body.n_predict != 0:
                yield sse({"content": event.text, "stop": False, "index": 0})
    except ServiceError as e:
        yield sse({"content": "", "stop": True, **error_body(e.status, e.message)})


def _final(service: ModelService, prompt: Prompt, r: EngineRequest, body: CompletionBody, content: str) -> dict:
    """llama.cpp's completion result: the text, why it stopped, the counts and timings."""
    tokens = r.tokens if body.n_predict != 0 else []  # a cache warm-up's drawn token is not an answer
    content = content if body.n_predict != 0 else ""
    word = next((s for s in r.params.stop if s in prompt.decode(tokens)), "")
    stop_type = "limit" if r.finish_reason == "length" else "word" if word else "eos"
    first = r.first_token_at if r.first_token_at is not None else r.finished_at
    prompt_ms, predicted_ms = (first - r.submitted) * 1000, (r.finished_at - first) * 1000
    return {"content": content, "tokens": tokens if body.return_tokens else [], "stop": True, "index": 0,
            "model": service.name, "tokens_predicted": len(tokens), "tokens_evaluated": len(r.prompt),
            "tokens_cached": r.cached_tokens, "stop_type": stop_type, "stopping_word": word, "truncated": False,
            "timings": {"prompt_n": len(r.prompt) - r.cached_tokens, "prompt_ms": prompt_ms,
                        "predicted_n": len(tokens), "predicted_ms": predicted_ms,
                        "predicted_per_second": len(tokens) / (predicted_ms / 1000) if predicted_ms > 0 else 0.0}}

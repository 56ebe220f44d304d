"""The Ollama protocol: ``POST /api/generate`` (with ``suffix``: Code Llama infilling), ``POST /api/chat``,
``GET /api/tags`` and ``POST /api/show``, streamed as newline-delimited JSON (``"stream": false`` for one object).

Field names and shapes follow Ollama's ``docs/api.md``; ``options`` defaults are Ollama's (temperature 0.8,
top-p 0.9, top-k 40, ``num_predict`` -1: until the context is full). The served template is the identity
(``{{ .Prompt }}``, and with ``.Suffix`` the FIM prompt), so ``raw`` changes nothing: a prompt that spells
the FIM format as text is infilling either way. ``/api/show``'s template contains ``.Suffix`` exactly when
the model can infill, which is how Continue decides to send ``suffix``.
``logprobs: true`` (with ``top_logprobs``, 0 … 20) adds ``logprobs``: per new token its text, log-probability,
bytes and likeliest alternatives, on each streamed line or in the whole response, as Ollama does.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import AsyncIterator, List, Optional, Union

from fastapi import APIRouter, Request
from pydantic import Field

from ..engine import Request as EngineRequest
from ..engine import MAX_TOP_LOGPROBS, SamplingParams
from .service import Generation, ModelService, Prompt, ServiceError, sampling
from .web import NDJSON, Body, Stream, json_body, ndjson, results, service_of, start

router = APIRouter(prefix="/api")
FIM_TEMPLATE = "{{- if .Suffix }}<PRE> {{ .Prompt }} <SUF>{{ .Suffix }} <MID>{{- else }}{{ .Prompt }}{{- end }}"
PLAIN_TEMPLATE = "{{ .Prompt }}"


def error_body(status: int, message: str) -> dict:
    """Ollama's error object."""
    return {"error": message}


# ----------------------------------------------------------------------------- request bodies
class Options(Body):
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40  # 0 or less: no top-k
    num_predict: int = -1  # negative: until the context is full
    stop: Union[str, List[str]] = []
    seed: Optional[int] = None  # negative: a fresh seed


class GenerateBody(Body):
    model: str
    prompt: str = ""
    suffix: Optional[str] = None
    raw: bool = False
    stream: bool = True
    options: Options = Options()
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


class ChatMessage(Body):
    role: str
    content: str = ""


class ChatBody(Body):
    model: str
    messages: List[ChatMessage] = []
    stream: bool = True
    options: Options = Options()
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)


class ShowBody(Body):
    model: str = ""
    name: str = ""  # what older clients (Continue among them) send


# ----------------------------------------------------------------------------- endpoints
@router.get("/tags")
async def tags(request: Request) -> dict:
    service = service_of(request)
    name = f"{service.name}:latest"
    return {"models": [{"name": name, "model": name, "modified_at": _now(), "size": _size_bytes(service),
                        "digest": hashlib.sha256(name.encode()).hexdigest(), "details": _details(service)}]}


@router.post("/show")
async def show(request: Request, body: ShowBody = json_body(ShowBody)) -> dict:
    service = service_of(request)
    name = body.model or body.name
    if not name:
        raise ServiceError(400, "model: the name of the model to show is required")
    service.check_model(name)
    template = FIM_TEMPLATE if service.can_infill else PLAIN_TEMPLATE
    parameters = f"num_ctx {service.context_length}"
    return {"modelfile": f'FROM {service.name}\nTEMPLATE """{template}"""\nPARAMETER {parameters}\n',
            "parameters": parameters, "template": template, "details": _details(service),
            "model_info": _model_info(service), "capabilities": _capabilities(service), "modified_at": _now()}


@router.post("/generate")
async def generate(request: Request, body: GenerateBody = json_body(GenerateBody)):
    service = service_of(request)
    service.check_model(body.model)
    if not body.prompt and body.suffix is None:  # Ollama's way of loading a model: it is loaded
        return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    reserve = body.options.num_predict  # the answer's room when an infilling prompt is cut to fit
    prompt = (service.infill(body.prompt, body.suffix, reserve=reserve) if body.suffix is not None
              else service.raw(body.prompt, reserve=reserve))
    generation = start(request, [(prompt, _params(body))])
    if body.stream:
        return Stream(_stream(service, generation, body, lambda text: {"response": text}), NDJSON, generation)
    [r] = await results(request, generation)
    return _final(r, body.model, {"response": r.text, **_logprobs(service, body, prompt, r)})


@router.post("/chat")
async def chat(request: Request, body: ChatBody = json_body(ChatBody)):
    service = service_of(request)
    service.check_model(body.model)
    if not body.messages:  # loading the model
        return {"model": body.model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    prompt: Prompt = service.chat([{"role": m.role, "content": m.content} for m in body.messages])
    generation = start(request, [(prompt, _params(body))])

    def message(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    if body.stream:
        return Stream(_stream(service, generation, body, message), NDJSON, generation)
    [r] = await results(request, generation)
    return _final(r, body.model, {**message(r.text), **_logprobs(service, body, prompt, r)})


# ----------------------------------------------------------------------------- helpers
def _params(body: Union[GenerateBody, ChatBody]) -> SamplingParams:
    if body.top_logprobs and not body.logprobs:
        raise ServiceError(400, "top_logprobs needs logprobs: true")
    options = body.options
    return sampling(temperature=options.temperature, top_p=options.top_p,
                    top_k=options.top_k if options.top_k > 0 else None,
                    max_tokens=options.num_predict if options.num_predict >= 0 else None, stop=options.stop,
                    seed=options.seed if options.seed is not None and options.seed >= 0 else None,
                    logprobs=body.logprobs, top_logprobs=body.top_logprobs)


def _logprobs(service: ModelService, body: Union[GenerateBody, ChatBody], prompt: Prompt, r: EngineRequest) -> dict:
    """``{"logprobs": [...]}`` with one entry per new token when asked for, else nothing."""
    return {"logprobs": service.logprob_entries(r)} if body.logprobs else {}


async def _stream(service: ModelService, generation: Generation, body: Union[GenerateBody, ChatBody],
                  content) -> AsyncIterator[bytes]:
    """NDJSON lines: ``{"model", "created_at", <content>, "done": false}`` per piece (with its token's
    ``logprobs`` when asked for), then the final line with ``done_reason`` and the counts; an error ends the
    stream with Ollama's ``{"error": …}`` line."""
    model = body.model
    try:
        async for _, event in generation.events():
            if event.finish_reason is not None:
                yield ndjson(_final(generation.requests[0], model, content(event.text)))
            elif event.text or body.logprobs:
                extra = ({"logprobs": [service.logprob_entry(event.token, event.logprob, event.top_logprobs)]}
                         if body.logprobs and event.token is not None else {})
                yield ndjson({"model": model, "created_at": _now(), **content(event.text), **extra, "done": False})
    except ServiceError as e:
        yield ndjson(error_body(e.status, e.message))


def _final(r: EngineRequest, model: str, content: dict) -> dict:
    """The last object of a response: Ollama's counts and durations (nanoseconds)."""
    first = r.first_token_at if r.first_token_at is not None else r.finished_at
    ns = 1_000_000_000
    return {"model": model, "created_at": _now(), **content, "done": True, "done_reason": r.finish_reason,
            "total_duration": int((r.finished_at - r.submitted) * ns), "load_duration": 0,
            "prompt_eval_count": len(r.prompt), "prompt_eval_duration": int((first - r.submitted) * ns),
            "eval_count": len(r.tokens), "eval_duration": int((r.finished_at - first) * ns)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _size_bytes(service: ModelService) -> int:
    return service.engine.model.args.num_params() * service.engine.model.tok_embeddings.weight.element_size()


def _details(service: ModelService) -> dict:
    n = service.engine.model.args.num_params()
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    dtype = str(service.engine.model.tok_embeddings.weight.dtype).replace("torch.", "")
    level = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, dtype.upper())
    return {"parent_model": "", "format": "pytorch", "family": "llama", "families": ["llama"],
            "parameter_size": size, "quantization_level": level}


def _model_info(service: ModelService) -> dict:
    a = service.engine.model.args
    return {"general.architecture": "llama", "general.parameter_count": a.num_params(),
            "llama.context_length": service.context_length, "llama.embedding_length": a.dim,
            "llama.block_count": a.n_layers, "llama.attention.head_count": a.n_heads,
            "llama.attention.head_count_kv": a.kv_heads, "llama.rope.freq_base": a.rope_theta,
            "llama.vocab_size": a.vocab_size}


def _capabilities(service: ModelService) -> List[str]:
    return ["completion"] + (["insert"] if service.can_infill else [])

"""HTTP plumbing the protocol adapters share: request bodies parsed and checked, generations started and
recorded for the access log, streamed responses that cancel their generation however they end, and waiting
for results unless the client leaves first."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, Hashable, Optional, Sequence, Tuple, Type, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine import SamplingParams
from .security import check_content_type
from .service import Generation, ModelService, Prompt, ServiceError

M = TypeVar("M", bound=BaseModel)

SSE, NDJSON = "text/event-stream", "application/x-ndjson"


class Body(BaseModel):
    """A request body (or a part of one): unknown fields are ignored, a known field of the wrong type is an
    error (no "5" for 5), and ``null`` means "the default"."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


def service_of(request: Request) -> ModelService:
    return request.app.state.service


def json_body(model: Type[M]) -> Any:
    """A dependency giving the request body as ``model``, at most ``app.state.max_body_bytes`` long; a 400 (413
    past the limit) otherwise, and a 415 for a content type that is not JSON (form-encoded, what ``curl -d``
    says, or none, only from a program: see :func:`~codellama.serve.security.check_content_type`)."""

    async def parse(request: Request) -> M:
        wrong_type = check_content_type(request.headers)
        if wrong_type:
            raise ServiceError(415, wrong_type)
        data = await _read_json(request)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise ServiceError(400, describe(e)) from None

    return Depends(parse)


async def _read_json(request: Request) -> dict:
    limit = request.app.state.max_body_bytes
    too_large = ServiceError(413, f"the request body is larger than the server's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:  # also bytes that are not UTF-8, and absurdly deep nesting
        raise ServiceError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ServiceError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def describe(error: ValidationError) -> str:
    """One clause per wrong field, e.g. ``max_tokens: Input should be a valid integer (got str)``."""
    clauses = {}
    for e in error.errors():
        path = ".".join(str(p) for p in e["loc"] if not _type_tag(p))
        field = str(e["loc"][0]) if e["loc"] else "body"
        given = "" if e["type"] == "missing" else f" (got {type(e['input']).__name__})"
        clauses.setdefault(field, f"{path or field}: {e['msg']}{given}")
    return "; ".join(clauses.values())


def _type_tag(part: Any) -> bool:
    """Union members and model names appear in an error's location as type tags ("str", "list[int]", "Message")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part[:1].isupper())


def start(request: Request, work: Sequence[Tuple[Prompt, SamplingParams]], session: Hashable = None,
          supersede: bool = True) -> Generation:
    """Submit the work of one HTTP request, recorded on the request for its access-log line; ``session`` and
    ``supersede`` as ``ModelService.generate``'s."""
    generation = service_of(request).generate(work, session, supersede)
    request.state.generation = generation
    return generation


async def results(request: Request, generation: Generation, work: Optional[Awaitable[Any]] = None) -> Any:
    """The finished requests of ``generation`` (or what ``work``, which follows it, returns), unless the client
    disconnects first: then the generation is cancelled (its slots freed at the next step) and
    :class:`ClientGone` raised."""
    task = asyncio.ensure_future(generation.finish() if work is None else work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        generation.cancel()
        raise ClientGone()
    finally:
        task.cancel()
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Stream(StreamingResponse):
    """A streamed response (SSE or NDJSON) whose generation is cancelled however the response ends: finished,
    the client gone (Starlette cancels the stream), or an error."""

    def __init__(self, content: AsyncIterator[bytes], media_type: str, generation: Generation):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()
            await self.body_iterator.aclose()


def sse(data: Any) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def ndjson(data: Any) -> bytes:
    """One line of newline-delimited JSON."""
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"

"""The application: the three protocols' routes over one :class:`ModelService`, errors in each protocol's
own shape, who may use it (API key, Host, Origin: ``security.py``), one log line per request, and a server
whose connections a flood cannot exhaust (``connections.py``) and whose shutdown ends in-flight streams.

Paths under ``/v1/`` speak OpenAI, under ``/api/`` Ollama, the rest llama.cpp; an error (bad JSON, a wrong
type, a missing key, an unknown path, a full queue) is answered in the shape of the path's protocol, never
with a traceback.
"""

from __future__ import annotations

import logging
import socket
import time
from contextlib import asynccontextmanager
from typing import List, Optional, Sequence

import uvicorn
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine import Engine
from . import llamacpp_api, ollama_api, openai_api
from .connections import BACKLOG, READ_TIMEOUT_S, guarded_protocol
from .security import HostAndOrigin, RequireKey, check_api_key
from .service import ModelService, ServiceError
from .web import ClientGone

log = logging.getLogger("codellama.serve")

MAX_BODY_BYTES = 4 * 2**20  # an editor's request holds a file or two; 4 MiB is far past any context
GRACEFUL_SHUTDOWN_S = 5  # after the engine has stopped, how long a slow client may take to read its last event
PROTOCOLS = (("/v1/", openai_api), ("/api/", ollama_api))  # any other path: llama.cpp's


def error_response(path: str, status: int, message: str, headers: Optional[dict] = None,
                   error: Optional[ServiceError] = None) -> JSONResponse:
    """An error in the shape of the protocol that ``path`` belongs to (llama.cpp's with ``error``'s kind and
    details, e.g. ``exceed_context_size_error``)."""
    adapter = next((a for prefix, a in PROTOCOLS if path.startswith(prefix)), llamacpp_api)
    if adapter is llamacpp_api and error is not None:
        body = llamacpp_api.error_body(status, message, error.kind, error.details)
    else:
        body = adapter.error_body(status, message)
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(service: ModelService, *, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES,
               host: str = "127.0.0.1", allowed_hosts: Sequence[str] = (), cors_origins: Sequence[str] = (),
               llamacpp: Optional[llamacpp_api.Settings] = None) -> FastAPI:
    """The ASGI application serving ``service``; its lifespan starts the engine's thread and stops it.

    With ``api_key`` (never empty) every path needs ``Authorization: Bearer <api_key>`` or ``X-Api-Key:
    <api_key>``; request bodies longer than ``max_body_bytes`` get a 413. Requests naming a Host that a server
    bound to ``host`` does not answer to, or coming from a web page whose origin is not in ``cors_origins``,
    get a 403 (see ``security.py``). ``llamacpp`` holds the llama.cpp endpoints' server-wide defaults.
    """
    api_key = check_api_key(api_key, "api_key")

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.stop()

    app = FastAPI(title="codellama", summary="Code Llama over the OpenAI, Ollama and llama.cpp protocols",
                  lifespan=lifespan)
    app.state.service, app.state.max_body_bytes = service, max_body_bytes
    app.state.llamacpp = llamacpp or llamacpp_api.Settings()
    for adapter in (openai_api, ollama_api, llamacpp_api):
        app.include_router(adapter.router)
    # llama-server's path for OpenAI's chat (its errors in llama.cpp's shape, as llama-server answers there)
    app.add_api_route("/chat/completions", openai_api.chat_completions, methods=["POST"])
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key, error=error_response)
    # Outside the key: a browser's preflight carries no key, and a refused page learns nothing from a 401.
    app.add_middleware(HostAndOrigin, error=error_response, bind_host=host, allowed_hosts=allowed_hosts,
                       cors_origins=cors_origins)
    app.add_middleware(AccessLog)  # added last: outermost, so refused requests are logged too
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, e: ServiceError) -> Response:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return error_response(request.url.path, e.status, e.message, headers, e)

    async def http_error(request: Request, e: HTTPException) -> Response:
        return error_response(request.url.path, e.status_code, str(e.detail), getattr(e, "headers", None))

    async def client_gone(request: Request, e: ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it; the access log says the client left

    async def unexpected(request: Request, e: Exception) -> Response:  # Starlette then logs the traceback
        return error_response(request.url.path, 500, f"internal error ({type(e).__name__}); see the server's log")

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, unexpected)


class AccessLog:
    """ASGI middleware: one line per request when its response has ended: method, path, status, tokens, time."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), [499]  # 499: the client left before a response started

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            generation = scope.get("state", {}).get("generation")
            tokens = "-" if generation is None else (
                f"prompt={generation.prompt_tokens} cached={generation.cached_tokens} "
                f"completion={generation.completion_tokens}")
            log.info("%s %s %d %s %.3fs", scope["method"], printable(scope["path"]), status[0], tokens,
                     time.perf_counter() - began)


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe to write on one log line: unprintable characters (a path's ``%0d%0a`` forging a line,
    ``%1b[`` a terminal escape, a right-to-left override) as Python escapes (``\\r``, ``\\x1b``, ``\\u202e``),
    backslashes doubled so that an escape cannot be forged either, at most ``limit`` characters."""
    def safe(c: str) -> str:
        if c == "\\":
            return "\\\\"
        return c if c.isprintable() else ascii(c)[1:-1]

    return "".join(map(safe, text[:limit])) + ("…" if len(text) > limit else "")


class Server(uvicorn.Server):
    """uvicorn's server, stopping the engine first when it shuts down (SIGINT/SIGTERM, or ``should_exit``):
    every in-flight request ends at once with a final event, so the connections close and nothing is left."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    async def startup(self, sockets: Optional[List[socket.socket]] = None) -> None:
        await super().startup(sockets)
        if sockets and self.started:
            # uvicorn says where it listens only on sockets it bound itself; say it for one bound beforehand.
            host, port = sockets[0].getsockname()[:2]
            logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                    f"[{host}]" if ":" in host else host, port)

    async def shutdown(self, sockets: Optional[List[socket.socket]] = None) -> None:
        self.engine.stop()
        await super().shutdown(sockets)


def server(service: ModelService, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
           max_body_bytes: int = MAX_BODY_BYTES, log_level: str = "info", allowed_hosts: Sequence[str] = (),
           cors_origins: Sequence[str] = (), read_timeout: float = READ_TIMEOUT_S,
           max_connections: Optional[int] = None, llamacpp: Optional[llamacpp_api.Settings] = None) -> Server:
    """A :class:`Server` for ``service``; ``.run()`` serves until SIGINT/SIGTERM (or ``.run(sockets=[sock])``
    on a socket bound already to ``host``). ``read_timeout`` and ``max_connections`` bound idle and incomplete
    connections (``connections.py``)."""
    app = create_app(service, api_key=api_key, max_body_bytes=max_body_bytes, host=host, allowed_hosts=allowed_hosts,
                     cors_origins=cors_origins, llamacpp=llamacpp)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, backlog=BACKLOG,
                            http=guarded_protocol(read_timeout, max_connections))
    return Server(config, service.engine)

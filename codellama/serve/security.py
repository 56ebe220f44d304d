"""Who may use the server: the API key, the Host a request names, and the web page it comes from.

Three attacks are refused here, before a request reaches a protocol:

- **DNS rebinding**: a page at ``http://attacker.example`` points that name at 127.0.0.1 and reads this
  server as if it were its own. Its requests name the attacker's host in ``Host``: only the names this server
  answers to (:func:`host_names`) are served, 403 for any other.
- **Cross-site requests**: any page can make a browser POST to ``http://127.0.0.1:8000`` (a ``text/plain``
  body needs no preflight). A browser names the page's origin in ``Origin`` on every such request: a foreign
  origin is refused (403) unless ``--cors-origins`` allows it, and then CORS preflights are answered and
  responses carry ``Access-Control-Allow-Origin`` (as llama.cpp's server does for browser clients). The
  server's own origin (its ``/docs`` page) is not foreign. Request bodies must also say they are JSON
  (:func:`check_content_type`).
- **A local user without the key**: with ``--api-key`` every request needs it, as ``Authorization: Bearer
  KEY`` or ``X-Api-Key: KEY`` (llama.cpp accepts both; Continue sends both), compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from typing import Callable, FrozenSet, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PREFLIGHT_MAX_AGE_S = 600  # how long a browser may reuse a preflight's answer
JSON_TYPES = ("application/json",)
# Sent without an Origin header only by programs (curl -d says form-encoded; a bare request says nothing): a
# browser always names the page's origin on a POST, and no browser form can encode a JSON object this way.
NON_BROWSER_TYPES = ("", "application/x-www-form-urlencoded")

ErrorResponse = Callable[[str, int, str, Optional[dict]], Response]  # path, status, message, headers


def check_api_key(key: Optional[str], source: str = "--api-key") -> Optional[str]:
    """``key`` when it is usable, None for no key; a ``ValueError`` for an empty key (a ``--api-key "$KEY"``
    with ``$KEY`` unset would otherwise start a server with no authentication) or one a header cannot carry."""
    if key is None:
        return None
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"{source} is empty: give a key, or leave it out to serve without one")
    if key != key.strip() or not all(c.isprintable() and c.isascii() for c in key):
        raise ValueError(f"{source} must be printable ASCII without leading or trailing spaces, as a header carries it")
    return key


class RequireKey:
    """ASGI middleware: every request needs ``Authorization: Bearer <key>`` or ``X-Api-Key: <key>``."""

    def __init__(self, app: ASGIApp, api_key: str, error: ErrorResponse):
        self.app, self.error = app, error
        self.bearer, self.key = f"Bearer {api_key}".encode(), api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._has_key(Headers(scope=scope)):
            response = self.error(scope["path"], 401, "a valid API key is required: send the header 'Authorization: "
                                  "Bearer <key>' (or 'X-Api-Key: <key>')", {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _has_key(self, headers: Headers) -> bool:
        # Both compared whatever the first gives, so the time taken says nothing about either.
        bearer = hmac.compare_digest(headers.get("authorization", "").encode(), self.bearer)
        key = hmac.compare_digest(headers.get("x-api-key", "").encode(), self.key)
        return bearer or key


# ----------------------------------------------------------------------------- hosts and origins
def host_names(bind_host: str, allowed: Iterable[str] = ()) -> Tuple[FrozenSet[str], bool, bool]:
    """The Host names a server bound to ``bind_host`` answers to: ``(names, any_ip, any_name)``.

    Bound to a loopback address (or ``localhost``): ``localhost``, ``127.0.0.1`` and ``::1``. Bound to one
    address or name: that one. Bound to every address (``0.0.0.0``, ``::``): any IP address (a rebinding
    attack needs a name it controls, never an address), ``localhost`` and this machine's host name. Then the
    ``allowed`` names: exact names, ``.example.com`` for a domain and its subdomains, ``*`` for any.
    """
    bind = _bare(bind_host)
    names = {bind}
    wildcard = bind in ("", "0.0.0.0", "::")
    if wildcard:
        names |= {"localhost", socket.gethostname().lower()}
    elif bind == "localhost" or _is_loopback(bind):
        names |= set(LOOPBACK_NAMES)
    extra = {_bare(a) for a in allowed}
    return frozenset(names | extra - {"*"}), wildcard, "*" in extra


def check_origins(origins: Iterable[str]) -> List[str]:
    """``--cors-origins`` entries normalised (``scheme://host[:port]``, lower case), or ``*``; a ``ValueError``
    naming an entry that is not an origin."""
    out = []
    for origin in origins:
        o = origin.strip().rstrip("/").lower()
        parts = urlsplit(o)
        if o != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query):
            raise ValueError(f"--cors-origins: {origin!r} is not an origin: give scheme://host[:port] "
                             "(e.g. http://localhost:3000), or * for any")
        out.append(o)
    return out


class HostAndOrigin:
    """ASGI middleware: refuses a Host this server does not answer to and a foreign Origin that is not allowed
    (403); answers CORS preflights from allowed origins and marks their responses readable."""

    def __init__(self, app: ASGIApp, error: ErrorResponse, bind_host: str, allowed_hosts: Iterable[str] = (),
                 cors_origins: Iterable[str] = ()):
        self.app, self.error = app, error
        self.names, self.any_ip, self.any_name = host_names(bind_host, allowed_hosts)
        self.origins = frozenset(check_origins(cors_origins))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        refusal = self._refusal(host, origin, len(headers.getlist("host")))
        if refusal:
            await self.error(scope["path"], 403, refusal, None)(scope, receive, send)
            return
        cross = origin is not None and not _same_origin(origin, host)
        if not cross:
            await self.app(scope, receive, send)
        elif scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(origin, headers)(scope, receive, send)
        else:
            await self.app(scope, receive, _with_cors(send, origin))

    def _refusal(self, host: Optional[str], origin: Optional[str], hosts: int) -> Optional[str]:
        if hosts > 1:
            return "the request has several Host headers"
        if host is not None and not self._host_allowed(host):
            return (f"this server does not answer to the host name {_shown(host)} (a DNS rebinding attack sends "
                    f"one); it answers to {', '.join(sorted(self.names))}" + (", any IP address" if self.any_ip else "")
                    + ": start it with --allowed-hosts NAME to add one")
        if origin is not None and not _same_origin(origin, host) and not self._origin_allowed(origin):
            return (f"requests from web pages at {_shown(origin)} are refused (cross-site); start the server with "
                    "--cors-origins ORIGIN to allow a page's origin")
        return None

    def _host_allowed(self, host: str) -> bool:
        name = _bare(_host_name(host))
        if self.any_name or name in self.names or any(n.startswith(".") and ("." + name).endswith(n)
                                                      for n in self.names):
            return True
        return self.any_ip and _is_ip(name)

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin.lower().rstrip("/") in self.origins

    def _preflight(self, origin: str, headers: Headers) -> Response:
        """The answer to a browser asking whether a page at ``origin`` may send its request (already allowed)."""
        allow = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                 "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                 "Access-Control-Allow-Headers": headers.get("access-control-request-headers",
                                                             "Authorization, Content-Type, X-Api-Key"),
                 "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S)}
        return Response(status_code=204, headers=allow)


def _with_cors(send: Send, origin: str) -> Send:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": list(message.get("headers", [])) + [
                (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]}
        await send(message)

    return send_with_cors


def check_content_type(headers: Headers) -> Optional[str]:
    """Why a request body is refused for its content type (415), or None. JSON bodies must say
    ``application/json``; a program's request without an Origin header may also say form-encoded (curl's
    ``-d``) or nothing. A page cannot send ``application/json`` elsewhere without a preflight that only an
    allowed origin passes."""
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in JSON_TYPES or kind.endswith("+json"):
        return None
    if kind in NON_BROWSER_TYPES and "origin" not in headers:
        return None
    return (f"the request body must be sent with 'Content-Type: application/json', got {kind or 'none'!r}"
            + (" from a web page" if "origin" in headers else ""))


def _same_origin(origin: str, host: Optional[str]) -> bool:
    """Whether ``origin`` is this server's own (a page it served, such as /docs), as reached through ``host``."""
    if host is None:
        return False
    host = host.lower()
    if host.endswith(":80"):
        host = host[:-3]
    return origin.lower().rstrip("/") == f"http://{host}"


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` → ``::1``."""
    host = host.strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _bare(name: str) -> str:
    """A host name compared as DNS compares it: lower case, without brackets or a final dot."""
    return name.strip().lower().strip("[]").rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _is_loopback(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _shown(text: str) -> str:
    return repr(text[:100] + ("…" if len(text) > 100 else ""))

"""Connections that a flood cannot use to lock clients out: a deadline to send each request, and a bound on
open connections that closes the idle ones first.

uvicorn closes a connection idle *after* a response (``timeout_keep_alive``) but waits for ever for the first
request on a new connection and for a request sent a byte at a time (slowloris); its ``limit_concurrency``
answers 503 to *every* new request once connections pile up, the well-behaved included, and each open socket
holds a file descriptor until the process has none left (``RLIMIT_NOFILE``), when ``/health`` itself can no
longer be accepted. :class:`GuardedH11Protocol` adds what is missing:

- **A read deadline**: a client must send its whole request, head and body, within ``read_timeout`` seconds
  of connecting or of the end of its previous response; otherwise the connection is closed (a 408 when part
  of a head had arrived).
- **A connection bound**: past ``max_connections`` open connections, each new one closes the connection that
  has waited longest for its client's request, so a flood of idle or slow sockets only ever displaces itself
  and a client that sends its request promptly is served. Connections whose request is being answered are
  never closed; when every one is, the new connection gets a 503.

The default bound leaves room under ``RLIMIT_NOFILE`` for what the process already holds and for a burst of
accepts (asyncio accepts up to ``backlog`` connections before any is seen here).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from typing import Optional, Type

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

READ_TIMEOUT_S = 15.0  # a whole request (≤ 4 MiB) from a local editor takes milliseconds
BACKLOG = 128  # the listen queue, and so the most connections asyncio accepts at once
MAX_CONNECTIONS_CAP = 4096
_WAITING = (h11.IDLE, h11.SEND_BODY)  # the client's side while its request is still coming


def default_max_connections(backlog: int = BACKLOG) -> int:
    """Open connections that fit in this process's file descriptors: the soft ``RLIMIT_NOFILE`` less those
    open now, a burst of ``backlog`` accepts and a margin (at most :data:`MAX_CONNECTIONS_CAP`)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    # A burst of accepts can come while as many connections closed to make room still hold their descriptors
    # (a transport releases it on the loop's next turn): room for both, and a margin for the process itself.
    room = MAX_CONNECTIONS_CAP if soft == resource.RLIM_INFINITY else soft - in_use - 2 * backlog - 64
    return max(8, min(MAX_CONNECTIONS_CAP, room))


class _AcceptErrors(logging.Filter):
    """asyncio logs each failed ``accept()`` (no descriptor left: EMFILE) with a traceback and tries again a
    second later; the server says it once a second, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "socket.accept() out of system resource" not in record.getMessage():
            return True
        now = time.monotonic()
        if now - getattr(self, "said", -1e9) < 1.0:
            return False
        self.said = now
        record.msg, record.args, record.exc_info, record.exc_text = (
            "no file descriptor left to accept a connection: accepting again in a second (raise RLIMIT_NOFILE or "
            "lower --max_connections)", None, None, None)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_accept_errors() -> None:
    """Install :class:`_AcceptErrors` on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _AcceptErrors) for f in logger.filters):
        logger.addFilter(_AcceptErrors())


def guarded_protocol(read_timeout: float = READ_TIMEOUT_S, max_connections: Optional[int] = None) -> Type[H11Protocol]:
    """uvicorn's h11 protocol with a read deadline and a connection bound (:func:`default_max_connections`
    when None); pass it as ``uvicorn.Config(http=...)``."""
    if not read_timeout > 0:
        raise ValueError(f"read_timeout must be a positive number of seconds, got {read_timeout!r}")
    quiet_accept_errors()
    if max_connections is None:
        max_connections = default_max_connections()
    if not isinstance(max_connections, int) or max_connections < 1:
        raise ValueError(f"max_connections must be a positive integer, got {max_connections!r}")
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"read_timeout": float(read_timeout), "max_connections": max_connections})


class GuardedH11Protocol(H11Protocol):
    """One connection (see the module's docstring); ``read_timeout`` and ``max_connections`` are set by
    :func:`guarded_protocol`."""

    read_timeout = READ_TIMEOUT_S
    max_connections = MAX_CONNECTIONS_CAP

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = None
        self._wait_for_request()
        self._make_room()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting():
            self._wait_for_request()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)

    def _waiting(self) -> bool:
        """Whether the client still owes its request (nothing yet, part of its head, or part of its body)."""
        return self.conn.their_state in _WAITING

    def _wait_for_request(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self.waiting_since = time.monotonic()
        self._deadline = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _read_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._waiting():
            return  # its request arrived: it is answered; the next one gets a new deadline
        self._close(b"408 Request Timeout" if self._partial_head() else None)

    def _partial_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])

    def _make_room(self) -> None:
        """Past the bound, close the connection that has waited longest for its request (this new one last)."""
        if len(self.connections) <= self.max_connections:  # those closing still counted: an upper bound
            return
        open_now = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_now) <= self.max_connections:
            return
        waiting = [c for c in open_now if c is not self and isinstance(c, GuardedH11Protocol) and c._waiting()]
        if waiting:
            oldest = min(waiting, key=lambda c: c.waiting_since)
            oldest._close(b"408 Request Timeout" if oldest._partial_head() else None)
        else:
            self._close(b"503 Service Unavailable")

    def _close(self, status: Optional[bytes]) -> None:
        """Close the connection, first telling a client that is not mid-response why (before h11 has a request,
        it cannot write a response: the bytes are written as they are)."""
        if status is not None and self.conn.our_state is h11.IDLE:
            self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()  # connection_lost follows: a request still reading its body sees the client gone


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (not yet listening), as uvicorn binds one; an ``OSError`` with
    one line saying what failed, before anything slow (loading the model) has been done."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reasons = {errno.EADDRINUSE: "the address is already in use (another server? pick another --port, or --port 0 "
                                     "for any free one)",
                   errno.EADDRNOTAVAIL: "this machine has no such address",
                   errno.EACCES: "permission denied (ports below 1024 need privileges)"}
        reason = reasons.get(e.errno, e.strerror or str(e))
        error = OSError(f"cannot listen on {host}:{port}: {reason}")
        error.errno = e.errno
        raise error from None
    sock.set_inheritable(True)
    return sock

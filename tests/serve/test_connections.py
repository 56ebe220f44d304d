"""A flood of connections against ``python -m codellama.serve`` run as a user runs it, with real sockets:
idle and slowloris sockets beyond the process's file descriptors must not lock out a well-behaved client,
and incomplete requests are closed after ``--read_timeout``; a port in use is one line before any loading."""

import os
import resource
import socket
import subprocess
import sys
import time

import httpx
import pytest
from test_serve import make_service, running
from test_serve_process import _wait_for_url

from conftest import ROOT

FD_LIMIT = 1024
IDLE, SLOW = 1100, 320  # more idle sockets than the server has descriptors, and a slowloris crowd
READ_TIMEOUT = 3


def _limit_fds():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def _room_for_sockets(n: int) -> None:
    """This process needs ``n`` descriptors for its own end of the sockets: raise its soft limit, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"needs {n} file descriptors for the client sockets; RLIMIT_NOFILE's hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def _connect(port: int, first: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if first:
        s.sendall(first)
    return s


def _closed_by_server(s: socket.socket) -> bool:
    """Whether the server closed ``s`` (possibly after a 408); False while it is still open."""
    s.setblocking(False)
    try:
        data = s.recv(4096)
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


@pytest.mark.slow
def test_a_flood_of_idle_and_slow_connections_does_not_lock_out_a_client():
    """1,100 idle and 320 slowloris sockets against a server with 1,024 descriptors: /health and a completion
    are answered at once, and every one of those sockets is closed (those the kernel held in its accept queue
    only once accepted, which its SYN-ACK retries delay by seconds)."""
    _room_for_sockets(IDLE + SLOW + 200)
    proc = subprocess.Popen([sys.executable, "-m", "codellama.serve", "--port", "0", "--max_seq_len", "128",
                             "--max_batch_size", "1", "--read_timeout", str(READ_TIMEOUT)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_limit_fds, env={**os.environ, "OMP_NUM_THREADS": "1"})
    idle, slow = [], []
    try:
        url, log = _wait_for_url(proc)
        port = int(url.rsplit(":", 1)[1])
        began = time.monotonic()
        idle = [_connect(port) for _ in range(IDLE)]  # connect and say nothing
        slow = [_connect(port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n") for _ in range(SLOW)]
        for s in slow:  # a header line a second: never a whole request
            s.sendall(b"X-a: b\r\n")
        answered = []
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(3):
                t = time.monotonic()
                assert http.get("/health").json() == {"status": "ok"}
                body = {"prompt": "import os\n", "max_tokens": 4, "temperature": 0}
                assert http.post("/v1/completions", json=body).json()["choices"][0]["finish_reason"]
                answered.append(time.monotonic() - t)
                for s in slow[:50]:
                    try:
                        s.sendall(b"X-b: c\r\n")
                    except OSError:
                        pass  # already closed to make room
        assert max(answered) < 5, answered
        pending = idle + slow
        while pending and time.monotonic() - began < READ_TIMEOUT + 20:
            time.sleep(0.5)
            pending = [s for s in pending if not _closed_by_server(s)]
        assert not pending, f"{len(pending)} connections outlived --read_timeout {READ_TIMEOUT}"
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/health").status_code == 200  # and the server is still whole
    finally:
        for s in idle + slow:
            s.close()
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
    log += out
    assert "Traceback" not in log, log[-3000:]


def test_a_port_in_use_is_one_line_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "codellama.serve", "--port", str(port)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr  # the bundled model's notice: never printed
    assert lines[0] == f"error: cannot listen on 127.0.0.1:{port}: the address is already in use (another server? " \
                       "pick another --port, or --port 0 for any free one)"


def test_idle_and_incomplete_connections_make_room_and_time_out():
    """In process, with a bound of 16 connections and a 1 s deadline: 40 idle or half-sent connections only
    displace one another, a client is answered at once, each is closed (408 when it had begun a request), and a
    slow client that sends its whole request in time is answered."""
    from codellama import Llama
    tiny = Llama.build(max_seq_len=64, max_batch_size=1, device="cpu")
    with running(make_service(tiny, max_batch_size=1), read_timeout=1.0, max_connections=16) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        began = time.monotonic()
        crowd = [_connect(port, b"GET /health HTTP/1.1\r\n" if i % 2 else b"") for i in range(40)]
        with httpx.Client(base_url=srv.url, timeout=5) as http:
            assert http.get("/health").status_code == 200
        assert time.monotonic() - began < 1.0  # answered before any deadline, by making room
        closed_early = sum(_closed_by_server(s) for s in crowd)
        assert closed_early >= 40 - 16 + 1, closed_early  # room was made: the oldest went first
        patient = _connect(port, b"GET /health HTTP/1.1\r\n")
        time.sleep(0.5)
        patient.sendall(b"Host: localhost\r\n\r\n")  # within the deadline
        patient.settimeout(5)
        assert patient.recv(100).startswith(b"HTTP/1.1 200")
        time.sleep(1.5)
        assert all(_closed_by_server(s) for s in crowd)
        late = _connect(port, b"GET /health HTTP/1.1\r\n")
        late.settimeout(5)
        assert late.recv(100).startswith(b"HTTP/1.1 408")  # a head begun and not finished
        for s in crowd + [patient, late]:
            s.close()

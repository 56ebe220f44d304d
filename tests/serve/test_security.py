"""What a web page, a local user without the key and a forged request can do to the server, over real sockets:
DNS rebinding (Host), cross-site requests (Origin, CORS preflights, content types), the API key (Bearer or
X-Api-Key, never empty), and an access log that a path cannot forge lines in."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys

import httpx
import pytest
from test_serve import NAME, make_service, running, wait_until

from codellama import Llama
from codellama.serve.app import create_app
from codellama.serve.security import check_api_key, check_origins, host_names
from conftest import ROOT

SMALL = {"model": NAME, "prompt": "x", "max_tokens": 1}


@pytest.fixture(scope="module")
def tiny():
    return Llama.build(max_seq_len=128, max_batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def srv(tiny):
    with running(make_service(tiny, max_batch_size=2), cors_origins=["http://localhost:3000"]) as handle:
        yield handle


@pytest.fixture
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# ----------------------------------------------------------------------------- DNS rebinding
def test_only_the_bound_address_names_are_answered(srv, http):
    p = port(srv.url)
    for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", "LOCALHOST", "localhost."):
        assert http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example", f"attacker.example:{p}", "127.0.0.1.nip.io", "localhost.attacker.example",
                 "10.0.0.1"):
        for method, path, body in [("GET", "/v1/models", None), ("GET", "/health", None),
                                   ("POST", "/v1/completions", SMALL), ("POST", "/api/generate", SMALL)]:
            r = http.request(method, path, json=body, headers={"Host": host})
            assert r.status_code == 403 and "--allowed-hosts" in r.text, (host, path, r.text)
    r = http.post("/api/generate", json=SMALL, headers={"Host": "attacker.example"})
    assert "does not answer to the host name 'attacker.example'" in r.json()["error"]  # Ollama's shape


def test_allowed_hosts_and_what_each_bind_answers_to(tiny):
    names, any_ip, any_name = host_names("127.0.0.1")
    assert names == {"127.0.0.1", "localhost", "::1"} and not any_ip and not any_name
    names, any_ip, _ = host_names("0.0.0.0")  # every address: any IP (a rebinding needs a name), localhost, us
    assert {"localhost", socket.gethostname().lower()} <= names and any_ip and "attacker.example" not in names
    assert host_names("192.168.1.5")[0] == {"192.168.1.5"}
    assert host_names("127.0.0.1", ["*"])[2]
    with running(make_service(tiny, max_batch_size=1), allowed_hosts=["codellama.lan", ".corp.example"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        for host, status in [("codellama.lan", 200), ("CodeLlama.lan:8000", 200), ("corp.example", 200),
                             ("gpu.corp.example", 200), ("evilcorp.example", 403), ("localhost", 200)]:
            assert http.get("/v1/models", headers={"Host": host}).status_code == status, host


# ----------------------------------------------------------------------------- cross-site requests
def test_a_foreign_web_page_is_refused(srv, http):
    """What a page at another origin can make a browser send without a preflight: a text/plain or form POST.
    Refused for its Origin, whatever its type; the server's own origin (its /docs page) is not foreign."""
    body = '{"model": "codellama-tiny", "prompt": "x", "max_tokens": 1}'
    for origin in ("http://attacker.example", "null", "http://localhost:3001", "https://localhost:3000"):
        for kind in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
            r = http.post("/v1/completions", content=body, headers={"Origin": origin, "Content-Type": kind})
            assert r.status_code == 403 and "--cors-origins" in r.json()["error"]["message"], (origin, kind)
            assert "access-control-allow-origin" not in r.headers
        preflight = http.options("/v1/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    own = http.post("/v1/completions", json=SMALL, headers={"Origin": srv.url})
    assert own.status_code == 200 and "access-control-allow-origin" not in own.headers


def test_an_allowed_origin_gets_cors_as_a_browser_needs(srv, http):
    """``--cors-origins http://localhost:3000``: the preflight is answered (methods, the headers asked for,
    how long to keep it), and the response is readable by that page."""
    origin = "http://localhost:3000"
    preflight = http.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204
    h = preflight.headers
    assert h["access-control-allow-origin"] == origin and "POST" in h["access-control-allow-methods"]
    assert h["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert int(h["access-control-max-age"]) > 0 and h["vary"] == "Origin"
    r = http.post("/v1/completions", json=SMALL, headers={"Origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    with http.stream("POST", "/v1/completions", json={**SMALL, "stream": True}, headers={"Origin": origin}) as s:
        assert s.headers["access-control-allow-origin"] == origin  # streams too
    plain = http.post("/v1/completions", content=b'{"prompt": "x"}',
                      headers={"Origin": origin, "Content-Type": "text/plain"})
    assert plain.status_code == 415  # even an allowed page sends JSON as JSON


def test_the_preflight_needs_no_key_but_the_request_does(tiny):
    with running(make_service(tiny, max_batch_size=1), api_key="k", cors_origins=["*"]) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        origin = "https://any.example"
        preflight = http.options("/v1/models", headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
        assert preflight.status_code == 204
        refused = http.get("/v1/models", headers={"Origin": origin})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
        assert http.get("/v1/models", headers={"Origin": origin, "X-Api-Key": "k"}).status_code == 200


def test_bodies_must_say_json_except_from_programs(http):
    """A browser names the page's origin on every POST; a program (curl -d, a bare request) does not, and may
    send form-encoded or untyped JSON. Anything else, or a non-JSON type with an Origin, is 415."""
    body = b'{"model": "codellama-tiny", "prompt": "x", "max_tokens": 1}'
    for kind, status in [("application/json", 200), ("application/json; charset=utf-8", 200),
                         ("application/vnd.api+json", 200), ("application/x-www-form-urlencoded", 200),
                         (None, 200), ("text/plain", 415), ("text/plain;charset=UTF-8", 415),
                         ("multipart/form-data; boundary=x", 415)]:
        r = http.post("/v1/completions", content=body, headers={"Content-Type": kind} if kind else {})
        assert r.status_code == status, (kind, r.text)
    r = http.post("/api/generate", content=body, headers={"Content-Type": "text/plain"})
    assert "Content-Type: application/json" in r.json()["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_documented_curl_commands_work(srv):
    """docs/server.md's examples, run as written: ``curl -d`` says form-encoded, which a program may send."""
    commands = [shlex.split(line) for line in (ROOT / "docs" / "server.md").read_text().splitlines()
                if line.startswith("curl ")]
    assert len(commands) >= 10
    for command in commands:
        command = [srv.url + a[len("http://127.0.0.1:8000"):] if a.startswith("http://127.0.0.1:8000") else a
                   for a in command]
        out = subprocess.run(command[:1] + ["-sS", "--max-time", "120"] + command[1:], capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0 and out.stdout and '"error"' not in out.stdout, (command, out.stdout[:300])


# ----------------------------------------------------------------------------- the API key
def test_x_api_key_and_bearer_are_both_accepted(tiny):
    with running(make_service(tiny, max_batch_size=1), api_key="s3cret") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        for headers, status in [({"Authorization": "Bearer s3cret"}, 200), ({"X-Api-Key": "s3cret"}, 200),
                                ({"X-Api-Key": "wrong"}, 401), ({"X-Api-Key": "Bearer s3cret"}, 401),
                                ({"Authorization": "Bearer undefined", "X-Api-Key": "s3cret"}, 200),  # Continue
                                ({"Authorization": "Bearer s3cret", "X-Api-Key": ""}, 200), ({}, 401)]:
            assert http.get("/v1/models", headers=headers).status_code == status, headers
        assert "X-Api-Key" in http.get("/v1/models").json()["error"]["message"]


def test_an_empty_key_is_refused(tiny):
    for key in ("", "   "):
        with pytest.raises(ValueError, match="is empty"):
            check_api_key(key)
        with pytest.raises(ValueError, match="empty"):
            create_app(make_service(tiny, max_batch_size=1), api_key=key)
    with pytest.raises(ValueError, match="printable ASCII"):
        check_api_key("key\n")
    assert check_api_key(None) is None and check_api_key("k") == "k"
    with pytest.raises(ValueError, match="not an origin"):
        check_origins(["localhost:3000"])
    assert check_origins(["HTTP://LocalHost:3000/", "*"]) == ["http://localhost:3000", "*"]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_command_refuses_an_empty_key_before_loading(how):
    """``--api-key "$KEY"`` with ``$KEY`` unset, or ``CODELLAMA_API_KEY=`` set empty: one line, status 2, and
    no model loaded (the bundled model's notice never printed)."""
    env = {**os.environ, "CODELLAMA_API_KEY": ""} if how == "environment" else {
        k: v for k, v in os.environ.items() if k != "CODELLAMA_API_KEY"}
    args = ["--api-key", ""] if how == "flag" else []
    r = subprocess.run([sys.executable, "-m", "codellama.serve", "--port", "0", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: ") and "empty" in r.stderr
    assert ("--api-key" if how == "flag" else "$CODELLAMA_API_KEY") in r.stderr


# ----------------------------------------------------------------------------- the access log
def test_a_path_cannot_forge_log_lines_or_write_escapes(srv, caplog):
    """``%0d%0a`` would end the line and start a forged one; ``%1b[`` would drive the terminal."""
    with caplog.at_level("INFO", logger="codellama.serve"):
        with socket.create_connection(("127.0.0.1", port(srv.url))) as s:
            s.sendall(b"GET /x%0d%0aGET%20/v1/admin%20200%20-%200.001s%1b[2J\\x41 HTTP/1.1\r\nHost: localhost\r\n"
                      b"Connection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 404")
        wait_until(lambda: any("/x" in r.getMessage() for r in caplog.records if r.name == "codellama.serve"))
    [line] = [r.getMessage() for r in caplog.records if r.name == "codellama.serve" and "/x" in r.getMessage()]
    assert "\r" not in line and "\n" not in line and "\x1b" not in line
    assert line.startswith("GET /x\\r\\nGET /v1/admin 200 - 0.001s\\x1b[2J\\\\x41 404 - ")
    assert re.fullmatch(r".* 404 - \d+\.\d{3}s", line)

"""``python -m codellama.serve`` as a user runs it: one command, the bundled model, a clean stop on SIGINT/SIGTERM
with the in-flight stream ending on a final event; and the package's place in the layering."""

import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT

# What the server may use of the library (at module level): the engine and what builds it, never the reverse.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_server_runs_in_one_command_and_stops_cleanly_on_a_signal(sig):
    proc = subprocess.Popen([sys.executable, "-m", "codellama.serve", "--port", "0", "--max_seq_len", "256"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, log = _wait_for_url(proc)
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").json() == {"status": "ok"}
            body = {"prompt": "import os\n", "max_tokens": 250, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                proc.send_signal(sig)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and "shutting down" in rest[-2], rest[-3:]
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    log += out
    assert proc.returncode in (0, -sig), log  # uvicorn re-raises the signal it caught once it has stopped
    assert "Traceback" not in log, log
    assert re.search(r"POST /v1/completions 200 prompt=\d+ cached=\d+ completion=\d+ ", log), log


def _wait_for_url(proc: subprocess.Popen, timeout: float = 60.0):
    """The address uvicorn prints once it is listening (``--port 0`` picks a free one), and the log so far."""
    deadline, log = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log += line
        found = re.search(r"Uvicorn running on (http://\S+)", line)
        if found:
            return found.group(1), log
    raise AssertionError(f"the server did not start:\n{log}")


def test_a_bad_checkpoint_is_one_line_and_status_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "codellama.serve", "--ckpt_dir", str(tmp_path / "missing")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr



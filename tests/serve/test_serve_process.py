"""``python -m codellama.serve`` as a user runs it: one command, the bundled model, a clean stop on SIGINT/SIGTERM
with the in-flight stream ending on a final event; and the package's place in the layering."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from codellama import Llama, ModelArgs
from codellama.checkpoint import BUNDLED_CKPT_DIR
from codellama.testing import write_checkpoint
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




@pytest.mark.distributed
def test_tensor_parallel_server_under_torchrun_answers_like_one_process(tmp_path):
    """Two gloo ranks: rank 0 serves and schedules, rank 1 follows; concurrent answers equal one process's, and
    SIGTERM to torchrun stops both ranks cleanly (rank 0 releases rank 1, nothing is left running)."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=4096, multiple_of=64, rope_theta=1e6)
    ckpt = write_checkpoint(tmp_path / "ckpt", args, "meta", seed=5, shards=2,
                            tokenizer=os.path.join(BUNDLED_CKPT_DIR, "tokenizer.model"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(master_port),
           "-m", "codellama.serve", "--ckpt_dir", ckpt, "--port", "0", "--max_seq_len", "128", "--max_batch_size", "2",
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prompts = ["def f(x):", "import os\n", "class A:\n    def"]
    got = {}
    try:
        url, log = _wait_for_url(proc, timeout=180)
        with httpx.Client(base_url=url, timeout=60) as http:
            def ask(i):
                body = {"prompt": prompts[i], "max_tokens": 10, "temperature": 0}
                got[i] = http.post("/v1/completions", json=body).json()["choices"][0]["text"]

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]  # 3 requests, 2 slots
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
        proc.wait()
    log += out
    llama = Llama.build(ckpt, max_seq_len=128, max_batch_size=1, device="cpu")
    for i, prompt in enumerate(prompts):
        [tokens], _ = llama.generate([llama.tokenizer.encode(prompt, bos=True, eos=False)], 10, temperature=0)
        assert got[i] == llama.tokenizer.decode_infilling(tokens), i
    assert "Finished server process" in log, log
    assert "[rank" not in log and "codellama/" not in log, log  # no rank failed (torchrun's own SIGTERM report aside)
    left = subprocess.run(["pgrep", "-f", ckpt], capture_output=True, text=True).stdout
    assert not left.strip(), left

"""A stuck rank makes the others fail with a message naming the rank and the timeout, instead of a hang."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from codellama.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, collective_timeout

from conftest import ROOT
from test_distributed import free_port

pytestmark = pytest.mark.distributed

# Each rank builds the bundled model split in two; rank 1 then stops itself (SIGSTOP: alive, connections
# open, silent) while rank 0 generates, so rank 0's first collective waits for a rank that never answers.
WORKER = """
import os, signal, time
from codellama import Llama
llama = Llama.build(None, max_seq_len=32, max_batch_size=1, device="cpu")
if os.environ["RANK"] == "1":
    os.kill(os.getpid(), signal.SIGSTOP)
start = time.monotonic()
try:
    llama.generate([[1, 2, 3]], 4, temperature=0)
finally:
    print(f"gave up after {time.monotonic() - start:.1f} s", flush=True)
"""


def test_a_stopped_rank_makes_the_other_fail_within_the_timeout():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", TIMEOUT_ENV: "3", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in (0, 1)]
    try:
        out, err = ranks[0].communicate(timeout=120)
    finally:
        for p in ranks:
            p.kill()  # rank 1 is stopped: only SIGKILL ends it
            p.wait()
    assert ranks[0].returncode != 0
    waited = float(out.split("gave up after ")[1].split(" s")[0])
    assert 2.5 < waited < 30, out
    message = err.strip().splitlines()[-1]
    assert re.search(r"TimeoutError: rank 0 of 2: \w+ got no answer", message), err[-2000:]
    assert f"within 3 s ({TIMEOUT_ENV})" in message


def test_collective_timeout_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT_S == 600
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout() == 90.0 and collective_timeout(5) == 5.0
    for bad in ("soon", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{TIMEOUT_ENV} must be a positive number of seconds"):
            collective_timeout()
    with pytest.raises(ValueError, match=r"timeout_s must be a positive number of seconds \(e.g. 600\), got True"):
        collective_timeout(True)

"""The sandbox: hostile and broken programs are contained, time-bounded and reported; the harness survives."""

import os
import signal
import subprocess
import sys
import time

import pytest

from codellama.evaluate.guard import RESULT_PREFIX
from codellama.evaluate.sandbox import Limits, Outcome, _verdict, active_layers, run_program, run_programs

FAST = Limits(timeout_s=2.0)


@pytest.fixture(scope="module")
def layers():
    return active_layers(FAST)


@pytest.fixture
def canary_process():
    """A process standing in for the harness, whose survival the kill tests check."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _gone(pid: int, within_s: float = 3.0) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_layers_include_limits_and_guard(layers):
    assert {"session", "tempdir", "scrubbed-env", "rlimits", "guard"} <= set(layers)


@pytest.mark.parametrize("program, reason, detail", [
    ("assert sum([1, 2]) == 3\n", "passed", ""),
    ("assert 1 + 1 == 3, 'arithmetic'\n", "failed", "AssertionError: arithmetic"),
    ("def f(:\n", "error", "SyntaxError"),
    ("raise KeyError('k')\n", "error", "KeyError"),
    ("import sys\nsys.exit(0)\n", "error", "SystemExit"),  # leaving early is not passing
    ("import os\nos._exit(0)\n", "error", "os._exit is disabled"),
    ("import ctypes\n", "error", "ctypes"),
    ("input()\n", "error", "EOFError"),  # no stdin
])
def test_verdicts(program, reason, detail):
    outcome = run_program(program, FAST)
    assert outcome.reason == reason, outcome
    assert detail in outcome.detail
    assert outcome.passed == (reason == "passed")


def test_infinite_loop_times_out_on_time():
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.0))
    assert outcome == Outcome("timed out", "exceeded the 1 s wall-clock limit")
    assert time.monotonic() - start < 3.0


def test_sleeping_program_times_out():
    outcome = run_program("import time\ntime.sleep(30)\n", Limits(timeout_s=1.0))
    assert outcome.reason == "timed out"


@pytest.mark.parametrize("program", [
    "x = bytearray(64 * 2**30)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n",
])
def test_memory_bomb_is_contained(program):
    start = time.monotonic()
    outcome = run_program(program, Limits(timeout_s=10.0, memory_mb=256))
    assert outcome.reason == "error" and "MemoryError" in outcome.detail, outcome
    assert time.monotonic() - start < 8.0


@pytest.mark.parametrize("program, blocked", [
    ("import os\nwhile True:\n    os.fork()\n", "os.fork"),
    ("import os\nwhile True:\n    os.system(':')\n", "os.system"),
    ("import subprocess\nsubprocess.Popen(['sleep', '100'])\n", "subprocess"),
    ("import multiprocessing\nmultiprocessing.Process(target=print).start()\n", "os.fork"),
    ("import os\nos.posix_spawn('/bin/sh', ['sh'], {})\n", "os.posix_spawn"),
])
def test_fork_bomb_and_process_creation_are_refused(program, blocked):
    outcome = run_program(program, FAST)
    assert outcome.reason == "error" and blocked in outcome.detail, outcome


def test_kill_of_the_harness_is_refused(canary_process):
    # The first kill would end this very test process if it got through.
    for target in (os.getpid(), canary_process.pid):
        outcome = run_program(f"import os, signal\nos.kill({target}, signal.SIGKILL)\n", FAST)
        assert outcome.reason == "error" and "os.kill" in outcome.detail, outcome
    outcome = run_program("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, 9)\n", FAST)
    assert outcome.reason == "error" and "os.kill" in outcome.detail
    time.sleep(0.2)
    assert canary_process.poll() is None, "the canary standing in for the harness was killed"


def test_kill_without_the_guard_cannot_see_the_harness(layers, canary_process):
    if "pidns" not in layers:
        pytest.skip(f"no PID namespace on this machine (layers: {layers})")
    outcome = run_program(f"import os\nos.kill({canary_process.pid}, 9)\n", FAST, guard=False)
    assert outcome.reason == "error" and "ProcessLookupError" in outcome.detail, outcome
    assert canary_process.poll() is None


@pytest.mark.parametrize("program", [
    "import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=1)\n",
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.sendto(b'x', ('8.8.8.8', 53))\n",
    "import urllib.request\nurllib.request.urlopen('http://93.184.216.34/', timeout=1)\n",
])
def test_network_is_refused(program):
    outcome = run_program(program, FAST)
    assert outcome.reason == "error" and "socket" in outcome.detail, outcome


def test_network_namespace_has_no_route_without_the_guard(layers):
    if "netns" not in layers:
        pytest.skip(f"no network namespace on this machine (layers: {layers})")
    outcome = run_program("import socket\nsocket.create_connection(('93.184.216.34', 80), timeout=1)\n", FAST,
                          guard=False)
    assert outcome.reason == "error" and "unreachable" in outcome.detail.lower(), outcome


@pytest.mark.parametrize("attack", [
    "import os\nos.remove({file!r})\n",
    "import os\nos.unlink({file!r})\n",
    "import os\nos.rename({file!r}, 'stolen')\n",
    "import shutil\nshutil.rmtree({folder!r})\n",
    "import shutil\nshutil.move({file!r}, 'stolen')\n",
    "import pathlib\npathlib.Path({file!r}).unlink()\n",
    "import pathlib\npathlib.Path({file!r}).write_text('gone')\n",
    "open({file!r}, 'w').close()\n",
    "import os\nos.truncate({file!r}, 0)\n",
    "import os\nos.chmod({file!r}, 0)\n",
    "import os\nos.close(os.open({file!r}, os.O_WRONLY | os.O_TRUNC))\n",
    "import os\nos.system('rm -f {file}')\n",
    "import subprocess\nsubprocess.run(['rm', '-f', {file!r}])\n",
    "import os\nos.symlink({file!r}, 'link')\nopen('link', 'w').close()\n",
    "import os\nos.chdir({folder!r})\nos.remove('precious.txt')\n",
])
def test_files_outside_the_sandbox_are_untouched(tmp_path, attack):
    folder = tmp_path / "outside"
    folder.mkdir()
    file = folder / "precious.txt"
    file.write_text("keep me")
    file.chmod(0o644)
    outcome = run_program(attack.format(file=str(file), folder=str(folder)), FAST)
    assert outcome.reason == "error" and "SandboxViolation" in outcome.detail, outcome
    assert file.read_text() == "keep me"
    assert file.stat().st_mode & 0o777 == 0o644


def test_files_inside_the_sandbox_are_allowed():
    program = ("import os, shutil, tempfile, pathlib\n"
               "open('a.txt', 'w').write('x')\nos.rename('a.txt', 'b.txt')\nos.makedirs('d/e')\n"
               "pathlib.Path('d/e/f').write_text('y')\nshutil.rmtree('d')\nos.remove('b.txt')\n"
               "with tempfile.NamedTemporaryFile() as f:\n    f.write(b'z')\n"
               "assert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')\n"
               "import json\nassert json.loads('[1]') == [1]\n")
    assert run_program(program, FAST) == Outcome("passed")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    program = "import os\nassert 'SECRET_TOKEN' not in os.environ, 'leaked'\nassert os.getcwd() == os.environ['HOME']\n"
    assert run_program(program, FAST) == Outcome("passed")


def test_the_child_runs_on_the_standard_library_only():
    # The runner must never import codellama (and so torch): that would cost seconds per program.
    program = ("import sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('codellama', 'torch')]\n"
               "assert not any('site-packages' in p for p in sys.path), sys.path\n")
    assert run_program(program, FAST) == Outcome("passed")


def test_output_flood_is_bounded():
    start = time.monotonic()
    outcome = run_program("import sys\nwhile True:\n    sys.stderr.write('x' * 100000)\n",
                          Limits(timeout_s=5.0, file_size_mb=1))
    assert outcome.reason == "error"
    outcome = run_program("f = open('big', 'w')\nwhile True:\n    f.write('x' * 100000)\n",
                          Limits(timeout_s=5.0, file_size_mb=1))
    assert outcome.reason == "error" and "File too large" in outcome.detail, outcome
    assert time.monotonic() - start < 5.0


def test_left_behind_processes_are_killed(layers, tmp_path):
    # Without the guard, a child that starts its own session escapes the process-group kill; the PID
    # namespace still ends it when the program's process exits.
    if "pidns" not in layers:
        pytest.skip(f"no PID namespace on this machine (layers: {layers})")
    pid_file = tmp_path / "escapee.pid"
    program = (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n"
               f"    open({str(pid_file)!r}, 'w').write(os.readlink('/proc/self'))\n"
               f"    time.sleep(60)\n    os._exit(0)\n"
               f"while not os.path.exists({str(pid_file)!r}):\n    time.sleep(0.01)\n")
    assert run_program(program, FAST, guard=False).passed
    pid = int(pid_file.read_text())
    assert _gone(pid), f"process {pid} outlived its sandbox"


def test_pool_runs_all_and_keeps_indices():
    programs = ["assert True\n", "assert False\n", "while True: pass\n", "raise ValueError\n"] * 2
    results = dict(run_programs(programs, Limits(timeout_s=1.0), workers=2))
    assert sorted(results) == list(range(8))
    assert [results[i].reason for i in range(4)] == ["passed", "failed", "timed out", "error"]
    assert [results[i] for i in range(4)] == [results[i + 4] for i in range(4)]


def test_harness_does_not_die_from_signals_to_its_group():
    # The program's process group is its own session's: signalling group 0 reaches only the sandbox.
    outcome = run_program("import signal\nsignal.raise_signal(signal.SIGKILL)\n", FAST)
    assert outcome.reason == "error" and "SIGKILL" in outcome.detail, outcome


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("inf")}, "timeout_s"),
    ({"memory_mb": 0}, "memory_mb"), ({"memory_mb": 32}, "memory_mb"), ({"max_processes": -1}, "max_processes"),
])
def test_limits_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Limits(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="program must be a str"):
        run_program(b"pass")
    with pytest.raises(ValueError, match="workers"):
        list(run_programs(["pass"], workers=0))


@pytest.mark.parametrize("code, stderr, cpu_s, reason, detail", [
    (1, RESULT_PREFIX + "AssertionError: x\n", 0.1, "failed", "AssertionError: x"),
    (1, "Traceback (most recent call last):\n", 0.1, "error", "status 1: Traceback"),  # Python's, not the runner's
    (2, RESULT_PREFIX + "ValueError: x\n", 0.1, "error", "ValueError: x"),
    (-signal.SIGXCPU, "", 2.0, "timed out", "CPU-time limit"),
    (128 + signal.SIGXCPU, "", 2.0, "timed out", "CPU-time limit"),  # passed on by the PID-namespace parent
    (-signal.SIGKILL, "", 2.1, "timed out", "CPU-time limit"),  # the hard CPU limit
    (-signal.SIGKILL, "", 0.1, "error", "SIGKILL"),
    (128 + signal.SIGSEGV, "", 0.1, "error", "SIGSEGV"),
    (-signal.SIGXFSZ, "", 0.1, "error", "file-size limit"),
    (3, "", 0.1, "error", "status 3"),
])
def test_exit_verdicts(code, stderr, cpu_s, reason, detail):
    outcome = _verdict(True, code, cpu_s, stderr, Limits(timeout_s=2.0))
    assert outcome.reason == reason and detail in outcome.detail, outcome


def test_without_pidfd_the_harness_polls(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open", raising=False)  # older kernels and Pythons
    assert run_program("assert True\n", FAST).passed
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.0)).reason == "timed out"

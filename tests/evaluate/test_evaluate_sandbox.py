"""The sandbox: verdicts, limits, what a program sees under bubblewrap, and the refusal to run without it.

Attacks written to escape are in test_sandbox_attacks.py, forged verdicts in test_sandbox_verdicts.py.
"""

import os
import signal
import time

import pytest

from codellama.evaluate import sandbox
from codellama.evaluate.sandbox import (Limits, Outcome, Program, SandboxUnavailable, _verdict, active_layers,
                                        check_isolation, run_program, run_programs)
from codellama.evaluate.seccomp import build_filter

FAST = Limits(timeout_s=2.0)
PROCESS = Limits(timeout_s=2.0, isolation="process")


def _bwrap_usable() -> bool:
    try:
        check_isolation(FAST)
        return True
    except SandboxUnavailable:
        return False


needs_bwrap = pytest.mark.skipif(not _bwrap_usable(), reason="bubblewrap cannot run here (apt-get install bubblewrap)")


def _seen(program: str, limits: Limits = FAST, guard: bool = True) -> str:
    """What a program reports about its world: it raises an exception whose message is that report."""
    outcome = run_program(program, limits, guard=guard)
    assert outcome.reason == "error" and outcome.detail.startswith("Exception: "), outcome
    return outcome.detail[len("Exception: "):]


@pytest.mark.parametrize("limits", [pytest.param(FAST, marks=needs_bwrap), PROCESS], ids=["bwrap", "process"])
@pytest.mark.parametrize("program, reason, detail", [
    ("assert sum([1, 2]) == 3\n", "passed", ""),
    ("assert 1 + 1 == 3, 'arithmetic'\n", "failed", "AssertionError: arithmetic"),
    ("def f(:\n", "error", "SyntaxError"),
    ("raise KeyError('k')\n", "error", "KeyError"),
    ("import sys\nsys.exit(0)\n", "error", "SystemExit"),  # leaving early is not passing
    ("import os\nos._exit(0)\n", "error", "exit status 0"),  # nor is an exit status of 0
    ("print('passed')\nimport os\nos._exit(0)\n", "error", "exit status 0"),  # nor a printed line
    ("import ctypes\n", "error", "importing ctypes is disabled"),
    ("input()\n", "error", "EOFError"),  # no stdin
    ("import collections, enum, logging, typing\ncollections.namedtuple('P', 'x')\nlogging.warning('w')\n"
     "enum.Enum('E', 'A B')\ntyping.TypeVar('T')\n", "passed", ""),  # frame users in the stdlib still work
])
def test_verdicts(limits, program, reason, detail):
    outcome = run_program(program, limits)
    assert outcome.reason == reason and detail in outcome.detail, outcome
    assert outcome.passed == (reason == "passed")


def test_tests_run_after_the_code_and_see_it():
    program = Program("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", entry_points=("add",))
    assert run_program(program, FAST).passed
    wrong = Program("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5, 'add'\n", entry_points=("add",))
    assert run_program(wrong, FAST) == Outcome("failed", "AssertionError: add")
    assert run_program(Program("raise ValueError('v')\n", "pass\n"), FAST) == Outcome("error", "ValueError: v")


@pytest.mark.parametrize("limits", [pytest.param(FAST, marks=needs_bwrap), PROCESS], ids=["bwrap", "process"])
def test_infinite_loop_times_out_on_time(limits):
    start = time.monotonic()
    outcome = run_program("while True:\n    pass\n", Limits(timeout_s=1.0, isolation=limits.isolation))
    assert outcome.reason == "timed out" and "exceeded the 1 s" in outcome.detail, outcome  # wall or CPU, whichever first
    assert time.monotonic() - start < 3.0
    assert run_program("import time\ntime.sleep(30)\n", Limits(timeout_s=1.0, isolation=limits.isolation)
                       ).reason == "timed out"


@needs_bwrap
@pytest.mark.parametrize("program", [
    "x = bytearray(64 * 2**30)\n",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(2**24))\n",
])
def test_memory_bomb_is_contained(program):
    start = time.monotonic()
    outcome = run_program(program, Limits(timeout_s=10.0, memory_mb=256))
    assert outcome.reason == "error" and "MemoryError" in outcome.detail, outcome
    assert time.monotonic() - start < 8.0


@needs_bwrap
def test_output_and_file_size_are_bounded():
    start = time.monotonic()
    outcome = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)\n",
                          Limits(timeout_s=5.0, output_kb=64))
    assert outcome.reason == "error" and "BrokenPipeError" in outcome.detail, outcome
    outcome = run_program("f = open('big', 'w')\nwhile True:\n    f.write('x' * 100000)\n    f.flush()\n",
                          Limits(timeout_s=5.0, file_size_mb=1))
    assert outcome.reason == "error" and ("File too large" in outcome.detail or "file-size" in outcome.detail), outcome
    assert time.monotonic() - start < 5.0


@needs_bwrap
def test_what_a_program_sees():
    # Nothing of the host but the interpreter, the system libraries and a scratch /tmp; no /proc at all.
    seen = _seen("import os, socket, sys\n"
                 "raise Exception(repr((sorted(os.listdir('/')), os.getcwd(), os.getuid(), socket.gethostname(),\n"
                 "    sorted(os.listdir(os.path.dirname(os.__file__) + '/site-packages')), os.path.exists('/proc'),\n"
                 "    sorted(os.environ), os.access('/', os.W_OK), os.access('/tmp', os.W_OK))))\n")
    listing, cwd, uid, host, site_packages, proc, env, root_writable, tmp_writable = eval(seen)
    assert not {"proc", "run", "home", "work", "var", "sys", "opt"} & set(listing), listing
    assert set(listing) <= {"dev", "etc", "lib", "lib32", "lib64", "root", "tmp", "usr"}, listing
    assert cwd == "/tmp" and host == "sandbox" and site_packages == [] and proc is False
    assert (uid != 0) == (os.geteuid() == 0)  # as root, the program runs as a uid of its own
    assert env == ["HOME", "LANG", "LC_ALL", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH",
                   "PWD", "TMPDIR"]  # PWD: bubblewrap sets it
    assert not root_writable and tmp_writable
    package = os.path.dirname(os.path.dirname(sandbox.__file__))
    assert _seen(f"import os\nraise Exception(str(os.path.exists({package!r})))\n") == "False"


@needs_bwrap
def test_seccomp_refuses_namespaces_and_ptrace():
    # Without the audit hook, so that ctypes reaches the kernel: the filter, not Python, refuses.
    program = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nout = []\n"
               "for name, call in (('unshare', lambda: libc.unshare(0x10000000)),\n"
               "                   ('setns', lambda: libc.setns(-1, 0)),\n"
               "                   ('ptrace', lambda: libc.ptrace(0, 0, 0, 0)),\n"
               "                   ('clone3', lambda: libc.syscall(435, 0, 0))):\n"
               "    result = call()\n"
               "    out.append(f'{name}={result}/{os.strerror(ctypes.get_errno())}')\n"
               "raise Exception(' '.join(out))\n")
    seen = _seen(program, guard=False)
    assert seen == ("unshare=-1/Operation not permitted setns=-1/Operation not permitted "
                    "ptrace=-1/Operation not permitted clone3=-1/Function not implemented"), seen


def test_seccomp_filter_is_well_formed():
    prog = build_filter("x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 100
    assert build_filter("aarch64") != prog
    with pytest.raises(ValueError, match=r"no seccomp filter for the mips architecture; supported: \['x86_64'"):
        build_filter("mips")


@needs_bwrap
def test_nothing_survives_a_sample(tmp_path):
    # A file written by one sample is gone for the next; nothing reached the host's /tmp.
    marker = f"codellama-survivor-{os.getpid()}"
    assert run_program(f"open('/tmp/{marker}', 'w').write('x')\nopen('{marker}', 'w').write('x')\n", FAST).passed
    assert run_program(f"import os\nassert not os.path.exists('/tmp/{marker}')\n", FAST).passed
    assert not os.path.exists(f"/tmp/{marker}")


@needs_bwrap
def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    assert run_program("import os\nassert 'SECRET_TOKEN' not in os.environ, 'leaked'\n", FAST).passed


def test_the_child_runs_on_the_standard_library_only():
    # The runner must never import codellama (and so torch): that would cost seconds per program.
    program = ("import sys\nassert not [m for m in sys.modules if m.split('.')[0] in ('codellama', 'torch')]\n"
               "assert not any('site-packages' in p for p in sys.path), sys.path\n")
    assert run_program(program, PROCESS) == Outcome("passed")


def test_pool_runs_all_and_keeps_indices():
    programs = ["assert True\n", "assert False\n", "while True: pass\n", "raise ValueError\n"] * 2
    results = dict(run_programs(programs, Limits(timeout_s=1.0, isolation="process"), workers=2))
    assert sorted(results) == list(range(8))
    assert [results[i].reason for i in range(4)] == ["passed", "failed", "timed out", "error"]
    assert [results[i].reason for i in range(4)] == [results[i + 4].reason for i in range(4)]


def test_a_lone_surrogate_is_that_programs_error():
    outcome = run_program("x = '\ud800'\n", PROCESS)
    assert outcome.reason == "error" and "not valid Unicode" in outcome.detail, outcome


# --------------------------------------------------------------------------------- no silent weak mode
def test_without_bwrap_it_refuses_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap anywhere
    with pytest.raises(SandboxUnavailable, match=r"not installed: install bubblewrap \(apt-get install bubblewrap\)"
                                                 r", or pass --isolation process"):
        run_program("pass\n", FAST)
    with pytest.raises(SandboxUnavailable):
        list(run_programs(["pass\n"], FAST))
    assert run_program("pass\n", PROCESS).passed  # the explicit weak mode still runs
    assert active_layers(PROCESS) == ["session", "tempdir", "scrubbed-env", "rlimits", "verdict-nonce", "audit-hook"]


def test_a_bwrap_that_cannot_create_namespaces_is_refused(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxUnavailable, match=r"cannot create the sandbox here \(bwrap: No permissions to create "
                                                 r"new namespace\).*apt-get install bubblewrap"):
        run_program("pass\n", FAST)
    assert "\n" not in str(pytest.raises(SandboxUnavailable, run_program, "pass\n", FAST).value)


@needs_bwrap
def test_layers_say_which_isolation_runs():
    layers = active_layers(FAST)
    assert layers[0] == "bwrap" and {"mount-ns", "pid-ns", "net-ns", "seccomp", "verdict-nonce"} <= set(layers)


# ------------------------------------------------------------------------------------ argument checks
@pytest.mark.parametrize("kwargs, match", [
    ({"timeout_s": 0}, "timeout_s"), ({"timeout_s": float("inf")}, "timeout_s"), ({"timeout_s": True}, "timeout_s"),
    ({"memory_mb": 0}, "memory_mb"), ({"memory_mb": 32}, "memory_mb"), ({"max_processes": -1}, "max_processes"),
    ({"max_processes": 2}, "max_processes"), ({"output_kb": 0}, "output_kb"),
    ({"isolation": "none"}, r"isolation must be one of \['bwrap', 'process'\]"),
])
def test_limits_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Limits(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match="program must be a str"):
        run_program(b"pass")
    with pytest.raises(ValueError, match="workers"):
        list(run_programs(["pass"], workers=0))
    with pytest.raises(ValueError, match="Program.tests must be a str"):
        Program("pass", tests=None)
    with pytest.raises(ValueError, match="entry_points must be a tuple of str"):
        Program("pass", entry_points=["f"])


@pytest.mark.parametrize("code, cpu_s, reason, detail", [
    (-signal.SIGXCPU, 2.0, "timed out", "CPU-time limit"),
    (128 + signal.SIGXCPU, 2.0, "timed out", "CPU-time limit"),  # passed on by bubblewrap
    (-signal.SIGKILL, 2.1, "timed out", "CPU-time limit"),  # the hard CPU limit
    (-signal.SIGKILL, 0.1, "error", "SIGKILL"),
    (128 + signal.SIGSEGV, 0.1, "error", "SIGSEGV"),
    (-signal.SIGXFSZ, 0.1, "error", "file-size limit"),
    (0, 0.1, "error", "exit status 0"),
    (3, 0.1, "error", "exit status 3"),
])
def test_exit_verdicts(code, cpu_s, reason, detail):
    outcome = _verdict(b"n" * 32, b"", True, code, cpu_s, "", Limits(timeout_s=2.0))
    assert outcome.reason == reason and detail in outcome.detail, outcome


def test_only_the_nonce_line_counts():
    nonce = b"a" * 32
    assert _verdict(nonce, b"x passed\n" + nonce + b" failed AssertionError: x\n", True, 0, 0.1, "",
                    FAST) == Outcome("failed", "AssertionError: x")
    assert _verdict(nonce, b"b" * 32 + b" passed \n", True, 0, 0.1, "", FAST).reason == "error"
    assert _verdict(nonce, nonce + b" passed \n", True, 0, 0.1, "", FAST) == Outcome("passed")


def test_without_pidfd_the_harness_polls(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open", raising=False)  # older kernels and Pythons
    assert run_program("assert True\n", PROCESS).passed
    assert run_program("while True:\n    pass\n", Limits(timeout_s=1.0, isolation="process")).reason == "timed out"

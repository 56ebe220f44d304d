"""The sandbox: verdicts, limits, what a program sees under bubblewrap, and the refusal to run without it.

Attacks written to escape are in test_sandbox_attacks.py, forged verdicts in test_sandbox_verdicts.py.
"""

import json
import os
import re
import signal
import site
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from codellama.evaluate import isolation, sandbox
from codellama.evaluate.sandbox import (Limits, Outcome, Program, SandboxUnavailable, _verdict, active_layers,
                                        check_isolation, run_program, run_programs)
from codellama.evaluate.seccomp import build_filter

FAST = Limits(timeout_s=2.0)
PROCESS = Limits(timeout_s=2.0, isolation="process")


def _bwrap_refusal() -> str:
    try:
        check_isolation(FAST)
        return ""
    except SandboxUnavailable as e:
        return str(e)


BWRAP_REFUSAL = _bwrap_refusal()
needs_bwrap = pytest.mark.skipif(bool(BWRAP_REFUSAL), reason=f"bubblewrap cannot run here: {BWRAP_REFUSAL}")


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


@pytest.mark.parametrize("limits", [pytest.param(FAST, marks=needs_bwrap), PROCESS], ids=["bwrap", "process"])
def test_tests_run_after_the_code_and_see_it(limits):
    program = Program("def add(a, b):\n    return a + b\n", "assert add(2, 3) == 5\n", entry_points=("add",))
    assert run_program(program, limits).passed
    wrong = Program("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5, 'add'\n", entry_points=("add",))
    assert run_program(wrong, limits) == Outcome("failed", "AssertionError: add")
    assert run_program(Program("raise ValueError('v')\n", "pass\n"), limits) == Outcome("error", "ValueError: v")


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


@needs_bwrap
def test_seccomp_refuses_memory_that_no_limit_counts():
    # Files in memory, SysV segments and queues, network sockets, larger socket buffers: refused by the
    # kernel (no audit hook). Unix sockets with their default buffers, and other socket options, still work.
    program = ("import ctypes, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\nout = []\n"
               "def call(name, fn):\n    try:\n        fn()\n        out.append(f'{name}=ok')\n"
               "    except OSError as e:\n        out.append(f'{name}={e.strerror}')\n"
               "def raw(name, *args):\n    call(name, lambda: libc.syscall(*args) == -1 and "
               "(_ for _ in ()).throw(OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))))\n"
               "a, b = socket.socketpair()\n"
               "call('memfd_create', lambda: os.memfd_create('m'))\nraw('memfd_secret', 447, 0)\n"
               "call('shmget', lambda: libc.shmget(0, 4096, 0o1600) == -1 and (_ for _ in ()).throw(OSError(ctypes.get_errno(), 'shmget: ' + os.strerror(ctypes.get_errno()))))\n"
               "call('inet', lambda: socket.socket(socket.AF_INET))\ncall('inet6', lambda: socket.socket(socket.AF_INET6))\n"
               "call('sndbuf', lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20))\n"
               "call('rcvbuf', lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20))\n"
               "call('unix', lambda: socket.socket(socket.AF_UNIX).close())\n"
               "call('passcred', lambda: a.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1))\n"
               "call('send', lambda: a.send(b'x') and b.recv(1))\n"
               "raise Exception(' '.join(out))\n")
    seen = _seen(program, guard=False)
    assert seen == ("memfd_create=Operation not permitted memfd_secret=Operation not permitted "
                    "shmget=shmget: Operation not permitted inet=Operation not permitted "
                    "inet6=Operation not permitted sndbuf=Operation not permitted rcvbuf=Operation not permitted "
                    "unix=ok passcred=ok send=ok"), seen


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


@pytest.mark.parametrize("script, cause", [
    # What bubblewrap says where the kernel, a container or AppArmor forbids its namespaces.
    ("echo 'bwrap: No permissions to creating new namespace, likely because the kernel does not allow "
     "non-privileged user namespaces.' >&2; exit 1",
     r"is installed but may not create namespaces here \(bwrap: No permissions to creating new namespace.*\): "
     r"run as root, or allow unprivileged user namespaces"),
    ("echo 'bwrap: setting up uid map: Permission denied' >&2; exit 1",
     r"may not create namespaces here \(bwrap: setting up uid map: Permission denied\)"),
    ("echo 'bwrap: Creating new namespace failed: Operation not permitted' >&2; exit 1",
     r"may not create namespaces here \(bwrap: Creating new namespace failed: Operation not permitted\)"),
    # The interpreter cannot be started inside (as when the scratch /tmp hid a virtualenv under /tmp).
    ("echo 'bwrap: execvp /tmp/venv/bin/python: No such file or directory' >&2; exit 1",
     r"set up the sandbox but could not start the interpreter .* in it \(bwrap: execvp /tmp/venv/bin/python: "
     r"No such file or directory\)"),
    ("echo 'bwrap: prctl(PR_SET_SECCOMP): Invalid argument' >&2; exit 1",
     r"cannot set up the sandbox \(bwrap: prctl\(PR_SET_SECCOMP\): Invalid argument\)"),
    ("echo \"bwrap: Can't find source path /x: Permission denied\" >&2; exit 1",
     r"cannot set up the sandbox \(bwrap: Can't find source path /x: Permission denied\)"),
    ("exit 1", r"runs, but a trivial program does not pass in its sandbox \(error: the program ended the process "
               r"\(exit status 1\)"),
])
def test_each_refusal_names_its_real_cause(monkeypatch, tmp_path, script, cause):
    fake = tmp_path / "bwrap"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxUnavailable) as refused:
        run_program("pass\n", FAST)
    message = str(refused.value)
    assert message.startswith(f"bubblewrap ({fake}) ") and "\n" not in message
    assert re.search(cause, message), message
    assert "install bubblewrap" not in message  # it is installed: never tell the user to install it
    assert message.endswith("pass --isolation process (Limits(isolation='process')) to run programs without OS "
                            "isolation")


def test_a_bwrap_that_cannot_be_started_is_refused_as_such(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/nonexistent/interpreter\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(SandboxUnavailable, match=rf"^bubblewrap \({fake}\) cannot be started \(error: could not start "
                                                 r"the sandbox: .*No such file or directory"):
        run_program("pass\n", FAST)


@pytest.mark.parametrize("prefix, executable, cause", [
    ("/", "/bin/python3", r"the interpreter's directory / holds /tmp, so mounting it would show the host's files"),
    ("/tmp", "/tmp/bin/python3", r"the interpreter's directory /tmp holds /tmp"),
    (None, "/nowhere/bin/python3", r"the interpreter /nowhere/bin/python3 lies outside its own directories"),
])
def test_an_interpreter_the_sandbox_cannot_hold_is_refused(monkeypatch, prefix, executable, cause):
    monkeypatch.setattr(isolation, "find_bwrap", lambda: "/usr/bin/bwrap")  # the layout is checked before it runs
    for name in ("prefix", "base_prefix", "exec_prefix", "base_exec_prefix"):
        if prefix is not None:
            monkeypatch.setattr(sys, name, prefix)
    monkeypatch.setattr(sys, "executable", executable)
    with pytest.raises(SandboxUnavailable, match=r"^the sandbox cannot hold this Python: " + cause):
        check_isolation(FAST)


@needs_bwrap
def test_a_virtualenv_under_tmp_runs_in_the_sandbox(tmp_path):
    # The layout of CI runners: a virtualenv in /tmp whose bin/python links to a base interpreter elsewhere.
    # Its directory is mounted read-only over the scratch /tmp, its site-packages hidden unless asked for,
    # and nothing else of the host's /tmp shows.
    assert str(tmp_path).startswith("/tmp/")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    assert python.is_symlink()
    packages = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                              capture_output=True, text=True).stdout.strip()
    assert packages.startswith(str(venv))
    with open(os.path.join(packages, "venv_marker.py"), "w") as f:
        f.write("MARK = 'from the venv'\n")
    (tmp_path / "host-file.txt").write_text("the host's /tmp")
    probe = (f"import os, sys\nassert sys.executable == {str(python)!r}, sys.executable\n"
             f"assert os.path.exists({str(venv / 'pyvenv.cfg')!r})\n"
             f"assert not os.path.exists({str(tmp_path / 'host-file.txt')!r})\n"
             f"assert os.listdir({str(tmp_path)!r}) == ['venv']\n"
             f"assert not os.access({str(venv)!r}, os.W_OK) and os.access('/tmp', os.W_OK)\n"
             "try:\n    import venv_marker\n    print('imported', venv_marker.MARK)\nexcept ImportError:\n"
             "    print('hidden')\nopen('/tmp/scratch.txt', 'w').write('x')\n"
             f"assert os.statvfs({str(venv)!r}).f_flag & os.ST_RDONLY, 'the virtualenv is writable'\n")
    script = ("import json\nfrom codellama.evaluate.sandbox import Limits, check_isolation, run_program, _execute, "
              "Program\ncheck_isolation(Limits())\nout = []\n"
              "for site_packages in (False, True):\n"
              f"    outcome, output = _execute(Program({probe!r}), Limits(timeout_s=10.0, site_packages=site_packages), "
              "True)\n    out.append([outcome.reason, outcome.detail, output.strip()])\nprint(json.dumps(out))\n")
    # The test's own packages (torch, codellama) on the path; the sandboxed programs ignore it (python -I).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + site.getsitepackages())}
    done = subprocess.run([str(python), "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    hidden, shown = json.loads(done.stdout.strip().splitlines()[-1])
    assert hidden == ["passed", "", "hidden"] and shown == ["passed", "", "imported from the venv"]


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

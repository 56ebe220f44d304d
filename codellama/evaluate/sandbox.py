"""Run untrusted programs: one subprocess each, in a fresh directory, with limits, and a worker pool.

The harness side of the sandbox. Each program is written to a new temporary directory and run there by
``guard.py`` (see its docstring for the layers inside the child) with a scrubbed environment, no stdin,
stdout discarded, and stderr in an anonymous file the program cannot reach by name. The child starts a
new session, so on a wall-clock timeout (and after every run, for anything left behind) the harness
kills the whole process group. Whatever the program does, :func:`run_program` returns an
:class:`Outcome`; it never raises because of the program. Linux only (``waitid``, ``/proc``, namespaces).
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

from .guard import EXIT_ERROR, EXIT_FAILED, EXIT_PASSED, LAYERS_PREFIX, RESULT_PREFIX

REASONS = ("passed", "failed", "timed out", "error")
GUARD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guard.py")
_STDERR_TAIL = 4096  # bytes of the child's stderr read back for the reason


@dataclass(frozen=True)
class Limits:
    """What one program may use.

    ``timeout_s`` is wall-clock; CPU time is limited to the same number of seconds (rounded up).
    ``max_processes`` is RLIMIT_NPROC, which the kernel does not apply to root. ``namespaces`` tries
    network and PID namespaces (silently skipped where the kernel refuses); ``site_packages`` lets
    programs import installed third-party packages (off: the standard library only, and a faster start).
    """

    timeout_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 16
    max_open_files: int = 64
    namespaces: bool = True
    site_packages: bool = False

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        for name in ("memory_mb", "file_size_mb", "max_processes", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb} is too small to start Python; use at least 64")
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files={self.max_open_files} is too small to start Python; use at least 16")


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``reason`` is one of :data:`REASONS`, ``detail`` says why in a few words."""

    reason: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.reason == "passed"


def _environment(workdir: str) -> dict:
    # Nothing of the harness's environment (tokens, proxies, PYTHONPATH) reaches the program.
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited, without reaping it; False after ``timeout`` seconds.

    Not reaping keeps the pid (the process group's id) reserved while the group is killed afterwards.
    A pidfd wakes up the moment the process exits; where there is none, poll with a growing interval.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(timeout * 1000))
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _execute(program: str, limits: Limits, guard_on: bool) -> Tuple[Outcome, str]:
    """Run one program; returns its outcome and the tail of its stderr."""
    settings = {"cpu_s": math.ceil(limits.timeout_s), "memory_mb": limits.memory_mb,
                "file_size_mb": limits.file_size_mb, "max_processes": limits.max_processes,
                "max_open_files": limits.max_open_files, "namespaces": limits.namespaces, "guard": guard_on}
    flags = ["-I", "-B"] + ([] if limits.site_packages else ["-S"])
    workdir = tempfile.mkdtemp(prefix="codellama-sandbox-")
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen([sys.executable, *flags, GUARD_SCRIPT, "program.py", json.dumps(settings)],
                                        cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, close_fds=True)
            except OSError as e:  # e.g. no processes left on the machine: this sample errs, the run goes on
                return Outcome("error", f"could not start the sandbox: {e}"), ""
            try:
                finished = _wait_exited(proc.pid, limits.timeout_s)
            finally:
                # On timeout this kills the program; after a normal exit, anything it left running.
                _kill_group(proc.pid)
                # wait4 rather than proc.wait(): its resource usage tells a CPU-limit kill from other kills.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)  # so that Popen never waits again
            size = err.seek(0, os.SEEK_END)
            err.seek(max(0, size - _STDERR_TAIL))
            stderr = err.read().decode("utf-8", "replace")
        return _verdict(finished, proc.returncode, usage.ru_utime + usage.ru_stime, stderr, limits), stderr
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _verdict(finished: bool, code: int, cpu_s: float, stderr: str, limits: Limits) -> Outcome:
    if not finished:
        return Outcome("timed out", f"exceeded the {limits.timeout_s:g} s wall-clock limit")
    detail = ""
    at = stderr.rfind(RESULT_PREFIX)
    if at >= 0:
        detail = stderr[at + len(RESULT_PREFIX):].strip()
    if code == EXIT_PASSED:
        return Outcome("passed")
    # Without the runner's verdict line, status 1 or 2 comes from Python itself (e.g. the runner could
    # not start): an error, never a test failure.
    if code == EXIT_FAILED and at >= 0:
        return Outcome("failed", detail)
    if code == EXIT_ERROR and at >= 0:
        return Outcome("error", detail)
    # Killed by a signal: directly (negative code) or passed on by the PID-namespace parent (128 + n).
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number is None:
        last = stderr.strip().splitlines()[-1:] or ["no message"]
        return Outcome("error", f"the sandbox exited with status {code}: {last[0][:200]}")
    if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_s >= math.ceil(limits.timeout_s)):
        return Outcome("timed out", f"exceeded the {math.ceil(limits.timeout_s)} s CPU-time limit")
    if number == signal.SIGXFSZ:
        return Outcome("error", f"exceeded the {limits.file_size_mb} MiB file-size limit")
    return Outcome("error", f"killed by {_signal_name(number)}")


def run_program(program: str, limits: Limits = Limits(), *, guard: bool = True) -> Outcome:
    """Run a Python program in the sandbox and say how it ended.

    ``passed``: it ran to its end; ``failed``: an ``AssertionError`` (a test did not hold); ``timed out``:
    the wall-clock or CPU limit; ``error``: anything else (a syntax error, an exception, a blocked call,
    a limit, a signal). ``guard=False`` leaves out the Python-level guard, to test the OS layers alone.
    """
    if not isinstance(program, str):
        raise ValueError(f"program must be a str of Python source, got {type(program).__name__}")
    try:
        return _execute(program, limits, guard)[0]
    except OSError as e:  # the harness's own trouble (e.g. a full /tmp) is this sample's error, not a crash
        return Outcome("error", f"sandbox failure: {e}")


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: Optional[int] = None
                 ) -> Iterator[Tuple[int, Outcome]]:
    """Run many programs on a pool of ``workers`` threads (each waits on one subprocess).

    Yields ``(index, outcome)`` as each program finishes, in completion order. Defaults to one worker
    per CPU.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if not programs:
        return
    pool = ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox")
    try:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        # On an interrupt, programs not yet started are dropped; running ones end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)


def active_layers(limits: Limits = Limits()) -> List[str]:
    """The isolation layers this machine grants, from a trial run: e.g. ``["session", "tempdir",
    "scrubbed-env", "rlimits", "netns", "pidns", "guard"]``."""
    outcome, stderr = _execute("pass\n", limits, True)
    if not outcome.passed:
        raise RuntimeError(f"the sandbox cannot run a trivial program here: {outcome.reason}: {outcome.detail}")
    child = []
    for line in stderr.splitlines():
        if line.startswith(LAYERS_PREFIX):
            child = line[len(LAYERS_PREFIX):].split(",")
    return ["session", "tempdir", "scrubbed-env"] + child


def limits_dict(limits: Limits) -> dict:
    """The limits as a plain dict, for reports."""
    return asdict(limits)

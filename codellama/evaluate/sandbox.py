"""Run untrusted programs: one sandbox each, isolated by the kernel, with limits, and a worker pool.

The harness side of the sandbox. Each program runs under bubblewrap (see :mod:`.isolation` for what
it can see) or, when explicitly asked for, as a plain process. The runner inside (``runner.py``) gets
the program and a per-run nonce on stdin and proves a pass by writing the nonce on a pipe of its own
after the tests ran to their end; stdout and stderr share a second pipe, of which the harness keeps the
tail and which it closes once the program has written ``output_kb``. On a wall-clock timeout, and after
every run, the harness kills the whole process group, and with it the sandbox's PID namespace.
Whatever the program does, :func:`run_program` returns an :class:`Outcome`; it raises only for the
harness's own errors (bad arguments, :class:`SandboxUnavailable`). Linux only.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import select
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from . import isolation

REASONS = ("passed", "failed", "timed out", "error")
RUNNER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
# Executes the runner's text with globals and builtins of its own (see runner.py).
BOOT = ("import sys;exec(compile(sys.argv[1],'runner.py','exec'),"
        "{'__name__':'__runner__','__builtins__':__builtins__.__dict__.copy()})")
_OUTPUT_TAIL = 4096  # bytes of the program's output kept for the reason
_RESULT_CAP = 65536  # bytes read from the result pipe; the runner's line is far shorter


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot run on this machine; the message says how to get it (one line)."""


@dataclass(frozen=True)
class Limits:
    """What one program may use, and how it is isolated.

    ``timeout_s`` is wall-clock; CPU time is limited to the same number of seconds (rounded up).
    ``file_size_mb`` caps each file and, under bubblewrap, the whole scratch directory. ``output_kb``
    caps stdout and stderr together. ``max_processes`` counts threads too; it holds under bubblewrap
    (also for root, see ``runner.py``) and is not applied with ``isolation="process"``.
    ``isolation`` is ``"bwrap"`` (kernel namespaces; refused where bubblewrap cannot run) or
    ``"process"`` (limits only: the program sees the host as the harness's user does).
    ``site_packages`` lets programs import installed third-party packages (off: the standard library).
    """

    timeout_s: float = 5.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    output_kb: int = 1024
    max_processes: int = 16
    max_open_files: int = 64
    isolation: str = "bwrap"
    site_packages: bool = False

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and not isinstance(self.timeout_s, bool)
                and math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {self.timeout_s!r}")
        for name in ("memory_mb", "file_size_mb", "output_kb", "max_processes", "max_open_files"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb={self.memory_mb} is too small to start Python; use at least 64")
        if self.max_open_files < 16:
            raise ValueError(f"max_open_files={self.max_open_files} is too small to start Python; use at least 16")
        if self.max_processes < 4:
            raise ValueError(f"max_processes={self.max_processes} is too small for the runner's threads; "
                             "use at least 4")
        if self.isolation not in isolation.ISOLATIONS:
            raise ValueError(f"isolation must be one of {list(isolation.ISOLATIONS)}, got {self.isolation!r}")


@dataclass(frozen=True)
class Program:
    """What the sandbox runs: ``code`` (untrusted: HumanEval's prompt and completion, or MBPP's completion),
    then ``tests``, which pass only by running to their end. ``entry_points`` name the functions under
    test: the tests take them from ``code`` even where they shadow a builtin, and every other name from
    ``reference`` (trusted code: HumanEval's prompt) rather than from ``code``. A program without tests
    passes when its code runs to its end."""

    code: str
    tests: str = ""
    reference: str = ""
    entry_points: Tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("code", "tests", "reference"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"Program.{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.entry_points, tuple) or not all(isinstance(n, str) for n in self.entry_points):
            raise ValueError(f"Program.entry_points must be a tuple of str, got {self.entry_points!r}")

    def unencodable(self) -> Optional[str]:
        """Why the program cannot be run as UTF-8 source (e.g. a lone surrogate), or None."""
        for name in ("code", "tests", "reference"):
            try:
                getattr(self, name).encode("utf-8")
            except UnicodeEncodeError as e:
                return f"the program's {name} is not valid Unicode: {e.reason} at character {e.start}"
        return None


@dataclass(frozen=True)
class Outcome:
    """How one program ended: ``reason`` is one of :data:`REASONS`, ``detail`` says why in a few words."""

    reason: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.reason == "passed"


@functools.lru_cache(maxsize=1)
def _runner_source() -> str:
    with open(RUNNER_SCRIPT, encoding="utf-8") as f:
        return f.read()


def _interpreter(site_packages: bool) -> List[str]:
    return [isolation.interpreter(), "-I", "-B"] + ([] if site_packages else ["-S"]) + ["-c", BOOT, _runner_source()]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in the group


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its pid, the group's id, stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


class _Pipes:
    """The three pipes between harness and runner: the payload in; the result and the output out."""

    def __init__(self):
        self.payload_r, self.payload_w = os.pipe()
        self.result_r, self.result_w = os.pipe()
        self.output_r, self.output_w = os.pipe()

    def close(self, *names: str) -> None:
        for name in names:
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def close_all(self) -> None:
        self.close("payload_r", "payload_w", "result_r", "result_w", "output_r", "output_w")


def _read(fd: int) -> Optional[bytes]:
    """What a non-blocking pipe holds now: data, ``b""`` at its end, or None when nothing is there yet."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError:
        return b""


class _Collector:
    """The result (whole, up to a cap) and the output's tail (after ``output_cap`` bytes, the pipe closes)."""

    def __init__(self, pipes: _Pipes, output_cap: int):
        self.pipes, self.output_cap = pipes, output_cap
        self.result, self.tail, self.output_total = bytearray(), b"", 0

    def take(self, fd: int, data: bytes) -> bool:
        """Keep ``data`` read from ``fd``; True when that pipe is done with (its end, or over its cap)."""
        if fd == self.pipes.result_r:
            self.result += data[:_RESULT_CAP - len(self.result)]
            return not data or len(self.result) >= _RESULT_CAP
        self.output_total += len(data)
        self.tail = (self.tail + data)[-_OUTPUT_TAIL:]
        return not data or self.output_total > self.output_cap

    def drain(self) -> None:
        """Read what is left in both pipes without waiting: after the exit, what the runner wrote last."""
        for name in ("result_r", "output_r"):
            fd = getattr(self.pipes, name)
            while fd >= 0:
                data = _read(fd)
                if data is None or self.take(fd, data):
                    break


def _communicate(pid: int, pipes: _Pipes, payload: bytes, timeout_s: float, collector: _Collector) -> bool:
    """Feed the payload and collect output until ``pid`` exits (True) or the timeout passes (False)."""
    for fd in (pipes.payload_w, pipes.result_r, pipes.output_r):
        os.set_blocking(fd, False)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # older kernels and Pythons: look at the process on a short interval
        pidfd = None
    poller = select.poll()
    for fd, events in ((pipes.payload_w, select.POLLOUT), (pipes.result_r, select.POLLIN),
                       (pipes.output_r, select.POLLIN), (pidfd, select.POLLIN)):
        if fd is not None:
            poller.register(fd, events)
    sent, finished = 0, False
    deadline = time.monotonic() + timeout_s
    try:
        while not finished:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for fd, _ in poller.poll(1000 * (remaining if pidfd is not None else min(remaining, 0.01))):
                if fd == pidfd:
                    finished = True
                elif fd == pipes.payload_w:
                    try:
                        sent += os.write(fd, payload[sent:sent + 65536])
                    except BrokenPipeError:
                        sent = len(payload)  # the sandbox did not start, or ended: its exit says why
                    if sent == len(payload):
                        poller.unregister(fd)
                        pipes.close("payload_w")
                else:
                    data = _read(fd)
                    if data is not None and collector.take(fd, data):
                        poller.unregister(fd)
                        pipes.close("result_r" if fd == pipes.result_r else "output_r")
            if pidfd is None and not finished:
                finished = _exited(pid)
        collector.drain()
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return finished


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _verdict(nonce: bytes, result: bytes, finished: bool, code: int, cpu_s: float, output: str,
             limits: Limits) -> Outcome:
    """The outcome: the runner's line when it carries the nonce, else what the exit says (never passed)."""
    for line in result.split(b"\n"):
        word, _, rest = line.partition(b" ")
        if word == nonce:
            reason, _, detail = rest.partition(b" ")
            reason = reason.decode("ascii", "replace")
            if reason in ("passed", "failed", "error"):
                return Outcome(reason, detail.decode("utf-8", "replace"))
    if not finished:
        return Outcome("timed out", f"exceeded the {limits.timeout_s:g} s wall-clock limit")
    # Killed by a signal: directly (negative code) or passed on by bubblewrap (128 + n).
    number = -code if code < 0 else code - 128 if code > 128 else None
    if number == signal.SIGXCPU or (number == signal.SIGKILL and cpu_s >= math.ceil(limits.timeout_s)):
        return Outcome("timed out", f"exceeded the {math.ceil(limits.timeout_s)} s CPU-time limit")
    if number == signal.SIGXFSZ:
        return Outcome("error", f"exceeded the {limits.file_size_mb} MiB file-size limit")
    if number is not None:
        return Outcome("error", f"killed by {_signal_name(number)} before its tests finished")
    last = output.strip().splitlines()[-1:] or ["no output"]
    return Outcome("error", f"the program ended the process (exit status {code}) before its tests finished: "
                            f"{last[0][:200]}")


def _execute(program: Program, limits: Limits, guard: bool) -> Tuple[Outcome, str]:
    """Run one program; returns its outcome and the tail of its output."""
    nonce = secrets.token_hex(16)
    pipes = _Pipes()
    try:
        with isolation.launch(limits.isolation, limits.file_size_mb, limits.max_processes,
                              limits.site_packages) as launch:
            settings = {"cpu_s": math.ceil(limits.timeout_s), "memory_mb": limits.memory_mb,
                        "file_size_mb": limits.file_size_mb, "max_open_files": limits.max_open_files,
                        "max_processes": launch.max_processes, "uid": launch.uid, "result_fd": pipes.result_w,
                        "guard": guard}
            payload = json.dumps({"settings": settings, "nonce": nonce, **asdict(program)}).encode("ascii")
            try:
                proc = subprocess.Popen(launch.argv + _interpreter(limits.site_packages), cwd=launch.cwd,
                                        env=launch.env, stdin=pipes.payload_r, stdout=pipes.output_w,
                                        stderr=pipes.output_w, pass_fds=(pipes.result_w, *launch.pass_fds),
                                        start_new_session=True, close_fds=True)
            except OSError as e:  # e.g. no processes left on the machine: this sample errs, the run goes on
                return Outcome("error", f"could not start the sandbox: {e}"), ""
            pipes.close("payload_r", "result_w", "output_w")
            collector = _Collector(pipes, limits.output_kb * 1024)
            try:
                finished = _communicate(proc.pid, pipes, payload, limits.timeout_s, collector)
            finally:
                # On timeout this kills the program; after a normal exit, anything it left running.
                _kill_group(proc.pid)
                # wait4 rather than proc.wait(): its resource usage tells a CPU-limit kill from other kills.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)  # so that Popen never waits again
        output = collector.tail.decode("utf-8", "replace")
        outcome = _verdict(nonce.encode("ascii"), bytes(collector.result), finished, proc.returncode,
                           usage.ru_utime + usage.ru_stime, output, limits)
        return outcome, output
    finally:
        pipes.close_all()


def _as_program(program: Union[str, Program]) -> Program:
    if isinstance(program, str):
        return Program(program)
    if not isinstance(program, Program):
        raise ValueError(f"program must be a str of Python source or a Program, got {type(program).__name__}")
    return program


def run_program(program: Union[str, Program], limits: Limits = Limits(), *, guard: bool = True) -> Outcome:
    """Run a program in the sandbox and say how it ended.

    ``passed``: the tests (or, without tests, the code) ran to their end, as the runner proved;
    ``failed``: an ``AssertionError`` (a test did not hold) or an always-true ``__eq__``; ``timed out``:
    the wall-clock or CPU limit; ``error``: anything else (a syntax error, an exception, a refused call,
    a limit, a signal, an early exit). ``guard=False`` leaves out the runner's audit hook, to test the
    kernel's layers alone. Raises :class:`SandboxUnavailable` where ``limits.isolation`` cannot run.
    """
    program = _as_program(program)
    check_isolation(limits)
    problem = program.unencodable()
    if problem:
        return Outcome("error", problem)
    try:
        return _execute(program, limits, guard)[0]
    except OSError as e:  # the harness's own trouble (e.g. out of file descriptors) is this sample's error
        return Outcome("error", f"sandbox failure: {e}")


def run_programs(programs: Sequence[Union[str, Program]], limits: Limits = Limits(), *,
                 workers: Optional[int] = None) -> Iterator[Tuple[int, Outcome]]:
    """Run many programs on a pool of ``workers`` threads (each waits on one sandbox).

    Yields ``(index, outcome)`` as each program finishes, in completion order. Defaults to one worker
    per CPU.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    programs = [_as_program(p) for p in programs]
    if not programs:
        return
    check_isolation(limits)
    pool = ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox")
    try:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:
        # On an interrupt, programs not yet started are dropped; running ones end within their timeout.
        pool.shutdown(wait=True, cancel_futures=True)


@functools.lru_cache(maxsize=None)
def _bwrap_refusal(bwrap: str, site_packages: bool) -> Optional[str]:
    """Why bubblewrap at ``bwrap`` cannot run a trivial program here (the refusal), or None; asked once
    per process."""
    outcome, output = _execute(Program("pass"), Limits(timeout_s=30.0, site_packages=site_packages), True)
    if outcome.passed:
        return None
    said = [line.strip() for line in output.splitlines() if line.startswith("bwrap:")]
    return isolation.refusal(bwrap, said[-1] if said else "", f"{outcome.reason}: {outcome.detail}")


def check_isolation(limits: Limits = Limits()) -> None:
    """Raise :class:`SandboxUnavailable` (one line, naming the cause and the fix) unless ``limits.isolation``
    can run here."""
    if limits.isolation == "process":
        return
    bwrap = isolation.find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {isolation.INSTALL_HINT}")
    problem = isolation.layout_problem()
    if problem is not None:
        raise SandboxUnavailable(f"the sandbox cannot hold this Python: {problem}; or {isolation.PROCESS_HINT}")
    refusal = _bwrap_refusal(bwrap, limits.site_packages)
    if refusal is not None:
        raise SandboxUnavailable(refusal)


def active_layers(limits: Limits = Limits()) -> List[str]:
    """The isolation layers a program gets with ``limits``: e.g. ``["bwrap", "mount-ns", …, "audit-hook"]``.
    Raises :class:`SandboxUnavailable` where they cannot run."""
    check_isolation(limits)
    common = ["rlimits", "verdict-nonce", "audit-hook"]
    if limits.isolation == "process":
        return ["session", "tempdir", "scrubbed-env"] + common
    user = "own-uid" if os.geteuid() == 0 else "user-ns"
    return ["bwrap", "mount-ns", "pid-ns", "net-ns", "ipc-ns", "uts-ns", user, "no-capabilities", "seccomp",
            "process-limit"] + common


def limits_dict(limits: Limits) -> dict:
    """The limits as a plain dict, for reports."""
    return asdict(limits)

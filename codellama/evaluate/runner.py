"""The sandboxed side of the harness: run one program, then its tests, and report a verdict it cannot forge.

:mod:`codellama.evaluate.sandbox` starts it as ``python -I [-S] -B -c BOOT RUNNER``, where ``BOOT``
executes this file's text (``RUNNER``) with globals and builtins of its own, so that none of it is
reachable through ``sys.modules['__main__']``. The payload arrives as JSON on stdin: the settings, the
run's nonce, the program's code, its tests and its reference code (HumanEval's prompt). Only the standard
library is imported here, never ``codellama`` or torch, so a program starts in a few milliseconds.

How a verdict is proved
-----------------------
Only the main thread holds the nonce, and it runs none of the program's code. The program runs in a
second thread; when it, and every thread it started, has ended (the interpreter's own count of threads
says so), the tests run in a third thread; when that has ended too, the main thread writes
``NONCE passed`` (or ``failed`` / ``error`` and the reason) on the result pipe and exits. The harness
counts a sample as passed only on that line: an exit status, a printed line, a verdict without the nonce
or a process that ends early never passes.

The other threads cannot reach the main thread. Frames link only within one thread. Python runs signal
handlers, which receive the main thread's frame, only in the main thread, and only the main thread may
install one. An audit hook, installed before any code of the program runs, refuses the other ways to
another thread's frames or objects: ``sys._getframe``, ``sys._current_frames``, the frames of tracebacks
and generators, ``gc.get_objects`` / ``get_referrers`` / ``get_referents``, tracing and profiling
(``sys.settrace``, ``sys.setprofile``, ``sys.monitoring``), new audit hooks, replacing a function's
``__code__``, and loading ``ctypes``, the interpreter's test modules, sub-interpreters, or any extension
module from outside the interpreter's own (read-only) directories. A refused call raises
:class:`SandboxViolation`, a ``ValueError`` because that is what the standard library's frame users
(``logging``, ``namedtuple``, ``typing``) expect from ``sys._getframe`` and handle.

The tests see a clean namespace: a copy of the program's globals without names that shadow builtins, with
fresh builtins (so ``len = ...`` or ``builtins.abs = ...`` in a completion does not reach them), with the
reference's helpers (HumanEval's ``poly``, ``encode_cyclic``) taken from the prompt rather than from the
completion, and with every top-level function of the program wrapped, so that returning an object that
compares equal to a fresh sentinel (an always-true ``__eq__``) fails the sample.

What still is possible in-process (the tests run in the interpreter that ran the program): changing
objects the tests share with the program, such as attributes of a module both import (``math.isclose``)
or of a class defined in Python; an ``__eq__`` that recognises the sentinel. Those are flaws of executing
a benchmark's tests beside the answer, and they need no escape; see the README's sandbox section.

Resource limits come first. As root under bubblewrap, the runner then drops to an unused uid: the kernel
does not apply RLIMIT_NPROC to root, and a uid of its own makes that limit count this sandbox only.
"""

import _thread
import builtins
import json
import os
import resource
import sys
import time

VERDICTS = ("passed", "failed", "error")  # the word after the nonce on the result line
_THREAD_GRACE_S = 0.5  # how long threads the program started may take to end after it returns


class SandboxViolation(ValueError):
    """A call the audit hook refused. A ValueError: the standard library treats one from ``sys._getframe``
    as "no frame here" (``logging``, ``collections.namedtuple``, ``typing``), so those keep working."""


# ---------------------------------------------------------------------------------------------- limits
def apply_limits(settings: dict) -> None:
    """Soft = hard limits, so the program cannot raise them again."""
    mb = 1 << 20
    cpu = settings["cpu_s"]
    # The hard CPU limit one second later delivers SIGKILL, which even a handler cannot delay.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for res, value in ((resource.RLIMIT_AS, settings["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, settings["file_size_mb"] * mb),
                       (resource.RLIMIT_NOFILE, settings["max_open_files"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def drop_privileges(uid: int) -> None:
    """Become ``uid`` (and the group of the same number) with no supplementary groups; this also clears
    the capabilities bubblewrap left for the purpose (CAP_SETUID, CAP_SETGID)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# --------------------------------------------------------------------------------------------- the hook
def make_audit_hook(roots: tuple):
    """The audit hook described in the module docstring; extension modules may load only from ``roots``.

    Everything it uses is bound as a default argument, and names are copied to exact ``str`` before they
    are compared, so neither patched modules nor ``str`` subclasses with their own methods change it.
    """

    def hook(event, args, _deny=SandboxViolation, _str=str, _type=type,
             _events=frozenset({"sys.addaudithook", "sys._getframe", "sys._getframemodulename",
                                "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                                "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
                                "sys.monitoring.register_callback", "sys.remote_exec"}),
             _frame_attrs=frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"}),
             _modules=frozenset({"ctypes", "_ctypes"}), _prefixes=("_test", "_xx", "xx", "_interp"),
             _roots=roots):
        if event in _events:
            raise _deny(f"{event} is disabled in the sandbox (it would reach another thread's frames or objects)")
        if event == "object.__getattr__" and _str.__str__(args[1]) in _frame_attrs:
            raise _deny(f"reading {_str.__str__(args[1])} is disabled in the sandbox")
        if event == "object.__setattr__" and _str.__str__(args[1]) == "__code__":
            raise _deny("replacing a function's __code__ is disabled in the sandbox")
        if event == "import":
            name = _str.rpartition(_str.__str__(args[0]), ".")[2]
            if name in _modules or name.startswith(_prefixes):
                raise _deny(f"importing {name} is disabled in the sandbox")
            origin = args[1]
            if origin is not None and not (_type(origin) is _str and origin.startswith(_roots)
                                           and "/../" not in origin):
                raise _deny(f"loading the extension module {origin!r} is disabled in the sandbox: only the "
                            "interpreter's own extension modules load")

    return hook


# --------------------------------------------------------------------------------------------- threads
def describe(e: BaseException) -> bytes:
    """``Type: message`` of an exception, short, as bytes (the main thread handles no object of the program)."""
    try:
        message = str(e)[:500]
        text = f"{type(e).__name__}: {message}" if message else type(e).__name__
    except BaseException:  # noqa: B902 -- a __str__ that raises, or anything else odd
        text = "an exception whose message cannot be read"
    return text.encode("utf-8", "replace")


def in_thread(start, allocate_lock, fn, *args):
    """Start ``fn(*args)`` in a new thread; returns a lock that is released when ``fn`` returns or raises."""
    done = allocate_lock()
    done.acquire()

    def bootstrap():
        try:
            fn(*args)
        finally:
            done.release()

    start(bootstrap, ())
    return done


def solve(code: str, ns: dict, box: list) -> None:
    """Run the program's code in ``ns``; its verdict (``ok``, ``failed``, ``error``) goes in ``box``."""
    try:
        exec(compile(code, "program.py", "exec"), ns)
        box.append(("ok", b""))
    except AssertionError as e:
        box.append(("failed", describe(e)))
    except BaseException as e:  # noqa: B902 -- SystemExit, KeyboardInterrupt, MemoryError are verdicts too
        box.append(("error", describe(e)))


class _Sentinel:
    """Equal to nothing but itself: a result that compares equal to one is an always-true ``__eq__``."""

    __slots__ = ()


def probed(fn, suspicious: list):
    """``fn``, wrapped so that a result equal to a fresh sentinel is recorded in ``suspicious``."""
    sentinel = _Sentinel()

    def call(*args, **kwargs):
        result = fn(*args, **kwargs)
        try:
            if result == sentinel:
                suspicious.append(fn.__name__)
        except Exception:  # e.g. an array whose truth value is ambiguous: not an always-true __eq__
            pass
        return result

    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(call, attr, getattr(fn, attr))
    call.__wrapped__ = fn
    return call


def test_namespace(ns: dict, clean_builtins: dict, reference: str, entry_points: list, suspicious: list) -> dict:
    """The namespace the tests run in (see the module docstring); ``entry_points`` are the names under
    test, which come from the program even where they shadow a builtin (MBPP has a ``sum``)."""
    function = type(solve)
    tests = {}
    for name, value in ns.items():
        if name in clean_builtins and not name.startswith("__") and name not in entry_points:
            continue  # a completion's `abs = ...` is not the tests' abs
        if type(value) is function and value.__globals__ is ns:
            value = probed(value, suspicious)
        tests[name] = value
    if reference:
        helpers = {"__name__": "__main__", "__builtins__": dict(clean_builtins)}
        exec(compile(reference, "reference.py", "exec"), helpers)
        for name, value in helpers.items():
            if name not in entry_points and not name.startswith("__"):
                tests[name] = value
    tests["__name__"] = "__main__"
    tests["__builtins__"] = dict(clean_builtins)
    return tests


def test(payload: dict, ns: dict, clean_builtins: dict, box: list) -> None:
    """Run the tests; ``passed`` goes in ``box`` only when their code ran to its end."""
    suspicious = []
    try:
        tests = test_namespace(ns, clean_builtins, payload["reference"], payload["entry_points"],
                               suspicious)
        exec(compile(payload["tests"], "tests.py", "exec"), tests)
        if suspicious:
            box.append(("failed", f"{suspicious[0]} returned an object that compares equal to anything (an "
                                  "always-true __eq__), which the tests cannot check".encode("utf-8", "replace")))
        else:
            box.append(("passed", b""))
    except AssertionError as e:
        box.append(("failed", describe(e)))
    except BaseException as e:  # noqa: B902
        box.append(("error", describe(e)))


# ---------------------------------------------------------------------------------------- main thread
def main() -> None:
    """Read the payload, limit and isolate this process, run the program and its tests, report; never returns."""
    payload = json.loads(sys.stdin.buffer.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the program's stdin is empty
    os.close(devnull)
    settings = payload.pop("settings")
    nonce = payload.pop("nonce").encode("ascii")
    if settings["uid"] is not None:
        drop_privileges(settings["uid"])
    apply_limits(settings)
    if settings["max_processes"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (settings["max_processes"], settings["max_processes"]))

    # From here on the main thread calls only what it holds in its own locals, bound before the program runs.
    write, exit_, result_fd = os.write, os._exit, settings["result_fd"]
    start, count, allocate_lock = _thread.start_new_thread, _thread._count, _thread.allocate_lock
    sleep, monotonic, stdout, stderr = time.sleep, time.monotonic, sys.stdout, sys.stderr
    builtins_dict = builtins.__dict__
    clean_builtins = dict(builtins_dict)

    def report(word: bytes, detail: bytes) -> None:
        line = nonce + b" " + word + b" " + detail[:1000].replace(b"\n", b" ") + b"\n"
        try:
            write(result_fd, line)  # one write of under PIPE_BUF bytes: never interleaved with another's
        finally:
            for stream in (stdout, stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: B902 -- the program may have closed it
                    pass
            exit_(0)

    def alone(done) -> bool:
        """Wait for ``done``, then until no other thread runs (False after the grace period)."""
        done.acquire()
        deadline = monotonic() + _THREAD_GRACE_S
        while count():
            if monotonic() > deadline:
                return False
            sleep(0.0005)
        return True

    def verdict(box: list):
        """The thread's claim, if it is one of the exact shapes a thread of ours writes; else None."""
        if len(box) != 1 or type(box[0]) is not tuple or len(box[0]) != 2:
            return None
        word, detail = box[0]
        if type(word) is not str or type(detail) is not bytes:
            return None
        return word, detail

    roots = tuple(sorted({p.rstrip("/") + "/" for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                          sys.base_exec_prefix)}))
    if settings["guard"]:
        sys.addaudithook(make_audit_hook(roots))
    try:
        ns = {"__name__": "__main__", "__builtins__": builtins}
        box = []
        if not alone(in_thread(start, allocate_lock, solve, payload["code"], ns, box)):
            report(b"error", b"the program left threads running; its tests run only when nothing else does")
        claim = verdict(box)
        if claim is None:
            report(b"error", b"the program ended without a result")
        if claim[0] != "ok":
            report(b"failed" if claim[0] == "failed" else b"error", claim[1])
        builtins_dict.clear()  # undo `builtins.abs = ...`, for the tests and the program's code they call
        builtins_dict.update(clean_builtins)
        box = []
        if not alone(in_thread(start, allocate_lock, test, payload, ns, clean_builtins, box)):
            report(b"error", b"the tests left threads running")
        claim = verdict(box)
        if claim is None:
            report(b"error", b"the tests ended without a result")
        for word in VERDICTS:
            if claim[0] == word:
                report(word.encode("ascii"), claim[1])
        report(b"error", b"the tests ended with an unknown result")
    except BaseException as e:  # noqa: B902 -- raised by the interpreter in this thread: never a pass
        # e.g. MemoryError, KeyboardInterrupt, or "can't start new thread" at the process limit
        report(b"error", b"the runner failed: " + describe(e))


if __name__ == "__runner__":
    main()

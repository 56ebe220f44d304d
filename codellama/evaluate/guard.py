"""The sandboxed side of the harness: limit this process, isolate it, install the guard, run one program.

:mod:`codellama.evaluate.sandbox` starts it as ``python -I -B [-S] guard.py PROGRAM SETTINGS_JSON`` in a fresh
temporary directory, in a new session. It imports only the standard library (never ``codellama``, which
would pull in torch) so that a program starts in a fraction of a second.

The layers, in order (each is a backstop for the ones after it):

1. resource limits (``setrlimit``): address space, CPU time, file size, open files, no core dumps, and a
   process count (the kernel ignores the count for root; the guard below blocks forking in any case);
2. namespaces where the kernel permits them: a new network namespace (no interface but a downed loopback,
   so nothing can be reached) and a new PID namespace, in which the program cannot see (or signal) any
   process outside; its first process waits for the program, and when it exits, or its parent (killed by
   the harness on timeout) dies, the kernel kills every process left in the namespace, including any
   that changed session;
3. the guard: Python-level replacements for the usual calls that create, change or delete files outside
   the program's directory (``open``, ``os.remove``, ``os.rename``, ``shutil.rmtree`` through ``os``, …),
   start or signal processes (``os.fork``, ``os.system``, ``subprocess``, ``os.kill``, …), open sockets,
   raise limits or leave the process group. A blocked call raises :class:`SandboxViolation`. Reading files
   anywhere stays allowed: Python itself needs it. ``ctypes`` cannot be imported.

This is a guard against accidents of untrusted generated code, not against a program written to escape:
a determined program can still reach the originals (e.g. through closures). Run as root, file
permissions protect nothing, so the guard is what keeps files outside the directory untouched.

Exit status: 0 the program ran to its end (tests passed), 1 it raised ``AssertionError`` (failed), 2 it
raised anything else (error). The reason is the last stderr line, after :data:`RESULT_PREFIX`; the
active layers are the first, after :data:`LAYERS_PREFIX`.
"""

import builtins
import json
import os
import resource
import signal
import sys

LAYERS_PREFIX = "codellama-sandbox-layers: "
RESULT_PREFIX = "codellama-sandbox-result: "
EXIT_PASSED, EXIT_FAILED, EXIT_ERROR = 0, 1, 2

# <linux/sched.h>, <linux/prctl.h>
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1

# Saved before the guard replaces them: the runner itself still needs them to report and exit.
_exit = os._exit
_write = os.write


class SandboxViolation(PermissionError):
    """A guarded call was refused. A PermissionError, so code that handles OS errors sees a familiar type."""


# ---------------------------------------------------------------------------------------------- limits
def apply_limits(settings: dict) -> None:
    """Set soft = hard limits, so the program cannot raise them again (the guard also blocks setrlimit)."""
    mb = 1024 * 1024
    cpu = max(1, int(settings["cpu_s"]))
    # The hard CPU limit one second later delivers SIGKILL, which even a PID-namespace init cannot ignore.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for res, value in ((resource.RLIMIT_AS, settings["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, settings["file_size_mb"] * mb),
                       (resource.RLIMIT_NOFILE, settings["max_open_files"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def limit_processes(settings: dict) -> None:
    """RLIMIT_NPROC counts every process of the user, so it is set last, in the program's own process."""
    n = settings["max_processes"]
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
    except (ValueError, OSError):
        pass  # some kernels refuse lowering it below the current count; the guard blocks forking anyway


def enter_namespaces() -> list:
    """Unshare network and PID namespaces where permitted; returns the names of those entered."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return []
    # Root can unshare directly; an ordinary user may do it inside a new user namespace.
    for flags, names in ((CLONE_NEWNET | CLONE_NEWPID, ["netns", "pidns"]),
                         (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, ["userns", "netns", "pidns"]),
                         (CLONE_NEWNET, ["netns"]),
                         (CLONE_NEWUSER | CLONE_NEWNET, ["userns", "netns"])):
        if libc.unshare(flags) == 0:
            return names
    return []


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (the harness kills the parent on timeout)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (ImportError, OSError, AttributeError):
        pass


def supervise(pid: int) -> None:
    """Wait for child ``pid`` and exit with its status; never returns.

    Other children are reaped on the way: in the PID namespace's first process, orphans of the program
    are re-parented here.
    """
    while True:
        try:
            child, status = os.waitpid(-1, 0)
        except ChildProcessError:
            _exit(EXIT_ERROR)
        if child == pid:
            break
    code = os.waitstatus_to_exitcode(status)
    # A signal death is passed on as 128 + signal number, the shell's convention.
    _exit(code if code >= 0 else 128 - code)


# ----------------------------------------------------------------------------------------------- guard
def install_guard(root: str) -> None:
    """Replace the usual dangerous calls; ``root`` is the only directory the program may change."""
    import io
    import _io
    import posix
    import _socket
    import subprocess  # imported first so that it still imports after _posixsubprocess is defused
    import _posixsubprocess

    root = os.path.realpath(root)

    def resolve(path, dir_fd=None) -> str:
        if isinstance(path, int):  # a file descriptor: where it points
            return os.path.realpath(f"/proc/self/fd/{path}")
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(path):
            path = os.path.join(os.path.realpath(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.realpath(path)

    def check(name: str, path, dir_fd=None) -> None:
        real = resolve(path, dir_fd)
        if real != root and not real.startswith(root + os.sep):
            raise SandboxViolation(f"{name}({path!r}) touches {real}, outside the sandbox directory {root}")

    def disabled(name: str):
        def refuse(*args, **kwargs):
            raise SandboxViolation(f"{name} is disabled in the sandbox")
        refuse.__name__ = name.rsplit(".", 1)[-1]
        return refuse

    def on_paths(name: str, fn, n_paths: int = 1):
        # Calls whose first n_paths positional arguments are paths (or descriptors) that must lie inside
        # root. A relative path is taken against dir_fd (one path) or src_dir_fd/dst_dir_fd (two paths).
        fd_keys = ("dir_fd",) if n_paths == 1 else ("src_dir_fd", "dst_dir_fd")

        def guarded(*args, **kwargs):
            paths = list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]
            for i, p in enumerate(paths):
                check(name, p, kwargs.get(fd_keys[min(i, len(fd_keys) - 1)]))
            return fn(*args, **kwargs)
        guarded.__name__ = fn.__name__
        return guarded

    real_open = _io.open
    write_modes = set("wax+")

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and write_modes & set(mode):
            check("open", file)
        return real_open(file, mode, *args, **kwargs)

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            check("os.open", path, kwargs.get("dir_fd"))
        return real_os_open(path, flags, *args, **kwargs)

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and write_modes & set(mode):
                check("FileIO", file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO

    # os functions are posix's own objects; both modules are patched so that reloading os cannot undo it.
    replacements = {"open": guarded_os_open}
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "lchmod", "chown", "lchown", "truncate", "utime",
                 "mkfifo", "mknod", "chroot", "setxattr", "removexattr", "fchmod", "fchown", "ftruncate"):
        if hasattr(os, name):
            replacements[name] = on_paths(f"os.{name}", getattr(os, name))
    real_symlink = os.symlink

    def guarded_symlink(src, dst, *args, **kwargs):
        # Only the link is created here; opening or deleting through it is checked on its resolved target.
        check("os.symlink", dst, kwargs.get("dir_fd"))
        return real_symlink(src, dst, *args, **kwargs)

    replacements["symlink"] = guarded_symlink
    for name in ("rename", "replace", "link"):
        replacements[name] = on_paths(f"os.{name}", getattr(os, name), n_paths=2)
    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execl", "execle", "execlp",
                 "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setsid", "setpgid",
                 "setpgrp", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid",
                 "setresgid", "setgroups", "_exit", "putenv", "unsetenv", "pidfd_open"):
        if hasattr(os, name):
            replacements[name] = disabled(f"os.{name}")
    for module in (os, posix):
        for name, fn in replacements.items():
            if hasattr(module, name):
                setattr(module, name, fn)

    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, disabled(f"signal.{name}"))
    for name in ("setrlimit", "prlimit"):
        if hasattr(resource, name):
            setattr(resource, name, disabled(f"resource.{name}"))
    # subprocess and os.popen all end in _posixsubprocess.fork_exec.
    _posixsubprocess.fork_exec = disabled("subprocess")
    for name in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, disabled(f"subprocess.{name}"))

    # socket.socket subclasses _socket.socket when socket.py is imported, so refusing in the base class
    # refuses every socket, however it is created.
    class NoSocket(_socket.socket):
        __slots__ = ()  # socket.socket adds its own __weakref__ slot

        def __init__(self, *args, **kwargs):
            raise SandboxViolation("socket creation is disabled in the sandbox (no network)")

    _socket.socket = _socket.SocketType = NoSocket
    _socket.socketpair = disabled("socket.socketpair")
    if "socket" in sys.modules:
        sys.modules["socket"].socket = NoSocket

    # ctypes reaches any libc function directly; a None entry makes `import ctypes` fail.
    for name in ("ctypes", "_ctypes", "ctypes.util", "cffi"):
        sys.modules[name] = None


# ---------------------------------------------------------------------------------------------- runner
def report(reason: str) -> None:
    try:
        _write(2, ("\n" + RESULT_PREFIX + reason.replace("\n", " ")[:1000] + "\n").encode("utf-8", "replace"))
    except OSError:
        pass  # stderr closed or full: the exit status still says how it ended


def run(program_path: str) -> None:
    """Execute the program as ``__main__`` and exit with its verdict; never returns."""
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    code = EXIT_PASSED
    try:
        exec(compile(source, program_path, "exec"), {"__name__": "__main__", "__builtins__": builtins})
        report("passed")
    except AssertionError as e:
        code = EXIT_FAILED
        report(f"AssertionError: {e}" if str(e) else "AssertionError")
    except BaseException as e:  # noqa: B902 -- SystemExit, KeyboardInterrupt and MemoryError are verdicts too
        code = EXIT_ERROR
        # Reading the name and message only, so that a huge object in the traceback is not formatted.
        try:
            message = f"{type(e).__name__}: {str(e)[:500]}" if str(e) else type(e).__name__
        except BaseException:  # noqa: B902 -- a __str__ that raises
            message = type(e).__name__
        del e
        report(message)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: B902 -- the program may have closed or replaced stdout
        pass
    # os._exit skips interpreter shutdown, which a program's non-daemon thread or atexit hook could block.
    _exit(code)


def main(argv: list) -> None:
    program_path, settings = argv[1], json.loads(argv[2])
    apply_limits(settings)
    layers = ["rlimits"] + (enter_namespaces() if settings["namespaces"] else [])
    if "pidns" in layers:
        # The first process forked after unsharing is the new namespace's init: when it exits, the kernel
        # kills everything left in the namespace. It runs the program in a child of its own, because an
        # init ignores signals it has no handler for, which would change how the program can die.
        init = os.fork()
        if init:
            supervise(init)
        die_with_parent()  # the harness kills the outer process on timeout; this takes the namespace along
        program = os.fork()
        if program:
            supervise(program)
    limit_processes(settings)
    if settings["guard"]:
        install_guard(os.getcwd())
        layers.append("guard")
    _write(2, (LAYERS_PREFIX + ",".join(layers) + "\n").encode())
    run(program_path)


if __name__ == "__main__":
    main(sys.argv)

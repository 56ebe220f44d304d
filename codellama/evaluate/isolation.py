"""How a program is started: under bubblewrap (the default), or as a plain process when asked for.

``bwrap``: each program runs in new mount, PID, network, IPC, UTS (and cgroup) namespaces. Its file
system is a fresh tmpfs root, read-only after set-up, that holds only

- the interpreter's directories (``sys.base_prefix`` and ``sys.prefix``), read-only, with their
  site-packages hidden (an empty read-only tmpfs over each) unless ``site_packages``; this package's own
  directory is hidden in any case;
- the system's shared libraries (``/usr/lib``, ``/lib``, ``/usr/lib64``, ``/lib64``, ``/etc/ld.so.cache``),
  read-only, because the interpreter links against them;
- a new, read-only ``/dev`` (``null``, ``zero``, ``full``, ``random``, ``urandom``, ``tty``; no ``shm``
  to fill) and a size-capped tmpfs at ``/tmp``, the working directory and the only writable place.

The scratch ``/tmp`` is mounted first and the interpreter's directories after it, so an interpreter
that lives under ``/tmp`` (a virtualenv on a CI runner) is bound read-only inside the scratch rather
than hidden by it; nothing else of the host's ``/tmp`` is there. An interpreter whose directory holds
``/tmp`` (or is ``/``) cannot be mounted without showing the host's files: :func:`layout_problem` says so.

There is no ``/proc`` at all (Python does not need one; it would show the program its own memory), no
host ``/tmp``, ``/run``, home, project or site-packages directory, and no network interface but a
downed loopback. The seccomp filter of :mod:`.seccomp` is loaded; every capability is dropped. As root,
bubblewrap runs privileged and the runner drops to a uid of its own (see ``runner.py``); as an ordinary
user it runs in a user namespace. Either way ``--die-with-parent`` and ``--new-session`` are set.

``process``: the program runs in a fresh temporary directory, in its own session, with a scrubbed
environment and the runner's resource limits, but sees the host as the harness's user does. Only for
code one trusts, or on a machine one does not mind losing.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import site
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from .seccomp import build_filter

ISOLATIONS = ("bwrap", "process")
PROCESS_HINT = "pass --isolation process (Limits(isolation='process')) to run programs without OS isolation"
INSTALL_HINT = f"install bubblewrap (apt-get install bubblewrap), or {PROCESS_HINT}"
SYSTEM_LIBRARIES = ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32")
UID_BASE, UID_SPAN = 2_000_000_000, 100_000_000  # far above any account's uid or subordinate-uid range
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # codellama/
SCRATCH = "/tmp"  # the program's working directory, a size-capped tmpfs: its only writable place


@dataclass(frozen=True)
class Launch:
    """What starting one program needs: the command before the interpreter's, its environment and
    working directory, the descriptors it inherits, and what the runner applies itself."""

    argv: List[str]
    env: dict
    cwd: Optional[str]
    pass_fds: Tuple[int, ...]
    uid: Optional[int]  # the runner drops to it (root under bubblewrap)
    max_processes: Optional[int]  # RLIMIT_NPROC, set where it counts this sandbox's processes only


def environment(home: str) -> dict:
    """The program's whole environment: nothing of the harness's (tokens, proxies, PYTHONPATH)."""
    return {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _outermost(paths) -> List[str]:
    """The existing directories among ``paths`` that no other one contains, parents first."""
    real = sorted({os.path.realpath(p) for p in paths if os.path.isdir(p)})
    return [p for p in real if not any(q != p and _inside(p, q) for q in real)]


def _parents(paths: List[str]) -> List[str]:
    """``--dir`` arguments for the ancestors of ``paths``, world-readable (bubblewrap's own are 0700,
    which the runner could not enter once it has dropped to its own uid); the scratch exists already."""
    args: List[str] = []
    seen = {SCRATCH}
    for path in paths:
        parent = os.path.dirname(path)
        chain = []
        while parent not in ("/", "") and parent not in seen:
            seen.add(parent)
            chain.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(chain):
            args += ["--perms", "0755", "--dir", directory]
    return args


def interpreter_trees() -> List[str]:
    """The interpreter's directories, real paths, none inside another: a virtualenv and its base."""
    return _outermost([sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix])


def layout_problem() -> Optional[str]:
    """Why this interpreter cannot be mounted in the sandbox, or None.

    Binding a directory that holds the scratch (``/``, ``/tmp``) would show the host's files, and an
    interpreter started from outside its directories (``sys.executable``) would not be there to start.
    """
    trees = interpreter_trees()
    for tree in trees:
        if _inside(SCRATCH, tree):
            return (f"the interpreter's directory {tree} holds {SCRATCH}, so mounting it would show the host's "
                    "files in the sandbox; use a Python installed in a directory of its own (e.g. /usr, /opt/python)")
    executable = interpreter()
    if not any(_inside(executable, tree) for tree in trees):
        return (f"the interpreter {executable} lies outside its own directories {trees}, which are all the "
                "sandbox mounts; start Python by a path inside them")
    return None


def interpreter() -> str:
    """``sys.executable`` with its directory as a real path, as the sandbox mounts it. The file itself
    stays as named: a virtualenv's ``bin/python`` is a link, and Python finds the virtualenv through it."""
    executable = os.path.abspath(sys.executable or "python")
    return os.path.join(os.path.realpath(os.path.dirname(executable)), os.path.basename(executable))


def mounts(site_packages: bool) -> List[str]:
    """bubblewrap's file-system arguments after the scratch ``/tmp`` (see the module docstring)."""
    problem = layout_problem()
    if problem:
        raise ValueError(problem)
    trees = interpreter_trees()
    libraries = [lib for lib in SYSTEM_LIBRARIES if os.path.islink(lib) or (
        os.path.isdir(lib) and not any(_inside(os.path.realpath(lib), t) for t in trees))]
    args = _parents(libraries + trees + ["/etc/ld.so.cache"])
    for lib in libraries:
        args += ["--symlink", os.readlink(lib), lib] if os.path.islink(lib) else ["--ro-bind", lib, lib]
    for tree in trees:
        args += ["--ro-bind", tree, tree]
    hidden = [PACKAGE_DIR]
    if not site_packages:  # the virtualenv's and its base interpreter's (which a virtualenv's site omits)
        prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
        hidden += site.getsitepackages(prefixes) + [site.getusersitepackages()]
    mounted = trees + [os.path.realpath(lib) for lib in libraries if not os.path.islink(lib)]
    for path in _outermost(hidden):
        if any(_inside(path, m) for m in mounted):
            args += ["--tmpfs", path, "--remount-ro", path]
    if os.path.isfile("/etc/ld.so.cache"):
        args += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    return args


def bwrap_argv(bwrap: str, scratch_bytes: int, seccomp_fd: int, as_root: bool, site_packages: bool) -> List[str]:
    """The bubblewrap command line, up to and including ``--``."""
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv"]
    for key, value in environment(SCRATCH).items():
        argv += ["--setenv", key, value]
    if as_root:  # privileged: the runner needs CAP_SETUID/CAP_SETGID once, to drop to its own uid
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user"]
    # The scratch first: the interpreter may live under it, and is then bound over it, read-only.
    argv += ["--perms", "1777", "--size", str(scratch_bytes), "--tmpfs", SCRATCH]
    argv += mounts(site_packages)
    argv += ["--dev", "/dev", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", SCRATCH,
             "--seccomp", str(seccomp_fd), "--"]
    return argv


def find_bwrap() -> Optional[str]:
    return shutil.which("bwrap")


# What bubblewrap says when the kernel, a container or a security module will not let it make namespaces,
# e.g. "No permissions to create new namespace", "setting up uid map: Permission denied", "Creating new
# namespace failed: Operation not permitted", "loopback: Failed RTM_NEWADDR: Operation not permitted".
_NAMESPACE_SIGNS = ("namespace", "uid map", "gid map", "setgroups", "Operation not permitted", "Permission denied")


def refusal(bwrap: str, said: str, ended: str) -> str:
    """The one-line refusal for a bubblewrap that did not run a trivial program, naming the real cause.

    ``said`` is bubblewrap's last ``bwrap: …`` line (empty when it said nothing); ``ended`` how the
    trivial program ended.
    """
    if not said:
        if ended.startswith("error: could not start the sandbox"):
            return f"bubblewrap ({bwrap}) cannot be started ({ended}); {PROCESS_HINT}"
        return (f"bubblewrap ({bwrap}) runs, but a trivial program does not pass in its sandbox ({ended}); "
                f"{PROCESS_HINT}")
    if "execvp" in said:
        return (f"bubblewrap ({bwrap}) set up the sandbox but could not start the interpreter {interpreter()} in "
                f"it ({said}); {PROCESS_HINT}")
    if "source path" not in said and any(sign in said for sign in _NAMESPACE_SIGNS):
        return (f"bubblewrap ({bwrap}) is installed but may not create namespaces here ({said}): run as root, "
                "or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 and "
                "user.max_user_namespaces > 0; on Ubuntu 24.04 and later, "
                "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap); in a container, "
                f"give it those rights (e.g. docker run --security-opt seccomp=unconfined); or {PROCESS_HINT}")
    return f"bubblewrap ({bwrap}) cannot set up the sandbox ({said}); {PROCESS_HINT}"


@contextlib.contextmanager
def launch(isolation: str, file_size_mb: int, max_processes: int, site_packages: bool) -> Iterator[Launch]:
    """Prepare one program's start; what it created (a temporary directory, a pipe) is removed after."""
    if isolation == "process":
        workdir = tempfile.mkdtemp(prefix="codellama-sandbox-")
        try:
            # RLIMIT_NPROC would count all of the user's processes on the machine (and none of root's).
            yield Launch([], environment(workdir), workdir, (), None, None)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    bwrap = find_bwrap()
    if bwrap is None:
        raise FileNotFoundError("bubblewrap (bwrap) is not installed")
    seccomp_r, seccomp_w = os.pipe()  # bwrap reads the filter from here; it is far smaller than a pipe's buffer
    try:
        os.write(seccomp_w, build_filter())
        os.close(seccomp_w)
        seccomp_w = -1
        as_root = os.geteuid() == 0
        uid = UID_BASE + secrets.randbelow(UID_SPAN) if as_root else None
        argv = bwrap_argv(bwrap, file_size_mb << 20, seccomp_r, as_root, site_packages)
        yield Launch(argv, {"PATH": "/usr/bin:/bin"}, None, (seccomp_r,), uid, max_processes)
    finally:
        os.close(seccomp_r)
        if seccomp_w >= 0:
            os.close(seccomp_w)

"""Programs written to escape: each is a wrong answer plus an attack, run as root where the tests run as root.

For every attack: under bubblewrap, with and without the runner's audit hook (the kernel is the
boundary, not Python), it is scored as not passed, the host shows no trace of it, and a correct sample
run after it passes. Where running it on the host is harmless, a control runs the same attack with
``isolation="process"`` and no audit hook and checks that it does work there, so that each test can fail.
"""

import dataclasses
import hashlib
import os
import pathlib
import socket
import string
import subprocess
import sys
import time
from typing import Callable

import pytest

from codellama.evaluate import runner
from codellama.evaluate.isolation import UID_BASE, UID_SPAN
from codellama.evaluate.sandbox import Limits, Program, SandboxUnavailable, check_isolation, run_program

LIMITS = Limits(timeout_s=3.0, file_size_mb=4)
WRONG = "def add(a, b):\n    return a - b\n\n"
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
RIGHT = Program("def add(a, b):\n    return a + b\n", TESTS, entry_points=("add",))
SECRET_VAR = "CODELLAMA_TEST_SECRET"

try:
    check_isolation(LIMITS)
    BWRAP = None
except SandboxUnavailable as e:
    BWRAP = str(e)


@dataclasses.dataclass
class Host:
    """What an attack aims at, made fresh for each test: files, listeners, a canary process."""

    dir: pathlib.Path
    precious: pathlib.Path
    secret: str
    tcp: socket.socket
    udp: socket.socket
    unix: socket.socket
    abstract: socket.socket
    canary: subprocess.Popen

    def values(self) -> dict:
        return {"dir": self.dir, "precious": self.precious, "secret_file": self.dir / "secret.txt",
                "tcp_port": self.tcp.getsockname()[1], "udp_port": self.udp.getsockname()[1],
                "unix_path": self.unix.getsockname(), "abstract": self.abstract.getsockname()[1:].decode(),
                "canary": self.canary.pid, "harness": os.getpid(), "home": os.path.expanduser("~"),
                "runner": runner.__file__, "package": os.path.dirname(os.path.dirname(runner.__file__)),
                "tag": self.dir.name}

    def files(self) -> set:
        return {p.name for p in self.dir.iterdir()}


def _pending(sock: socket.socket) -> bool:
    """Whether a listener got a connection, or a datagram socket a message."""
    sock.setblocking(False)
    try:
        if sock.type == socket.SOCK_DGRAM:
            sock.recv(64)
        else:
            sock.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.fixture
def host(tmp_path, monkeypatch):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    secret = "s3cr3t-" + os.urandom(8).hex()
    (tmp_path / "secret.txt").write_text(secret)
    monkeypatch.setenv(SECRET_VAR, secret)  # the harness's own environment
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "host.sock"))
    unix.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0codellama-test-{secret}")
    abstract.listen()
    canary = subprocess.Popen(["sleep", "60"])
    yield Host(tmp_path, precious, secret, tcp, udp, unix, abstract, canary)
    canary.kill()
    canary.wait()
    for sock in (tcp, udp, unix, abstract):
        sock.close()
    for leftover in pathlib.Path("/dev/shm").glob(f"codellama-attack-{tmp_path.name}-*"):
        leftover.unlink()
    for leftover in pathlib.Path("/tmp").glob(f"codellama-attack-{tmp_path.name}*"):
        leftover.unlink()


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    code: str  # a string.Template over Host.values(), appended to the wrong answer
    worked: Callable  # (host, outcome) -> True when the attack reached the host
    control: bool = True  # harmless to run on the host, to show it works there


def _changed(host, outcome) -> bool:
    return host.precious.read_text() != "keep me" or bool(host.files() - {"precious.txt", "secret.txt", "host.sock"})


def _leaked(host, outcome) -> bool:
    return host.secret in outcome.detail


def _dead(proc: subprocess.Popen) -> bool:
    """Whether the canary died (waiting a moment: a SIGKILL from another process is not instant)."""
    try:
        proc.wait(timeout=0.05)
        return True
    except subprocess.TimeoutExpired:
        return False


def _home_listed(host, outcome) -> bool:
    # Under bubblewrap the home directory holds only the path down to the interpreter (e.g. .pyenv).
    home = os.path.expanduser("~")
    allowed = {os.path.relpath(sys.base_prefix, home).split(os.sep)[0]} if sys.base_prefix.startswith(home) else set()
    words = outcome.detail.split()
    return words[:1] == ["Exception:"] and bool(set(words[1:]) - allowed)


def _count_over(n: int) -> Callable:
    def worked(host, outcome) -> bool:
        number = [int(w) for w in outcome.detail.split() if w.isdigit()]
        return bool(number) and number[0] > n
    return worked


FRESH_POSIX = ("import _imp, importlib.machinery\n"
               "posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))\n")
CTYPES = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"

ATTACKS = [
    # ---------------------------------------------------------------------------- write outside
    Attack("open", "open('$precious', 'w').write('pwned')\n", _changed),
    Attack("fileio-base-class", "import io\nF = next(c for c in io.FileIO.__mro__ if c.__module__ == '_io' and "
           "c.__name__ == 'FileIO')\nF('$precious', 'w').write(b'pwned')\n", _changed),
    Attack("open-closure", "o = open\nfor cell in getattr(o, '__closure__', None) or ():\n"
           "    if getattr(cell.cell_contents, '__name__', '') == 'open':\n        o = cell.cell_contents\n"
           "o('$precious', 'w').write('pwned')\n", _changed),
    Attack("fresh-posix", FRESH_POSIX + "import os\nfd = posix.open('$precious', os.O_WRONLY | os.O_TRUNC)\n"
           "posix.write(fd, b'pwned')\n", _changed),
    Attack("sqlite3", "import sqlite3\nsqlite3.connect('$dir/pwned.db').execute('create table t(x)')\n", _changed),
    Attack("readline", "import readline\nreadline.add_history('pwned')\n"
           "readline.write_history_file('$dir/pwned.history')\n", _changed),
    Attack("rename-race", "import os, threading\nos.mkdir('d')\nstop = []\ndef flip():\n    while not stop:\n"
           "        try:\n            os.rename('d', 'd.real')\n            os.symlink('$dir', 'd')\n"
           "            os.unlink('d')\n            os.rename('d.real', 'd')\n        except OSError:\n"
           "            pass\nt = threading.Thread(target=flip)\nt.start()\nfor _ in range(2000):\n    try:\n"
           "        open('mine', 'w').write('pwned')\n        os.rename('mine', 'd/precious.txt')\n"
           "    except OSError:\n        pass\nstop.append(1)\nt.join()\n", _changed),
    Attack("ctypes-popped", "import sys\nsys.modules.pop('ctypes', None)\n" + CTYPES +
           "fd = libc.open(b'$precious', os.O_WRONLY | os.O_TRUNC)\nlibc.write(fd, b'pwned', 5)\n", _changed),
    # ----------------------------------------------------------------------------- read secrets
    Attack("host-file", "raise Exception(open('$secret_file').read())\n", _leaked),
    Attack("harness-environ", "import os\nfound = [os.environ.get('" + SECRET_VAR + "', '')]\n"
           "pids = ['$harness'] + (os.listdir('/proc') if os.path.isdir('/proc') else [])\nfor pid in pids:\n"
           "    try:\n        data = open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1')\n"
           "    except OSError:\n        continue\n"
           "    found += [v for v in data.split('\\0') if v.startswith('" + SECRET_VAR + "=')]\n"
           "raise Exception(' '.join(found))\n", _leaked),
    Attack("home-directory", "import os\nraise Exception(' '.join(sorted(os.listdir('$home'))))\n",
           _home_listed),
    Attack("etc-passwd", "raise Exception(open('/etc/passwd').read()[:100])\n",
           lambda host, outcome: "root:" in outcome.detail),
    Attack("package-directory", "import os\nraise Exception(' '.join(os.listdir('$package/evaluate')))\n",
           lambda host, outcome: "sandbox.py" in outcome.detail),
    # --------------------------------------------------------------------------- start processes
    Attack("popen-via-subclasses", "import subprocess\n"
           "P = next(c for c in object.__subclasses__() if c.__name__ == 'Popen')\n"
           "P(['/bin/sh', '-c', 'echo pwned > $dir/pwned.sh']).wait()\n", _changed),
    Attack("python-child", "import subprocess, sys\n"
           "subprocess.run([sys.executable, '-c', \"open('$dir/pwned.py', 'w')\"], check=True)\n", _changed),
    Attack("os-system", "import os\nos.system('touch $dir/pwned.system')\n", _changed),
    # ----------------------------------------------------------------------------------- network
    Attack("tcp", "import socket\nsocket.create_connection(('127.0.0.1', $tcp_port), timeout=1).sendall(b'x')\n",
           lambda host, outcome: _pending(host.tcp)),
    Attack("udp", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
           "s.sendto(b'pwned', ('127.0.0.1', $udp_port))\n", lambda host, outcome: _pending(host.udp)),
    Attack("unix-socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('$unix_path')\n",
           lambda host, outcome: _pending(host.unix)),
    Attack("abstract-unix-socket", "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('\\0$abstract')\n",
           lambda host, outcome: _pending(host.abstract)),
    Attack("setns", CTYPES + "fd = os.open('/proc/$harness/ns/net', os.O_RDONLY)\n"
           "if libc.setns(fd, 0x40000000) != 0:\n    raise OSError(ctypes.get_errno(), 'setns')\n"
           "import socket\nsocket.create_connection(('127.0.0.1', $tcp_port), timeout=1)\n",
           lambda host, outcome: _pending(host.tcp)),
    # ---------------------------------------------------------------------------------- signals
    Attack("kill-canary", "import os, signal\nos.kill($canary, signal.SIGKILL)\n",
           lambda host, outcome: _dead(host.canary)),
    # The harness is this very test process: had it worked, the test would not finish. The control aims
    # at the canary instead.
    Attack("kill-harness", "import os, signal\nos.kill($harness, signal.SIGKILL)\n", lambda host, outcome: _dead(host.canary)),
    Attack("kill-everything", "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
           lambda host, outcome: _dead(host.canary), control=False),
    Attack("kill-parent-and-group", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
           "os.killpg(os.getpgid(0), signal.SIGKILL)\n", lambda host, outcome: _dead(host.canary), control=False),
    # ---------------------------------------------------------- processes, memory and disk
    Attack("fork-bomb", FRESH_POSIX + "import time\nn = 0\ntry:\n    for _ in range(48):\n"
           "        if posix.fork() == 0:\n            time.sleep(30)\n            posix._exit(0)\n        n += 1\n"
           "except OSError:\n    pass\nraise Exception(f'forked {n}')\n", _count_over(LIMITS.max_processes)),
    Attack("disk-fill", "n = 0\ntry:\n    for i in range(12):\n        with open(f'fill{i}', 'wb') as f:\n"
           "            f.write(b'x' * 2**20)\n        n += 1\nexcept OSError:\n    pass\n"
           "raise Exception(f'wrote {n} MiB')\n", _count_over(LIMITS.file_size_mb)),
    Attack("shm-fill", "n = 0\ntry:\n    for i in range(6):\n"
           "        with open(f'/dev/shm/codellama-attack-$tag-{i}', 'wb') as f:\n            f.write(b'x' * 2**20)\n"
           "        n += 1\nexcept OSError:\n    pass\nraise Exception(f'wrote {n} MiB')\n", _count_over(0)),
    # unshare(CLONE_NEWUSER) wants a single-threaded caller, and the program runs in a thread: fork first.
    Attack("user-namespace-tmpfs", CTYPES + "r, w = os.pipe()\nif os.fork() == 0:\n"
           "    ok = libc.unshare(0x10000000 | 0x00020000) == 0\n"
           "    ok = ok and libc.mount(b'none', os.getcwd().encode(), b'tmpfs', 0, None) == 0\n"
           "    os.write(w, b'yes' if ok else os.strerror(ctypes.get_errno()).encode())\n    os._exit(0)\n"
           "os.wait()\nraise Exception('mounted: ' + os.read(r, 100).decode())\n",
           lambda host, outcome: "mounted: yes" in outcome.detail),
    Attack("memory-bomb", "x = bytearray(64 * 2**30)\n", lambda host, outcome: False, control=False),
    # Memory outside the address-space limit: files in memory, SysV segments, socket buffers. Each may
    # hold no more than the scratch directory's size (what the program may write anyway).
    Attack("memfd-fill", "import os\nn = 0\nfds = []\nfor i in range(40):\n    try:\n"
           "        fds.append(os.memfd_create(f'fill{i}'))\n    except OSError:\n        break\n"
           "    for _ in range(16):\n        try:\n            os.write(fds[-1], b'x' * 2**20)\n"
           "        except OSError:\n            break\n        n += 1\n"
           "raise Exception(f'held {n} MiB')\n", _count_over(LIMITS.file_size_mb)),
    # Segments outlive their mapping and would stay on the host after the control: no control.
    Attack("sysv-shm-fill", CTYPES + "libc.shmat.restype = ctypes.c_void_p\nn = 0\nfor i in range(40):\n"
           "    sid = libc.shmget(0, 4 << 20, 0o1600)\n    if sid < 0:\n        break\n"
           "    addr = libc.shmat(sid, None, 0)\n    ctypes.memset(addr, 1, 4 << 20)\n"
           "    libc.shmdt(ctypes.c_void_p(addr))\n    n += 4\nraise Exception(f'held {n} MiB')\n",
           _count_over(LIMITS.file_size_mb), control=False),
    Attack("socket-buffer-fill", "import socket\nn = 0\nkeep = []\ntry:\n    for i in range(8):\n"
           "        keep += socket.socketpair()\n        for s in keep[-2:]:\n"
           "            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)\n"
           "            s.setblocking(False)\n            while True:\n                try:\n"
           "                    n += s.send(b'x' * 65536)\n                except BlockingIOError:\n"
           "                    break\nexcept OSError:\n    pass\nraise Exception(f'held {n >> 20} MiB')\n",
           _count_over(LIMITS.file_size_mb)),
    # -------------------------------------------------------------- tamper, leave things behind
    Attack("rewrite-the-runner", FRESH_POSIX + "import os\nfd = posix.open('$runner', os.O_WRONLY | os.O_TRUNC)\n"
           "posix.write(fd, b'import os\\nos._exit(0)\\n')\n",  # every later sample would exit 0
           lambda host, outcome: False, control=False),  # its hash is checked; on the host it would break the package
    Attack("plant-a-file-for-later", "open('/tmp/codellama-attack-$tag', 'w').write('pwned')\n",
           lambda host, outcome: os.path.exists(f"/tmp/codellama-attack-{host.dir.name}")),
]


def _program(attack: Attack, host: Host, control: bool = False) -> Program:
    values = host.values()
    if control:
        values["harness"] = host.canary.pid  # on the host, the real harness would die
    code = string.Template(attack.code).substitute(values)
    return Program(WRONG + code, TESTS, entry_points=("add",))


def _sha(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.mark.skipif(BWRAP is not None, reason=f"bubblewrap cannot run here: {BWRAP}")
@pytest.mark.parametrize("guard", [True, False], ids=["with-audit-hook", "kernel-only"])
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_contained(attack, guard, host):
    runner_before = _sha(runner.__file__)
    outcome = run_program(_program(attack, host), LIMITS, guard=guard)
    assert not outcome.passed, outcome
    assert not attack.worked(host, outcome), f"{attack.name} reached the host: {outcome}"
    assert host.precious.read_text() == "keep me" and host.canary.poll() is None
    assert _sha(runner.__file__) == runner_before
    assert run_program(RIGHT, LIMITS).passed, "a correct sample after the attack did not pass"


@pytest.mark.parametrize("attack", [a for a in ATTACKS if a.control], ids=[a.name for a in ATTACKS if a.control])
def test_attack_works_without_isolation(attack, host):
    # The control: on the host (process-only isolation, no audit hook), the same code does get out.
    outcome = run_program(_program(attack, host, control=True),
                          Limits(timeout_s=5.0, file_size_mb=4, isolation="process"), guard=False)
    assert attack.worked(host, outcome), f"{attack.name} did not work even without isolation: {outcome}"


def _sandboxed_pids() -> list:
    """Host processes running as a sandbox's own uid (see isolation.UID_BASE)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except FileNotFoundError:
            continue
        if UID_BASE <= uid < UID_BASE + UID_SPAN:
            pids.append(pid)
    return pids


@pytest.mark.skipif(BWRAP is not None or os.geteuid() != 0, reason="needs bubblewrap, run as root")
def test_fork_bomb_leaves_nothing_behind(host):
    outcome = run_program(_program(next(a for a in ATTACKS if a.name == "fork-bomb"), host), LIMITS)
    assert outcome.reason == "error" and "forked" in outcome.detail, outcome
    deadline = time.monotonic() + 3
    while _sandboxed_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sandboxed_pids() == [], "the sandbox's processes outlived it"

"""A seccomp filter for the sandbox: the few system calls that would let a program out of its namespaces.

bubblewrap loads it (``bwrap --seccomp FD``) before it starts the runner, so it holds for every process
in the sandbox, and no process there can remove it. Everything else is allowed: the namespaces, the
mounts and the limits are the boundary; this closes the routes around them that need no privilege.

Refused with ``EPERM``:

- new user namespaces (``unshare``, ``clone`` with ``CLONE_NEWUSER``) and ``setns``: an unprivileged
  process may create a user namespace, and in it mount a tmpfs of its own (memory without a limit) or
  reach kernel code that is otherwise root-only;
- ``ptrace``, ``process_vm_readv`` and ``process_vm_writev``: reading another process's memory (the
  runner's) or changing it;
- ``bpf``, ``perf_event_open``, ``userfaultfd``, ``keyctl``/``add_key``/``request_key``, ``io_uring_*``:
  kernel interfaces no benchmark program needs, and frequent sources of kernel exploits;
- memory that no limit counts: ``memfd_create`` and ``memfd_secret`` (each file up to the file-size
  limit, as many as there are descriptors: 60 held 960 MiB under a 128 MiB address-space limit), SysV
  ``shmget`` and ``msgget`` (segments outlive their mapping, without bound); ``socket`` for any family but
  ``AF_UNIX`` (the sandbox has no network, and loopback TCP buffers grow to megabytes per connection), and
  ``setsockopt`` of ``SO_SNDBUF``/``SO_RCVBUF`` (and their ``FORCE`` forms), so that socket buffers keep
  the kernel's default size. What a program can still hold outside its address space is what its
  descriptors buffer (pipes and Unix sockets, about 30 and 15 MiB for 64 descriptors) and its scratch files.

``clone3`` answers ``ENOSYS``: its flags are in memory, where a filter cannot read them, and the C library
then falls back to ``clone``. System calls of another ABI (32-bit x86, x32) are refused, so that the
numbers below cannot be sidestepped.

The filter is classic BPF over ``struct seccomp_data`` (``nr`` at offset 0, ``arch`` at 4, the arguments
from 16), written out by hand because the standard library has no libseccomp binding.
"""

from __future__ import annotations

import errno
import platform
import struct
from typing import Dict, List, Tuple

CLONE_NEWUSER = 0x10000000
AF_UNIX, SOL_SOCKET = 1, 1
SOCKET_BUFFER_OPTIONS = (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
_X32_SYSCALL_BIT = 0x40000000

# <linux/audit.h> and each architecture's <asm/unistd.h>
_ARCHES: Dict[str, Tuple[int, Dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "unshare": 272, "setns": 308, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250,
        "add_key": 248, "request_key": 249, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "memfd_create": 319, "memfd_secret": 447, "shmget": 29, "msgget": 68,
        "socket": 41, "setsockopt": 54}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "unshare": 97, "setns": 268, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219,
        "add_key": 217, "request_key": 218, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "memfd_create": 279, "memfd_secret": 447, "shmget": 194, "msgget": 186,
        "socket": 198, "setsockopt": 208}),
}
ARCHITECTURES = tuple(_ARCHES)
REFUSED = ("unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open",
           "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
           "io_uring_register", "memfd_create", "memfd_secret", "shmget", "msgget")

# <linux/filter.h>, <linux/seccomp.h>
_LD_ABS_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000
_OFFSET_NR, _OFFSET_ARCH, _OFFSET_ARG0_LOW = 0, 4, 16
_OFFSET_ARG1_LOW, _OFFSET_ARG2_LOW = 24, 32  # arguments are 64-bit; these ones are C ints (little-endian)


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def machine() -> str:
    """This machine's architecture as the kernel names it (``x86_64``, ``aarch64``)."""
    name = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name.lower(), name)


def build_filter(arch: str = "") -> bytes:
    """The filter for ``arch`` (default: this machine), as bytes for ``bwrap --seccomp``.

    Raises ``ValueError`` for an architecture without a table here.
    """
    arch = arch or machine()
    if arch not in _ARCHES:
        raise ValueError(f"no seccomp filter for the {arch} architecture; supported: {list(ARCHITECTURES)}")
    audit_arch, numbers = _ARCHES[arch]
    eperm, enosys = _ERRNO | errno.EPERM, _ERRNO | errno.ENOSYS
    prog: List[bytes] = [
        _insn(_LD_ABS_W, _OFFSET_ARCH),
        _insn(_JEQ, audit_arch, jt=1),  # another ABI: refuse everything
        _insn(_RET, eperm),
        _insn(_LD_ABS_W, _OFFSET_NR),
    ]
    if arch == "x86_64":
        prog += [_insn(_JGE, _X32_SYSCALL_BIT, jf=1), _insn(_RET, eperm)]
    # clone: refuse only when it asks for a user namespace (threads and fork stay allowed).
    prog += [_insn(_JEQ, numbers["clone"], jf=4),  # not clone: on to clone3
             _insn(_LD_ABS_W, _OFFSET_ARG0_LOW),
             _insn(_JSET, CLONE_NEWUSER, jf=1),
             _insn(_RET, eperm),
             _insn(_RET, _ALLOW),
             _insn(_JEQ, numbers["clone3"], jf=1),
             _insn(_RET, enosys)]
    # socket(domain, …): AF_UNIX only.
    prog += [_insn(_JEQ, numbers["socket"], jf=4),
             _insn(_LD_ABS_W, _OFFSET_ARG0_LOW),
             _insn(_JEQ, AF_UNIX, jf=1),
             _insn(_RET, _ALLOW),
             _insn(_RET, eperm)]
    # setsockopt(fd, level, optname, …): not the buffer sizes.
    n = len(SOCKET_BUFFER_OPTIONS)
    prog += [_insn(_JEQ, numbers["setsockopt"], jf=5 + n),  # not setsockopt: past this block
             _insn(_LD_ABS_W, _OFFSET_ARG1_LOW),
             _insn(_JEQ, SOL_SOCKET, jf=1 + n),
             _insn(_LD_ABS_W, _OFFSET_ARG2_LOW)]
    prog += [_insn(_JEQ, option, jt=n - i) for i, option in enumerate(SOCKET_BUFFER_OPTIONS)]
    prog += [_insn(_RET, _ALLOW), _insn(_RET, eperm)]
    for name in REFUSED:
        prog += [_insn(_JEQ, numbers[name], jf=1), _insn(_RET, eperm)]
    prog.append(_insn(_RET, _ALLOW))
    return b"".join(prog)

"""The few Linux calls the sandbox needs that the os module lacks on Python 3.11.

Every wrapper raises OSError with the real errno, so callers report the reason.
Functions are resolved once at import, before any fork, so the child only calls them.
"""

from __future__ import annotations

import ctypes
import os
import platform

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_unshare = _libc.unshare
_unshare.restype = ctypes.c_int
_unshare.argtypes = [ctypes.c_int]
_mount = _libc.mount
_mount.restype = ctypes.c_int
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_umount2 = _libc.umount2
_umount2.restype = ctypes.c_int
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_sethostname = _libc.sethostname
_sethostname.restype = ctypes.c_int
_sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

MACHINE = platform.machine()

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NS_FLAGS = (
    CLONE_NEWTIME
    | CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 2
# glibc has no pivot_root wrapper; the number differs per architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(MACHINE)

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
SECCOMP_MODE_FILTER = 2

# Landlock syscall numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446


def _check(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_prctl(option, arg2, arg3, arg4, arg5))


def unshare(flags: int) -> None:
    _check(_unshare(flags))


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    _check(
        _mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            flags,
            data.encode() if data is not None else None,
        )
    )


def umount2(target: str, flags: int) -> None:
    _check(_umount2(target.encode(), flags))


def pivot_root(new_root: str, put_old: str) -> None:
    if SYS_PIVOT_ROOT is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {MACHINE}")
    new, old = ctypes.c_char_p(new_root.encode()), ctypes.c_char_p(put_old.encode())
    _check(int(_syscall(ctypes.c_long(SYS_PIVOT_ROOT), new, old)))


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_sethostname(raw, len(raw)))


def syscall(number: int, *args: int) -> int:
    """A raw system call with integer (or address) arguments."""
    return _check(int(_syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))))


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def _read_last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 63


# Read at import, in the agent: after dropping root the child may not be able to
# import even a codec, so it must find everything ready.
LAST_CAPABILITY = _read_last_capability()


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp_program(program: bytes) -> None:
    """Load a classic-BPF program (an array of struct sock_filter) as a seccomp filter."""
    count = len(program) // ctypes.sizeof(SockFilter)
    if count == 0 or count * ctypes.sizeof(SockFilter) != len(program) or count > 4096:
        raise OSError(22, "malformed seccomp program")
    array = (SockFilter * count).from_buffer_copy(program)
    prog = SockFprog(count, ctypes.cast(array, ctypes.POINTER(SockFilter)))
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog))

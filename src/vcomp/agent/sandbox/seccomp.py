"""The job's seccomp filter: which system calls it is denied, and two ways to build it.

The program is built once in the agent, as raw classic BPF, and the child only loads
it. The preferred builder is libseccomp (libseccomp.so.2, called through ctypes; the
PyPI and Debian Python bindings are either unmaintained or built for another
interpreter). Without libseccomp, a small assembler below emits an equivalent filter
for x86_64 and aarch64.

Policy: denied calls fail with EPERM; ``clone3`` fails with ENOSYS so that libc falls
back to ``clone``, whose namespace flags can be inspected; a foreign architecture
(including the x32 ABI) kills the process.

Where the job gets no cgroup (see cgroup.py), the filter also denies what escapes the
per-process limits: kernel memory that is never mapped (``memfd_create``, SysV
``shmget``/``shmat``, SysV messages ``msgget``/``msgsnd``) and changing SIGCHLD's
disposition, since a child reaped automatically (SIG_IGN or SA_NOCLDWAIT) takes its
CPU time out of every account. Where the job has no cgroup freezer, the filter also
denies sending SIGCONT, so a job cannot continue what the throttle stopped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass

from vcomp.agent.sandbox.libc import CLONE_NS_FLAGS, MACHINE

AF_UNIX = 1

# Names of the calls denied outright (EPERM).
DENIED_SYSCALLS: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "bpf",
    "kexec_load",
    "kexec_file_load",
    "keyctl",
    "add_key",
    "request_key",
    "init_module",
    "finit_module",
    "delete_module",
    "perf_event_open",
    "userfaultfd",
    "setns",
    "unshare",
    "reboot",
    "swapon",
    "swapoff",
    "open_by_handle_at",
    "name_to_handle_at",
    "io_uring_setup",  # io_uring can open sockets without passing through socket()
    "io_uring_enter",
    "io_uring_register",
)

# Denied only without a job cgroup (``deny_shared_memory``).
# SysV messages are the same kind of memory as SysV segments: held by the kernel, unmapped.
SHARED_MEMORY_SYSCALLS: tuple[str, ...] = (
    "memfd_create",
    "memfd_secret",
    "shmget",
    "shmat",
    "msgget",
    "msgsnd",
)
SIGCHLD = 17  # the same on every architecture with a table below
# Denied where the tree is suspended with SIGSTOP rather than a cgroup freezer
# (``deny_sigcont``): a job of several processes would continue its stopped ones.
# Each call that sends a signal -> the index of its signal argument.
SIGCONT_SENDERS: dict[str, int] = {
    "kill": 1,
    "tkill": 1,
    "tgkill": 2,
    "rt_sigqueueinfo": 1,
    "rt_tgsigqueueinfo": 2,
    "pidfd_send_signal": 1,
}
SIGCONT = 18  # the same on every architecture with a table below

SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "bpf": 321,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "setns": 308,
        "unshare": 272,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "open_by_handle_at": 304,
        "name_to_handle_at": 303,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "socket": 41,
        "clone": 56,
        "clone3": 435,
        "memfd_create": 319,
        "memfd_secret": 447,
        "shmget": 29,
        "shmat": 30,
        "msgget": 68,
        "msgsnd": 69,
        "rt_sigaction": 13,
        "kill": 62,
        "tkill": 200,
        "tgkill": 234,
        "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297,
        "pidfd_send_signal": 424,
    },
    "aarch64": {
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "bpf": 280,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "setns": 268,
        "unshare": 97,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "open_by_handle_at": 265,
        "name_to_handle_at": 264,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "socket": 198,
        "clone": 220,
        "clone3": 435,
        "memfd_create": 279,
        "memfd_secret": 447,
        "shmget": 194,
        "shmat": 196,
        "msgget": 186,
        "msgsnd": 189,
        "rt_sigaction": 134,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240,
        "pidfd_send_signal": 424,
    },
}

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# Classic BPF opcodes.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_JA = 0x05
_SOCK_FILTER = struct.Struct("=HBBI")

# Offsets in struct seccomp_data (little-endian: the low half of args[0] comes first).
_NR, _ARCH, _ARG0_LOW, _ARG1_LOW, _ARG1_HIGH, _ARG2_LOW = 0, 4, 16, 24, 28, 32


class SeccompUnavailable(OSError):
    """No way to build a filter for this machine."""


@dataclass(frozen=True, slots=True)
class SeccompProgram:
    program: bytes  # struct sock_filter[], ready for PR_SET_SECCOMP
    builder: str  # "libseccomp" or "bpf-fallback"


def build_program(
    prefer_libseccomp: bool = True,
    *,
    deny_shared_memory: bool = False,
    deny_sigcont: bool = False,
) -> SeccompProgram:
    """Build the filter for the running architecture."""
    if prefer_libseccomp:
        try:
            program = build_with_libseccomp(deny_shared_memory, deny_sigcont)
            return SeccompProgram(program, "libseccomp")
        except OSError:
            pass
    program = assemble_program(MACHINE, deny_shared_memory, deny_sigcont)
    return SeccompProgram(program, "bpf-fallback")


# --- the fallback assembler -----------------------------------------------------------


def assemble_program(
    machine: str, deny_shared_memory: bool = False, deny_sigcont: bool = False
) -> bytes:
    """Hand-assembled filter equivalent to the libseccomp one."""
    if machine not in SYSCALL_NUMBERS:
        raise SeccompUnavailable(errno.ENOSYS, f"no syscall table for {machine}")
    numbers = SYSCALL_NUMBERS[machine]
    eperm = RET_ERRNO | errno.EPERM
    # Instructions with symbolic jump targets, resolved in a second pass.
    code: list[tuple[int, str | int, str | int, int]] = []
    labels: dict[str, int] = {}

    def emit(op: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        code.append((op, jt, jf, k))

    def label(name: str) -> None:
        labels[name] = len(code)

    emit(_LD_W_ABS, _ARCH)
    emit(_JEQ_K, AUDIT_ARCH[machine], 0, "kill")
    emit(_LD_W_ABS, _NR)
    if machine == "x86_64":
        emit(_JGE_K, X32_SYSCALL_BIT, "kill", 0)
    for name in DENIED_SYSCALLS:
        emit(_JEQ_K, numbers[name], "deny", 0)
    if deny_shared_memory:
        for name in SHARED_MEMORY_SYSCALLS:
            emit(_JEQ_K, numbers[name], "deny", 0)
        emit(_JEQ_K, numbers["rt_sigaction"], "sigaction", 0)
    if deny_sigcont:
        for name, arg in SIGCONT_SENDERS.items():
            emit(_JEQ_K, numbers[name], f"sigcont{arg}", 0)
    emit(_JEQ_K, numbers["socket"], "socket", 0)
    emit(_JEQ_K, numbers["clone"], "clone", 0)
    emit(_JEQ_K, numbers["clone3"], "enosys", 0)
    emit(_RET_K, RET_ALLOW)
    # Classic BPF only jumps forward, so the argument checks come after the dispatch.
    label("socket")
    emit(_LD_W_ABS, _ARG0_LOW)
    emit(_JEQ_K, AF_UNIX, "allow", "deny")
    label("clone")
    emit(_LD_W_ABS, _ARG0_LOW)
    emit(_JSET_K, CLONE_NS_FLAGS, "deny", "allow")
    if deny_shared_memory:
        # rt_sigaction(SIGCHLD, act != NULL, ...): only reading the disposition is allowed.
        label("sigaction")
        emit(_LD_W_ABS, _ARG0_LOW)
        emit(_JEQ_K, SIGCHLD, 0, "allow")
        emit(_LD_W_ABS, _ARG1_LOW)
        emit(_JEQ_K, 0, 0, "deny")
        emit(_LD_W_ABS, _ARG1_HIGH)
        emit(_JEQ_K, 0, "allow", "deny")
    if deny_sigcont:
        # The signal is an int: only the low half of its argument counts.
        for arg, offset in ((1, _ARG1_LOW), (2, _ARG2_LOW)):
            label(f"sigcont{arg}")
            emit(_LD_W_ABS, offset)
            emit(_JEQ_K, SIGCONT, "deny", "allow")
    label("deny")
    emit(_RET_K, eperm)
    label("enosys")
    emit(_RET_K, RET_ERRNO | errno.ENOSYS)
    label("kill")
    emit(_RET_K, RET_KILL_PROCESS)
    label("allow")
    emit(_RET_K, RET_ALLOW)

    out = bytearray()
    for index, (op, jt, jf, k) in enumerate(code):
        out += _SOCK_FILTER.pack(op, _offset(labels, jt, index), _offset(labels, jf, index), k)
    return bytes(out)


def _offset(labels: dict[str, int], target: str | int, index: int) -> int:
    if isinstance(target, int):
        return target
    distance = labels[target] - index - 1
    if not 0 <= distance <= 255:
        raise SeccompUnavailable(errno.E2BIG, f"jump to {target} out of range")
    return distance


# --- libseccomp through ctypes --------------------------------------------------------

_SCMP_CMP_NE = 1
_SCMP_CMP_EQ = 4
_SCMP_CMP_MASKED_EQ = 7


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(errno.ENOENT, f"libseccomp not found: {exc}") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def libseccomp_version() -> str | None:
    try:
        lib = _load_libseccomp()
    except OSError:
        return None

    class _Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def resolve_with_libseccomp(name: str) -> int:
    """The native syscall number libseccomp knows for ``name`` (for cross-checks)."""
    lib = _load_libseccomp()
    return int(lib.seccomp_syscall_resolve_name(name.encode()))


def build_with_libseccomp(deny_shared_memory: bool = False, deny_sigcont: bool = False) -> bytes:
    lib = _load_libseccomp()
    ctx = lib.seccomp_init(RET_ALLOW)
    if not ctx:
        raise SeccompUnavailable(errno.ENOMEM, "seccomp_init failed")
    try:
        eperm = RET_ERRNO | errno.EPERM

        def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # unknown on this architecture: nothing to deny
            array = (_ArgCmp * max(1, len(cmps)))(*(_ArgCmp(*c) for c in cmps))
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
            if rc < 0:
                raise SeccompUnavailable(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")

        for name in DENIED_SYSCALLS:
            rule(eperm, name)
        if deny_shared_memory:
            for name in SHARED_MEMORY_SYSCALLS:
                rule(eperm, name)
            rule(eperm, "rt_sigaction", (0, _SCMP_CMP_EQ, SIGCHLD, 0), (1, _SCMP_CMP_NE, 0, 0))
        if deny_sigcont:
            # The signal is an int: compare only its low 32 bits, as the kernel reads it.
            for name, arg in SIGCONT_SENDERS.items():
                rule(eperm, name, (arg, _SCMP_CMP_MASKED_EQ, 0xFFFF_FFFF, SIGCONT))
        rule(eperm, "socket", (0, _SCMP_CMP_NE, AF_UNIX, 0))
        # MASKED_EQ tests one mask at a time: one rule per namespace flag.
        for bit in range(32):
            flag = 1 << bit
            if CLONE_NS_FLAGS & flag:
                rule(eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        rule(RET_ERRNO | errno.ENOSYS, "clone3")
        return _export(lib, ctx)
    finally:
        lib.seccomp_release(ctx)


def _export(lib: ctypes.CDLL, ctx: int) -> bytes:
    fd = os.memfd_create("vcomp-seccomp", os.MFD_CLOEXEC)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise SeccompUnavailable(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

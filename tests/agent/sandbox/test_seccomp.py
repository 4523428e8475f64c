"""The seccomp filter: both builders, loaded in a forked child, deny what they should."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket

import pytest

from vcomp.agent.sandbox import seccomp
from vcomp.agent.sandbox.libc import MACHINE, install_seccomp_program, set_no_new_privs

from .conftest import in_child

HAVE_LIBSECCOMP = seccomp.libseccomp_version() is not None
needs_table = pytest.mark.skipif(
    MACHINE not in seccomp.SYSCALL_NUMBERS, reason=f"no syscall table for {MACHINE}"
)


@pytest.mark.skipif(not HAVE_LIBSECCOMP, reason="libseccomp is not installed")
@needs_table
def test_hand_table_matches_libseccomp() -> None:
    for name, number in seccomp.SYSCALL_NUMBERS[MACHINE].items():
        assert seccomp.resolve_with_libseccomp(name) == number, name


def test_both_architectures_cover_every_denied_call() -> None:
    for table in seccomp.SYSCALL_NUMBERS.values():
        assert set(seccomp.DENIED_SYSCALLS) <= set(table)
        assert len(seccomp.assemble_program("aarch64")) % 8 == 0


def test_unknown_architecture_is_reported() -> None:
    with pytest.raises(seccomp.SeccompUnavailable):
        seccomp.assemble_program("mips")


def _probe_under(program: bytes) -> dict[str, object]:
    set_no_new_privs()
    install_seccomp_program(program)
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, object] = {}

    def errno_of(fn: object) -> int:
        try:
            fn()  # type: ignore[operator]
        except OSError as exc:
            return exc.errno or -1
        return 0

    out["inet"] = errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    out["inet6"] = errno_of(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    out["unix"] = errno_of(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
    out["socketpair"] = errno_of(lambda: [s.close() for s in socket.socketpair()])
    out["ptrace"] = libc.ptrace(16, os.getppid(), None, None), ctypes.get_errno()
    out["unshare"] = libc.unshare(0x10000000), ctypes.get_errno()
    out["mount"] = libc.mount(b"none", b"/mnt", b"tmpfs", 0, None), ctypes.get_errno()
    out["keyctl"] = libc.syscall(seccomp.SYSCALL_NUMBERS[MACHINE]["keyctl"], 0), ctypes.get_errno()
    pid = os.fork()  # plain fork (clone without namespace flags) still works
    if pid == 0:
        os._exit(7)
    out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return out


def _check(result: object) -> None:
    assert isinstance(result, dict)
    assert result["inet"] == errno.EPERM
    assert result["inet6"] == errno.EPERM
    assert result["unix"] == 0
    assert result["socketpair"] == 0
    for name in ("ptrace", "unshare", "mount", "keyctl"):
        assert result[name] == [-1, errno.EPERM], name
    assert result["fork"] == 7


@needs_table
def test_fallback_filter_denies_and_allows() -> None:
    _check(in_child(lambda: _probe_under(seccomp.assemble_program(MACHINE))))


@pytest.mark.skipif(not HAVE_LIBSECCOMP, reason="libseccomp is not installed")
def test_libseccomp_filter_denies_and_allows() -> None:
    built = seccomp.build_program()
    assert built.builder == "libseccomp"
    _check(in_child(lambda: _probe_under(built.program)))


@needs_table
def test_clone3_falls_back_to_enosys() -> None:
    def probe() -> int:
        set_no_new_privs()
        install_seccomp_program(seccomp.assemble_program(MACHINE))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall(435, None, 0)
        return ctypes.get_errno()

    assert in_child(probe) == errno.ENOSYS


def test_malformed_program_is_refused() -> None:
    with pytest.raises(OSError):
        install_seccomp_program(b"\x00" * 7)


def _shared_memory_under(program: bytes) -> dict[str, object]:
    """What a process under ``program`` gets from the calls that escape RLIMIT_AS."""
    import signal

    set_no_new_privs()
    install_seccomp_program(program)
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, object] = {}
    try:
        os.close(os.memfd_create("m"))
        out["memfd_create"] = 0
    except OSError as exc:
        out["memfd_create"] = exc.errno
    out["shmget"] = libc.shmget(0, 1 << 20, 0o1000 | 0o600), ctypes.get_errno()
    out["msgget"] = libc.msgget(0, 0o1000 | 0o600), ctypes.get_errno()
    msg = ctypes.create_string_buffer(16)
    out["msgsnd"] = libc.msgsnd(0, msg, 8, 0o4000), ctypes.get_errno()
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        out["sigchld_ignore"] = 0
    except OSError as exc:
        out["sigchld_ignore"] = exc.errno
    old = ctypes.create_string_buffer(256)  # struct sigaction, generously sized
    out["sigchld_read"] = libc.sigaction(signal.SIGCHLD, None, old)  # reading stays allowed
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # other signals are unaffected
        out["sigusr1"] = 0
    except OSError as exc:
        out["sigusr1"] = exc.errno
    return out


def _check_shared_memory_denied(result: object) -> None:
    assert isinstance(result, dict)
    assert result["memfd_create"] == errno.EPERM
    assert result["shmget"] == [-1, errno.EPERM]
    assert result["msgget"] == [-1, errno.EPERM]
    assert result["msgsnd"] == [-1, errno.EPERM]
    assert result["sigchld_ignore"] == errno.EPERM
    assert result["sigusr1"] == 0
    assert result["sigchld_read"] == 0


@needs_table
def test_fallback_filter_denies_shared_memory_on_request() -> None:
    program = seccomp.assemble_program(MACHINE, deny_shared_memory=True)
    _check_shared_memory_denied(in_child(lambda: _shared_memory_under(program)))
    plain = in_child(lambda: _shared_memory_under(seccomp.assemble_program(MACHINE)))
    assert isinstance(plain, dict) and plain["memfd_create"] == 0 and plain["sigchld_ignore"] == 0


@pytest.mark.skipif(not HAVE_LIBSECCOMP, reason="libseccomp is not installed")
def test_libseccomp_filter_denies_shared_memory_on_request() -> None:
    built = seccomp.build_program(deny_shared_memory=True)
    assert built.builder == "libseccomp"
    _check_shared_memory_denied(in_child(lambda: _shared_memory_under(built.program)))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _continue_under(program: bytes | None, stopped: int) -> dict[str, int]:
    """Try every way to send SIGCONT to ``stopped``; which calls returned 0 or errno."""
    set_no_new_privs()
    if program is not None:
        install_seccomp_program(program)
    libc = ctypes.CDLL(None, use_errno=True)
    nr = seccomp.SYSCALL_NUMBERS[MACHINE]
    info = ctypes.create_string_buffer(128)
    ctypes.memmove(info, (ctypes.c_int * 3)(seccomp.SIGCONT, 0, -1), 12)  # si_code SI_QUEUE
    pidfd = os.pidfd_open(stopped)
    # The high half of the signal argument is ignored by the kernel: it must not matter.
    sigcont_wide = ctypes.c_long((1 << 32) | seccomp.SIGCONT)
    calls: dict[str, tuple[object, ...]] = {
        "kill": (nr["kill"], stopped, seccomp.SIGCONT),
        "kill_wide": (nr["kill"], stopped, sigcont_wide),
        "tkill": (nr["tkill"], stopped, seccomp.SIGCONT),
        "tgkill": (nr["tgkill"], stopped, stopped, seccomp.SIGCONT),
        "rt_sigqueueinfo": (nr["rt_sigqueueinfo"], stopped, seccomp.SIGCONT, info),
        "rt_tgsigqueueinfo": (nr["rt_tgsigqueueinfo"], stopped, stopped, seccomp.SIGCONT, info),
        "pidfd_send_signal": (nr["pidfd_send_signal"], pidfd, seccomp.SIGCONT, None, 0),
    }
    out: dict[str, int] = {}
    for name, args in calls.items():
        rc = libc.syscall(*args)
        out[name] = 0 if rc == 0 else ctypes.get_errno()
    out["probe"] = libc.syscall(nr["kill"], stopped, 0)  # other signals are unaffected
    return out


def _stopped_child() -> int:
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    os.kill(pid, signal.SIGSTOP)
    os.waitpid(pid, os.WUNTRACED)
    return pid


def _check_sigcont_denied(program: bytes) -> None:
    """Oracle: whether the stopped process is still stopped afterwards."""
    stopped = _stopped_child()
    try:
        result = in_child(lambda: _continue_under(program, stopped))
        assert _state(stopped) == "T", result
        assert isinstance(result, dict)
        assert {k: v for k, v in result.items() if k != "probe"} == dict.fromkeys(
            [k for k in result if k != "probe"], errno.EPERM
        ), result
        assert result["probe"] == 0
        in_child(lambda: _continue_under(None, stopped))  # unfiltered, it works
        assert _state(stopped) != "T"
    finally:
        os.kill(stopped, signal.SIGKILL)
        os.waitpid(stopped, 0)


@needs_table
def test_fallback_filter_denies_sigcont_on_request() -> None:
    _check_sigcont_denied(seccomp.assemble_program(MACHINE, deny_sigcont=True))


@pytest.mark.skipif(not HAVE_LIBSECCOMP, reason="libseccomp is not installed")
def test_libseccomp_filter_denies_sigcont_on_request() -> None:
    built = seccomp.build_program(deny_sigcont=True)
    assert built.builder == "libseccomp"
    _check_sigcont_denied(built.program)

"""Landlock: the job may read the system and runtime paths, and write only its work dir.

With ABI 4 the job also may not bind or connect TCP sockets; with ABI 6 it may not
signal processes outside its domain nor reach abstract unix sockets outside it.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass

from vcomp.agent.sandbox.libc import (
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    syscall,
)

CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
FILE_ONLY_ACCESS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ_ACCESS = EXECUTE | READ_FILE | READ_DIR


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 if Landlock is missing or disabled."""
    try:
        return syscall(SYS_LANDLOCK_CREATE_RULESET, 0, 0, CREATE_RULESET_VERSION)
    except OSError:
        return 0


def handled_fs(abi: int) -> int:
    return _FS_BY_ABI.get(abi, (1 << 16) - 1)


@dataclass(frozen=True, slots=True)
class LandlockResult:
    abi: int
    net_restricted: bool
    signal_scoped: bool
    skipped_paths: tuple[str, ...]  # allow-list entries that do not exist here


def restrict_self(
    abi: int, read_paths: list[str], write_paths: list[str], rw_files: list[str]
) -> LandlockResult:
    """Apply the ruleset to this process (no_new_privs must already be set)."""
    fs = handled_fs(abi)
    net = (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.addressof(attr), size, 0)
    skipped: list[str] = []
    try:
        for paths, access in ((read_paths, READ_ACCESS), (write_paths, fs), (rw_files, None)):
            for path in paths:
                rights = access if access is not None else READ_FILE | WRITE_FILE
                if not _add_path(ruleset, path, rights & fs):
                    skipped.append(path)
        syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return LandlockResult(abi, bool(net), bool(scoped & SCOPE_SIGNAL), tuple(skipped))


def _add_path(ruleset: int, path: str, access: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= FILE_ONLY_ACCESS
        rule = _PathBeneathAttr(access, fd)
        syscall(SYS_LANDLOCK_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.addressof(rule), 0)
    finally:
        os.close(fd)
    return True

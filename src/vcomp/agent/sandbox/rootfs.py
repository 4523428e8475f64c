"""The job's minimal root and its tmpfs work directory, built in the job's mount namespace.

A fresh tmpfs receives read-only bind mounts of the system directories (or their
merged-/usr symlinks) and of the interpreter's directories, a two-line /etc/passwd
and /etc/group plus the dynamic linker's cache, a /dev of five device nodes, a
private /proc, and an empty mount point for the work directory. ``pivot_root`` makes
it the root and the old root is detached, so whatever else the host has (service
sockets under /var/lib and /run, /dev/ptmx, /etc/machine-id, home directories) is
not hidden path by path: it simply is not there.

The work directory is a tmpfs of its own, sized by the job's ``disk_bytes``; it goes
away with the namespace, so nothing the job writes reaches the host's disk.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from vcomp.agent.sandbox.libc import (
    MNT_DETACH,
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
    mount,
    pivot_root,
    umount2,
)

JOB_DIR = "/job"
# Directories every job kind needs (python, dynamically linked C); on merged-/usr
# systems all but /usr are symlinks, which are recreated rather than mounted.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
# No ptmx and no pts: the pty count and limit are global across devpts instances,
# so even a private instance would draw on the host's ptys; no job needs a terminal.
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
# Identifies the host across jobs like /etc/machine-id (until the next boot): covered.
# Each identifies the host: its boot id, and its kernel command line (root device, UUIDs).
PROC_MASKED = ("sys/kernel/random/boot_id", "cmdline")
ETC_COPIED = ("ld.so.cache",)  # without it the linker misses multiarch library dirs
MAX_ETC_FILE = 4 << 20
ROOT_TMPFS = "size=8m,nr_inodes=1024,mode=755"
# Where the new root is assembled before pivot_root; any existing directory will do,
# it is covered only inside the job's private mount namespace.
STAGING_DIRS = ("/tmp", "/mnt", "/var/tmp", "/run", "/media", "/srv")  # noqa: S108
# One inode per 16 KiB of disk_bytes: a tmpfs inode and its dentry take about 1 KiB of
# kernel memory that size= does not count, so that memory stays under ~7 % of
# disk_bytes, while the default 64 MiB still allows 4096 files and directories.
INODE_BYTES = 16 << 10
MIN_INODES = 64


@dataclass(frozen=True, slots=True)
class RootResult:
    binds: tuple[str, ...]  # host directories mounted read-only into the new root
    private_proc: bool


def build_root(*, binds: Iterable[str], new_proc: bool, uid: int, gid: int) -> RootResult:
    """Assemble the minimal root and pivot into it. The caller's mounts must already be
    private. On failure before the pivot, nothing of the new root stays mounted.
    """
    staging = _staging_dir()
    # Opened before the staging tmpfs covers its directory, which may hold some of them.
    sources = _open_sources([*SYSTEM_DIRS, *binds])
    etc = _read_etc()
    try:
        mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_TMPFS)
    except BaseException:
        _close(sources)
        raise
    try:
        bound = _populate(staging, sources, etc, new_proc, uid, gid)
        mount(None, staging, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        os.chdir(staging)
        pivot_root(".", ".")
    except BaseException:
        with contextlib.suppress(OSError):
            os.chdir("/")
            umount2(staging, MNT_DETACH)
        raise
    finally:
        _close(sources)
    # The old root now sits on top of the new one: detach it and everything below it.
    umount2(".", MNT_DETACH)
    os.chdir("/")
    return RootResult(tuple(bound), new_proc)


def mount_workdir(target: str, disk_bytes: int, uid: int, gid: int) -> int:
    """A tmpfs of ``disk_bytes`` owned by the job at ``target``; returns its inode limit."""
    inodes = inode_limit(disk_bytes)
    options = f"size={disk_bytes},nr_inodes={inodes},mode=700,uid={uid},gid={gid}"
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)
    return inodes


def inode_limit(disk_bytes: int) -> int:
    return max(MIN_INODES, disk_bytes // INODE_BYTES)


def _staging_dir() -> str:
    for path in STAGING_DIRS:
        if os.path.isdir(path) and not os.path.islink(path):
            return path
    raise OSError(2, "no directory to assemble the new root on: " + ",".join(STAGING_DIRS))


@dataclass(frozen=True, slots=True)
class _Source:
    path: str  # where it goes in the new root
    fd: int  # an O_PATH descriptor of the host's file
    link: str | None  # the target, for a symlink (recreated, not mounted)
    is_dir: bool
    dev: int


def _open_sources(paths: Iterable[str]) -> list[_Source]:
    """The host files to expose, each once: system dirs as they are (a merged-/usr
    symlink stays a symlink), the rest by their real path; nothing below another on
    the same filesystem (the bind of the upper one shows it; a submount it does not).
    """
    sources: list[_Source] = []
    wanted = [p for p in SYSTEM_DIRS if os.path.lexists(p)]
    wanted += sorted({os.path.realpath(p) for p in paths} - set(SYSTEM_DIRS), key=len)
    try:
        for path in wanted:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue  # absent here: nothing to expose
            st = os.fstat(fd)
            if any(_within(path, s.path) and s.dev == st.st_dev for s in sources if not s.link):
                os.close(fd)
                continue
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            is_dir = stat.S_ISDIR(st.st_mode)
            sources.append(_Source(path, fd, link, is_dir, st.st_dev))
    except BaseException:
        _close(sources)
        raise
    return sources


def _close(sources: list[_Source]) -> None:
    for source in sources:
        with contextlib.suppress(OSError):
            os.close(source.fd)


def _read_etc() -> dict[str, bytes]:
    found = {}
    for name in ETC_COPIED:
        with contextlib.suppress(OSError), open("/etc/" + name, "rb") as src:
            data = src.read(MAX_ETC_FILE + 1)
            if len(data) <= MAX_ETC_FILE:
                found[name] = data
    return found


def _populate(
    root: str, sources: list[_Source], etc: dict[str, bytes], new_proc: bool, uid: int, gid: int
) -> list[str]:
    exposed: list[str] = []
    for source in sources:
        if source.link is not None:
            os.makedirs(os.path.dirname(root + source.path), mode=0o755, exist_ok=True)
            os.symlink(source.link, root + source.path)
        else:
            _bind_ro(f"/proc/self/fd/{source.fd}", root + source.path, is_dir=source.is_dir)
            exposed.append(source.path)
    _make_etc(root + "/etc", etc, uid, gid)
    _make_dev(root + "/dev")
    os.mkdir(root + "/proc", 0o555)
    if new_proc:
        mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        for name in PROC_MASKED:
            if os.path.exists(f"{root}/proc/{name}"):
                mount(f"{root}/dev/null", f"{root}/proc/{name}", None, MS_BIND, None)
    else:  # the host's, as before: without a pid namespace there is no private one
        mount("/proc", root + "/proc", None, MS_BIND | MS_REC, None)
    os.mkdir(root + JOB_DIR, 0o755)
    return exposed


def _within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _bind_ro(source: str, target: str, *, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))
    mount(source, target, None, MS_BIND, None)  # not recursive: no submounts come along
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _kept_flags(target)
    mount(None, target, None, flags, None)


def _kept_flags(path: str) -> int:
    """The flags a remount must repeat: in a user namespace the kernel refuses to
    clear noexec or change the atime mode that the host's mount has.
    """
    have = os.statvfs(path).f_flag
    flags = MS_NOEXEC if have & os.ST_NOEXEC else 0
    flags |= MS_NODIRATIME if have & os.ST_NODIRATIME else 0
    if have & os.ST_NOATIME:
        return flags | MS_NOATIME
    if have & os.ST_RELATIME:
        return flags | MS_RELATIME
    return flags | MS_STRICTATIME


def _make_etc(etc: str, copied: dict[str, bytes], uid: int, gid: int) -> None:
    """Only what the job kinds read; machine-id, hosts, the real passwd stay out."""
    os.mkdir(etc, 0o755)
    for name, data in copied.items():
        _write_file(f"{etc}/{name}", data)
    _write_file(f"{etc}/passwd", f"job:x:{uid}:{gid}:vcomp job:{JOB_DIR}:/bin/false\n".encode())
    _write_file(f"{etc}/group", f"job:x:{gid}:\n".encode())


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _make_dev(dev: str) -> None:
    """Bind mounts of the host's nodes: mknod is not allowed in a user namespace."""
    os.mkdir(dev, 0o755)
    for name in DEVICES:
        os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))
        mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND, None)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")

"""Remove a job's work tree, whatever shape the job left it in.

The job controls the tree: it can nest directories far deeper than PATH_MAX (so no
path to the bottom exists, and ``shutil.rmtree`` recurses until RecursionError),
make directories unreadable (``chmod 000``), plant symlinks to the host, and create
hundreds of thousands of files. So the wipe:

- works only with names relative to open directory descriptors (never a long path);
- flattens instead of descending: each subdirectory met below the top is renamed up
  into the top directory and handled later, so at most three descriptors are open
  at any depth and no Python recursion happens;
- never follows a symlink (``O_NOFOLLOW``; a symlink is unlinked as a name), and
  never enters another file system mounted inside the tree;
- gives itself back the permissions the job took away (``chmod 0700``), which only
  matters when the agent is not root;
- reports what it could not remove as one SandboxError, after removing everything
  else. Its messages carry errno texts only, never the job's file names.

Callers must make sure no process of the job is still alive (nothing may change the
tree meanwhile). The wipe blocks for as long as the unlinks take (about 1 s per 100k
files): run it off the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from vcomp.errors import SandboxError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Passes over one directory that removed nothing before giving up on it.
_STUCK_PASSES = 2


def wipe_tree(path: Path | str) -> None:
    """Remove ``path`` and everything under it (a missing ``path`` is fine)."""
    path = os.fspath(path)
    try:
        top = _open_dir(path, None)
    except FileNotFoundError:
        return
    problems = _Problems()
    try:
        _flatten_and_remove(top, problems)
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        problems.add(exc)
    problems.raise_if_any(path)


def empty_dir(path: Path | str) -> int:
    """Remove everything inside ``path`` but keep ``path``; returns how many top-level
    entries there were (leftovers of an earlier run, say)."""
    path = os.fspath(path)
    try:
        top = _open_dir(path, None)
    except FileNotFoundError:
        return 0
    problems = _Problems()
    try:
        count = len(os.listdir(top))
        _flatten_and_remove(top, problems)
    finally:
        os.close(top)
    problems.raise_if_any(path)
    return count


class _Problems:
    """The first few failures, by errno text, and how many there were."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, None] = {}

    def add(self, exc: OSError) -> None:
        self.count += 1
        if len(self.kinds) < 4:
            self.kinds[exc.strerror or type(exc).__name__] = None

    def raise_if_any(self, path: str) -> None:
        if self.count:
            kinds = ", ".join(self.kinds)
            raise SandboxError(f"could not wipe {path}: {self.count} entries left ({kinds})")


def _flatten_and_remove(top: int, problems: _Problems) -> None:
    """Empty the directory open as ``top``: files go at once, subdirectories are moved
    up into ``top`` (by fresh names) and emptied one at a time, then removed."""
    pending: list[str] = []
    queued: set[str] = set()

    def found_dir(name: str) -> None:
        if name not in queued:  # a repeated pass over ``top`` meets its dirs again
            queued.add(name)
            pending.append(name)

    fresh = _FreshNames(top)
    device = os.fstat(top).st_dev
    _empty_one(top, top, found_dir, fresh, problems)
    while pending:
        name = pending.pop()
        try:
            fd = _open_dir(name, top)
        except FileNotFoundError:
            continue
        except OSError as exc:
            problems.add(exc)
            continue
        if os.fstat(fd).st_dev != device:  # a mount point: never wipe another file system
            os.close(fd)
            problems.add(OSError(errno.EXDEV, "a mount point inside the tree"))
            continue
        try:
            _empty_one(fd, top, found_dir, fresh, problems)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=top)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.add(exc)


def _empty_one(
    fd: int, top: int, found_dir: Callable[[str], None], fresh: _FreshNames, problems: _Problems
) -> None:
    """Unlink the non-directories in ``fd``; hand its subdirectories to ``found_dir``
    (moved up into ``top`` first, unless ``fd`` is ``top``). Repeats while entries
    remain and progress is made, since a directory changed while it is read may skip
    entries."""
    stuck = 0
    while stuck < _STUCK_PASSES:
        progress = False
        remaining = 0
        with os.scandir(fd) as entries:
            batch = [(e.name, _is_dir(e)) for e in entries]
        for name, is_dir in batch:
            try:
                if not is_dir:
                    os.unlink(name, dir_fd=fd)
                elif fd == top:
                    found_dir(name)
                    continue  # stays in top until its own turn
                else:
                    found_dir(_move_up(name, fd, top, fresh))
                progress = True
            except FileNotFoundError:
                progress = True
            except OSError as exc:
                remaining += 1
                if stuck + 1 == _STUCK_PASSES:
                    problems.add(exc)
        if remaining == 0:
            return
        stuck = 0 if progress else stuck + 1


def _move_up(name: str, parent: int, top: int, fresh: _FreshNames) -> str:
    new = fresh.next()
    try:
        os.rename(name, new, src_dir_fd=parent, dst_dir_fd=top)
    except PermissionError:
        # Moving a directory to a new parent rewrites its "..": it must be writable.
        os.chmod(name, 0o700, dir_fd=parent, follow_symlinks=True)  # a dir, per lstat
        os.rename(name, new, src_dir_fd=parent, dst_dir_fd=top)
    return new


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False  # vanished or unstattable: unlink it as a name


class _FreshNames:
    """Names not present in ``top``, for directories moved up into it."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.counter = 0

    def next(self) -> str:
        while True:
            self.counter += 1
            name = f".wipe-{self.counter}"
            try:
                os.stat(name, dir_fd=self.top, follow_symlinks=False)
            except FileNotFoundError:
                return name


def _open_dir(name: str, parent: int | None) -> int:
    """Open a directory (never through a symlink), taking back the permissions to
    read and change it if the job removed them."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    except PermissionError:
        # Known to be a directory and not a symlink (O_NOFOLLOW would say ELOOP).
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        os.chmod(name, 0o700, dir_fd=parent)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
    mode = os.fstat(fd).st_mode
    if mode & 0o700 != 0o700:
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o700)
    return fd

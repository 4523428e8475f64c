"""wipe_tree and empty_dir on trees a hostile job could leave: deeper than PATH_MAX,
unreadable directories, symlinks to the host, many files, too few descriptors."""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vcomp.agent.sandbox.wipe import empty_dir, wipe_tree
from vcomp.errors import SandboxError

from .conftest import in_child

NOBODY = 65534
DEPTH = 3000  # 6000 characters of "a/": no path reaches the bottom


def deep_chain(root: Path, depth: int = DEPTH, *, locked_every: int = 0) -> None:
    """``root/a/a/.../a/f``, built with descriptor-relative calls (no long paths)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("a", dir_fd=fd)
            child = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            if locked_every and level % locked_every == 0:
                os.fchmod(fd, 0)  # the parent becomes unreadable and unwritable
            os.close(fd)
            fd = child
        leaf = os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd)
        os.write(leaf, b"x" * 100)
        os.close(leaf)
    finally:
        os.close(fd)


def chown_tree(root: Path, uid: int) -> None:
    """Give a shallow tree to ``uid`` (deep ones are built by that uid instead)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), uid, uid, follow_symlinks=False)
    os.chown(root, uid, uid)


def as_nobody(base: Path, fn: Callable[[], object]) -> object:
    """Run ``fn`` in a child whose cwd is ``base``, as uid 65534 when we are root (so
    permission bits bind, as for an agent that is not root); else as ourselves."""

    def child() -> object:
        os.chdir(base)
        if os.geteuid() == 0:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
        return fn()

    return in_child(child)


def test_a_tree_deeper_than_path_max_is_removed(tmp_path: Path) -> None:
    tree = tmp_path / "job"
    tree.mkdir()
    deep_chain(tree)
    wipe_tree(tree)
    assert not tree.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_missing_tree_is_fine(tmp_path: Path) -> None:
    wipe_tree(tmp_path / "never-made")
    assert empty_dir(tmp_path / "never-made") == 0


def test_unreadable_directories_are_removed_without_root(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)  # the unprivileged child works in here

    def build_and_wipe() -> list[str]:
        os.mkdir("job", 0o700)
        os.makedirs("job/x/y/z")
        open("job/x/y/z/f", "wb").close()
        os.chmod("job/x/y", 0)
        os.chmod("job/x", 0o500)  # listable, but nothing can be removed from it
        deep_chain(Path("job"), 300, locked_every=7)
        os.chmod("job", 0)
        wipe_tree("job")
        return os.listdir(".")

    assert as_nobody(tmp_path, build_and_wipe) == []


def test_symlinks_are_removed_and_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "host"
    (outside / "sub").mkdir(parents=True)
    (outside / "precious").write_text("keep")
    (outside / "sub" / "also").write_text("keep")
    tree = tmp_path / "job"
    (tree / "d" / "e").mkdir(parents=True)
    (tree / "link-dir").symlink_to(outside)
    (tree / "d" / "link-sub").symlink_to(outside / "sub")
    (tree / "d" / "e" / "link-file").symlink_to(outside / "precious")
    (tree / "d" / "e" / "dangling").symlink_to(tmp_path / "nothing-here")
    deep_chain(tree / "d", 200)
    wipe_tree(tree)
    assert not tree.exists()
    assert (outside / "precious").read_text() == "keep"
    assert (outside / "sub" / "also").read_text() == "keep"


def test_the_top_itself_being_a_symlink_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (tmp_path / "job").symlink_to(outside)
    with pytest.raises(OSError):
        wipe_tree(tmp_path / "job")
    assert (outside / "precious").read_text() == "keep"


def test_many_files_in_wide_and_nested_directories(tmp_path: Path) -> None:
    tree = tmp_path / "job"
    tree.mkdir()
    for d in range(10):
        sub = tree / f"d{d}"
        sub.mkdir()
        for i in range(500):
            (sub / f"f{i}").touch()
    for i in range(2000):
        (tree / f"top{i}").touch()
    wipe_tree(tree)
    assert not tree.exists()


def test_descriptors_stay_bounded_on_a_deep_tree(tmp_path: Path) -> None:
    tree = tmp_path / "job"
    tree.mkdir()
    deep_chain(tree)

    def wipe_with_few_fds() -> bool:
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 4, in_use + 4))
        wipe_tree(tree)
        return tree.exists()

    assert in_child(wipe_with_few_fds) is False


def test_what_cannot_be_removed_is_reported_without_names(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o777)
    (tmp_path / "job" / "owned-by-root").mkdir(parents=True)
    (tmp_path / "job" / "owned-by-root" / "secret-name").write_text("x")
    (tmp_path / "job" / "mine").mkdir()
    (tmp_path / "job" / "mine" / "f").touch()
    os.chown(tmp_path / "job", NOBODY, NOBODY)
    os.chown(tmp_path / "job" / "mine", NOBODY, NOBODY)
    os.chown(tmp_path / "job" / "mine" / "f", NOBODY, NOBODY)
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file the wiping user cannot remove")

    def wipe() -> str:
        try:
            wipe_tree("job")
        except SandboxError as exc:
            return str(exc)
        return "no error"

    message = as_nobody(tmp_path, wipe)
    assert isinstance(message, str) and "entries left" in message, message
    assert "secret-name" not in message and "owned-by-root" not in message
    assert not (tmp_path / "job" / "mine").exists()  # the rest went anyway
    assert (tmp_path / "job" / "owned-by-root" / "secret-name").exists()


def test_empty_dir_keeps_the_root(tmp_path: Path) -> None:
    root = tmp_path / "work"
    (root / "job-old").mkdir(parents=True)
    deep_chain(root / "job-old", 500)
    (root / "stray").write_text("x")
    assert empty_dir(root) == 2
    assert root.is_dir() and list(root.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_another_file_system_inside_the_tree_is_left_alone(tmp_path: Path) -> None:
    tree = tmp_path / "job"
    (tree / "d" / "mnt").mkdir(parents=True)
    (tree / "top-mnt").mkdir()
    for where in (tree / "d" / "mnt", tree / "top-mnt"):
        subprocess.run(["mount", "-t", "tmpfs", "none", str(where)], check=True)
    try:
        (tree / "d" / "mnt" / "keep").write_text("x")
        (tree / "top-mnt" / "keep").write_text("x")
        (tree / "d" / "gone").write_text("x")
        with pytest.raises(SandboxError, match="entries left"):
            wipe_tree(tree)
        assert (tree / "d" / "mnt" / "keep").exists() and (tree / "top-mnt" / "keep").exists()
        assert not (tree / "d" / "gone").exists()
    finally:
        for where in (tree / "d" / "mnt", tree / "top-mnt"):
            subprocess.run(["umount", str(where)], check=True)
    wipe_tree(tree)
    assert not tree.exists()

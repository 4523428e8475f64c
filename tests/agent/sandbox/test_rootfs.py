"""The minimal root and the tmpfs work dir, each built in a forked child's mount namespace."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vcomp.agent.sandbox import isolation, rootfs
from vcomp.agent.sandbox.libc import CLONE_NEWNS, MS_PRIVATE, MS_REC, mount, unshare

from .conftest import in_child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace without a user one")


def private_mounts() -> None:
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE, None)


def test_inode_limit_is_one_per_16_kib_with_a_floor() -> None:
    assert rootfs.inode_limit(64 << 20) == 4096
    assert rootfs.inode_limit(1) == rootfs.MIN_INODES


def test_the_new_root_holds_only_what_jobs_need(tmp_path: Path) -> None:
    # Under /tmp, which the staging tmpfs covers: the bind must still find it.
    extra = tmp_path / "runtime"
    extra.mkdir()
    (extra / "lib.txt").write_text("from the runtime")

    def probe() -> dict[str, object]:
        private_mounts()
        result = rootfs.build_root(binds=[str(extra)], new_proc=False, uid=1234, gid=5678)
        try:
            open("/usr/vcomp-write-probe", "w").close()
            usr_write = "succeeded"
        except OSError as exc:
            usr_write = errno.errorcode[exc.errno or 0]
        with open("/proc/self/mountinfo") as f:
            points = sorted({line.split()[4] for line in f})
        return {
            "binds": list(result.binds),
            "etc": sorted(os.listdir("/etc")),
            "dev": sorted(os.listdir("/dev")),
            "passwd": Path("/etc/passwd").read_text(),
            "runtime": (extra / "lib.txt").read_text(),
            "usr_write": usr_write,
            "points": points,
            "links": {p: os.readlink(p) for p in ("/bin", "/lib") if os.path.islink(p)},
            "job_dir": os.path.isdir(rootfs.JOB_DIR),
        }

    got = in_child(probe)
    assert isinstance(got, dict)
    assert str(extra) in got["binds"]
    assert got["runtime"] == "from the runtime"
    assert got["etc"] == sorted(
        ["group", "passwd", *(n for n in rootfs.ETC_COPIED if os.path.exists("/etc/" + n))]
    )
    assert got["passwd"].startswith("job:x:1234:5678:")
    assert got["dev"] == sorted([*rootfs.DEVICES, *rootfs.DEV_LINKS])
    assert got["usr_write"] == "EROFS"
    assert got["job_dir"] is True
    assert not set(got["points"]) & {"/tmp", "/home", "/root", "/run", "/var", "/dev/pts"}
    for path in ("/bin", "/lib"):  # merged /usr here: the symlinks come along as symlinks
        if os.path.islink(path):
            assert got["links"][path] == os.readlink(path)


def test_workdir_tmpfs_stops_bytes_and_inodes(tmp_path: Path) -> None:
    target = tmp_path / "job"
    target.mkdir()

    def probe() -> dict[str, object]:
        private_mounts()
        inodes = rootfs.mount_workdir(str(target), 1 << 20, 4321, 4321)
        written = 0
        try:
            with open(target / "big", "wb") as f:
                while written < 4 << 20:
                    f.write(b"x" * 65536)
                    f.flush()
                    written += 65536
        except OSError as exc:
            bytes_error = exc.errno
        os.unlink(target / "big")
        files = 0
        try:
            while files < 10_000:
                open(target / f"f{files}", "w").close()
                files += 1
        except OSError as exc:
            files_error = exc.errno
        st = os.stat(target)
        return {
            "inodes": inodes,
            "written": written,
            "bytes_error": bytes_error,
            "files": files,
            "files_error": files_error,
            "owner": [st.st_uid, st.st_gid],
            "mode": oct(st.st_mode & 0o777),
        }

    got = in_child(probe)
    assert got == {
        "inodes": 64,
        "written": got["written"],
        "bytes_error": errno.ENOSPC,
        "files": got["files"],
        "files_error": errno.ENOSPC,
        "owner": [4321, 4321],
        "mode": "0o700",
    }
    assert isinstance(got, dict) and got["written"] <= 1 << 20 and got["files"] <= 64
    assert os.listdir(target) == []  # the tmpfs lived only in the child's namespace


def test_fallback_hides_paths_when_no_root_is_wanted() -> None:
    def probe() -> dict[str, object]:
        unshare(CLONE_NEWNS)
        result = isolation.setup_mounts(new_proc=False, hidden=["/mnt"], reexpose=[], hostname=None)
        return {"root": result.root is None, "error": result.root_error, "mnt": os.listdir("/mnt")}

    assert in_child(probe) == {"root": True, "error": "not requested", "mnt": []}


def test_a_bind_below_another_on_its_own_filesystem_is_kept(tmp_path: Path) -> None:
    inner = tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)

    def probe() -> list[object]:
        private_mounts()
        mount("tmpfs", str(inner), "tmpfs", 0, "size=64k")  # e.g. /usr/local on its own disk
        (inner / "python").write_text("interpreter")
        result = rootfs.build_root(
            binds=[str(inner.parent), str(inner)], new_proc=False, uid=1, gid=1
        )
        return [list(result.binds), (inner / "python").read_text()]

    binds, text = in_child(probe)  # type: ignore[misc]
    assert text == "interpreter"
    assert str(inner) in binds and str(inner.parent) in binds

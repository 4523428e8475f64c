"""The launcher's dry run: the same setup path as a job, stopped before exec."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vcomp.agent.sandbox import Sandbox, rootfs

from .conftest import LIMITS, job


def test_probe_reports_every_protection(tmp_path: Path) -> None:
    prots = Sandbox(work_root=tmp_path / "w").protections()
    names = [p.name for p in prots]
    assert len(names) == len(set(names))
    for name in (
        "rlimits",
        "unprivileged_uid",
        "cleared_environment",
        "process_tree_kill",
        "seccomp",
        "landlock",
        "pid_namespace",
        "net_namespace",
        "closed_fds",
    ):
        assert name in names
    assert "setup" not in names, prots
    assert all(p.status in ("active", "unavailable", "failed") for p in prots)
    assert list((tmp_path / "w").iterdir()) == []


def test_disabled_protections_are_reported_not_skipped(tmp_path: Path) -> None:
    sandbox = Sandbox(
        work_root=tmp_path / "w", namespaces=False, use_landlock=False, use_seccomp=False
    )
    status = {p.name: (p.status, p.reason) for p in sandbox.protections()}
    assert status["seccomp"] == ("unavailable", "disabled by configuration")
    assert status["landlock"][0] == "unavailable"
    assert status["pid_namespace"] == ("unavailable", "disabled by configuration")
    assert status["process_tree_kill"] == ("active", "subreaper sweep")


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root or a user namespace")
def test_probe_reports_the_minimal_root_and_the_tmpfs_work_dir(tmp_path: Path) -> None:
    status = {p.name: (p.status, p.reason) for p in Sandbox(work_root=tmp_path / "w").protections()}
    for name in ("minimal_root", "no_ptmx", "private_proc", "hidden_paths"):
        assert status[name][0] == "active", (name, status[name])
    assert status["tmpfs_workdir"] == ("active", f"{64 << 20} bytes, 4096 inodes at /job")


def test_without_namespaces_the_root_and_work_dir_are_the_hosts(tmp_path: Path) -> None:
    sandbox = Sandbox(work_root=tmp_path / "w", namespaces=False)
    status = {p.name: (p.status, p.reason) for p in sandbox.protections()}
    for name in ("minimal_root", "tmpfs_workdir", "no_ptmx", "private_proc"):
        assert status[name][0] == "unavailable", (name, status[name])
    assert "host" in status["tmpfs_workdir"][1]


@pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace needs root or a user namespace")
async def test_without_the_minimal_root_the_work_dir_is_still_a_tmpfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**_kwargs: object) -> None:
        raise OSError(errno.EINVAL, "refused for the test")

    monkeypatch.setattr(rootfs, "build_root", refuse)  # the forked launcher inherits it
    sandbox = Sandbox(work_root=tmp_path / "w", prespawn=False)
    seen: list[int] = []
    code = job("""
with open("f", "wb") as f:
    f.write(b"x" * (1 << 20))
progress(0.5)
time.sleep(0.5)
return os.getcwd().encode()
""")
    outcome = await sandbox.run(
        kind="python",
        code=code,
        input=b"",
        limits=LIMITS,
        on_progress=lambda _f: seen.append(sum(len(f) for _, _, f in os.walk(tmp_path / "w"))),
    )
    assert outcome.kind.value == "ok", outcome
    assert seen == [0], "files the job put on the host's disk"
    status = {p.name: (p.status, p.reason) for p in outcome.protections}
    assert (
        status["minimal_root"][0] == "failed"
        and "refused for the test" in status["minimal_root"][1]
    )
    assert status["hidden_paths"][0] == "active" and "/root" in status["hidden_paths"][1]
    assert status["tmpfs_workdir"][0] == "active"
    assert (outcome.result or b"").startswith(str(tmp_path / "w").encode())  # today's path

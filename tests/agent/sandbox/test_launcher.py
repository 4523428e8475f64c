"""The launcher's dry run: the same setup path as a job, stopped before exec."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vcomp.agent.sandbox import Sandbox


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

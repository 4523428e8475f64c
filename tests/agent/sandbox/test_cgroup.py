"""Job cgroups: finding the agent's own, and real ones made, limited, counted, removed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcomp.agent.sandbox import cgroup, isolation
from vcomp.agent.sandbox.cgroup import CgroupHost, JobCgroup

from .conftest import in_child

PROC_CGROUP_V1 = """\
12:pids:/
4:memory:/process_api/abc
2:cpu,cpuacct:/user.slice
1:name=systemd:/init.scope
0::/user.slice/agent.service
"""

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
37 31 0:34 /user.slice /mnt/odd\\040dir rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /proc rw - proc proc rw
"""


def test_proc_cgroup_is_read_per_controller() -> None:
    own = cgroup.parse_proc_cgroup(PROC_CGROUP_V1 + "garbage\n7:x\n")
    assert own == {
        "pids": "/",
        "memory": "/process_api/abc",
        "cpu": "/user.slice",
        "cpuacct": "/user.slice",
        "": "/user.slice/agent.service",
    }


def test_mountinfo_lists_cgroup_mounts_with_unescaped_paths() -> None:
    mounts = cgroup.parse_mountinfo(MOUNTINFO + "short line - x\n")
    assert [(m.version, m.path) for m in mounts] == [
        (1, "/sys/fs/cgroup/memory"),
        (1, "/sys/fs/cgroup/cpu,cpuacct"),
        (1, "/mnt/odd dir"),
        (2, "/sys/fs/cgroup/unified"),
    ]
    assert "cpuacct" in mounts[1].controllers
    pids = mounts[2]
    # A mount whose root is a sub-cgroup shows only what lies below that root.
    assert cgroup._below(pids, "/user.slice/job") == "/mnt/odd dir/job"
    assert cgroup._below(pids, "/user.slice") == "/mnt/odd dir"
    assert cgroup._below(pids, "/other") is None


def test_missing_files_and_mounts_become_reasons(tmp_path: Path) -> None:
    assert "cannot read" in str(cgroup.find_host(str(tmp_path / "nope"), str(tmp_path / "nope")))
    proc = tmp_path / "cgroup"
    proc.write_text(PROC_CGROUP_V1)
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.replace("/sys/fs/cgroup/", str(tmp_path / "absent") + "/"))
    found = cgroup.find_host(str(proc), str(info))
    assert isinstance(found, str)
    assert "v1: no writable memory hierarchy" in found and "v2:" in found, found


@pytest.fixture
def host() -> CgroupHost:
    found = cgroup.find_host()
    if isinstance(found, str):
        pytest.skip(f"no job cgroups on this host: {found}")
    return found


@pytest.fixture
def job_cgroup(host: CgroupHost) -> Iterator[JobCgroup]:
    made = host.new_job()
    dirs = list(made.dirs.values())
    yield made
    made.remove()
    assert not any(os.path.exists(d) for d in dirs)


def _limit_file(made: JobCgroup) -> str:
    if made.version == 2:
        return os.path.join(made.dirs[""], "memory.max")
    return os.path.join(made.dirs["memory"], "memory.limit_in_bytes")


def _spawn_in(made: JobCgroup, body: str) -> int:
    """Fork a child that joins ``made`` and runs ``body`` (Python), then exits 0."""
    pid = os.fork()
    if pid == 0:
        try:
            for procs in made.procs_files():
                isolation.join_cgroup(procs)
            exec(body, {"os": os, "time": time})
        finally:
            os._exit(0)
    return pid


def test_job_cgroup_is_made_below_the_agents_own(host: CgroupHost, job_cgroup: JobCgroup) -> None:
    for controller, path in job_cgroup.dirs.items():
        assert os.path.dirname(path) == host.parents[controller]
        assert os.path.basename(path).startswith(f"vcomp-job-{os.getpid()}-")
    assert host.describe().startswith(f"v{host.version}: memory")


def test_limits_are_written(job_cgroup: JobCgroup) -> None:
    job_cgroup.set_limits(96 << 20, 10)
    assert int(Path(_limit_file(job_cgroup)).read_text()) == 96 << 20
    pids_dir = job_cgroup._dir("pids")
    if pids_dir is not None:
        assert Path(pids_dir, "pids.max").read_text().strip() == str(10 + cgroup.PIDS_OVERHEAD)


def test_cpu_of_children_reaped_without_wait_is_counted(job_cgroup: JobCgroup) -> None:
    job_cgroup.set_limits(256 << 20, 16)
    burn = """
import signal
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(3):
    if os.fork() == 0:
        while time.process_time() < 0.2:
            pass
        os._exit(0)
time.sleep(2)
"""
    pid = _spawn_in(job_cgroup, burn)
    os.waitpid(pid, 0)
    cpu = job_cgroup.cpu_seconds()
    assert cpu is not None and cpu >= 0.55, cpu  # three children x 0.2 s, none of them waited


def test_over_the_limit_the_kernel_kills_and_it_is_seen(job_cgroup: JobCgroup) -> None:
    job_cgroup.set_limits(64 << 20, 16)
    hog = """
fd = os.memfd_create("m")
for _ in range(256):
    os.write(fd, b"x" * (1 << 20))
"""
    pid = _spawn_in(job_cgroup, hog)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert job_cgroup.out_of_memory(killed=True)
    peak = job_cgroup.peak_memory()
    assert peak is not None and peak <= 64 << 20


def test_remove_kills_what_is_left(host: CgroupHost) -> None:
    made = host.new_job()
    pid = _spawn_in(made, "time.sleep(60)")
    for _ in range(500):  # until the child has joined
        if pid in made.pids():
            break
        time.sleep(0.01)
    assert made.remove() is None
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL
    assert made.dirs == {}


def _joined(made: JobCgroup, pid: int) -> None:
    for _ in range(500):
        if pid in made.pids():
            return
        time.sleep(0.01)


def test_a_frozen_job_burns_no_cpu_whatever_it_signals(job_cgroup: JobCgroup) -> None:
    """The throttle's suspension: every task frozen at once, and SIGCONT (the job's
    own, or anyone's) does not undo it. Oracle: the CPU the cgroup counted.
    """
    if not job_cgroup.can_freeze:
        pytest.skip("no cgroup freezer on this host (v1 freezer not mounted, v2 < 5.2)")
    job_cgroup.set_limits(256 << 20, 16)
    burn = """
import signal
for _ in range(3):
    if os.fork() == 0:
        while True:
            os.kill(0, signal.SIGCONT)
time.sleep(60)
"""
    pid = _spawn_in(job_cgroup, burn)
    _joined(job_cgroup, pid)
    time.sleep(0.3)  # the burners start
    assert job_cgroup.freeze(True)
    time.sleep(0.2)  # freezing completes
    before = job_cgroup.cpu_seconds() or 0.0
    for task in job_cgroup.pids():
        os.kill(task, signal.SIGCONT)
    time.sleep(1.0)
    frozen_cpu = (job_cgroup.cpu_seconds() or 0.0) - before
    assert frozen_cpu < 0.05, frozen_cpu
    assert job_cgroup.freeze(False)
    time.sleep(0.3)
    assert (job_cgroup.cpu_seconds() or 0.0) - before > 0.1  # thawed, it burns again
    assert job_cgroup.freeze(True)
    job_cgroup.kill()  # a kill while frozen still takes every task
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL


def test_stale_job_cgroups_of_dead_agents_are_swept(host: CgroupHost) -> None:
    dead = in_child(os.getpid)  # reaped: that pid is gone
    assert isinstance(dead, int)
    stale = [os.path.join(p, f"vcomp-job-{dead}-1") for p in host.parents.values()]
    ours = host.new_job()
    for path in stale:
        os.mkdir(path)
    host.sweep_stale()
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.isdir(p) for p in ours.dirs.values())  # a live agent's stay
    assert ours.remove() is None


def test_unprivileged_user_without_delegation_gets_a_reason(host: CgroupHost) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")

    def probe() -> str:
        os.setgid(65534)
        os.setuid(65534)
        found = cgroup.find_host()
        return found if isinstance(found, str) else "found"

    reason = in_child(probe)
    assert isinstance(reason, str) and reason != "found"

"""Child-side isolation steps, each in a forked child."""

from __future__ import annotations

import os
import resource
import signal
import sys

import pytest

from vcomp.agent.sandbox import isolation
from vcomp.agent.sandbox.policy import JobLimits, MiB

from .conftest import in_child

LIMITS = JobLimits(
    cpu_seconds=3, memory_bytes=512 * MiB, wall_seconds=5, output_bytes=10, max_open_files=32
)


def test_rlimits_are_set() -> None:
    def probe() -> dict[str, object]:
        isolation.set_rlimits(LIMITS)
        return {
            name: list(resource.getrlimit(getattr(resource, f"RLIMIT_{name}")))
            for name in ("CPU", "AS", "NOFILE", "NPROC", "FSIZE", "CORE")
        }

    got = in_child(probe)
    assert got == {
        "CPU": [3, 4],
        "AS": [512 * MiB, 512 * MiB],
        "NOFILE": [32, 32],
        "NPROC": [64, 64],
        "FSIZE": [64 * MiB, 64 * MiB],
        "CORE": [0, 0],
    }


def test_arrange_fds_keeps_only_the_wanted_ones() -> None:
    def probe() -> dict[str, object]:
        a, _b = os.pipe()
        _c, d = os.pipe()
        extra = os.open("/dev/null", os.O_RDONLY)
        moved = isolation.arrange_fds({3: a, 4: d}, [extra])
        fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
        return {"moved": moved, "fds": fds, "inheritable": os.get_inheritable(3)}

    got = in_child(probe)
    assert isinstance(got, dict)
    assert got["moved"] == [6]
    # 3, 4, the extra at 6, and listdir's own descriptor in the lowest free slot.
    assert {3, 4, 6} <= set(got["fds"]) and len(got["fds"]) == 4
    assert got["inheritable"] is True


def test_reset_signals_restores_defaults() -> None:
    def probe() -> list[object]:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        isolation.reset_signals()
        return [
            signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL,
            len(signal.pthread_sigmask(signal.SIG_BLOCK, set())),
        ]

    assert in_child(probe) == [True, 0]


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces without a user namespace need root")
def test_namespaces_and_mounts_as_root(tmp_path: object) -> None:
    def probe() -> dict[str, object]:
        entered = isolation.unshare_namespaces(list(isolation.NAMESPACES[:1]))  # mount only
        result = isolation.setup_mounts(
            new_proc=False, hidden=["/mnt", "/nonexistent-path"], reexpose=[], hostname=None
        )
        return {
            "entered": entered,
            "hidden": list(result.hidden),
            "missing": list(result.missing),
            "mnt": os.listdir("/mnt"),
        }

    got = in_child(probe)
    assert got == {
        "entered": {"mount_namespace": None},
        "hidden": ["/mnt"],
        "missing": ["/nonexistent-path"],
        "mnt": [],
    }


def test_hide_argv_overwrites_what_proc_shows() -> None:
    def probe() -> dict[str, object]:
        with open("/proc/self/cmdline", "rb") as f:
            before = f.read()
        isolation.hide_argv(b"vcomp-init")
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read()
        with open("/proc/self/environ", "rb") as f:
            environ = f.read()
        return {
            "argv_was_there": sys.argv[0].encode() in before,
            "cmdline": cmdline.rstrip(b"\0").decode(),
            "environ_clear": environ.strip(b"\0") == b"",
            "python_argv_kept": sys.argv[0] != "",
        }

    assert in_child(probe) == {
        "argv_was_there": True,
        "cmdline": "vcomp-init",
        "environ_clear": True,
        "python_argv_kept": True,
    }

"""Landlock, applied in a forked child: writes only below the allowed directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vcomp.agent.sandbox import landlock
from vcomp.agent.sandbox.libc import set_no_new_privs

from .conftest import in_child

ABI = landlock.abi_version()
pytestmark = pytest.mark.skipif(ABI == 0, reason="this kernel has no Landlock")


def test_abi_is_a_small_positive_number() -> None:
    assert 1 <= ABI < 100
    assert landlock.handled_fs(1) == (1 << 13) - 1


def test_writes_only_inside_and_reads_only_allowed(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    outside = tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("s")

    def probe() -> dict[str, object]:
        set_no_new_privs()
        result = landlock.restrict_self(ABI, ["/usr", "/nonexistent"], [str(inside)], [])
        out: dict[str, object] = {"skipped": list(result.skipped_paths)}
        for name, action in {
            "write_inside": lambda: (inside / "f").write_text("ok"),
            "write_outside": lambda: (outside / "f").write_text("no"),
            "read_outside": lambda: (outside / "secret").read_text(),
            "read_usr": lambda: os.listdir("/usr"),
        }.items():
            try:
                action()
                out[name] = "ok"
            except OSError as exc:
                out[name] = exc.errno
        return out

    result = in_child(probe)
    assert isinstance(result, dict)
    assert result["write_inside"] == "ok"
    assert result["read_usr"] == "ok"
    assert result["write_outside"] == 13  # EACCES
    assert result["read_outside"] == 13
    assert result["skipped"] == ["/nonexistent"]
    assert not (outside / "f").exists()

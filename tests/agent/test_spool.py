"""The sealed spool on real files: checkpoints (results are covered by the runtime tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vcomp.agent.spool import ResultSpool, SpoolError
from vcomp.agent.tpm import SimulatedTpm

BINDING = b"\x11" * 32


@pytest.fixture
def spool(tmp_path: Path) -> ResultSpool:
    return ResultSpool(tmp_path / "spool", SimulatedTpm.open(tmp_path / "tpm"))


def test_checkpoint_round_trip_keeps_only_the_latest(spool: ResultSpool) -> None:
    assert spool.checkpoint(7, BINDING, 1024) is None
    spool.put_checkpoint(7, 1, BINDING, b"first")
    spool.put_checkpoint(7, 2, BINDING, b"second")
    assert spool.checkpoint(7, BINDING, 1024) == b"second"
    assert spool.checkpoint_holdings() == [(7, 2)]
    files = sorted(p.name for p in spool.directory.iterdir())
    assert files == ["7-2.checkpoint", "spool.key.sealed"]
    spool.remove_checkpoint(7)
    assert spool.checkpoint(7, BINDING, 1024) is None


def test_checkpoint_is_sealed_at_rest(spool: ResultSpool) -> None:
    spool.put_checkpoint(3, 1, BINDING, b"points done 123456789")
    assert b"123456789" not in (spool.directory / "3-1.checkpoint").read_bytes()


def test_tampered_checkpoint_is_refused_and_removed(spool: ResultSpool) -> None:
    spool.put_checkpoint(3, 1, BINDING, b"state")
    path = spool.directory / "3-1.checkpoint"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(SpoolError, match="tampered"):
        spool.checkpoint(3, BINDING, 1024)
    assert not path.exists()


def test_checkpoint_of_another_job_is_refused(spool: ResultSpool) -> None:
    """A file renamed to another job, or a job id reused for other content, is not used."""
    spool.put_checkpoint(3, 1, BINDING, b"state of 3")
    (spool.directory / "3-1.checkpoint").rename(spool.directory / "4-1.checkpoint")
    with pytest.raises(SpoolError):
        spool.checkpoint(4, BINDING, 1024)
    spool.put_checkpoint(5, 1, BINDING, b"state of 5")
    with pytest.raises(SpoolError):
        spool.checkpoint(5, b"\x22" * 32, 1024)


def test_oversized_checkpoint_file_is_refused_before_reading(spool: ResultSpool) -> None:
    spool.put_checkpoint(9, 1, BINDING, b"x" * 2000)
    with pytest.raises(SpoolError, match="over 1000 bytes"):
        spool.checkpoint(9, BINDING, 1000)
    assert spool.checkpoint_holdings() == []


def test_checkpoints_from_another_build_are_set_aside(tmp_path: Path) -> None:
    tpm_dir = tmp_path / "tpm"
    spool = ResultSpool(tmp_path / "spool", SimulatedTpm.open(tpm_dir))
    spool.put_checkpoint(1, 1, BINDING, b"state")
    other = SimulatedTpm.open(tpm_dir)
    other.extend(17, b"\x01" * 32)  # another measurement: the old key does not unseal
    again = ResultSpool(tmp_path / "spool", other)
    assert again.set_aside is not None
    assert (again.set_aside / "1-1.checkpoint").exists()
    assert again.checkpoint(1, BINDING, 1024) is None


def test_a_renamed_attempt_is_refused(spool: ResultSpool) -> None:
    """The attempt in the file name is authenticated too (it is reported to the server)."""
    spool.put_checkpoint(3, 1, BINDING, b"state")
    (spool.directory / "3-1.checkpoint").rename(spool.directory / "3-9.checkpoint")
    assert spool.checkpoint_holdings() == [(3, 9)]
    with pytest.raises(SpoolError):
        spool.checkpoint(3, BINDING, 1024)
    assert spool.checkpoint_holdings() == []

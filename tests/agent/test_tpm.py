from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from vcomp.agent.tpm import SimulatedTpm, TpmError, UnsealError
from vcomp.errors import ConfigError
from vcomp.protocol import attestation as at
from vcomp.protocol import tpm_format as tf

T0 = 1_700_000_000.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated AK and seed, copied per test: RSA key generation is the slow part."""
    path = tmp_path_factory.mktemp("template") / "tpm"
    SimulatedTpm.open(path, now=T0)
    (path / "counters.json").unlink()
    return path


@pytest.fixture
def state(tmp_path: Path, template: Path) -> Path:
    return Path(shutil.copytree(template, tmp_path / "tpm"))


def test_key_and_seed_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "fresh"
    SimulatedTpm.open(state, now=T0)
    assert mode(state) == 0o700
    assert mode(state / "ak.pem") == 0o600
    assert mode(state / "seed.bin") == 0o600
    assert mode(state / "counters.json") == 0o600
    assert b"PRIVATE KEY" in (state / "ak.pem").read_bytes()


def test_ak_is_generated_once(state: Path) -> None:
    a = SimulatedTpm.open(state, now=T0)
    b = SimulatedTpm.open(state, now=T0 + 1)
    assert a.agent_id == b.agent_id == hashlib.sha256(a.ak_spki_der).digest()


def test_refuses_a_world_readable_key(state: Path) -> None:
    SimulatedTpm.open(state, now=T0)
    os.chmod(state / "ak.pem", 0o644)
    with pytest.raises(ConfigError, match="0600"):
        SimulatedTpm.open(state, now=T0)


def test_extend_matches_hand_computation(state: Path) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    m1, m2 = hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()
    assert tpm.read_pcr(17) == bytes(32)
    tpm.extend(17, m1)
    tpm.extend(17, m2)
    step1 = hashlib.sha256(bytes(32) + m1).digest()
    assert tpm.read_pcr(17) == hashlib.sha256(step1 + m2).digest()
    assert tpm.read_pcr(18) == bytes(32)
    with pytest.raises(TpmError):
        tpm.extend(17, b"not a digest")
    with pytest.raises(TpmError):
        tpm.extend(24, m1)


def test_pcrs_start_at_zero_after_reopen(state: Path) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    tpm.extend(17, bytes(32))
    assert SimulatedTpm.open(state, now=T0).read_pcr(17) == bytes(32)


def test_reset_count_increments_and_clock_persists(state: Path) -> None:
    a = SimulatedTpm.open(state, now=T0)
    assert (a.reset_count, a.restart_count) == (0, 0)
    assert a.clock_info(T0 + 2.5).clock == 2500
    b = SimulatedTpm.open(state, now=T0 + 10)
    c = SimulatedTpm.open(state, now=T0 + 20)
    assert (b.reset_count, c.reset_count) == (1, 2)
    assert c.clock_info(T0 + 20).clock == 20_000
    # The host clock going backwards does not move the TPM clock backwards.
    d = SimulatedTpm.open(state, now=T0 + 5)
    assert d.reset_count == 3
    assert d.clock_info(T0 + 5).clock == 20_000
    assert d.clock_info(T0 + 21).clock == 21_000
    assert d.clock_info(T0 + 1).clock == 21_000


def test_quote_verifies_and_reports_counters(state: Path) -> None:
    SimulatedTpm.open(state, now=T0)
    tpm = SimulatedTpm.open(state, now=T0 + 1)
    tpm.extend(17, hashlib.sha256(b"code").digest())
    book = at.NonceBook()
    nonce = book.issue(T0 + 1)
    eph = b"ephemeral spki"
    quote, sig, values = tpm.quote(at.expected_extra_data(nonce, eph), [18, 17], now=T0 + 3)
    assert values == [tpm.read_pcr(17), tpm.read_pcr(18)]
    v = at.verify_quote(
        ak_public_key=tpm.ak_public_key,
        quote=quote,
        signature=sig,
        pcr_values=values,
        server_nonce=nonce,
        ephemeral_spki_der=eph,
        nonce_book=book,
        now=T0 + 2,
        allowlist={at.Measurement.of((17, 18), values)},
        previous_clock=tf.ClockInfo(1000, 0, 0, True),
    )
    assert v.agent_id == tpm.agent_id
    assert v.clock_info == tf.ClockInfo(3000, 1, 0, True)
    assert v.qualified_signer == tpm.ak_name


def test_quote_refuses_oversized_qualifying_data(state: Path) -> None:
    with pytest.raises(TpmError):
        SimulatedTpm.open(state, now=T0).quote(bytes(67), [17])


def test_seal_unseal_round_trip_across_power_cycles(state: Path) -> None:
    digest = hashlib.sha256(b"agent code").digest()
    tpm = SimulatedTpm.open(state, now=T0)
    tpm.extend(17, digest)
    blob = tpm.seal(b"spool key")
    assert b"spool key" not in blob
    assert tpm.unseal(blob) == b"spool key"
    # Same measurements after a restart: the spool can be opened again.
    again = SimulatedTpm.open(state, now=T0 + 60)
    again.extend(17, digest)
    assert again.unseal(blob) == b"spool key"


def test_modified_agent_cannot_unseal(state: Path) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    tpm.extend(17, hashlib.sha256(b"agent code").digest())
    blob = tpm.seal(b"secret")
    tpm.extend(17, hashlib.sha256(b"patched").digest())
    with pytest.raises(UnsealError, match="policy_mismatch") as info:
        tpm.unseal(blob)
    assert info.value.reason == "policy_mismatch"


def test_unselected_pcrs_do_not_matter(state: Path) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    blob = tpm.seal(b"secret", pcrs=(17, 18))
    tpm.extend(16, bytes(32))
    assert tpm.unseal(blob) == b"secret"


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (0, "malformed"),  # magic
        (10, "malformed"),  # selection hash alg
        (20, "policy_mismatch"),  # stored policy digest
        (50, "integrity"),  # salt
        (70, "integrity"),  # GCM nonce
        (-1, "integrity"),  # tag
        (-17, "integrity"),  # ciphertext
    ],
)
def test_tampered_blob_fails(state: Path, offset: int, reason: str) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    blob = bytearray(tpm.seal(b"secret"))
    blob[offset] ^= 0x01
    with pytest.raises(UnsealError) as info:
        tpm.unseal(bytes(blob))
    assert info.value.reason == reason


def test_another_tpm_cannot_unseal(tmp_path: Path, state: Path) -> None:
    blob = SimulatedTpm.open(state, now=T0).seal(b"secret")
    with pytest.raises(UnsealError, match="integrity"):
        SimulatedTpm.open(tmp_path / "b", now=T0).unseal(blob)


def test_truncated_blob_is_malformed(state: Path) -> None:
    tpm = SimulatedTpm.open(state, now=T0)
    with pytest.raises(UnsealError, match="malformed"):
        tpm.unseal(tpm.seal(b"")[:-1])

"""TssTpm against a real software TPM (swtpm): AK inside the TPM, measured launch into
PCR 23, quotes the server's verifier accepts, and one-change negatives, each with its
own reason."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests import swtpm
from vcomp.agent import measure
from vcomp.agent.tpm import TpmError, UnsealError
from vcomp.agent.tpm_backend import Tpm, open_tpm
from vcomp.errors import AttestationError, ConfigError
from vcomp.protocol import attestation as at
from vcomp.protocol import tpm_format as tf
from vcomp.protocol.attestation import Measurement, NonceBook

POLICY = {"sandbox": "tss test"}
EPHEMERAL = b"ephemeral spki of the agent"
NOW = 1000.0

if swtpm.missing():
    pytestmark = pytest.mark.skip(reason=swtpm.missing())
else:
    from vcomp.agent.tss_tpm import AK_PRIVATE_FILE, AK_PUBLIC_FILE, TssTpm


@pytest.fixture
def sw(tmp_path: Path) -> Iterator[swtpm.Swtpm]:
    swtpm.require()
    with swtpm.running_swtpm(tmp_path / "swtpm-state") as running:
        yield running


@pytest.fixture
def tpm(sw: swtpm.Swtpm, tmp_path: Path) -> Iterator[TssTpm]:
    opened = TssTpm.open(sw.spec, tmp_path / "home-tpm")
    yield opened
    opened.close()


class Server:
    """The server's side of attestation for one agent: enrolled key, allowlist, clock."""

    def __init__(self, tpm: Tpm, allowlist: set[Measurement]) -> None:
        self.key = tpm.ak_public_key
        self.allowlist = allowlist
        self.book = NonceBook()
        self.previous: tf.ClockInfo | None = None

    def challenge(self) -> bytes:
        return self.book.issue(NOW)

    def verify(self, nonce: bytes, quote: tuple[bytes, bytes, list[bytes]]) -> at.VerifiedQuote:
        attest, signature, values = quote
        verified = at.verify_quote(
            ak_public_key=self.key,
            quote=attest,
            signature=signature,
            pcr_values=values,
            server_nonce=nonce,
            ephemeral_spki_der=EPHEMERAL,
            nonce_book=self.book,
            now=NOW + 1,
            requested_pcrs=at.MEASURED_PCRS,  # what CHALLENGE asks for today
            selection_from_allowlist=True,
            allowlist=self.allowlist,
            previous_clock=self.previous,
        )
        self.previous = verified.clock_info
        return verified

    def reason(self, nonce: bytes, quote: tuple[bytes, bytes, list[bytes]]) -> str:
        with pytest.raises(AttestationError) as info:
            self.verify(nonce, quote)
        return info.value.reason


def quote_for(tpm: Tpm, nonce: bytes) -> tuple[bytes, bytes, list[bytes]]:
    return tpm.quote(at.expected_extra_data(nonce, EPHEMERAL), tpm.measured_pcrs)


def golden() -> Measurement:
    return measure.golden_measurement(POLICY, pcrs=(23,))


# ---------------------------------------------------------------- the AK


def test_ak_is_a_restricted_signing_key_made_inside_the_tpm(tpm: TssTpm, tmp_path: Path) -> None:
    from tpm2_pytss import TPM2B_PUBLIC

    public = TPM2B_PUBLIC.unmarshal((tmp_path / "home-tpm" / AK_PUBLIC_FILE).read_bytes())[0]
    assert int(public.publicArea.objectAttributes) == tf.AK_OBJECT_ATTRIBUTES
    # The TPM's Name for the AK is the one the server derives from the public key alone.
    assert bytes(public.get_name().marshal())[2:] == at.ak_name(tpm.ak_public_key)
    assert tpm.agent_id == hashlib.sha256(at.spki_der(tpm.ak_public_key)).digest()
    # The private file is the SRK-wrapped TPM2B_PRIVATE, mode 0600, not a usable key.
    priv = tmp_path / "home-tpm" / AK_PRIVATE_FILE
    assert priv.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError):
        serialization.load_der_private_key(priv.read_bytes(), password=None)


def test_reopening_keeps_the_identity(sw: swtpm.Swtpm, tmp_path: Path) -> None:
    first = TssTpm.open(sw.spec, tmp_path / "t")
    agent_id = first.agent_id
    first.close()
    again = open_tpm(sw.spec, tmp_path / "t")
    assert again.agent_id == agent_id
    assert isinstance(again, TssTpm)
    again.close()


def test_ak_blob_is_useless_in_another_tpm(sw: swtpm.Swtpm, tmp_path: Path) -> None:
    first = TssTpm.open(sw.spec, tmp_path / "a")
    first.close()
    with (
        swtpm.running_swtpm(tmp_path / "other-state") as other,
        pytest.raises(TpmError, match="refused to load the AK"),
    ):
        TssTpm.open(other.spec, tmp_path / "a")


def test_fixture_provisions_an_ek_certificate_from_a_local_ca(tmp_path: Path) -> None:
    """For EK-based enrolment (next round): swtpm_setup + swtpm_localca give the TPM an
    RSA EK certificate in NV that chains to the CA root the fixture keeps."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import padding as rsa_padding

    with swtpm.running_swtpm(tmp_path / "ek-state", ek=True) as sw:
        der = sw.read_nv(0x01C00002)
        root = x509.load_pem_x509_certificate(sw.ca_root_pem.read_bytes())
        issuer = x509.load_pem_x509_certificate((sw.ca_dir / "issuercert.pem").read_bytes())
    # The NV index is padded past the DER; a DER reader takes the first certificate.
    length = int.from_bytes(der[2:4], "big") + 4
    ek_cert = x509.load_der_x509_certificate(der[:length])
    for cert, signer in ((ek_cert, issuer), (issuer, root)):
        assert cert.issuer == signer.subject
        key = signer.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        assert cert.signature_hash_algorithm is not None
        key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            rsa_padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )


def test_unrestricted_key_swapped_in_for_the_ak_is_refused(sw: swtpm.Swtpm, tmp_path: Path) -> None:
    """An unrestricted signing key can sign forged TPMS_ATTEST bytes; the agent refuses
    to use one in place of the AK. (The server's own check of the AK's attributes comes
    with credential activation, next round.)"""
    from tpm2_pytss import ESAPI, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TCTILdr

    from vcomp.agent.tss_tpm import _create_srk

    home = tmp_path / "home"
    TssTpm.open(sw.spec, home).close()
    esys = ESAPI(TCTILdr(*sw.spec.tcti()))
    try:
        srk = _create_srk(esys)
        loose = TPM2B_PUBLIC.parse(
            "rsa2048:rsassa-sha256:null",
            objectAttributes="fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign",
        )
        private, public, *_ = esys.create(srk, TPM2B_SENSITIVE_CREATE(), loose)
        esys.flush_context(srk)
    finally:
        esys.close()
    for name, blob in ((AK_PUBLIC_FILE, public), (AK_PRIVATE_FILE, private)):
        (home / name).unlink()
        (home / name).write_bytes(bytes(blob.marshal()))
    with pytest.raises(ConfigError, match="not an AK of the vcomp template"):
        TssTpm.open(sw.spec, home)


# ---------------------------------------------------------------- PCRs and launch


def test_extend_follows_the_tpm_hash(tpm: TssTpm) -> None:
    tpm.reset_measured_pcrs()
    assert tpm.read_pcr(23) == tf.EMPTY_PCR
    m = hashlib.sha256(b"m").digest()
    assert tpm.extend(23, m) == tf.extend(tf.EMPTY_PCR, m)


def test_measured_launch_resets_pcr23_and_yields_the_golden_value(tpm: TssTpm) -> None:
    tpm.extend(23, hashlib.sha256(b"left over from earlier").digest())
    got = measure.measured_launch(tpm, POLICY)
    assert got == golden()
    assert [i for i, _ in got.pcrs] == [23]
    # A golden value for PCR 23 differs from the simulated 17+18 one; the text says which.
    assert golden() != measure.golden_measurement(POLICY)
    assert golden().format().startswith("sha256:23=")


# ---------------------------------------------------------------- quotes


def test_quote_made_in_swtpm_passes_the_servers_verifier(tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {golden()})
    nonce = server.challenge()
    verified = server.verify(nonce, quote_for(tpm, nonce))
    assert verified.agent_id == tpm.agent_id
    assert verified.measurement == golden()
    # qualifiedSigner is the AK's Qualified Name (it covers the SRK): a real TPM's value.
    _, name, qualified_name = tpm._esys.read_public(tpm._ak)
    assert bytes(name.marshal())[2:] == tpm.ak_name
    assert verified.qualified_signer == bytes(qualified_name.marshal())[2:]


def test_tpm2_checkquote_accepts_a_swtpm_quote(tpm: TssTpm, tmp_path: Path) -> None:
    if shutil.which("tpm2_checkquote") is None:
        pytest.skip("tpm2_checkquote not installed (apt-get install tpm2-tools)")
    measure.measured_launch(tpm, POLICY)
    nonce = bytes(range(32))
    attest, sig, values = tpm.quote(nonce, [23])
    out = tmp_path / "q"
    out.mkdir()
    (out / "ak.pem").write_bytes(
        tpm.ak_public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (out / "quote.msg").write_bytes(attest)
    (out / "quote.sig").write_bytes(sig)
    (out / "pcrs.bin").write_bytes(b"".join(values))
    args = ["tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig"]
    args += ["-f", "pcrs.bin", "-l", "sha256:23", "-g", "sha256", "-q", nonce.hex()]
    ok = subprocess.run(args, cwd=out, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*args[:-1], bytes(32).hex()], cwd=out, capture_output=True, text=True)
    assert bad.returncode != 0  # the check can fail: a different nonce is refused


def test_other_measurement_is_not_allowed(tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    tpm.extend(23, hashlib.sha256(b"a patched agent").digest())
    server = Server(tpm, {golden()})
    nonce = server.challenge()
    assert server.reason(nonce, quote_for(tpm, nonce)) == "measurement_not_allowed"


def test_selection_nobody_allowlisted_is_refused(tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {measure.golden_measurement(POLICY)})  # only the 17+18 golden
    nonce = server.challenge()
    assert server.reason(nonce, quote_for(tpm, nonce)) == "pcr_selection_mismatch"


def test_ak_from_another_swtpm_is_refused(tpm: TssTpm, tmp_path: Path) -> None:
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {golden()})
    with swtpm.running_swtpm(tmp_path / "other-state") as other_sw:
        other = TssTpm.open(other_sw.spec, tmp_path / "other-home")
        try:
            measure.measured_launch(other, POLICY)
            nonce = server.challenge()
            assert server.reason(nonce, quote_for(other, nonce)) == "bad_signature"
        finally:
            other.close()


def test_replayed_quote_is_refused(tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {golden()})
    nonce = server.challenge()
    recorded = quote_for(tpm, nonce)
    server.verify(nonce, recorded)
    assert server.reason(nonce, recorded) == "nonce_reused"
    assert server.reason(server.challenge(), recorded) == "nonce_mismatch"


def test_reset_moves_reset_count_forward_and_is_accepted(
    sw: swtpm.Swtpm, tpm: TssTpm, tmp_path: Path
) -> None:
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {golden()})
    nonce = server.challenge()
    before = server.verify(nonce, quote_for(tpm, nonce)).clock_info
    sw.reset()
    # The reset unloaded the AK and cleared PCR 23: this session can no longer quote.
    with pytest.raises(TpmError, match="not loaded"):
        quote_for(tpm, server.challenge())
    rebooted = TssTpm.open(sw.spec, tmp_path / "home-tpm")
    try:
        assert rebooted.read_pcr(23) == tf.EMPTY_PCR
        measure.measured_launch(rebooted, POLICY)
        nonce = server.challenge()
        after = server.verify(nonce, quote_for(rebooted, nonce)).clock_info
    finally:
        rebooted.close()
    assert after.reset_count == before.reset_count + 1


def test_tpm_rolled_back_between_quotes_is_refused(sw: swtpm.Swtpm, tmp_path: Path) -> None:
    home = tmp_path / "home"
    TssTpm.open(sw.spec, home).close()
    sw.stop()
    snapshot = tmp_path / "snapshot"
    shutil.copytree(sw.state_dir, snapshot)
    sw.start()
    sw.reset()
    sw.reset()
    tpm = TssTpm.open(sw.spec, home)
    measure.measured_launch(tpm, POLICY)
    server = Server(tpm, {golden()})
    nonce = server.challenge()
    server.verify(nonce, quote_for(tpm, nonce))
    tpm.close()
    sw.stop()
    # The volunteer restores an older TPM state (or a reset count is forged): the
    # counters go backwards.
    shutil.rmtree(sw.state_dir)
    shutil.copytree(snapshot, sw.state_dir)
    sw.start()
    tpm = TssTpm.open(sw.spec, home)
    try:
        measure.measured_launch(tpm, POLICY)
        nonce = server.challenge()
        assert server.reason(nonce, quote_for(tpm, nonce)) == "reset_count_regressed"
    finally:
        tpm.close()


# ---------------------------------------------------------------- sealing


def test_seal_opens_only_with_the_same_measurement(sw: swtpm.Swtpm, tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    blob = tpm.seal(b"spool key")
    assert b"spool key" not in blob
    assert tpm.unseal(blob) == b"spool key"
    tpm.extend(23, hashlib.sha256(b"a patched agent").digest())
    with pytest.raises(UnsealError) as info:
        tpm.unseal(blob)
    assert info.value.reason == "policy_mismatch"
    sw.reset()
    rebooted = TssTpm.open(sw.spec, tpm.state_dir)
    try:
        measure.measured_launch(rebooted, POLICY)  # the same build after a reboot
        assert rebooted.unseal(blob) == b"spool key"
    finally:
        rebooted.close()


def test_malformed_sealed_blobs_are_refused(tpm: TssTpm) -> None:
    measure.measured_launch(tpm, POLICY)
    blob = tpm.seal(b"k")
    for bad in (b"", blob[:-1], b"VCTS" + b"\xff" * 8, b"XXXX" + blob[4:]):
        with pytest.raises(UnsealError) as info:
            tpm.unseal(bad)
        assert info.value.reason == "malformed"
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    with pytest.raises(UnsealError) as info:
        tpm.unseal(bytes(tampered))
    assert info.value.reason == "integrity"

"""The enrolment line: a real agent's line parses; altered or foreign lines are refused."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vcomp.agent.enrolment import ENROLMENT_TAG, format_enrolment, parse_enrolment
from vcomp.agent.tpm import SimulatedTpm
from vcomp.errors import ConfigError


@pytest.fixture(scope="module")
def tpm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedTpm:
    return SimulatedTpm.open(tmp_path_factory.mktemp("tpm"))


def spki_b64(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def test_round_trip(tpm: SimulatedTpm) -> None:
    line = format_enrolment(tpm, "alice's  laptop")
    assert "\n" not in line and line.startswith(ENROLMENT_TAG + " ")
    assert line.split()[2] == "alice's-laptop"
    e = parse_enrolment(line)
    assert e.agent_id == tpm.agent_id.hex()
    assert e.name == "alice's-laptop"
    loaded = serialization.load_pem_public_key(e.ak_public_pem.encode())
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == tpm.ak_public_key.public_numbers()
    assert parse_enrolment("  " + line + "\n") == e


def test_forged_agent_id_is_refused(tpm: SimulatedTpm) -> None:
    _, agent_id, name, key = format_enrolment(tpm, "a").split()
    forged = hashlib.sha256(b"someone else").hexdigest()
    with pytest.raises(ConfigError, match="does not match"):
        parse_enrolment(f"{ENROLMENT_TAG} {forged} {name} {key}")
    # Someone else's key under this agent's id is refused as well.
    other = spki_b64(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(ConfigError, match="does not match"):
        parse_enrolment(f"{ENROLMENT_TAG} {agent_id} {name} {other}")


def test_key_must_be_rsa_2048() -> None:
    for key in (
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        ec.generate_private_key(ec.SECP256R1()),
    ):
        b64 = spki_b64(key)
        agent_id = hashlib.sha256(base64.b64decode(b64)).hexdigest()
        with pytest.raises(ConfigError, match="RSA-2048"):
            parse_enrolment(f"{ENROLMENT_TAG} {agent_id} n {b64}")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "must start with"),
        ("vcomp-enrol/2 " + "0" * 64 + " n AAAA", "must start with"),
        (ENROLMENT_TAG + " " + "0" * 64 + " n", "4 fields"),
        (ENROLMENT_TAG + " " + "0" * 64 + " two words AAAA", "4 fields"),
        (ENROLMENT_TAG + " xyz n AAAA", "64 hex digits"),
        (ENROLMENT_TAG + " " + "0" * 64 + " n !!!notbase64", "not a base64 DER"),
        (ENROLMENT_TAG + " " + "0" * 64 + " n " + "A" * 4000, "longer than"),
    ],
)
def test_malformed_lines(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_enrolment(line)


def test_tpm_dir_identity_is_stable(tmp_path: Path) -> None:
    first = format_enrolment(SimulatedTpm.open(tmp_path), "n")
    assert format_enrolment(SimulatedTpm.open(tmp_path), "n") == first


def _line_for(key: rsa.RSAPrivateKey, name: str = "n") -> str:
    b64 = spki_b64(key)
    agent_id = hashlib.sha256(base64.b64decode(b64)).hexdigest()
    return f"{ENROLMENT_TAG} {agent_id} {name} {b64}"


def test_key_exponent_must_be_65537() -> None:
    """attestation.md 1: the AK is RSA-2048 with e = 65537, as a TPM makes it
    (TPMT_PUBLIC exponent 0); an AK with another exponent is not a TPM's AK."""
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    with pytest.raises(ConfigError, match="65537"):
        parse_enrolment(_line_for(key))


def test_what_a_line_may_hold(tpm: SimulatedTpm) -> None:
    """The grammar of attestation.md 1.1: upper-case hex is accepted (and stored
    lower-case), fields may be separated by any run of white space (a chat program's
    no-break spaces too), and a name is 1-64 printable characters, any script."""
    _, agent_id, _, key = format_enrolment(tpm, "n").split()
    for sep in (" ", "\t", "  ", "\u00a0", " \u3000 "):
        for name in ("Zoë's-laptop", "n" * 64, "实验室-7", "a/b:c=d(e)#f"):
            line = sep.join([ENROLMENT_TAG, agent_id.upper(), name, key])
            e = parse_enrolment(line)
            assert (e.agent_id, e.name) == (agent_id, name)
    for name in ("n" * 65, "a\u200bb", "a\u202eb", "a\x1bb", "a\ue000b", "a\u0378b"):
        # too long; zero-width space (Cf); right-to-left override (Cf); ESC (Cc);
        # private use (Co); unassigned (Cn)
        with pytest.raises(ConfigError, match="printable"):
            parse_enrolment(f"{ENROLMENT_TAG} {agent_id} {name} {key}")
    # The agent's own line: single spaces, lower-case id, whitespace in the name as '-'.
    line = format_enrolment(tpm, " Zoë \t laptop ")
    assert line == f"{ENROLMENT_TAG} {agent_id} Zoë-laptop {key}"
    for bad in (key[:10] + "-" + key[11:], key[:10] + "_" + key[11:], key[:-4]):
        # the URL-safe alphabet's characters; a length that is not a multiple of 4
        with pytest.raises(ConfigError, match="base64"):
            parse_enrolment(f"{ENROLMENT_TAG} {agent_id} n {bad}")

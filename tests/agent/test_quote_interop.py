"""Standard TPM 2.0 tooling (tpm2-tools' tpm2_checkquote) accepts our quotes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECKQUOTE = shutil.which("tpm2_checkquote")
pytestmark = pytest.mark.skipif(
    CHECKQUOTE is None,
    reason="tpm2_checkquote not installed (Debian package tpm2-tools; .ci/run installs it)",
)
VECTOR = json.loads((Path(__file__).parents[2] / "protocol" / "vectors" / "quote.json").read_text())
NONCE = "5eed" * 16  # 32 bytes of qualifying data, hex


def run_agent_quote(out: Path, state: Path) -> None:
    cli = "from vcomp.agent.cli import main; main()"
    args = ["quote", "--qualifying-data", NONCE, "--out", str(out), "--state", str(state)]
    subprocess.run(
        [sys.executable, "-c", cli, *args],
        check=True,
        capture_output=True,
        timeout=60,
    )


def checkquote(d: Path, qualification: str) -> subprocess.CompletedProcess[str]:
    pcr_list = (d / "pcr-list.txt").read_text().strip()
    assert CHECKQUOTE is not None
    args = ["-u", "ak.pub.pem", "-m", "quote.msg", "-s", "quote.sig", "-f", "pcrs.bin"]
    args += ["-l", pcr_list, "-g", "sha256", "-q", qualification]
    return subprocess.run(
        [CHECKQUOTE, *args],
        cwd=d,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def quote_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("interop")
    run_agent_quote(base / "q", base / "state")
    return base / "q"


def copy_of(quote_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(quote_dir, tmp_path / "q"))


def test_agent_writes_the_five_files(quote_dir: Path) -> None:
    names = sorted(p.name for p in quote_dir.iterdir())
    assert names == ["ak.pub.pem", "pcr-list.txt", "pcrs.bin", "quote.msg", "quote.sig"]
    assert (quote_dir / "pcr-list.txt").read_text() == "sha256:17,18\n"
    assert len((quote_dir / "pcrs.bin").read_bytes()) == 64


def test_tpm2_checkquote_accepts_our_quote(quote_dir: Path) -> None:
    result = checkquote(quote_dir, NONCE)
    assert result.returncode == 0, result.stderr
    assert "17: 0x" in result.stdout and "18: 0x" in result.stdout


def test_tpm2_checkquote_accepts_the_golden_vector(tmp_path: Path) -> None:
    (tmp_path / "ak.pub.pem").write_text(VECTOR["ak_public_key_pem"])
    (tmp_path / "quote.msg").write_bytes(bytes.fromhex(VECTOR["tpms_attest"]))
    (tmp_path / "quote.sig").write_bytes(bytes.fromhex(VECTOR["tpmt_signature"]))
    pcrs = bytes.fromhex(VECTOR["pcr_values"]["17"]) + bytes.fromhex(VECTOR["pcr_values"]["18"])
    (tmp_path / "pcrs.bin").write_bytes(pcrs)
    (tmp_path / "pcr-list.txt").write_text("sha256:17,18\n")
    result = checkquote(tmp_path, VECTOR["extra_data"])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("offset", [50, 80, 130])  # extraData, clockInfo, pcrDigest
def test_tpm2_checkquote_rejects_a_modified_quote(
    quote_dir: Path, tmp_path: Path, offset: int
) -> None:
    d = copy_of(quote_dir, tmp_path)
    msg = bytearray((d / "quote.msg").read_bytes())
    msg[offset] ^= 0x01
    (d / "quote.msg").write_bytes(bytes(msg))
    assert checkquote(d, NONCE).returncode != 0


def test_tpm2_checkquote_rejects_other_nonce_or_pcrs(quote_dir: Path, tmp_path: Path) -> None:
    assert checkquote(quote_dir, "5eed" * 15 + "5eee").returncode != 0
    d = copy_of(quote_dir, tmp_path)
    pcrs = bytearray((d / "pcrs.bin").read_bytes())
    pcrs[0] ^= 0x01
    (d / "pcrs.bin").write_bytes(bytes(pcrs))
    assert checkquote(d, NONCE).returncode != 0

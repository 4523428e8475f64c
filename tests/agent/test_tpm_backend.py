"""The TPM backend choice: parsing ``--tpm``, agent.toml's ``tpm``, init and doctor.

Bad values are refused with a message that says what is expected; an unreachable TPM
is a clean error, never a traceback. The swtpm cases run a real swtpm.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests import swtpm
from tests.agent.test_cli import assert_clean_error
from vcomp.agent.cli import main
from vcomp.agent.config import init_agent_home, load_agent_config
from vcomp.agent.tpm import SimulatedTpm
from vcomp.agent.tpm_backend import TpmSpec, open_tpm
from vcomp.errors import ConfigError


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    ("text", "spec", "tcti"),
    [
        ("simulated", TpmSpec("simulated"), None),
        ("swtpm:127.0.0.1:2321", TpmSpec("swtpm", "127.0.0.1", 2321), "host=127.0.0.1,port=2321"),
        ("swtpm:::1:2321", TpmSpec("swtpm", "::1", 2321), "host=::1,port=2321"),
        ("device", TpmSpec("device", path="/dev/tpmrm0"), "/dev/tpmrm0"),
        ("device:/dev/tpm0", TpmSpec("device", path="/dev/tpm0"), "/dev/tpm0"),
    ],
)
def test_parse(text: str, spec: TpmSpec, tcti: str | None) -> None:
    assert TpmSpec.parse(text) == spec
    assert TpmSpec.parse(spec.format()) == spec
    if tcti is not None:
        assert spec.tcti()[1] == tcti
    assert spec.measured_pcrs == ((17, 18) if text == "simulated" else (23,))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hardware",
        "simulated:x",
        "swtpm",
        "swtpm:host",
        "swtpm:host:0",
        "swtpm:host:99999",
        "swtpm:host:port",
        "swtpm:h,port=1:2321",  # no smuggling extra TCTI options
        "device:relative/path",
        "device:/dev/tpm0,foo=1",
    ],
)
def test_bad_values_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="tpm"):
        TpmSpec.parse(text)


def test_simulated_is_the_default_and_is_written_to_agent_toml(tmp_path: Path) -> None:
    config = init_agent_home(tmp_path / "a", name="a")
    assert config.tpm == "simulated"
    assert 'tpm = "simulated"' in config.config_path.read_text()
    tpm = open_tpm(config.tpm_spec(), config.tpm_dir)
    assert isinstance(tpm, SimulatedTpm) and tpm.measured_pcrs == (17, 18)


def test_bad_tpm_in_agent_toml_names_the_file(tmp_path: Path) -> None:
    config = init_agent_home(tmp_path / "a", name="a")
    text = config.config_path.read_text().replace('tpm = "simulated"', 'tpm = "tpm0"')
    config.config_path.write_text(text)
    with pytest.raises(ConfigError, match=r"agent\.toml: tpm must be simulated"):
        load_agent_config(config.home)


def test_init_with_a_bad_tpm_is_a_clean_error(tmp_path: Path) -> None:
    assert_clean_error(run("init", tmp_path / "a", "--tpm", "tpm0"), "tpm must be simulated")


def test_init_with_an_unreachable_swtpm_is_a_clean_error(tmp_path: Path) -> None:
    swtpm.require()
    port = swtpm._free_port_pair()  # nobody listens there
    result = run("init", tmp_path / "a", "--tpm", f"swtpm:127.0.0.1:{port}")
    assert_clean_error(result, "cannot reach the TPM at swtpm:127.0.0.1")
    assert "run init again with --force" in result.stderr


@pytest.fixture
def sw(tmp_path: Path) -> Iterator[swtpm.Swtpm]:
    swtpm.require()
    with swtpm.running_swtpm(tmp_path / "swtpm-state") as running:
        yield running


def test_init_on_swtpm_prints_the_pcr23_golden_and_doctor_says_active(
    tmp_path: Path, sw: swtpm.Swtpm
) -> None:
    home = tmp_path / "a"
    result = run("init", home, "--name", "a", "--tpm", sw.spec.format())
    assert result.exit_code == 0, result.output
    assert f"tpm:        {sw.spec.format()}" in result.stdout
    assert "\nsha256:23=" in result.stdout
    assert not (home / "tpm" / "ak.pem").exists()  # no private key in a file
    assert load_agent_config(home).tpm == sw.spec.format()
    doctor = run("doctor", "--config", home)
    assert "tpm      active" in doctor.stdout and "PCR 23" in doctor.stdout
    sw.stop()
    doctor = run("doctor", "--config", home)
    assert "tpm      failed" in doctor.stdout and "cannot reach the TPM" in doctor.stdout


def test_doctor_says_the_simulated_tpm_is_no_root_of_trust(tmp_path: Path) -> None:
    init_agent_home(tmp_path / "a", name="a")
    doctor = run("doctor", "--config", tmp_path / "a")
    assert "tpm      unavailable  simulated TPM" in doctor.stdout

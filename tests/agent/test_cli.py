"""``vcomp-agent`` through click's CliRunner: init, enrolment, measure, join checks, quote."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from vcomp.agent.cli import main
from vcomp.agent.config import load_agent_config
from vcomp.agent.enrolment import parse_enrolment
from vcomp.agent.measure import golden_measurement
from vcomp.agent.tpm import SimulatedTpm
from vcomp.protocol.attestation import Measurement

FP = "cd" * 32


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_clean_error(result: Result, message: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert message in result.stderr, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    d = tmp_path_factory.mktemp("cli") / "agent"
    result = run("init", d, "--name", "bob's pc", "--server", "10.0.0.1:7461", "--server-key", FP)
    assert result.exit_code == 0, result.output
    return d, result


def line_starting(result: Result, prefix: str) -> str:
    return next(ln for ln in result.stdout.splitlines() if ln.startswith(prefix))


def test_init_prints_enrolment_and_measurement(home: tuple[Path, Result]) -> None:
    d, result = home
    enrolment = parse_enrolment(line_starting(result, "vcomp-enrol/1 "))
    assert enrolment.agent_id == SimulatedTpm.open(d / "tpm").agent_id.hex()
    assert enrolment.name == "bob's-pc"
    assert f"agent id:   {enrolment.agent_id}" in result.stdout
    golden = line_starting(result, "sha256:")
    config = load_agent_config(d)
    assert Measurement.parse(golden) == golden_measurement(config.policy())
    assert (config.servers, config.server_key) == (("10.0.0.1:7461",), FP)


def test_enrolment_and_measure_repeat_what_init_printed(home: tuple[Path, Result]) -> None:
    d, result = home
    again = run("enrolment", "--config", d)
    assert again.exit_code == 0
    assert line_starting(again, "vcomp-enrol/1") == line_starting(result, "vcomp-enrol/1")
    measured = run("measure", env={"VCOMP_AGENT_HOME": str(d)})  # home from the environment
    assert measured.exit_code == 0
    fresh = golden_measurement(load_agent_config(d).policy())  # the code may have changed
    assert measured.stdout.strip() == fresh.format()
    assert measured.stdout.strip()[-64:] == line_starting(result, "sha256:")[-64:]  # PCR 18


def test_init_without_server_says_what_to_do(tmp_path: Path) -> None:
    result = run("init", tmp_path / "a")
    assert result.exit_code == 0
    assert "set servers and server_key" in result.stderr
    assert_clean_error(run("init", tmp_path / "a"), "not empty")


def test_init_rejects_a_bad_server_key(tmp_path: Path) -> None:
    assert_clean_error(
        run("init", tmp_path / "a", "--server-key", "1234"), "fingerprint (64 hex digits"
    )
    assert not (tmp_path / "a").exists()  # nothing created for a refused init


def test_init_takes_several_servers_in_order(tmp_path: Path) -> None:
    d = tmp_path / "a"
    result = run("init", d, "--server", "b.example:7461", "--server", "[::1]:9", "--server", "a:1")
    assert result.exit_code == 0, result.output
    assert load_agent_config(d).servers == ("b.example:7461", "[::1]:9", "a:1")
    assert 'servers = ["b.example:7461", "[::1]:9", "a:1"]' in (d / "agent.toml").read_text()


def test_init_refuses_duplicate_or_bad_servers(tmp_path: Path) -> None:
    assert_clean_error(
        run("init", tmp_path / "a", "--server", "h:1", "--server", "H:1"), "listed twice"
    )
    assert_clean_error(run("init", tmp_path / "b", "--server", "h:1", "--server", "h"), "HOST:PORT")
    assert_clean_error(run("init", tmp_path / "c", "--server", "h:70000"), "out of range")
    assert not any((tmp_path / n).exists() for n in "abc")  # nothing created


def test_join_refuses_without_server_or_key(tmp_path: Path) -> None:
    d = tmp_path / "a"
    assert run("init", d).exit_code == 0
    assert_clean_error(run("join", "--config", d), "no server set")
    assert_clean_error(run("join", "--config", d, "--server", "h:1"), "no server key pinned")
    assert_clean_error(run("join", "--config", d, "--server", "nohost"), "HOST:PORT")
    assert_clean_error(
        run("join", "--config", d, "--server", "h:1", "--server", "h:1"), "listed twice"
    )
    assert_clean_error(
        run("join", "--config", d, "--server", "h:1", "--server-key", "zz"), "fingerprint"
    )
    assert_clean_error(
        run("join", "--config", d, "--mode", "dedicated", "--server", "h:1"), "needs a core"
    )
    result = run("join", "--config", d, "--core", "1")
    assert result.exit_code == 2 and "--core applies to --mode dedicated" in result.stderr


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    d = tmp_path / "a"
    assert run("init", d).exit_code == 0
    toml = d / "agent.toml"
    toml.write_text(toml.read_text().replace("cores = 1", "cores = 'many'"))
    assert_clean_error(run("measure", "--config", d), f"{toml}: [agent] cores must be")
    toml.write_text("[agent]\ncolour = 'blue'\n")
    assert_clean_error(run("join", "--config", toml), "unknown key 'colour'")
    assert_clean_error(run("measure", "--config", tmp_path / "missing"), "no such file")


def test_quote_uses_the_home_policy(home: tuple[Path, Result], tmp_path: Path) -> None:
    d, result = home
    out = tmp_path / "q"
    quoted = run("quote", "--qualifying-data", "00" * 32, "--out", out, "--config", d)
    assert quoted.exit_code == 0, quoted.output
    # PCR 18 (policy) must match what init printed; PCR 17 (code) is compared with a fresh
    # digest, since the package's files may have changed since the module fixture ran.
    printed = dict(Measurement.parse(line_starting(result, "sha256:")).pcrs)
    golden = dict(golden_measurement(load_agent_config(d).policy()).pcrs)
    pcrs = (out / "pcrs.bin").read_bytes()
    assert (pcrs[:32], pcrs[32:]) == (golden[17], golden[18])
    assert golden[18] == printed[18]


def test_quote_without_a_home_keeps_the_old_behaviour(tmp_path: Path) -> None:
    out = tmp_path / "q"
    env = {"VCOMP_AGENT_HOME": str(tmp_path / "nohome")}
    args = ("quote", "--qualifying-data", "00" * 32, "--out", out, "--state", tmp_path / "s")
    assert run(*args, env=env).exit_code == 0
    empty = golden_measurement({})
    assert (out / "pcrs.bin").read_bytes() == b"".join(v for _, v in empty.pcrs)
    assert run("quote", "--qualifying-data", "xyz", "--out", out, env=env).exit_code == 2


def test_every_command_has_help() -> None:
    commands = ("init", "enrolment", "measure", "join", "quote", "doctor", "sandbox-run")
    for command in (*commands, "status", "pause", "resume"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.stdout


def test_join_log_file_appends_the_log_there(tmp_path: Path) -> None:
    agent = Path(sys.executable).parent / "vcomp-agent"
    if not agent.exists():
        pytest.skip("console scripts not installed in this environment")
    d = tmp_path / "a"
    assert run("init", d).exit_code == 0
    log = tmp_path / "agent.log"
    log.write_text("kept\n")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # nobody answers here
        s.bind(("127.0.0.1", 0))
        server = f"127.0.0.1:{s.getsockname()[1]}"
        args = ["join", "--config", str(d), "--server", server, "--server-key", "ab" * 32]
        proc = subprocess.Popen(
            [str(agent), *args, "--log-file", str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            for _ in range(600):  # until it logged past the kept line (at most 60 s)
                if proc.poll() is not None or len(log.read_text().splitlines()) > 1:
                    break
                time.sleep(0.1)
        finally:
            proc.terminate()
            _out, err = proc.communicate(timeout=60)
    lines = log.read_text().splitlines()
    assert lines[0] == "kept" and len(lines) > 1 and "event=" in lines[1], (lines, err)
    assert "event=" not in err


def test_join_preference_options_are_checked(home: tuple[Path, Result]) -> None:
    d, _ = home
    assert_clean_error(run("join", "--config", d, "--schedule", "Mon 9-10"), "not a time HH:MM")
    assert_clean_error(
        run("join", "--config", d, "--battery-below", "95", "--battery-hysteresis", "10"),
        "at most 100",
    )
    result = run("join", "--config", d, "--max-memory", "-1")
    assert result.exit_code == 2 and "--max-memory" in result.stderr


def test_status_pause_resume_without_a_running_agent(home: tuple[Path, Result]) -> None:
    d, _ = home
    for command in ("status", "pause", "resume"):
        result = run(command, "--config", d)
        assert result.exit_code == 1, result.output
        assert "the agent is not running" in result.stderr
        assert "Traceback" not in result.output


# ---------------------------------------------------------------------- issue 11, part 6


def test_every_printed_form_of_the_server_key_pins_the_same_fingerprint(tmp_path: Path) -> None:
    """What `vcomp-server init` prints, the contents of server.pub, and the path of
    server.pub: the three forms the README offers all pin the one fingerprint."""
    srv = tmp_path / "srv"
    printed = server_main_run("init", srv)
    fingerprint = next(
        ln.split()[-1] for ln in printed.splitlines() if ln.startswith("fingerprint:")
    )
    contents = (srv / "server.pub").read_text().strip()
    for n, form in enumerate((fingerprint, contents, str(srv / "server.pub"))):
        result = run("init", tmp_path / f"a{n}", "--server", "h:1", "--server-key", form)
        assert result.exit_code == 0, result.output
        assert load_agent_config(tmp_path / f"a{n}").server_key == fingerprint, form


def test_server_key_that_cannot_be_a_fingerprint_is_refused(tmp_path: Path) -> None:
    for value in ("1234", "zz" * 32, "-----BEGIN PUBLIC KEY-----", str(tmp_path / "nofile")):
        result = run("init", tmp_path / "a", "--server-key", value)
        assert_clean_error(result, "the server's fingerprint (64 hex digits")
    assert not (tmp_path / "a").exists()


def server_main_run(*args: str | Path) -> str:
    from vcomp.server.cli import main as server_main

    result = CliRunner().invoke(server_main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_server_init_hint_includes_the_server_address(tmp_path: Path) -> None:
    printed = server_main_run("init", tmp_path / "srv")
    hint = next(ln for ln in printed.splitlines() if "vcomp-agent init" in ln)
    assert "--server HOST:7461" in hint and "--server-key" in hint, hint


def test_enrolment_line_alone_for_scripts(home: tuple[Path, Result]) -> None:
    d, result = home
    line = line_starting(result, "vcomp-enrol/1 ")
    for args in (("enrolment", "--line", "--config", d), ("enrolment", "--config", d)):
        # CliRunner's stdout is not a terminal: both give exactly the line, for
        # vcomp-server enroll "$(vcomp-agent enrolment)".
        again = run(*args)
        assert again.exit_code == 0, again.output
        assert again.stdout == line + "\n"
    parse_enrolment(line)


def test_throttle_needs_a_cpu_percentage(tmp_path: Path) -> None:
    d = tmp_path / "a"
    assert run("init", d, "--server", "h:1", "--server-key", FP).exit_code == 0
    assert_clean_error(run("join", "--config", d, "--mode", "throttle"), "--cpu-percent")
    toml = d / "agent.toml"
    toml.write_text(toml.read_text().replace('mode = "background"', 'mode = "throttle"'))
    assert_clean_error(run("measure", "--config", d), "cpu_percent")


def test_default_names_are_unique_per_agent(tmp_path: Path) -> None:
    for n in "ab":
        assert run("init", tmp_path / n).exit_code == 0
    a, b = (load_agent_config(tmp_path / n) for n in "ab")
    assert a.name != b.name
    for config in (a, b):
        agent_id = SimulatedTpm.open(config.tpm_dir).agent_id.hex()
        assert config.name.endswith("-" + agent_id[:6]), config.name

"""Agent home: init layout, agent.toml loading, the measured policy and server-key pinning."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from vcomp.agent.config import (
    AgentConfig,
    SandboxPolicy,
    VolunteerLimits,
    default_agent_home,
    init_agent_home,
    load_agent_config,
    render_agent_toml,
    resolve_server_key,
)
from vcomp.agent.measure import golden_measurement
from vcomp.agent.sandbox import JobLimits
from vcomp.agent.tpm import SimulatedTpm
from vcomp.errors import ConfigError
from vcomp.protocol import handshake

FP = "ab" * 32


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agent") / "home"
    init_agent_home(d, name="alice laptop", servers=["127.0.0.1:7461"], server_key=FP.upper())
    return d


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_init_creates_the_layout(home: Path) -> None:
    assert sorted(p.name for p in home.iterdir()) == ["agent.toml", "spool", "tpm", "work"]
    for sub in ("spool", "work", "tpm"):
        assert stat.S_IMODE((home / sub).stat().st_mode) == 0o700
    assert (home / "tpm" / "ak.pem").exists()


def test_init_writes_a_loadable_config(home: Path) -> None:
    config = load_agent_config(home)
    assert config == load_agent_config(home / "agent.toml")
    assert config.name == "alice-laptop"  # whitespace is not allowed in the enrolment line
    assert config.server_addresses() == (("127.0.0.1", 7461),)
    assert config.server_key == FP and config.server_fingerprint() == bytes.fromhex(FP)
    assert (config.mode, config.cpu_percent, config.core, config.cores) == (
        "background",
        100,
        -1,
        1,
    )
    assert config.limits == VolunteerLimits()
    assert config.sandbox == SandboxPolicy()
    assert config.tpm_dir == home.absolute() / "tpm"
    assert config.spool_dir == home.absolute() / "spool"
    assert config.work_dir == home.absolute() / "work"


def test_init_refuses_a_non_empty_dir_and_force_keeps_the_identity(home: Path) -> None:
    with pytest.raises(ConfigError, match="not empty"):
        init_agent_home(home)
    before = SimulatedTpm.open(home / "tpm").agent_id
    config = init_agent_home(home, name="renamed", force=True)
    assert SimulatedTpm.open(config.tpm_dir).agent_id == before
    assert config.name == "renamed" and config.servers == ()
    init_agent_home(
        home, name="alice laptop", servers=["127.0.0.1:7461"], server_key=FP, force=True
    )


def test_example_file_loads_with_the_defaults() -> None:
    example = Path(__file__).parents[2] / "agent" / "agent.example.toml"
    config = load_agent_config(example)
    assert config.limits == VolunteerLimits() and config.sandbox == SandboxPolicy()


def test_policy_ignores_volunteer_preferences(home: Path) -> None:
    config = load_agent_config(home)
    other = dataclasses.replace(
        config,
        name="bob",
        servers=(),
        server_key="",
        mode="throttle",
        cpu_percent=30,
        cores=4,
        limits=VolunteerLimits(max_cpu_seconds=10),
    )
    assert other.policy() == config.policy()
    assert golden_measurement(other.policy()) == golden_measurement(config.policy())
    policy = config.policy()
    assert policy["policy_version"] == 1
    sandbox = policy["sandbox"]
    assert isinstance(sandbox, dict)
    assert sandbox["job_uid"] == 65534 and sandbox["namespaces"] is True
    assert sandbox["max_processes"] == JobLimits(1, 1, 1.0, 0).max_processes
    assert set(policy) == {"policy_version", "sandbox"}
    for preference in ("mode", "cores", "name", "server", "server_key", "cpu_percent"):
        assert preference not in sandbox


def test_sandbox_settings_change_the_measurement(home: Path) -> None:
    config = load_agent_config(home)
    weaker = dataclasses.replace(config, sandbox=SandboxPolicy(seccomp=False))
    assert golden_measurement(weaker.policy()) != golden_measurement(config.policy())
    no_cgroup = dataclasses.replace(config, sandbox=SandboxPolicy(cgroup=False))
    assert golden_measurement(no_cgroup.policy()) != golden_measurement(config.policy())


def test_sandbox_section_is_read(tmp_path: Path) -> None:
    text = "[sandbox]\nlandlock = false\ncgroup = false\nmax_processes = 8\n"
    config = load_agent_config(write_config(tmp_path, text))
    assert config.sandbox == SandboxPolicy(landlock=False, cgroup=False, max_processes=8)
    limits = config.job_limits(
        cpu_seconds=5, memory_bytes=1 << 20, wall_seconds=2, output_bytes=9, disk_bytes=1 << 20
    )
    assert limits.max_processes == 8 and limits.cpu_seconds == 5
    assert limits.disk_bytes == 1 << 20


def test_execution_mode_only_passes_options_that_apply(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, "[agent]\ncpu_percent = 40\n"))
    assert config.execution_mode().kind == "background"  # cpu_percent kept for later
    throttled = dataclasses.replace(config, mode="throttle")
    assert throttled.execution_mode().cpu_percent == 40
    with pytest.raises(ConfigError, match="needs a core"):
        dataclasses.replace(config, mode="dedicated")  # replace re-validates
    assert dataclasses.replace(config, mode="dedicated", core=0).execution_mode().core == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[agent]\nmdoe = 'full'\n", "unknown key 'mdoe'"),
        ("[agent]\ncores = '2'\n", "cores must be an integer"),
        ("[agent]\nmode = 'turbo'\n", "mode must be one of"),
        ("[agent]\ncpu_percent = 0\n", "cpu_percent must be between 1 and 100"),
        ("[agent]\nserver = 'nohost'\n", "server must look like HOST:PORT"),
        ("[agent]\nserver_key = 'abc'\n", "server_key must be the 64-hex-digit"),
        ("[agent]\nname = ''\n", "name must be 1-64"),
        ("[agent]\nmode = 'dedicated'\ncore = 1\ncores = 2\n", "set cores = 1"),
        ("[limits]\nmax_cpu_seconds = 1.5\n", "max_cpu_seconds must be an integer"),
        ("[sandbox]\njob_uid = 0\n", "job_uid must be between 1"),
        ("[sandbox]\nseccomp = 'no'\n", "seccomp must be true or false"),
        ("[agnet]\n", "unknown section"),
        ("[agent]\nname = \n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_agent_config(path)
    assert str(path) in str(info.value)


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_agent_config(tmp_path)


def test_default_home_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCOMP_AGENT_HOME", "/srv/agent")
    assert default_agent_home() == Path("/srv/agent")
    monkeypatch.delenv("VCOMP_AGENT_HOME")
    assert default_agent_home() == Path("~/.vcomp-agent").expanduser()


def test_resolve_server_key(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    raw = handshake.raw_public(key)
    fingerprint = handshake.key_fingerprint(raw).hex()
    pub = tmp_path / "server.pub"
    pub.write_text(fingerprint + "\n")  # what vcomp-server init writes there
    pem = tmp_path / "server.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert resolve_server_key(fingerprint.upper()) == fingerprint
    assert resolve_server_key(str(pub)) == fingerprint
    assert resolve_server_key(str(pem)) == fingerprint
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="neither"):
        resolve_server_key(str(bad))
    with pytest.raises(
        ConfigError, match=r"fingerprint \(64 hex digits.*or the path of server\.pub"
    ):
        resolve_server_key("abc123")


def test_render_round_trips_odd_names(tmp_path: Path) -> None:
    config = AgentConfig(home=tmp_path, name='quote"back\\slash-é', servers=("[::1]:9", "h:1"))
    (tmp_path / "agent.toml").write_text(render_agent_toml(config))
    assert load_agent_config(tmp_path) == dataclasses.replace(config, home=tmp_path.absolute())


def test_volunteer_limits_refusal() -> None:
    limits = VolunteerLimits(max_cpu_seconds=10)
    fits = dict(
        job_bytes=1, cpu_seconds=10, memory_bytes=1, wall_seconds=1.0, output_bytes=1, disk_bytes=1
    )
    assert limits.refusal(**fits) is None  # type: ignore[arg-type]
    reason = limits.refusal(**{**fits, "cpu_seconds": 11})  # type: ignore[arg-type]
    assert reason is not None and "cpu_seconds" in reason
    over_disk = {**fits, "disk_bytes": limits.max_disk_bytes + 1}
    assert "disk_bytes" in (limits.refusal(**over_disk) or "")  # type: ignore[arg-type]


def test_max_disk_bytes_is_read_bounded_and_declared(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, "[limits]\nmax_disk_bytes = 4096\n"))
    assert config.limits.max_disk_bytes == 4096
    assert config.limits.capacity().disk_bytes == 4096
    assert VolunteerLimits().max_disk_bytes == 1 << 30
    for bad in (0, -1, 1 << 63):
        with pytest.raises(ConfigError):
            VolunteerLimits(max_disk_bytes=bad)


def test_max_checkpoint_bytes_is_read_and_bounded(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, "[limits]\nmax_checkpoint_bytes = 4096\n"))
    assert config.limits.max_checkpoint_bytes == 4096
    assert VolunteerLimits().max_checkpoint_bytes == 4 << 20
    for bad in (-1, (64 << 20) + 1):
        with pytest.raises(ConfigError):
            VolunteerLimits(max_checkpoint_bytes=bad)


def test_capacity_declares_the_volunteer_limits() -> None:
    limits = VolunteerLimits(max_memory_bytes=256 << 20, max_wall_seconds=90.5)
    cap = limits.capacity()
    assert cap.memory_bytes == 256 << 20
    assert cap.wall_seconds == 90  # rounded down: never more than the volunteer allows
    assert cap.cpu_seconds == limits.max_cpu_seconds
    assert cap.job_bytes == limits.max_job_bytes
    assert set(cap.kinds) == {"python", "exec"}


def test_volunteer_limits_refuse_a_work_dir_over_max_disk_bytes(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        render_agent_toml(AgentConfig(home=tmp_path, name="a", servers=("127.0.0.1:9",))).replace(
            "max_disk_bytes = 1073741824", "max_disk_bytes = 1048576"
        )
    )
    limits = load_agent_config(tmp_path).limits
    assert limits.max_disk_bytes == 1 << 20
    fits = dict(job_bytes=1, cpu_seconds=1, memory_bytes=1, wall_seconds=1.0, output_bytes=1)
    assert limits.refusal(**fits, disk_bytes=1 << 20) is None  # type: ignore[arg-type]
    reason = limits.refusal(**fits, disk_bytes=(1 << 20) + 1)  # type: ignore[arg-type]
    assert reason == "disk_bytes 1048577 above this volunteer's limit 1048576"


def test_servers_list_is_read_in_order(tmp_path: Path) -> None:
    text = '[agent]\nservers = ["a.example:1", "[::1]:2", "10.0.0.3:3"]\n'
    config = load_agent_config(write_config(tmp_path, text))
    assert config.servers == ("a.example:1", "[::1]:2", "10.0.0.3:3")
    assert config.server_addresses() == (("a.example", 1), ("::1", 2), ("10.0.0.3", 3))


def test_old_single_server_is_read_as_a_list_of_one(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, '[agent]\nserver = "h:7461"\n'))
    assert config.servers == ("h:7461",)
    assert config.server_addresses() == (("h", 7461),)
    # Written back in the new form, and read again the same.
    (tmp_path / "agent.toml").write_text(render_agent_toml(config))
    assert load_agent_config(tmp_path).servers == ("h:7461",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('servers = ["h:1", "h:1"]', "listed twice"),
        ('servers = ["h:1", "H:1"]', "listed twice"),
        ('servers = ["h:1", "nohost"]', "HOST:PORT"),
        ('servers = ["h:0"]', "out of range"),
        ('servers = "h:1"', "a list of strings"),
        ("servers = [1]", "a list of strings"),
        ('servers = ["a:1"]\nserver = "b:1"', "not both"),
        ("servers = [" + ", ".join(f'"h:{p}"' for p in range(1, 18)) + "]", "at most 16"),
    ],
)
def test_bad_servers_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_agent_config(write_config(tmp_path, f"[agent]\n{text}\n"))


def test_no_servers_is_a_clear_error_at_join_time(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, "[agent]\nservers = []\n"))
    with pytest.raises(ConfigError, match="no server set"):
        config.server_addresses()

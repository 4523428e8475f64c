"""Server home: init layout, server.toml loading and the signing key's permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from vcomp.errors import ConfigError
from vcomp.protocol import handshake
from vcomp.server.config import (
    DEFAULT_CONFIG,
    STORE_URL_ENV,
    JobDefaults,
    init_server_home,
    load_server_config,
    load_signing_key,
)
from vcomp.server.store.sqlite import SqliteStore


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("srv") / "home"
    return d, init_server_home(d)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_init_creates_the_layout(home: tuple[Path, str]) -> None:
    d, _ = home
    assert sorted(p.name for p in d.iterdir() if not p.name.startswith("jobs.sqlite-")) == [
        "jobs.sqlite",
        "server.key",
        "server.pub",
        "server.toml",
    ]
    assert stat.S_IMODE((d / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    SqliteStore(d / "jobs.sqlite").close()  # a real, migrated store


def test_fingerprint_is_sha256_of_the_raw_public_key(home: tuple[Path, str]) -> None:
    d, fingerprint = home
    key = load_signing_key(d / "server.key")
    raw = handshake.raw_public(key)
    assert fingerprint == handshake.key_fingerprint(raw).hex()
    assert (d / "server.pub").read_text().strip() == fingerprint  # one printed form


def test_init_refuses_a_non_empty_dir_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        init_server_home(tmp_path)
    first = init_server_home(tmp_path, force=True)  # no key there yet: a new one
    store = SqliteStore(tmp_path / "jobs.sqlite")
    store.allow_measurement("sha256:17=" + "00" * 32, "kept")
    store.close()
    (tmp_path / "server.toml").write_text("[server]\nwindow = 8\n")
    second = init_server_home(tmp_path, force=True)
    assert second == first  # --force alone keeps the organisation key: agents stay pinned
    assert (tmp_path / "server.toml.bak").read_text() == "[server]\nwindow = 8\n"
    assert load_server_config(tmp_path).window == 1024  # the config went back to defaults
    store = SqliteStore(tmp_path / "jobs.sqlite")
    assert [m.note for m in store.list_measurements()] == ["kept"]  # the store survives
    store.close()
    assert (tmp_path / "notes.txt").exists()


def test_init_replaces_the_key_only_when_asked(tmp_path: Path) -> None:
    first = init_server_home(tmp_path)
    (tmp_path / "server.pub").unlink()  # rewritten from the kept key
    assert init_server_home(tmp_path, force=True) == first
    assert (tmp_path / "server.pub").read_text().strip() == first
    replaced = init_server_home(tmp_path, force=True, new_key=True)
    assert replaced != first
    raw = handshake.raw_public(load_signing_key(tmp_path / "server.key"))
    assert replaced == handshake.key_fingerprint(raw).hex()
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600


def test_init_force_does_not_silently_replace_a_broken_key(tmp_path: Path) -> None:
    init_server_home(tmp_path)
    (tmp_path / "server.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="--new-key"):
        init_server_home(tmp_path, force=True)
    assert (tmp_path / "server.key").read_bytes() == b"not a key"


def test_default_config_loads_as_documented(home: tuple[Path, str]) -> None:
    d, _ = home
    config = load_server_config(d)
    assert config == load_server_config(d / "server.toml")
    assert (config.bind_host, config.bind_port) == ("127.0.0.1", 7461)
    # The window is flow control only since congestion control sizes the flight (issue 10).
    assert (config.window, config.idle_timeout, config.max_sessions) == (1024, 60.0, 100000)
    assert config.congestion == "newreno"
    assert config.jobs == JobDefaults(
        lease_seconds=300.0,
        transfer_seconds=300.0,
        replicas=1,
        quorum=1,
        max_attempts=3,
        cpu_seconds=60,
        memory_bytes=536870912,
        wall_seconds=120.0,
        output_bytes=16777216,
        disk_bytes=67108864,
        refusals_per_hour=30,
        stop_after_same_failures=2,
    )
    assert config.hook_threads == 2
    assert (
        config.max_sessions_per_agent,
        config.max_leases_per_agent,
        config.upload_memory_bytes,
        config.max_pending_handshakes,
    ) == (16, 16, 64 << 20, 1024)
    assert config.key_path == d.absolute() / "server.key"
    assert config.store_path == d.absolute() / "jobs.sqlite"


def test_example_file_matches_the_defaults() -> None:
    example = Path(__file__).parents[2] / "server" / "server.example.toml"
    assert load_server_config(example).jobs == JobDefaults()


def test_refusal_cap_and_disk_bytes_are_read(tmp_path: Path) -> None:
    text = "[jobs]\nrefusals_per_hour = 5\ndisk_bytes = 1048576\n"
    jobs = load_server_config(write_config(tmp_path, text)).jobs
    assert (jobs.refusals_per_hour, jobs.disk_bytes) == (5, 1 << 20)


def test_hook_threads_and_stopping_on_the_same_failure_are_read(tmp_path: Path) -> None:
    text = "[server]\nhook_threads = 4\n[jobs]\nstop_after_same_failures = 0\n"
    config = load_server_config(write_config(tmp_path, text))
    assert (config.hook_threads, config.jobs.stop_after_same_failures) == (4, 0)


def test_checkpoint_upload_is_off_by_default_and_read(tmp_path: Path) -> None:
    assert JobDefaults().upload_checkpoints is False
    assert JobDefaults().checkpoint_bytes == 4 << 20
    text = "[jobs]\nupload_checkpoints = true\ncheckpoint_bytes = 65536\n"
    jobs = load_server_config(write_config(tmp_path, text)).jobs
    assert (jobs.upload_checkpoints, jobs.checkpoint_bytes) == (True, 65536)


def test_missing_keys_take_defaults(tmp_path: Path) -> None:
    config = load_server_config(write_config(tmp_path, "[server]\nbind = '[::1]:0'\n"))
    assert (config.bind_host, config.bind_port, config.window) == ("::1", 0, 1024)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nbnid = '1.2.3.4:1'\n", "unknown key 'bnid'"),
        ("[jobs]\nreplicas = '2'\n", "replicas must be an integer"),
        ("[jobs]\ncpu_seconds = 1.5\n", "cpu_seconds must be an integer"),
        ("[server]\nwindow = true\n", "window must be an integer"),
        ("[server]\nwindow = 0\n", "window must be between 1 and 1024"),
        ("[server]\ncongestion = 'bbr'\n", "congestion: 'bbr' is not one of newreno, cubic"),
        ("[server]\ncongestion = 1\n", "congestion must be a string"),
        ("[server]\nbind = 'localhost'\n", "bind must look like HOST:PORT"),
        ("[server]\nbind = 'h:70000'\n", "out of range"),
        ("[jobs]\nreplicas = 2\nquorum = 3\n", "quorum must be between 1 and 2"),
        ("[jobs]\nlease_seconds = -1\n", "lease_seconds must be positive"),
        ("[jobs]\noutput_bytes = 1073741824\n", "output_bytes must be between"),
        ("[jobs]\nrefusals_per_hour = 0\n", "refusals_per_hour must be between"),
        ("[jobs]\ndisk_bytes = 0\n", "disk_bytes must be between"),
        ("[jobs]\nstop_after_same_failures = -1\n", "stop_after_same_failures must be between"),
        ("[jobs]\nstop_after_same_failures = true\n", "stop_after_same_failures must be an"),
        ("[server]\nhook_threads = 0\n", "hook_threads must be between 1"),
        ("[jobs]\nupload_checkpoints = 1\n", "upload_checkpoints must be"),
        ("[jobs]\ncheckpoint_bytes = 0\n", "checkpoint_bytes must be between 1"),
        ("[server]\nmax_sessions_per_agent = 0\n", "max_sessions_per_agent must be between 1"),
        (
            "[server]\nmax_sessions = 10\nmax_sessions_per_agent = 11\n",
            "max_sessions_per_agent must be between 1 and 10",
        ),
        ("[server]\nmax_leases_per_agent = 0\n", "max_leases_per_agent must be between 1"),
        ("[server]\nmax_pending_handshakes = 0\n", "max_pending_handshakes must be between 1"),
        ("[server]\nmax_leases_per_agent = 2.5\n", "max_leases_per_agent must be an integer"),
        ("[server]\nupload_memory_bytes = 1000\n", "upload_memory_bytes must be between 1048576"),
        ("[jobs]\ntransfer_seconds = 0\n", "transfer_seconds must be positive"),
        ("[jobs]\ntransfer_seconds = 'slow'\n", "transfer_seconds must be a number"),
        ("[srever]\n", "unknown section"),
        ("server = 1\n", r"\[server\] must be a table"),
        ("[server\n", "invalid TOML"),
    ],
)
def test_bad_config_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_server_config(path)
    assert str(path) in str(info.value)


def test_the_congestion_controller_is_read(tmp_path: Path) -> None:
    config = load_server_config(write_config(tmp_path, "[server]\ncongestion = 'cubic'\n"))
    assert config.congestion == "cubic"


def test_leases_per_agent_follow_sessions_per_agent(tmp_path: Path) -> None:
    config = load_server_config(write_config(tmp_path, "[server]\nmax_sessions_per_agent = 8\n"))
    assert (config.max_sessions_per_agent, config.max_leases_per_agent) == (8, 8)


def test_missing_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_server_config(tmp_path)
    with pytest.raises(ConfigError, match="no such file"):
        load_server_config(tmp_path / "nope.toml")


def test_group_readable_key_is_refused(home: tuple[Path, str], tmp_path: Path) -> None:
    d, _ = home
    copy = tmp_path / "server.key"
    copy.write_bytes((d / "server.key").read_bytes())
    os.chmod(copy, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_signing_key(copy)
    os.chmod(copy, 0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_signing_key(copy)
    os.chmod(copy, 0o600)
    assert isinstance(load_signing_key(copy), ed25519.Ed25519PrivateKey)


def test_key_of_the_wrong_kind_is_refused(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "k.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            rsa_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with pytest.raises(ConfigError, match="not an Ed25519"):
        load_signing_key(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_signing_key(path)
    with pytest.raises(ConfigError, match="no such key"):
        load_signing_key(tmp_path / "missing.key")


def test_default_config_text_is_what_init_writes(home: tuple[Path, str]) -> None:
    d, _ = home
    assert (d / "server.toml").read_text() == DEFAULT_CONFIG


# ---------------------------------------------------------------------- the store url


def test_the_store_url_defaults_to_jobs_sqlite_in_the_home(tmp_path: Path) -> None:
    config = load_server_config(write_config(tmp_path, ""))
    assert config.store_url == f"sqlite://{tmp_path.absolute()}/jobs.sqlite"
    assert config.store_path == tmp_path.absolute() / "jobs.sqlite"


def test_the_store_url_is_read_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, '[store]\nurl = "sqlite:data/j.db"\n')
    config = load_server_config(path)
    assert config.store_path == tmp_path.absolute() / "data" / "j.db"
    assert config.store_url == f"sqlite://{tmp_path.absolute()}/data/j.db"
    monkeypatch.setenv(STORE_URL_ENV, "sqlite:///srv/elsewhere.sqlite")
    assert load_server_config(path).store_url == "sqlite:///srv/elsewhere.sqlite"
    monkeypatch.setenv(STORE_URL_ENV, "oracle://db")
    with pytest.raises(ConfigError, match=r"\$VCOMP_STORE_URL: unknown store url scheme 'oracle'"):
        load_server_config(path)


def test_the_busy_timeout_is_read_with_a_default(tmp_path: Path) -> None:
    assert load_server_config(write_config(tmp_path, "")).store_busy_timeout == 30.0
    path = write_config(tmp_path, "[store]\nbusy_timeout = 0.5\n")
    assert load_server_config(path).store_busy_timeout == 0.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[store]\nurl = "mongodb://x"\n', "unknown store url scheme 'mongodb'"),
        ('[store]\nurl = "postgresql://u:secret@db/"\n', "names no database"),
        ("[store]\nurl = 5\n", "[store] url must be"),
        ('[store]\npath = "x"\n', "unknown key 'path'"),
        ("[store]\nbusy_timeout = 0\n", "busy_timeout must be positive"),
        ('[store]\nbusy_timeout = "soon"\n', "[store] busy_timeout must be"),
    ],
)
def test_bad_store_settings_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_server_config(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_init_with_a_store_url_creates_that_store(tmp_path: Path) -> None:
    elsewhere = tmp_path / "data" / "jobs.db"
    elsewhere.parent.mkdir()
    init_server_home(tmp_path / "srv", store_url=f"sqlite://{elsewhere}")
    assert not (tmp_path / "srv" / "jobs.sqlite").exists()
    config = load_server_config(tmp_path / "srv")
    assert (config.store_path, config.store_url) == (elsewhere, f"sqlite://{elsewhere}")
    with SqliteStore(elsewhere, migrate=False) as store:  # at the current version
        assert store.list_apps() == []
    with pytest.raises(ConfigError, match="unknown store url scheme 'ftp'"):
        init_server_home(tmp_path / "bad", store_url="ftp://x")
    assert not (tmp_path / "bad").exists()  # nothing written for a bad url

"""The server's home directory: ``server.toml``, the signing key and the job store.

Layout of a server home (``vcomp-server init DIR``)::

    server.toml   bind address, session limits, job defaults (see server/server.example.toml)
    server.key    Ed25519 private key, PEM PKCS#8, mode 0600
    server.pub    the key's fingerprint (what `init` prints and agents pin), one line
    jobs.sqlite   the SQLite job store (the default ``[store] url``)

The job store is named by a URL (``[store] url``, overridden by ``$VCOMP_STORE_URL``);
see :mod:`vcomp.server.store.url` for the URL rules. ``sqlite:jobs.sqlite`` (relative to
the home) is the default.

Every problem with these files is a :class:`~vcomp.errors.ConfigError` naming the file
and the key, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp.errors import ConfigError, StoreError
from vcomp.protocol import congestion, handshake, limits
from vcomp.server.http.settings import DEFAULT_HTTP_BIND, DEFAULT_MAX_REQUEST_BYTES, HttpSettings
from vcomp.server.store import DEFAULT_DISK_BYTES, DEFAULT_TRANSFER_SECONDS
from vcomp.server.store.rules import DEFAULT_SAME_FAILURES
from vcomp.server.store.sql.checkpoints import MAX_CHECKPOINT_BYTES
from vcomp.server.store.url import StoreUrl, parse_store_url, sqlite_url
from vcomp.tomlconfig import Table, check_int, check_sections, parse_host_port, read_toml

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_PORT",
    "KEY_FILE",
    "PUBLIC_FILE",
    "STORE_FILE",
    "STORE_URL_ENV",
    "JobDefaults",
    "ServerConfig",
    "init_server_home",
    "load_server_config",
    "load_signing_key",
]

CONFIG_FILE = "server.toml"
KEY_FILE = "server.key"
PUBLIC_FILE = "server.pub"
STORE_FILE = "jobs.sqlite"
DEFAULT_STORE_URL = f"sqlite:{STORE_FILE}"  # relative to the server home
DEFAULT_BUSY_TIMEOUT = 30.0  # [store] busy_timeout: a write waiting longer finds the store away
STORE_URL_ENV = "VCOMP_STORE_URL"  # overrides [store] url
DEFAULT_PORT = 7461
# An honest agent opens one session per worker (one per core by default), so 64
# serves a 64-core volunteer; beyond that one key is hoarding, not computing.
# One job per session, so the same number bounds its leases.
DEFAULT_SESSIONS_PER_AGENT = 16  # an honest agent opens one session per worker (core)
DEFAULT_UPLOAD_MEMORY = 64 << 20  # result bytes in flight (buffered or queued), server-wide
MIN_UPLOAD_MEMORY = 1 << 20  # room for a few 256 KiB write batches

# Flow control only (congestion control sizes the flight): the largest window, so it
# never caps a long fat path (1024 x 1200 B per RTT: 24 MB/s at 50 ms).
DEFAULT_WINDOW = limits.MAX_WINDOW
DEFAULT_PENDING_HANDSHAKES = 1024  # half-open handshakes (HELLO answered, no ATTEST yet)

DEFAULT_CONFIG = f"""\
# vcomp organisation server. Created by `vcomp-server init`; see server/server.example.toml.
[server]
bind = "127.0.0.1:{DEFAULT_PORT}"
window = 1024
congestion = "newreno"
idle_timeout = 60.0
max_sessions = 100000
max_sessions_per_agent = 16
max_pending_handshakes = 1024
max_leases_per_agent = 16
upload_memory_bytes = 67108864
hook_threads = 2          # threads for the apps' validators, as many for assimilators

[jobs]
lease_seconds = 300.0     # lease = transfer + run + result; renewed while the agent works
transfer_seconds = 300.0  # reissued after lease_seconds + wall_seconds + this, renewed or not
replicas = 1
quorum = 1
max_attempts = 3
cpu_seconds = 60
memory_bytes = 536870912
wall_seconds = 120
output_bytes = 16777216
disk_bytes = 67108864     # the job's work directory
refusals_per_hour = 30    # past this, an agent gets no leases until the hour has passed
stop_after_same_failures = 2  # a job failing alike this often is not retried; 0: never
upload_checkpoints = false  # true: agents upload jobs' checkpoints; another agent resumes from them
checkpoint_bytes = 4194304  # the largest uploaded checkpoint kept

[store]
# sqlite:PATH (relative to this directory) or sqlite:///ABS/PATH; $VCOMP_STORE_URL overrides it
url = {json.dumps(DEFAULT_STORE_URL)}

[http]
# The HTTP API, /metrics and the dashboard; "" turns it off. A bind that is not
# loopback needs cert and key (TLS) unless allow_plaintext = true.
bind = "{DEFAULT_HTTP_BIND}"
open_metrics = false      # true: /metrics and the dashboard without a token (loopback only)
max_request_bytes = {DEFAULT_MAX_REQUEST_BYTES}
"""


@dataclass(frozen=True, slots=True)
class JobDefaults:
    """``[jobs]``: lease length and the defaults ``vcomp-server submit`` uses."""

    lease_seconds: float = 300.0
    transfer_seconds: float = DEFAULT_TRANSFER_SECONDS
    replicas: int = 1
    quorum: int = 1
    max_attempts: int = 3
    cpu_seconds: int = 60
    memory_bytes: int = 512 << 20
    wall_seconds: float = 120.0
    output_bytes: int = 16 << 20
    disk_bytes: int = DEFAULT_DISK_BYTES
    refusals_per_hour: int = 30
    """Refusals one agent may make per hour; then it gets no lease until older ones age out."""
    stop_after_same_failures: int = DEFAULT_SAME_FAILURES
    """A job whose attempts failed with the same status and error this many times is
    failed, not retried (a deterministic failure); 0 retries up to max_attempts."""
    upload_checkpoints: bool = False
    """Keep each job's latest checkpoint in the store, so a later attempt on any agent
    resumes from it; off, agents keep checkpoints in their own spool only."""
    checkpoint_bytes: int = MAX_CHECKPOINT_BYTES
    """The largest uploaded checkpoint the server keeps (larger ones are refused)."""

    def __post_init__(self) -> None:
        _check_seconds("lease_seconds", self.lease_seconds)
        _check_seconds("transfer_seconds", self.transfer_seconds)
        check_int("replicas", self.replicas, 1, 100)
        check_int("quorum", self.quorum, 1, self.replicas)
        check_int("max_attempts", self.max_attempts, 1, 1000)
        check_int("cpu_seconds", self.cpu_seconds, 1, 1 << 31)
        check_int("memory_bytes", self.memory_bytes, 1, 1 << 62)
        _check_seconds("wall_seconds", self.wall_seconds)
        check_int("output_bytes", self.output_bytes, 0, limits.MAX_RESULT_SIZE)
        check_int("disk_bytes", self.disk_bytes, 1, 1 << 62)
        check_int("refusals_per_hour", self.refusals_per_hour, 1, 1_000_000)
        check_int("stop_after_same_failures", self.stop_after_same_failures, 0, 1000)
        check_int("checkpoint_bytes", self.checkpoint_bytes, 1, limits.MAX_CHECKPOINT_SIZE)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """A loaded server home. ``bind_port`` 0 asks the OS for a free port."""

    home: Path
    bind_host: str
    bind_port: int
    window: int
    idle_timeout: float
    max_sessions: int
    jobs: JobDefaults
    key_path: Path
    store_path: Path
    max_sessions_per_agent: int = DEFAULT_SESSIONS_PER_AGENT
    max_leases_per_agent: int = DEFAULT_SESSIONS_PER_AGENT
    upload_memory_bytes: int = DEFAULT_UPLOAD_MEMORY
    max_pending_handshakes: int = DEFAULT_PENDING_HANDSHAKES
    """Handshakes waiting for their ATTEST, server-wide; counted apart from sessions."""
    store_url: str = ""
    """The job store's URL, absolute; empty means the SQLite file at ``store_path``."""
    store_busy_timeout: float = DEFAULT_BUSY_TIMEOUT
    """Seconds a write waits for the store's lock before the store counts as unavailable."""
    hook_threads: int = 2
    """Threads that call validators, and as many for assimilators: a hook that hangs
    holds one of them, not dispatch."""
    http: HttpSettings = field(default_factory=HttpSettings)
    """``[http]``: off (bind "") unless server.toml says where to listen."""
    congestion: str = "newreno"
    """The congestion controller of the server's sending side: "newreno" or "cubic"."""

    def __post_init__(self) -> None:
        if not self.store_url:
            object.__setattr__(self, "store_url", sqlite_url(self.store_path))
        if not self.bind_host:
            raise ConfigError("bind: the host is empty")
        check_int("bind port", self.bind_port, 0, 65535)
        check_int("window", self.window, limits.MIN_WINDOW, limits.MAX_WINDOW)
        _check_seconds("idle_timeout", self.idle_timeout)
        check_int("max_sessions", self.max_sessions, 1, 10_000_000)
        check_int("max_sessions_per_agent", self.max_sessions_per_agent, 1, self.max_sessions)
        check_int("max_leases_per_agent", self.max_leases_per_agent, 1, 10_000_000)
        check_int("max_pending_handshakes", self.max_pending_handshakes, 1, 1_000_000)
        check_int("upload_memory_bytes", self.upload_memory_bytes, MIN_UPLOAD_MEMORY, 1 << 40)
        _check_seconds("[store] busy_timeout", self.store_busy_timeout)
        check_int("hook_threads", self.hook_threads, 1, 256)
        if self.congestion not in congestion.ALGORITHMS:
            raise ConfigError(
                f"congestion: {self.congestion!r} is not one of {', '.join(congestion.ALGORITHMS)}"
            )

    @property
    def public_path(self) -> Path:
        return self.home / PUBLIC_FILE


# ---------------------------------------------------------------------- value checks


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be positive and finite, got {value}")


def _config_file(path: Path) -> Path:
    return path / CONFIG_FILE if path.is_dir() else path


def _store_url(configured: str, home: Path) -> StoreUrl:
    """``$VCOMP_STORE_URL`` if set, else ``[store] url``; relative to the home."""
    override = os.environ.get(STORE_URL_ENV)
    if not override:
        return parse_store_url(configured, base=home)
    try:
        return parse_store_url(override, base=home)
    except ConfigError as exc:
        raise ConfigError(f"${STORE_URL_ENV}: {exc}") from None


def _http_settings(table: Table, home: Path) -> HttpSettings:
    def path(key: str) -> Path | None:
        text = table.text(key, "")
        return (home / text).absolute() if text else None

    settings = HttpSettings(
        bind=table.text("bind", ""),
        open_metrics=table.flag("open_metrics", False),
        cert=path("cert"),
        key=path("key"),
        allow_plaintext=table.flag("allow_plaintext", False),
        max_request_bytes=table.integer("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
    )
    table.finish()
    return settings


def load_server_config(path: Path) -> ServerConfig:
    """Load ``server.toml`` from a server home directory or the file itself."""
    path = Path(path).expanduser()
    file = _config_file(path)
    if not file.exists():
        hint = "" if path.is_file() else " (run `vcomp-server init DIR`, or give --config)"
        raise ConfigError(f"{file}: no such file{hint}")
    doc = read_toml(file)
    home = file.parent.absolute()
    try:
        check_sections(doc, ("server", "jobs", "store", "http"))
        server = Table(doc, "server")
        host, port = parse_host_port(
            server.text("bind", f"127.0.0.1:{DEFAULT_PORT}"), what="bind", allow_zero=True
        )
        window = server.integer("window", DEFAULT_WINDOW)
        controller = server.text("congestion", "newreno")
        idle_timeout = server.number("idle_timeout", limits.IDLE_TIMEOUT)
        max_sessions = server.integer("max_sessions", 100_000)
        sessions_per_agent = server.integer("max_sessions_per_agent", DEFAULT_SESSIONS_PER_AGENT)
        leases_per_agent = server.integer("max_leases_per_agent", sessions_per_agent)
        pending = server.integer("max_pending_handshakes", DEFAULT_PENDING_HANDSHAKES)
        upload_memory = server.integer("upload_memory_bytes", DEFAULT_UPLOAD_MEMORY)
        hook_threads = server.integer("hook_threads", 2)
        server.finish()
        jobs = Table(doc, "jobs")
        defaults = JobDefaults(
            lease_seconds=jobs.number("lease_seconds", 300.0),
            transfer_seconds=jobs.number("transfer_seconds", DEFAULT_TRANSFER_SECONDS),
            replicas=jobs.integer("replicas", 1),
            quorum=jobs.integer("quorum", 1),
            max_attempts=jobs.integer("max_attempts", 3),
            cpu_seconds=jobs.integer("cpu_seconds", 60),
            memory_bytes=jobs.integer("memory_bytes", 512 << 20),
            wall_seconds=jobs.number("wall_seconds", 120.0),
            output_bytes=jobs.integer("output_bytes", 16 << 20),
            disk_bytes=jobs.integer("disk_bytes", DEFAULT_DISK_BYTES),
            refusals_per_hour=jobs.integer("refusals_per_hour", 30),
            stop_after_same_failures=jobs.integer(
                "stop_after_same_failures", DEFAULT_SAME_FAILURES
            ),
            upload_checkpoints=jobs.flag("upload_checkpoints", False),
            checkpoint_bytes=jobs.integer("checkpoint_bytes", MAX_CHECKPOINT_BYTES),
        )
        jobs.finish()
        store = Table(doc, "store")
        url = store.text("url", DEFAULT_STORE_URL)
        busy_timeout = store.number("busy_timeout", DEFAULT_BUSY_TIMEOUT)
        store.finish()
        http = _http_settings(Table(doc, "http"), home)
        where = _store_url(url, home)
        return ServerConfig(
            home=home,
            bind_host=host,
            bind_port=port,
            window=window,
            idle_timeout=idle_timeout,
            max_sessions=max_sessions,
            jobs=defaults,
            key_path=home / KEY_FILE,
            store_path=where.path or home / STORE_FILE,
            max_sessions_per_agent=sessions_per_agent,
            max_leases_per_agent=leases_per_agent,
            upload_memory_bytes=upload_memory,
            congestion=controller,
            max_pending_handshakes=pending,
            store_url=str(where),
            store_busy_timeout=busy_timeout,
            hook_threads=hook_threads,
            http=http,
        )
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


# ---------------------------------------------------------------------- keys


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the server's Ed25519 key; refuses a file that group or others may read."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{path} is accessible by group or others (mode {mode & 0o777:03o}); "
                f"run: chmod 600 {path}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such key file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _kept_key(path: Path) -> Ed25519PrivateKey | None:
    """The existing organisation key (None: there is none); a broken one is not replaced
    silently, since agents pinned to it would be cut off."""
    if not path.exists():
        return None
    try:
        return load_signing_key(path)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; to replace it, run init --force --new-key (every agent must then re-pin)"
        ) from None


def config_text(store_url: str = DEFAULT_STORE_URL) -> str:
    """The ``server.toml`` that ``init`` writes, naming the given store."""
    default = f"url = {json.dumps(DEFAULT_STORE_URL)}"
    return DEFAULT_CONFIG.replace(default, f"url = {json.dumps(store_url)}", 1)


def init_server_home(
    dir: Path, force: bool = False, new_key: bool = False, store_url: str | None = None
) -> str:
    """Create a server home in ``dir``; returns the key fingerprint (64 hex digits).

    ``store_url`` (default ``sqlite:jobs.sqlite``) goes into server.toml, and the store
    there is created at the current schema version. ``$VCOMP_STORE_URL`` plays no part:
    the home records where its store is. Refuses a non-empty directory unless
    ``force``. With ``force`` the organisation key is kept (agents pin it; a new one
    cuts every agent off until it re-pins), and only ``new_key`` replaces it. ``force``
    rewrites server.toml with the defaults, keeping the old one as server.toml.bak, and
    keeps an existing job store (its jobs and results are not thrown away; its schema
    is upgraded).
    """
    from vcomp.server.store.url import migrate_store  # only init needs the store code

    home = Path(dir).expanduser()
    url = DEFAULT_STORE_URL if store_url is None else store_url
    parse_store_url(url, base=home.absolute())  # a bad url fails before anything is written
    try:
        if home.exists() and not home.is_dir():
            raise ConfigError(f"{home} exists and is not a directory")
        if home.exists() and any(home.iterdir()) and not force:
            raise ConfigError(f"{home} is not empty; use --force to re-initialise it")
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = _kept_key(home / KEY_FILE) if not new_key else None
        if key is None:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            (home / KEY_FILE).unlink(missing_ok=True)
            _write_new(home / KEY_FILE, pem, 0o600)
        raw = handshake.raw_public(key)
        if (home / CONFIG_FILE).exists():
            os.replace(home / CONFIG_FILE, home / (CONFIG_FILE + ".bak"))
        for name in (PUBLIC_FILE, CONFIG_FILE):
            (home / name).unlink(missing_ok=True)
        # The fingerprint, not the raw key: one printed form of the key everywhere.
        fingerprint = handshake.key_fingerprint(raw).hex()
        _write_new(home / PUBLIC_FILE, fingerprint.encode() + b"\n", 0o644)
        _write_new(home / CONFIG_FILE, config_text(url).encode(), 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot initialise {home}: {exc}") from None
    try:
        migrate_store(url, base=home.absolute())
    except StoreError as exc:
        # The key and server.toml stand; only the schema is missing.
        raise type(exc)(
            f"{exc}; {home} is initialised but its store has no schema yet: run "
            f"`vcomp-server migrate --config {home}` once the store is reachable"
        ) from None
    return handshake.key_fingerprint(raw).hex()

"""The agent's home directory: ``agent.toml``, the simulated TPM, the spool and work dirs.

Layout of an agent home (``vcomp-agent init DIR``)::

    agent.toml   volunteer preferences and limits (see agent/agent.example.toml)
    tpm/         TPM state: the attestation key (the agent's identity); for a real TPM
                 (``tpm = "swtpm:HOST:PORT"`` or ``"device:PATH"``) only the AK's
                 public area and its SRK-wrapped private blob
    spool/       0700, unacknowledged results, sealed to the measured PCRs
    work/        0700, the sandbox's work root (one directory per running job)

:meth:`AgentConfig.policy` is what PCR 18 measures. It holds only the sandbox's
security settings, never the volunteer's preferences (mode, cores, name, server, limits),
so one golden measurement covers every default install of a release.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from vcomp.agent.modes import MODE_KINDS, ExecutionMode, parse_mode
from vcomp.agent.preferences.settings import Preferences, render_preferences
from vcomp.agent.sandbox import REQUIRED_PROTECTIONS, JobLimits
from vcomp.agent.sandbox.policy import NOBODY
from vcomp.agent.tpm_backend import SIMULATED, Tpm, TpmSpec, open_tpm
from vcomp.domain import DEFAULT_MAX_CHECKPOINT
from vcomp.errors import ConfigError, VcompError
from vcomp.protocol import limits
from vcomp.protocol.capacity import JobCapacity
from vcomp.tomlconfig import Table, check_int, check_sections, parse_host_port, read_toml

if TYPE_CHECKING:
    from vcomp.agent.sandbox import Sandbox

__all__ = [
    "CONFIG_FILE",
    "POLICY_VERSION",
    "AgentConfig",
    "SandboxPolicy",
    "VolunteerLimits",
    "default_agent_home",
    "init_agent_home",
    "load_agent_config",
    "resolve_server_key",
]

CONFIG_FILE = "agent.toml"
TPM_DIR = "tpm"
SPOOL_DIR = "spool"
WORK_DIR = "work"
STATUS_SOCKET = "status.sock"  # 0600, `vcomp-agent status/pause/resume` talk to it
STATS_FILE = "stats.json"  # jobs done and CPU-seconds donated, across restarts
POLICY_VERSION = 1
MAX_NAME = 64
MAX_SERVERS = 16  # a worker tries each in turn; more would only slow a full round
MAX_KEY_FILE = 4096
MiB = 1 << 20
_UNSET = "\0"  # no TOML file a person writes holds a NUL name
_FINGERPRINT_RE = re.compile(r"[0-9a-fA-F]{64}")
# The sandbox's own defaults for per-job process limits, so the policy follows them.
_SANDBOX_DEFAULTS = JobLimits(cpu_seconds=1, memory_bytes=1, wall_seconds=1.0, output_bytes=0)


def default_agent_home() -> Path:
    """``$VCOMP_AGENT_HOME``, else ``~/.vcomp-agent``."""
    return Path(os.environ.get("VCOMP_AGENT_HOME") or "~/.vcomp-agent").expanduser()


@dataclass(frozen=True, slots=True)
class VolunteerLimits:
    """``[limits]``: the most this volunteer allows any job. Not measured."""

    max_job_bytes: int = 256 * MiB
    max_cpu_seconds: int = 3600
    max_memory_bytes: int = 2048 * MiB
    max_wall_seconds: float = 7200.0
    max_output_bytes: int = 64 * MiB
    max_disk_bytes: int = 1024 * MiB  # the job's work dir, a tmpfs: it takes RAM
    max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT  # a larger CHECKPOINT ends the job

    def __post_init__(self) -> None:
        check_int("max_job_bytes", self.max_job_bytes, 1, 1 << 40)
        check_int("max_cpu_seconds", self.max_cpu_seconds, 1, 1 << 31)
        check_int("max_memory_bytes", self.max_memory_bytes, 1, 1 << 62)
        if not 0 < self.max_wall_seconds < float("inf"):
            raise ConfigError(f"max_wall_seconds must be positive, got {self.max_wall_seconds}")
        check_int("max_output_bytes", self.max_output_bytes, 0, limits.MAX_RESULT_SIZE)
        check_int("max_disk_bytes", self.max_disk_bytes, 1, 1 << 62)
        check_int("max_checkpoint_bytes", self.max_checkpoint_bytes, 0, limits.MAX_RESULT_SIZE)

    def capacity(self, max_memory: int = 0) -> JobCapacity:
        """These limits as READY declares them, so the server sends only jobs within them.

        ``max_memory`` (the preference, 0: none) caps the memory a job may ask for too.
        """
        return JobCapacity.clamped(
            memory_bytes=min(self.max_memory_bytes, max_memory or self.max_memory_bytes),
            cpu_seconds=self.max_cpu_seconds,
            wall_seconds=self.max_wall_seconds,
            output_bytes=self.max_output_bytes,
            job_bytes=self.max_job_bytes,
            disk_bytes=self.max_disk_bytes,
        )

    def refusal(
        self,
        *,
        job_bytes: int,
        cpu_seconds: float,
        memory_bytes: int,
        wall_seconds: float,
        output_bytes: int,
        disk_bytes: int,
    ) -> str | None:
        """Why this volunteer refuses a job with these needs, or None if it fits."""
        checks = (
            ("job size", job_bytes, self.max_job_bytes),
            ("cpu_seconds", cpu_seconds, self.max_cpu_seconds),
            ("memory_bytes", memory_bytes, self.max_memory_bytes),
            ("wall_seconds", wall_seconds, self.max_wall_seconds),
            ("output_bytes", output_bytes, self.max_output_bytes),
            ("disk_bytes", disk_bytes, self.max_disk_bytes),
        )
        for what, wanted, allowed in checks:
            if wanted > allowed:
                return f"{what} {wanted} above this volunteer's limit {allowed}"
        return None


@dataclass(frozen=True, slots=True)
class SandboxPolicy:
    """``[sandbox]`` (optional, normally absent): the isolation every job gets.

    These are the settings PCR 18 measures. Changing any of them changes the agent's
    measurement, so the server must allow-list the new one before it sends code.
    """

    namespaces: bool = True
    seccomp: bool = True
    landlock: bool = True
    cgroup: bool = True  # a cgroup per job bounds the tree's memory and counts its CPU
    job_uid: int = NOBODY
    job_gid: int = NOBODY
    max_processes: int = _SANDBOX_DEFAULTS.max_processes
    max_open_files: int = _SANDBOX_DEFAULTS.max_open_files
    max_file_bytes: int = _SANDBOX_DEFAULTS.max_file_bytes
    log_bytes: int = _SANDBOX_DEFAULTS.log_bytes

    def __post_init__(self) -> None:
        check_int("job_uid", self.job_uid, 1, (1 << 32) - 2)  # never root
        check_int("job_gid", self.job_gid, 1, (1 << 32) - 2)
        check_int("max_processes", self.max_processes, 1, 1 << 20)
        check_int("max_open_files", self.max_open_files, 8, 1 << 20)
        check_int("max_file_bytes", self.max_file_bytes, 0, 1 << 40)
        check_int("log_bytes", self.log_bytes, 0, 1 << 30)

    def as_dict(self) -> dict[str, object]:
        return {
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
            "required": list(REQUIRED_PROTECTIONS),
        }


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """A loaded agent home. ``servers``/``server_key`` may be empty until ``join``."""

    home: Path
    name: str
    servers: tuple[str, ...] = ()  # HOST:PORT each, in the order workers try them
    server_key: str = ""  # hex SHA-256 fingerprint of the organisation's Ed25519 key
    mode: str = "background"
    cpu_percent: int = 100
    core: int = -1  # -1: unset
    cores: int = 1
    limits: VolunteerLimits = field(default_factory=VolunteerLimits)
    sandbox: SandboxPolicy = field(default_factory=SandboxPolicy)
    preferences: Preferences = field(default_factory=Preferences)
    tpm: str = SIMULATED  # simulated | swtpm:HOST:PORT | device:PATH

    def __post_init__(self) -> None:
        object.__setattr__(self, "tpm", TpmSpec.parse(self.tpm).format())
        if not self.name or len(self.name) > MAX_NAME or not self.name.isprintable():
            raise ConfigError(f"name must be 1-{MAX_NAME} printable characters, got {self.name!r}")
        check_servers(self.servers)
        if self.server_key and not _FINGERPRINT_RE.fullmatch(self.server_key):
            raise ConfigError("server_key must be the 64-hex-digit fingerprint of the server key")
        if self.mode not in MODE_KINDS:
            raise ConfigError(f"mode must be one of {', '.join(MODE_KINDS)}, got {self.mode!r}")
        check_int("cpu_percent", self.cpu_percent, 1, 100)
        check_int("core", self.core, -1, 4095)
        check_int("cores", self.cores, 1, 1024)
        if self.mode == "throttle" and self.cpu_percent >= 100:
            raise ConfigError(
                "mode throttle needs cpu_percent between 1 and 99 (join --cpu-percent N, "
                "or cpu_percent in agent.toml): at 100 it would not throttle"
            )
        if self.mode == "dedicated" and self.cores != 1:
            raise ConfigError("dedicated mode runs one job on one core; set cores = 1")
        self.execution_mode()  # dedicated needs a core, and so on

    # ---- paths
    @property
    def config_path(self) -> Path:
        return self.home / CONFIG_FILE

    @property
    def tpm_dir(self) -> Path:
        return self.home / TPM_DIR

    @property
    def spool_dir(self) -> Path:
        return self.home / SPOOL_DIR

    @property
    def work_dir(self) -> Path:
        return self.home / WORK_DIR

    @property
    def status_socket(self) -> Path:
        return self.home / STATUS_SOCKET

    @property
    def stats_path(self) -> Path:
        return self.home / STATS_FILE

    # ---- the TPM
    def tpm_spec(self) -> TpmSpec:
        return TpmSpec.parse(self.tpm)

    def open_tpm(self) -> Tpm:
        """Open this agent's TPM backend (close it when done)."""
        return open_tpm(self.tpm_spec(), self.tpm_dir)

    def measured_pcrs(self) -> tuple[int, ...]:
        return self.tpm_spec().measured_pcrs

    # ---- derived values
    def server_addresses(self) -> tuple[tuple[str, int], ...]:
        """Every configured server, in order (all share the one organisation key)."""
        if not self.servers:
            raise ConfigError("no server set: give --server HOST:PORT or set servers in agent.toml")
        return tuple(parse_host_port(s, what="server") for s in self.servers)

    def server_fingerprint(self) -> bytes:
        if not self.server_key:
            raise ConfigError(
                "no server key pinned: give --server-key FINGERPRINT|FILE "
                "or set server_key in agent.toml"
            )
        return bytes.fromhex(self.server_key)

    def execution_mode(self) -> ExecutionMode:
        return parse_mode(
            self.mode,
            cpu_percent=self.cpu_percent if self.mode == "throttle" else None,
            core=self.core if self.mode == "dedicated" and self.core >= 0 else None,
        )

    def policy(self) -> dict[str, object]:
        """The sandbox policy PCR 18 measures (plain JSON data; no volunteer preferences)."""
        return {"policy_version": POLICY_VERSION, "sandbox": self.sandbox.as_dict()}

    def job_limits(
        self,
        *,
        cpu_seconds: int,
        memory_bytes: int,
        wall_seconds: float,
        output_bytes: int,
        disk_bytes: int,
        idle_seconds: float | None = None,
    ) -> JobLimits:
        """One job's sandbox limits: the server's numbers plus this policy's fixed ones."""
        return JobLimits(
            cpu_seconds=cpu_seconds,
            memory_bytes=memory_bytes,
            wall_seconds=wall_seconds,
            output_bytes=output_bytes,
            disk_bytes=disk_bytes,
            idle_seconds=idle_seconds,
            max_processes=self.sandbox.max_processes,
            max_open_files=self.sandbox.max_open_files,
            max_file_bytes=self.sandbox.max_file_bytes,
            log_bytes=self.sandbox.log_bytes,
        )

    def make_sandbox(self, *, work_root: Path | None = None, prespawn: bool = True) -> Sandbox:
        """The sandbox exactly as :meth:`policy` describes it (what PCR 18 vouches for).

        ``work_root`` defaults to ``work/``; give each concurrent worker its own subdir.
        """
        from vcomp.agent.sandbox import Sandbox

        return Sandbox(
            work_root=self.work_dir if work_root is None else work_root,
            mode=self.execution_mode(),
            hidden_paths=(self.home,),
            job_uid=self.sandbox.job_uid,
            job_gid=self.sandbox.job_gid,
            namespaces=self.sandbox.namespaces,
            use_landlock=self.sandbox.landlock,
            use_seccomp=self.sandbox.seccomp,
            use_cgroup=self.sandbox.cgroup,
            required=REQUIRED_PROTECTIONS,
            prespawn=prespawn,
        )


# ---------------------------------------------------------------------- servers


def check_servers(servers: Sequence[str]) -> None:
    """Each entry HOST:PORT, at most MAX_SERVERS, none twice (it would be tried twice a round)."""
    if len(servers) > MAX_SERVERS:
        raise ConfigError(f"at most {MAX_SERVERS} servers, got {len(servers)}")
    seen: dict[tuple[str, int], str] = {}
    for text in servers:
        host, port = parse_host_port(text, what="server")
        key = (host.lower(), port)
        if key in seen:
            raise ConfigError(f"server {text!r} is listed twice")
        seen[key] = text


def normalise_servers(servers: Sequence[str]) -> tuple[str, ...]:
    """Entries stripped and checked (see :func:`check_servers`)."""
    out = tuple(s.strip() for s in servers)
    check_servers(out)
    return out


# ---------------------------------------------------------------------- server key


KEY_FORMS = (
    "the server's fingerprint (64 hex digits, as `vcomp-server init` prints it and its "
    "server.pub holds) or the path of server.pub"
)


def _fingerprint_of_key_file(path: Path) -> str:
    """server.pub holds the fingerprint; a PEM Ed25519 public key is hashed to one."""
    try:
        if path.stat().st_size > MAX_KEY_FILE:
            raise ConfigError(f"{path}: too large for a server key file")
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read server key file {path}: {exc}") from None
    if _FINGERPRINT_RE.fullmatch(text):
        return text.lower()
    try:
        key = serialization.load_pem_public_key(text.encode())
    except ValueError:
        raise ConfigError(f"{path} holds neither a fingerprint nor a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def resolve_server_key(value: str) -> str:
    """The fingerprint: given as 64 hex digits, or read from a ``server.pub`` file.

    One key has one printed form: the fingerprint that ``vcomp-server init`` prints,
    ``serve`` logs and server.pub holds. A value that is neither that nor an existing
    file is refused here, not found out at the first handshake.
    """
    value = value.strip()
    if _FINGERPRINT_RE.fullmatch(value):
        return value.lower()
    path = Path(value).expanduser()
    if "\n" in value or len(value) > 4096 or not path.is_file():
        raise ConfigError(f"--server-key must be {KEY_FORMS}, got {value[:80]!r}")
    return _fingerprint_of_key_file(path)


# ---------------------------------------------------------------------- load / init


def _config_file(path: Path) -> Path:
    return path / CONFIG_FILE if path.is_dir() else path


def load_agent_config(path: Path) -> AgentConfig:
    """Load ``agent.toml`` from an agent home directory or the file itself."""
    path = Path(path).expanduser()
    file = _config_file(path)
    if not file.exists():
        hint = "" if path.is_file() else " (run `vcomp-agent init DIR`, or give --config)"
        raise ConfigError(f"{file}: no such file{hint}")
    doc = read_toml(file)
    try:
        check_sections(doc, ("agent", "limits", "sandbox", "preferences"))
        agent = Table(doc, "agent")
        tpm = agent.text("tpm", SIMULATED)
        name = agent.text("name", _UNSET)
        if name == _UNSET:  # absent (an empty name stays an error)
            name = default_name(_agent_id_if_any(file.parent) if tpm == SIMULATED else None)
        servers = _servers_of(agent)
        server_key = agent.text("server_key", "").lower()
        mode = agent.text("mode", "background")
        cpu_percent = agent.integer("cpu_percent", 100)
        core = agent.integer("core", -1)
        cores = agent.integer("cores", 1)
        agent.finish()
        lim = Table(doc, "limits")
        d = VolunteerLimits()
        volunteer = VolunteerLimits(
            max_job_bytes=lim.integer("max_job_bytes", d.max_job_bytes),
            max_cpu_seconds=lim.integer("max_cpu_seconds", d.max_cpu_seconds),
            max_memory_bytes=lim.integer("max_memory_bytes", d.max_memory_bytes),
            max_wall_seconds=lim.number("max_wall_seconds", d.max_wall_seconds),
            max_output_bytes=lim.integer("max_output_bytes", d.max_output_bytes),
            max_disk_bytes=lim.integer("max_disk_bytes", d.max_disk_bytes),
            max_checkpoint_bytes=lim.integer("max_checkpoint_bytes", d.max_checkpoint_bytes),
        )
        lim.finish()
        sb = Table(doc, "sandbox")
        s = SandboxPolicy()
        sandbox = SandboxPolicy(
            namespaces=sb.flag("namespaces", s.namespaces),
            seccomp=sb.flag("seccomp", s.seccomp),
            landlock=sb.flag("landlock", s.landlock),
            cgroup=sb.flag("cgroup", s.cgroup),
            job_uid=sb.integer("job_uid", s.job_uid),
            job_gid=sb.integer("job_gid", s.job_gid),
            max_processes=sb.integer("max_processes", s.max_processes),
            max_open_files=sb.integer("max_open_files", s.max_open_files),
            max_file_bytes=sb.integer("max_file_bytes", s.max_file_bytes),
            log_bytes=sb.integer("log_bytes", s.log_bytes),
        )
        sb.finish()
        prefs = Table(doc, "preferences")
        preferences = Preferences.from_table(prefs)
        prefs.finish()
        return AgentConfig(
            home=file.parent.absolute(),
            name=name,
            servers=servers,
            server_key=server_key,
            mode=mode,
            cpu_percent=cpu_percent,
            core=core,
            cores=cores,
            limits=volunteer,
            sandbox=sandbox,
            preferences=preferences,
            tpm=tpm,
        )
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def _agent_id_if_any(home: Path) -> bytes | None:
    """The agent id of an existing identity, without creating one."""
    from vcomp.agent.tpm import AK_FILE, SimulatedTpm

    if not (home / TPM_DIR / AK_FILE).is_file():
        return None
    return SimulatedTpm.open(home / TPM_DIR).agent_id


def _servers_of(agent: Table) -> tuple[str, ...]:
    """``servers = [...]``, or the older single ``server = "..."`` as a list of one."""
    servers = agent.texts("servers", ())
    single = agent.text("server", "")
    if single and servers:
        raise ConfigError("set servers (a list) or server (one address), not both")
    return normalise_servers(servers or ((single,) if single else ()))


def _toml_string(text: str) -> str:
    # A JSON string without ASCII escaping is a valid TOML basic string for printable text.
    return json.dumps(text, ensure_ascii=False)


def default_name(agent_id: bytes | None = None) -> str:
    """This host's name, plus the start of the agent id where it is known: two agents
    on one machine must not show the organisation the same name."""
    suffix = f"-{agent_id.hex()[:6]}" if agent_id else ""
    host = re.sub(r"\s+", "-", socket.gethostname().strip()) or "agent"
    return host[: MAX_NAME - len(suffix)] + suffix


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _line(assignment: str, comment: str = "") -> str:
    return f"{assignment:<26} # {comment}" if comment else assignment


def render_agent_toml(config: AgentConfig) -> str:
    """The ``agent.toml`` text for ``config`` (the layout of agent/agent.example.toml)."""
    lim = config.limits
    lines = [
        "# vcomp volunteer agent. Created by `vcomp-agent init`; see agent/agent.example.toml.",
        "[agent]",
        _line(f"name = {_toml_string(config.name)}"),
        _line(
            f"servers = [{', '.join(_toml_string(s) for s in config.servers)}]",
            "HOST:PORT each, tried in turn; may be set later or given to join",
        ),
        _line(
            f"server_key = {_toml_string(config.server_key)}",
            "hex fingerprint (64 hex chars) of the organisation key",
        ),
        _line(f"mode = {_toml_string(config.mode)}", "full | throttle | dedicated | background"),
        _line(f"cpu_percent = {config.cpu_percent}", "throttle"),
        _line(f"core = {config.core}", "dedicated (-1 = unset)"),
        _line(f"cores = {config.cores}", "concurrent jobs (one session per core)"),
        _line(f"tpm = {_toml_string(config.tpm)}", "simulated | swtpm:HOST:PORT | device:PATH"),
        "",
        _line("[limits]", "the most this volunteer allows any job"),
        f"max_job_bytes = {lim.max_job_bytes}",
        f"max_cpu_seconds = {lim.max_cpu_seconds}",
        f"max_memory_bytes = {lim.max_memory_bytes}",
        f"max_wall_seconds = {_number(lim.max_wall_seconds)}",
        f"max_output_bytes = {lim.max_output_bytes}",
        f"max_disk_bytes = {lim.max_disk_bytes}",
        f"max_checkpoint_bytes = {lim.max_checkpoint_bytes}",
        "",
        *render_preferences(config.preferences),
    ]
    return "\n".join(lines) + "\n"


def init_agent_home(
    dir: Path,
    *,
    name: str | None = None,
    servers: Sequence[str] = (),
    server_key: str = "",
    force: bool = False,
    tpm: str = SIMULATED,
) -> AgentConfig:
    """Create an agent home (config, TPM identity, spool and work dirs); returns its config.

    Refuses a non-empty directory unless ``force``, which rewrites ``agent.toml`` but
    keeps an existing TPM, so the agent keeps its identity and enrolment.
    ``server_key`` is a fingerprint or a path to the server's ``server.pub``.
    """
    home = Path(dir).expanduser().absolute()
    config = AgentConfig(
        home=home,
        name="agent" if name is None else re.sub(r"\s+", "-", name.strip()),
        servers=normalise_servers(servers),
        server_key=resolve_server_key(server_key) if server_key.strip() else "",
        tpm=tpm,
    )
    try:
        if home.exists() and not home.is_dir():
            raise ConfigError(f"{home} exists and is not a directory")
        if home.exists() and any(home.iterdir()) and not force:
            raise ConfigError(f"{home} is not empty; use --force to re-initialise it")
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        for sub in (config.spool_dir, config.work_dir):
            sub.mkdir(mode=0o700, exist_ok=True)
            os.chmod(sub, 0o700)  # an existing directory may have been wider
        tmp = config.config_path.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(render_agent_toml(config), encoding="utf-8")
        os.replace(tmp, config.config_path)
    except OSError as exc:
        raise ConfigError(f"cannot initialise {home}: {exc}") from None
    try:
        opened = config.open_tpm()  # creates the attestation key on first use
    except VcompError as exc:
        raise ConfigError(f"{exc} (then run init again with --force)") from None
    agent_id = opened.agent_id
    opened.close()
    if name is None:  # the default name needs the agent id, so it is written now
        named = dataclasses.replace(config, name=default_name(agent_id))
        try:
            tmp.write_text(render_agent_toml(named), encoding="utf-8")
            os.replace(tmp, config.config_path)
        except OSError as exc:
            raise ConfigError(f"cannot initialise {home}: {exc}") from None
    return load_agent_config(home)

"""Fixtures for the integration suite: real servers, agents, UDP sockets and SQLite files.

Everything here runs the real thing: :class:`OrganisationServer` on 127.0.0.1, real
:class:`AgentRuntime` workers (with the sandbox) or protocol-only
:class:`LiteAgent` clients, console scripts as subprocesses, and
:class:`tests.udpproxy.UdpProxy` when the network must misbehave. The ``lab``
fixture owns every object it hands out and tears them down in reverse order.

Timing rule: tests wait for conditions with :func:`wait_until` and generous bounds;
nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.udpproxy import UdpProxy
from vcomp.agent.config import AgentConfig, init_agent_home
from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement, measured_launch
from vcomp.agent.runtime import AgentRuntime
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.server.config import ServerConfig, init_server_home, load_server_config
from vcomp.server.service import OrganisationServer
from vcomp.server.store import JobState, StoredResult
from vcomp.server.store.sqlite import SqliteStore

if not sys.platform.startswith("linux"):
    pytest.skip("the integration suite needs Linux (the sandbox)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "server" / "examples"
PI_PY = EXAMPLES / "pi.py"
BIN = Path(sys.executable).parent
SERVER_CLI = str(BIN / "vcomp-server")
AGENT_CLI = str(BIN / "vcomp-agent")
LITE_POLICY: dict[str, object] = {"lite": True}  # what LiteAgents' PCR 18 measures
T = TypeVar("T")

# ---------------------------------------------------------------------- waiting


async def wait_until(
    predicate: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


def free_udp_port() -> int:
    """A UDP port that was free a moment ago (for servers run as subprocesses)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- logs

_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_logfmt(text: str) -> dict[str, str]:
    """``event=x key="a b"`` -> {"event": "x", "key": "a b"} (the format vcomp.logfmt writes)."""
    out: dict[str, str] = {}
    for key, value in _PAIR.findall(text):
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        out[key] = value
    return out


def find_events(lines: Iterable[str], name: str, **match: object) -> list[dict[str, str]]:
    """Parsed log lines whose event is ``name`` and whose fields equal ``match``."""
    found = []
    for line in lines:
        if f"event={name}" not in line:
            continue
        fields = parse_logfmt(line[line.index("event=") :])
        if fields.get("event") == name and all(fields.get(k) == str(v) for k, v in match.items()):
            found.append(fields)
    return found


class LogRecorder(logging.Handler):
    """Collects ``vcomp.*`` log lines as ``<logger> <message>`` strings."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()}")

    def events(self, name: str, logger: str = "vcomp", **match: object) -> list[dict[str, str]]:
        mine = (line for line in self.lines if line.split(" ", 1)[0].startswith(logger))
        return find_events(mine, name, **match)


@pytest.fixture
def logs() -> Iterator[LogRecorder]:
    """Every vcomp log line of the test, attached directly to the ``vcomp`` logger.

    Direct attachment (not caplog) keeps working even if something called
    ``logfmt.setup()``, which stops propagation to the root logger.
    """
    root = logging.getLogger("vcomp")
    recorder = LogRecorder()
    old_level = root.level
    root.addHandler(recorder)
    root.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)


class ProcessLog:
    """A subprocess's stderr, written to a file so a full pipe can never block it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def lines(self) -> list[str]:
        try:
            return self.path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, name: str, **match: object) -> list[dict[str, str]]:
        return find_events(self.lines, name, **match)


# ---------------------------------------------------------------------- jobs


def python_job(body: str, *, pad: int = 0) -> bytes:
    """A python job whose handler body is ``body`` (input in ``data``; returns bytes).

    ``pad`` adds that many bytes of comment lines, to make the code large.
    """
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    padding = b""
    if pad > 0:
        line = b"# " + b"p" * 97 + b"\n"
        padding = line * (pad // len(line) + 1)
    return (
        padding
        + (
            "import hashlib, json, time\n"
            "from vcomp.guest import run\n"
            "def handler(data, progress):\n"
            f"{lines}\n"
            "run(handler)\n"
        ).encode()
    )


def pi_inputs(n: int, points: int, seed0: int = 1) -> list[bytes]:
    return [json.dumps({"points": points, "seed": seed0 + i}).encode() for i in range(n)]


@functools.cache
def _load_pi_handler() -> Callable[[bytes, Callable[[float], None]], bytes]:
    spec = importlib.util.spec_from_file_location("vcomp_example_pi", PI_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    handler: Callable[[bytes, Callable[[float], None]], bytes] = module.handler
    return handler


def pi_reference(data: bytes) -> bytes:
    """What server/examples/pi.py returns for ``data``, computed here, outside any sandbox."""
    return _load_pi_handler()(data, lambda _fraction: None)


def echo_reference(code: bytes, data: bytes) -> bytes:
    """What a LiteAgent (loadgen.echo_digest) returns for a job."""
    return hashlib.sha256(code + data).digest()


# ---------------------------------------------------------------------- the organisation


@dataclasses.dataclass
class Org:
    """One server home, its in-process server once started, and store helpers.

    ``store`` is the admin's own handle on the job store, as the CLI has: the
    server's store object belongs to the server (its event-loop connection holds
    read snapshots open while it streams code; a write through it could fail).
    """

    home: Path
    config: ServerConfig
    fingerprint: str
    server: OrganisationServer
    store: SqliteStore

    @property
    def address(self) -> tuple[str, int]:
        assert self.server.address is not None, "server not started"
        return self.server.address

    @property
    def server_str(self) -> str:
        host, port = self.address
        return f"{host}:{port}"

    def enroll(self, tpm: SimulatedTpm, name: str) -> str:
        """Enroll an agent from its enrolment line, as `vcomp-server enroll` does."""
        e = parse_enrolment(format_enrolment(tpm, name))
        self.store.enroll_agent(e.agent_id, e.ak_public_pem, e.name)
        return e.agent_id

    def allow(self, policy: dict[str, object], code: bytes | None = None) -> str:
        text = golden_measurement(policy, code).format()
        self.store.allow_measurement(text, "integration test")
        return text

    async def synced(self) -> None:
        """Wait until the running server has loaded every enrolment and allowlist entry.

        The server reloads them from the store on its 0.5 s tick; an agent that
        connects before that is (rightly) rejected.
        """
        store, trust = self.store, self.server.trust

        def loaded() -> bool:
            agents = {bytes.fromhex(a.agent_id) for a in store.list_agents()}
            allowed = {m.text for m in store.list_measurements()}
            return agents <= set(trust.enrolled) and allowed <= {
                m.format() for m in trust.allowlist
            }

        await wait_until(loaded, "the server to load enrolments and the allowlist")

    def add_app(self, name: str, code: bytes | Path, kind: str = "python") -> bytes:
        path = code if isinstance(code, Path) else self.home / f"{name}.app"
        if not isinstance(code, Path):
            path.write_bytes(code)
        self.store.add_app(name, kind, path)
        return path.read_bytes()

    def submit(
        self,
        app: str,
        inputs: Sequence[bytes],
        *,
        cpu_seconds: float = 30,
        memory_bytes: int = 256 << 20,
        wall_seconds: float = 60,
        output_bytes: int = 1 << 20,
        max_attempts: int = 5,
    ) -> int:
        return self.store.create_batch(
            app,
            inputs,
            cpu_seconds=cpu_seconds,
            memory_bytes=memory_bytes,
            wall_seconds=wall_seconds,
            output_bytes=output_bytes,
            max_attempts=max_attempts,
        )

    async def wait_batch(self, batch_id: int, timeout: float = 60.0) -> None:
        st = await wait_until(
            lambda: self.store.batch_status(batch_id).finished,
            f"batch {batch_id} to finish",
            timeout,
        )
        assert st

    def outputs(self, batch_id: int) -> dict[int, tuple[StoredResult, bytes]]:
        """index -> (canonical result, its output), asserting every job is done."""
        out: dict[int, tuple[StoredResult, bytes]] = {}
        for rec in self.store.iter_results(batch_id):
            assert rec.state is JobState.DONE, f"job {rec.index} is {rec.state}: {rec.reason}"
            assert rec.result is not None
            with self.store.open_output(rec.job_id, rec.result.attempt) as blob:
                out[rec.index] = (rec.result, blob.read(0, blob.size))
        return out

    def live_sessions(self) -> int:
        endpoint = self.server.endpoint
        return 0 if endpoint is None else len(endpoint.sessions)


def assert_results_unique(store: SqliteStore, batch_id: int) -> None:
    """No (job, attempt) recorded twice, and exactly one counted ok result per done job."""
    for rec in store.iter_results(batch_id):
        results = store.list_results(rec.job_id)
        attempts = [r.attempt for r in results]
        assert len(attempts) == len(set(attempts)), f"job {rec.job_id}: {attempts}"
        counted = [r for r in results if r.counted and r.status == "ok"]
        assert len(counted) == 1, f"job {rec.job_id} has {len(counted)} counted results"


@dataclasses.dataclass
class AgentHandle:
    config: AgentConfig
    runtime: AgentRuntime
    task: asyncio.Task[None]
    agent_id: str

    @property
    def connected_sessions(self) -> int:
        return sum(w.stats.sessions for w in self.runtime.workers)


class ReconnectingLite:
    """A LiteAgent that starts a fresh one whenever its session ends (as real agents do).

    Handshake datagrams are unauthenticated, so a corrupted one legitimately ends
    that attempt; a volunteer agent simply tries again.
    """

    def __init__(self, make: Callable[[], LiteAgent], retry_delay: float = 0.2) -> None:
        self._make = make
        self._delay = retry_delay
        self.incarnations: list[LiteAgent] = []
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    @property
    def current(self) -> LiteAgent | None:
        return self.incarnations[-1] if self.incarnations else None

    @property
    def jobs(self) -> int:
        return sum(a.stats.jobs for a in self.incarnations)

    @property
    def committed(self) -> int:
        return sum(a.stats.committed for a in self.incarnations)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self._stopping.is_set():
            agent = self._make()
            self.incarnations.append(agent)
            await agent.start()
            stop = asyncio.ensure_future(self._stopping.wait())
            closed = asyncio.ensure_future(agent.closed.wait())
            await asyncio.wait({stop, closed}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            closed.cancel()
            await agent.stop()
            if not self._stopping.is_set():
                await asyncio.sleep(self._delay)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)


# ---------------------------------------------------------------------- the lab


class Lab:
    """Makes servers, agents, proxies and subprocesses, and cleans all of them up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        self._shared_ephemeral: tuple[Any, bytes] | None = None
        self.agent_ids: dict[str, str] = {}  # agent home name -> agent id (hex)

    async def close(self) -> None:
        errors: list[BaseException] = []
        for cleanup in reversed(self._cleanups):
            try:
                await asyncio.wait_for(cleanup(), 20)
            except BaseException as exc:  # keep tearing down the rest
                errors.append(exc)
        self._cleanups.clear()
        if errors:
            raise errors[0]

    def on_close(self, cleanup: Callable[[], Awaitable[None]]) -> None:
        self._cleanups.append(cleanup)

    # ---- servers ---------------------------------------------------------------

    def org(
        self,
        name: str = "srv",
        *,
        window: int | None = None,
        lease_seconds: float | None = None,
        idle_timeout: float | None = None,
        per_agent: int | None = None,
        store_busy_timeout: float | None = None,
        upload_checkpoints: bool = False,
    ) -> Org:
        """A server home and an (unstarted) in-process server bound to 127.0.0.1:0.

        ``per_agent`` raises the per-agent session and lease caps, for tests where many
        sessions share one agent identity (AK generation is slow).
        """
        home = self.root / name
        fingerprint = init_server_home(home)
        config = load_server_config(home)
        changes: dict[str, Any] = {"bind_host": "127.0.0.1", "bind_port": 0}
        if window is not None:
            changes["window"] = window
        if idle_timeout is not None:
            changes["idle_timeout"] = idle_timeout
        jobs = config.jobs
        if lease_seconds is not None:
            jobs = dataclasses.replace(jobs, lease_seconds=lease_seconds)
        if upload_checkpoints:
            jobs = dataclasses.replace(jobs, upload_checkpoints=True)
        changes["jobs"] = jobs
        if per_agent is not None:
            changes["max_sessions_per_agent"] = changes["max_leases_per_agent"] = per_agent
        if store_busy_timeout is not None:
            changes["store_busy_timeout"] = store_busy_timeout
        config = dataclasses.replace(config, **changes)
        admin = SqliteStore(config.store_path)

        async def close_admin() -> None:
            admin.close()

        self.on_close(close_admin)
        return Org(home, config, fingerprint, OrganisationServer(config), admin)

    async def start(self, org: Org) -> tuple[str, int]:
        address = await org.server.start()
        self.on_close(org.server.stop)
        return address

    # ---- real agents -----------------------------------------------------------

    def agent_home(
        self, name: str, server: tuple[str, int], fingerprint: str, *, cores: int = 1
    ) -> AgentConfig:
        """A fresh agent home (mode full) pointing at ``server``, pinning ``fingerprint``."""
        host, port = server
        config = init_agent_home(
            self.root / name, name=name, servers=[f"{host}:{port}"], server_key=fingerprint
        )
        config = dataclasses.replace(config, mode="full", cores=cores)
        self.agent_ids[name] = SimulatedTpm.open(config.tpm_dir).agent_id.hex()
        return config

    def agent_config(
        self,
        org: Org,
        name: str,
        *,
        server: tuple[str, int] | None = None,
        server_key: str | None = None,
        enroll: bool = True,
        allow: bool = True,
        cores: int = 1,
    ) -> AgentConfig:
        """An agent home for ``org`` (enrolled and allow-listed unless told otherwise).

        It talks to ``server`` (default: the org's own address, e.g. not a proxy).
        """
        config = self.agent_home(
            name, server or org.address, server_key or org.fingerprint, cores=cores
        )
        if enroll:
            org.enroll(SimulatedTpm.open(config.tpm_dir), name)
        if allow:
            org.allow(config.policy())
        return config

    async def run_agent(self, config: AgentConfig, org: Org | None = None) -> AgentHandle:
        """Run an AgentRuntime in this loop (after ``org``'s server trusts what it should)."""
        if org is not None and org.server.address is not None:
            await org.synced()
        runtime = AgentRuntime(config, shutdown_grace=1.0)
        task = asyncio.ensure_future(runtime.run())
        handle = AgentHandle(config, runtime, task, runtime.tpm.agent_id.hex())

        async def stop() -> None:
            runtime.stop()
            try:
                await asyncio.wait_for(asyncio.shield(task), 15)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        self.on_close(stop)
        return handle

    # ---- protocol-only agents --------------------------------------------------

    def lite_tpm(
        self, org: Org | None, name: str, *, enroll: bool = True, allow: bool = True
    ) -> SimulatedTpm:
        """A measured simulated TPM for LiteAgents (enrolled and allow-listed by default)."""
        tpm = SimulatedTpm.open(self.root / "tpm" / name)
        measured_launch(tpm, LITE_POLICY)
        if org is not None and enroll:
            org.enroll(tpm, name)
        if org is not None and allow:
            org.allow(LITE_POLICY)
        return tpm

    @property
    def ephemeral(self) -> tuple[Any, bytes]:
        """One ephemeral RSA key shared by many LiteAgents (key generation is slow)."""
        if self._shared_ephemeral is None:
            self._shared_ephemeral = hs.generate_ephemeral()
        return self._shared_ephemeral

    def make_lite(
        self,
        tpm: Any,
        server: tuple[str, int],
        fingerprint: str,
        *,
        on_event: Callable[[ev.Event], None] | None = None,
        ephemeral: tuple[Any, bytes] | None = None,
    ) -> LiteAgent:
        return LiteAgent(
            tpm=tpm,
            pinned=bytes.fromhex(fingerprint),
            server=server,
            ephemeral=ephemeral or self.ephemeral,
            on_event=on_event,
        )

    async def lite(
        self,
        tpm: Any,
        server: tuple[str, int],
        fingerprint: str,
        *,
        org: Org | None = None,
        **kwargs: Any,
    ) -> LiteAgent:
        if org is not None:
            await org.synced()
        agent = self.make_lite(tpm, server, fingerprint, **kwargs)
        await agent.start()
        self.on_close(agent.stop)
        return agent

    def reconnecting_lite(
        self, tpm: SimulatedTpm, server: tuple[str, int], fingerprint: str
    ) -> ReconnectingLite:
        agent = ReconnectingLite(lambda: self.make_lite(tpm, server, fingerprint))
        agent.start()
        self.on_close(agent.stop)
        return agent

    # ---- network ---------------------------------------------------------------

    async def proxy(self, upstream: tuple[str, int], **kwargs: Any) -> UdpProxy:
        proxy = UdpProxy(upstream, **kwargs)
        await proxy.start()
        self.on_close(proxy.close)
        return proxy

    # ---- subprocesses ----------------------------------------------------------

    async def serve(
        self, home: Path, name: str, *, bind: str | None = None, http_bind: str = "127.0.0.1:0"
    ) -> tuple[Process, ProcessLog]:
        """``vcomp-server serve`` on ``home`` (at ``bind``, if given), once it listens.
        The HTTP API takes a free port unless ``http_bind`` says otherwise."""
        extra = ["--http-bind", http_bind] + ([] if bind is None else ["--bind", bind])
        proc, log = self.spawn([SERVER_CLI, "serve", "--config", str(home), *extra], name)
        await wait_until(lambda: "listening on" in proc.stdout, f"{name} to listen", 30)
        return proc, log

    def spawn(self, argv: Sequence[str], name: str, **kwargs: Any) -> tuple[Process, ProcessLog]:
        """Start a subprocess in its own process group; stderr goes to a log file."""
        log_path = self.root / f"{name}.stderr"
        out_path = self.root / f"{name}.stdout"
        with log_path.open("wb") as err, out_path.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                **kwargs,
            )
        proc = Process(popen, out_path)
        self.on_close(proc.kill)
        return proc, ProcessLog(log_path)


class Process:
    """A subprocess started by :meth:`Lab.spawn`."""

    def __init__(self, popen: subprocess.Popen[bytes], stdout_path: Path) -> None:
        self.popen = popen
        self.stdout_path = stdout_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def killpg(self) -> None:
        """SIGKILL the whole process group (the agent and any sandbox it forked)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    async def wait(self, timeout: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.popen.poll() is None:
            if loop.time() >= deadline:
                raise AssertionError(f"process {self.popen.args!r} still running after {timeout} s")
            await asyncio.sleep(0.05)
        return int(self.popen.returncode)

    async def kill(self) -> None:
        if self.popen.poll() is None:
            self.killpg()
            with contextlib.suppress(AssertionError):
                await self.wait(10)
        self.killpg()  # stragglers left in the group


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        await lab.close()


def run_cli(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a console script to completion (for short commands); fails loudly on error."""
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}\nstdout:{done.stdout}\nstderr:{done.stderr}"
        )
    return done

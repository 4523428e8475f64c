"""Real servers and agents for the hostile tests: homes, jobs, subprocesses, /proc.

Everything here stands up the real thing (an :class:`OrganisationServer` in this
process or ``vcomp-server serve`` as a child process, :class:`LiteAgent` over
real UDP sockets); nothing is faked. The helpers only save each test the setup.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.agent.enrolment import format_enrolment, parse_enrolment
from vcomp.agent.measure import golden_measurement, measured_launch
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol.agent_session import AgentSession, AgentState
from vcomp.protocol.channel import SecureChannel
from vcomp.protocol.messages import Error, ErrorCode, Hello, encode_plaintext_packet, pad_hello
from vcomp.protocol.server_endpoint import ServerEndpoint
from vcomp.protocol.wire import VERSION
from vcomp.server.config import init_server_home, load_server_config
from vcomp.server.service import OrganisationServer
from vcomp.server.store.sqlite import SqliteStore
from vcomp.transport import AgentAdapter, open_agent

Address = tuple[str, int]
APP = "hostile-app"
APP_CODE = b"# job code the server streams out\n" + b"x" * 2500
VENV_BIN = Path(sys.executable).parent


def new_tpm(directory: Path, policy: dict[str, object] | None = None) -> SimulatedTpm:
    """A simulated TPM after a measured launch of this source tree under ``policy``."""
    tpm = SimulatedTpm.open(directory)
    measured_launch(tpm, policy or {})
    return tpm


def make_server_home(home: Path) -> str:
    """``vcomp-server init`` on ``home``, bound to a free loopback port; the fingerprint."""
    fingerprint = init_server_home(home)
    config_file = home / "server.toml"
    text = config_file.read_text()
    config_file.write_text(re.sub(r'bind = "[^"]*"', 'bind = "127.0.0.1:0"', text))
    return fingerprint


def enroll(store: SqliteStore, tpm: SimulatedTpm, name: str = "hostile") -> None:
    """What `vcomp-server enroll` does with the agent's enrolment line."""
    enrolment = parse_enrolment(format_enrolment(tpm, name))
    store.enroll_agent(enrolment.agent_id, enrolment.ak_public_pem, enrolment.name)


def prepare_store(
    store: SqliteStore,
    tpm: SimulatedTpm,
    policy: dict[str, object] | None = None,
    code: bytes = APP_CODE,
) -> None:
    """Enrol the agent behind ``tpm``, allow its measurement, register the app."""
    enroll(store, tpm)
    store.allow_measurement(golden_measurement(policy or {}).format())
    store.add_app(APP, "python", io.BytesIO(code))


def add_batch(
    store: SqliteStore,
    jobs: int,
    *,
    tag: str = "",
    wall_seconds: float = 10,
    output_bytes: int = 1 << 16,
    max_attempts: int = 1,
) -> int:
    inputs = [json.dumps({"i": i, "tag": tag}).encode() for i in range(jobs)]
    return store.create_batch(
        APP,
        inputs,
        cpu_seconds=5,
        memory_bytes=1 << 26,
        wall_seconds=wall_seconds,
        output_bytes=output_bytes,
        max_attempts=max_attempts,
    )


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (yielding to the loop) until ``condition()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def hello_datagram(agent: bytes, nonce: bytes, cookie: bytes = b"", pn: int = 0) -> bytes:
    """A well-formed HELLO padded to the anti-amplification minimum (1200 bytes)."""
    hello = pad_hello(Hello(versions=(VERSION,), agent=agent, nonce=nonce, cookie=cookie))
    return encode_plaintext_packet(hello, 0, pn)


# ---------------------------------------------------------------------- in-process server


@dataclass
class Org:
    """A running in-process organisation server and one enrolled agent identity."""

    server: OrganisationServer
    address: Address
    fingerprint: bytes
    tpm: SimulatedTpm
    ephemeral: tuple[rsa.RSAPrivateKey, bytes]

    @property
    def endpoint(self) -> ServerEndpoint:
        assert self.server.endpoint is not None
        return self.server.endpoint

    @property
    def store(self) -> SqliteStore:
        return self.server.store

    def agent(self, server: Address | None = None) -> LiteAgent:
        """A protocol-only agent for this organisation (optionally via a proxy)."""
        return LiteAgent(
            tpm=self.tpm,
            pinned=self.fingerprint,
            server=server or self.address,
            ephemeral=self.ephemeral,
        )


async def taken_in(org: Org, datagrams_in: int) -> None:
    """Wait until the in-process server has read this many datagrams in all."""
    await until(lambda: org.endpoint.counters["datagrams_in"] >= datagrams_in, 10, "the server")


async def start_org(
    root: Path,
    tpm: SimulatedTpm,
    *,
    policy: dict[str, object] | None = None,
    name: str = "srv",
    code: bytes = APP_CODE,
) -> Org:
    """A fresh server home under ``root/name`` that trusts ``tpm`` measured under ``policy``."""
    fingerprint = make_server_home(root / name)
    server = OrganisationServer(load_server_config(root / name))
    prepare_store(server.store, tpm, policy, code)
    address = await server.start()
    return Org(server, address, bytes.fromhex(fingerprint), tpm, hs.generate_ephemeral())


async def open_session(
    tpm: SimulatedTpm,
    pinned: bytes,
    server: Address,
    ephemeral: tuple[rsa.RSAPrivateKey, bytes],
    on_event: Callable[[ev.Event], None],
) -> tuple[AgentSession, AgentAdapter]:
    """A real AgentSession for ``tpm`` on a real socket, its handshake under way."""
    loop = asyncio.get_running_loop()
    session = AgentSession(
        agent_id=tpm.agent_id,
        pinned_server=pinned,
        quote=lambda extra, pcrs: tpm.quote(extra, pcrs),
        now=loop.time(),
        ephemeral=ephemeral,
    )
    adapter = await open_agent(session, on_event, *server)
    session.connect(loop.time())
    adapter.kick()
    return session, adapter


class HoldingAgent:
    """A real AgentSession on a real socket that keeps each job until told to finish it."""

    def __init__(
        self, org: Org | ProcessOrg, tpm: SimulatedTpm, server: Address | None = None
    ) -> None:
        self.org = org
        self.tpm = tpm
        self.server = server or org.address
        self.events: list[ev.Event] = []
        self.jobs: list[ev.JobReceived] = []
        self.session: AgentSession | None = None
        self.adapter: AgentAdapter | None = None

    async def start(self) -> None:
        self.session, self.adapter = await open_session(
            self.tpm, self.org.fingerprint, self.server, self.org.ephemeral, self._on_event
        )

    def _on_event(self, e: ev.Event) -> None:
        self.events.append(e)
        if isinstance(e, ev.JobReceived):
            self.jobs.append(e)

    def finish(self, job: ev.JobReceived, output: bytes = b"done") -> None:
        self.submit(job.description.job, job.description.attempt, output)

    def submit(self, job: int, attempt: int, output: bytes) -> None:
        """Send a result (fresh, or resent from a spool as the real agent does)."""
        assert self.session is not None and self.adapter is not None
        self.session.submit_result(job=job, attempt=attempt, status="ok", output=output)
        self.adapter.kick()

    def of_type(self, kind: type) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, kind)]

    def leave(self) -> None:
        """Close the session politely (the server hears of it at once)."""
        assert self.session is not None and self.adapter is not None
        self.session.close("leaving", asyncio.get_running_loop().time())
        self.adapter.kick()

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()


class RefusingAgent:
    """An enrolled, attested agent that refuses every job it is sent.

    ``by_error`` refuses with a job ERROR (as for a transfer or sandbox failure);
    otherwise with a RESULT of ``status``: ``refused``, as the real agent sends for a
    job above its ``[limits]``, or a failure such as ``error`` (a crashed job).
    ``refused`` counts the answers sent.
    """

    def __init__(
        self,
        tpm: SimulatedTpm,
        pinned: bytes,
        server: Address,
        ephemeral: tuple[rsa.RSAPrivateKey, bytes],
        *,
        by_error: bool = False,
        status: str = "refused",
    ) -> None:
        self.tpm, self.pinned, self.server, self.ephemeral = tpm, pinned, server, ephemeral
        self.by_error = by_error
        self.status = status
        self.refused = 0
        self.session: AgentSession | None = None
        self.adapter: AgentAdapter | None = None

    async def start(self) -> None:
        self.session, self.adapter = await open_session(
            self.tpm, self.pinned, self.server, self.ephemeral, self._on_event
        )

    def _on_event(self, e: ev.Event) -> None:
        if not isinstance(e, ev.JobReceived):
            return
        assert self.session is not None and self.adapter is not None
        d = e.description
        if self.by_error:
            channel = self.session.channel
            assert channel is not None
            channel.send_reliable(
                Error(code=ErrorCode.SANDBOX_FAILURE, message="no", job=d.job, attempt=d.attempt)
            )
            self.session._running = None  # free for the next START, as after a result
            self.session.state = AgentState.READY
        else:
            self.session.submit_result(
                job=d.job, attempt=d.attempt, status=self.status, output=b"", detail="no"
            )
        self.refused += 1
        self.adapter.kick()

    def session_alive(self) -> bool:
        return self.session is not None and self.session.state is not AgentState.CLOSED

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.close()


# ---------------------------------------------------------------------- child-process server


class ServerProcess:
    """``vcomp-server serve`` as a child process, so its memory can be read from /proc."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "vcomp-server"), "serve", "--config", str(home)],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = re.search(r"listening on ([\d.]+):(\d+) key ([0-9a-f]{64})", line)
        if match is None:
            self.stop()
            raise AssertionError(f"vcomp-server did not start: {line!r}")
        self.address: Address = (match.group(1), int(match.group(2)))
        self.fingerprint = bytes.fromhex(match.group(3))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        return proc_status_kib(self.pid, "VmRSS") * 1024

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class ProcessOrg:
    """A ``vcomp-server serve`` child process, its store (opened beside it) and one agent key."""

    server: ServerProcess
    store: SqliteStore
    tpm: SimulatedTpm
    ephemeral: tuple[rsa.RSAPrivateKey, bytes]

    @property
    def address(self) -> Address:
        return self.server.address

    @property
    def fingerprint(self) -> bytes:
        return self.server.fingerprint

    def agent(self, tpm: SimulatedTpm | None = None) -> LiteAgent:
        """An honest protocol-level agent that returns each job's result at once."""
        return LiteAgent(
            tpm=tpm or self.tpm,
            pinned=self.fingerprint,
            server=self.address,
            ephemeral=self.ephemeral,
        )

    def stop(self) -> int | None:
        code = self.server.stop()
        self.store.close()
        return code


def start_process_org(
    home: Path,
    tpm: SimulatedTpm,
    log_path: Path,
    *,
    server: dict[str, object] | None = None,
    jobs: dict[str, object] | None = None,
    others: tuple[SimulatedTpm, ...] = (),
) -> ProcessOrg:
    """A server home trusting ``tpm`` (and ``others``), with extra ``[server]``/``[jobs]``
    keys, served by a child process."""
    make_server_home(home)
    config = home / "server.toml"
    text = config.read_text()
    for section, extra in (("server", server or {}), ("jobs", jobs or {})):
        for key, value in extra.items():
            line = f"{key} = {value!r}"
            text, found = re.subn(rf"(?m)^{key} = .*$", line, text)
            if not found:
                text = text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1)
    config.write_text(text)
    store = SqliteStore(home / "jobs.sqlite")
    prepare_store(store, tpm)
    for n, other in enumerate(others):  # more enrolled agents, known before the server starts
        enroll(store, other, f"other-{n}")
    return ProcessOrg(ServerProcess(home, log_path), store, tpm, hs.generate_ephemeral())


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@dataclass(frozen=True, slots=True)
class UdpSocketState:
    """One line of /proc/net/udp: the kernel's view of a bound socket."""

    rx_queue: int  # bytes waiting to be read by the owner
    drops: int  # datagrams the kernel dropped because the buffer was full


def udp_socket_state(port: int) -> UdpSocketState:
    """The IPv4 UDP socket bound to 127.0.0.1:``port`` (or any address).

    /proc/net/udp is read in pages, and a line can be skipped while other
    processes open and close sockets, so a missing line is looked for again.
    """
    want = f":{port:04X}"
    for _ in range(50):
        with open("/proc/net/udp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].endswith(want):
                    rx_queue = int(fields[4].split(":")[1], 16)
                    return UdpSocketState(rx_queue=rx_queue, drops=int(fields[12]))
        time.sleep(0.001)
    raise AssertionError(f"no UDP socket bound to port {port}")


def forgeries(channel: SecureChannel | None) -> int:
    """Datagrams that reached this side's AEAD and failed it there."""
    assert channel is not None
    return channel.forgeries


def result_counts(store: SqliteStore, batch_id: int) -> dict[int, int]:
    """Stored results per job of a batch (a replayed result must not add one)."""
    return {r.job_id: len(store.list_results(r.job_id)) for r in store.iter_results(batch_id)}


def with_session_id(datagram: bytes, session_id: int) -> bytes:
    """The same datagram with another session id in its header (bytes 6-13)."""
    return datagram[:6] + session_id.to_bytes(8, "big") + datagram[14:]


def packet_number(datagram: bytes) -> int:
    return int.from_bytes(datagram[14:22], "big")


class Spoofer:
    """Sends UDP datagrams with any IPv4 source address and port (needs CAP_NET_RAW).

    :meth:`open` returns None where raw sockets are not allowed, so a test can
    skip only the part that needs a forged source.
    """

    def __init__(self, raw: socket.socket) -> None:
        self._raw = raw

    @classmethod
    def open(cls) -> Spoofer | None:
        try:
            return cls(socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))
        except PermissionError:
            return None

    def send(self, payload: bytes, source: Address, destination: Address) -> None:
        udp = struct.pack(">HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
        ip = struct.pack(
            ">BBHHHBBH4s4s",
            0x45,  # IPv4, 20-byte header
            0,
            20 + len(udp),
            0,
            0,
            64,
            socket.IPPROTO_UDP,
            0,  # the kernel fills in the checksum (and the id)
            socket.inet_aton(source[0]),
            socket.inet_aton(destination[0]),
        )
        self._raw.sendto(ip + udp, (destination[0], 0))  # UDP checksum 0: none (IPv4)

    def close(self) -> None:
        self._raw.close()

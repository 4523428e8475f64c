"""The organisation server: the protocol endpoint wired to the job store.

:class:`OrganisationServer` is the session glue. It owns the lifetime (the store
lock, the UDP adapter, one task group for all background work), keeps the trust
policy current, turns protocol events into calls on its two parts, and sends
what they queue on a session:

- :class:`~vcomp.server.scheduler.Scheduler` decides who gets which job and for
  how long (leases, renewals, expiry, per-agent caps, refusals);
- :class:`~vcomp.server.intake.ResultIntake` takes results in and sends the final
  ACK only after the result's transaction has committed.

Store writes go through one :class:`GroupCommitter` thread; chunk reads use the
event-loop thread's own read connection.

Background work (an assignment pass, a result commit, a release) runs in the task
group that :meth:`start` opens and :meth:`stop` closes, so none outlives the server.
Each piece is guarded: an exception in one job's work is logged as
``internal_error`` and does not cancel its siblings (a bare TaskGroup would tear
the whole server down). Only BaseException (KeyboardInterrupt, SystemExit) ends it.

A store outage (:mod:`vcomp.server.outage`) closes no session. The tick then makes one
store call, a probe (a write that changes nothing, since on SQLite reads keep working
while another process holds the write lock), at the backoff's pace; expiry, renewals,
agent touches and reset polling wait for the store and resume; work that failed with
StoreUnavailable is not logged as an error, since the outage is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import secrets
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp import logfmt
from vcomp.errors import StoreUnavailable, VcompError, loggable
from vcomp.protocol import events as ev
from vcomp.protocol.attestation import Measurement
from vcomp.protocol.handshake import key_fingerprint, raw_public
from vcomp.protocol.messages import ErrorCode
from vcomp.protocol.server_endpoint import ServerEndpoint
from vcomp.protocol.server_session import ServerSession
from vcomp.protocol.tpm_format import ClockInfo
from vcomp.protocol.trust import TrustPolicy
from vcomp.server.checkpoint_intake import CheckpointIntake
from vcomp.server.commit import GroupCommitter
from vcomp.server.config import ServerConfig, load_signing_key
from vcomp.server.hooks import Assimilation, Validation
from vcomp.server.intake import ResultIntake
from vcomp.server.scheduler import TICK_SECONDS, Scheduler, ServerStats
from vcomp.server.serve_lock import StoreLock
from vcomp.server.store import open_store
from vcomp.server.store.url import parse_store_url
from vcomp.transport import ServerAdapter, open_server

__all__ = ["OrganisationServer", "ServerStats", "serve"]

log = logging.getLogger("vcomp.server")

RESET_REQUEST_TTL = 300.0  # seconds every server has to see a reset request
RESET_PRUNE_SECONDS = 60.0
UPLOAD_SWEEP_SECONDS = 300.0
CHECKPOINT_SWEEP = 1000  # finished jobs whose checkpoints one sweep forgets
HEARTBEAT_SECONDS = 2.0
# JOB_LOST reports a session may make. An honest worker sends at most one per session
# (it runs one job at a time and reports at its next session); each report costs a
# store lookup, so more are dropped unanswered (see PROTOCOL.md 8.7).
LOST_REPORTS_PER_SESSION = 4


class OrganisationServer:
    def __init__(self, config: ServerConfig, *, signing_key: Ed25519PrivateKey | None = None):
        self.config = config
        self.store = open_store(
            config.store_url,
            busy_timeout=config.store_busy_timeout,
            same_failures=config.jobs.stop_after_same_failures,
        )
        # Names this process in the store: its leases carry it, and its heartbeat tells
        # the other servers on a shared store that they are still held.
        self.server_id = secrets.token_hex(8)
        self.committer = GroupCommitter(self.store, server_id=self.server_id)
        self._signing_key = signing_key or load_signing_key(config.key_path)
        self.fingerprint = key_fingerprint(raw_public(self._signing_key)).hex()
        """What agents pin: SHA-256 of the raw public key, in hex."""
        self.trust = TrustPolicy(on_clock=self._remember_clock)
        self.stats = ServerStats()
        self.scheduler = Scheduler(config, self.store, self.committer, self, self.spawn, self.stats)
        self.intake = ResultIntake(
            self.store,
            self.committer,
            self.scheduler,
            self,
            self.spawn,
            self.stats,
            config.upload_memory_bytes,
        )
        self.checkpoints = CheckpointIntake(
            self.store, self.committer, self.spawn, max_bytes=config.jobs.checkpoint_bytes
        )
        self.validation = Validation(
            self.store,
            self.committer,
            self.spawn,
            requeued=self.scheduler.requeued,
            threads=config.hook_threads,
        )
        self.assimilation = Assimilation(
            self.store, self.committer, self.spawn, threads=config.hook_threads
        )
        # One server per SQLite file; on a shared database server several are the point.
        store_file = parse_store_url(config.store_url).path
        self._lock = StoreLock(store_file) if store_file is not None else None
        self._tasks: asyncio.TaskGroup | None = None
        self._accepting = False
        self._runner: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._adapter: ServerAdapter | None = None
        self._ak_cache: dict[str, tuple[str, rsa.RSAPublicKey]] = {}
        self._pending_clocks: dict[str, ClockInfo] = {}
        self._pending_touches: dict[str, tuple[float, str]] = {}
        self._lost_reports: dict[int, int] = {}  # session -> JOB_LOST reports taken
        self._reset_cursor = 0  # the newest reset request this server has seen
        self._reset_pruned = 0.0
        self._uploads_swept = time.time()
        self._heartbeat_at = 0.0
        self.endpoint: ServerEndpoint | None = None
        self.address: tuple[str, int] | None = None

    @property
    def adapter(self) -> ServerAdapter | None:
        """The UDP socket driver while serving (its traffic totals feed /metrics)."""
        return self._adapter

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Lock the store, open the task group, bind. Call :meth:`stop` even if this fails."""
        loop = asyncio.get_running_loop()
        if self._lock is not None:
            self._lock.acquire(f"pid {os.getpid()}, starting")
        # With the store to itself (SQLite's serve lock) every staged upload is a dead
        # one; on a shared store other servers may be writing theirs, so only old ones.
        alone = self._lock is not None
        await self.committer.run(
            self.store.discard_stale_uploads, time.time() - (0 if alone else self._upload_ttl)
        )
        self._reset_cursor = await self.committer.run(self.store.newest_reset_request)
        # Registered before any lease is taken: a lease of an unknown server is an orphan.
        await self._heartbeat(time.time())
        self._load_trust()
        self.endpoint = ServerEndpoint(
            signing_key=self._signing_key,
            trust=self.trust,
            code_source=self.scheduler.read_code,
            now=loop.time(),
            window=self.config.window,
            max_sessions=self.config.max_sessions,
            max_sessions_per_agent=self.config.max_sessions_per_agent,
            max_pending_handshakes=self.config.max_pending_handshakes,
            idle_timeout=self.config.idle_timeout,
            congestion=self.config.congestion,
        )
        running: asyncio.Future[None] = loop.create_future()
        self._runner = asyncio.create_task(self._run(running))
        await running
        self._adapter = await open_server(
            self.endpoint, self.on_event, self.config.bind_host, self.config.bind_port
        )
        host, port = self._adapter.local_address
        self.address = (host, port)
        if self._lock is not None:
            self._lock.describe(f"pid {os.getpid()}, listening on {host}:{port}")
        self.committer.health.watching = True
        logfmt.event(
            log,
            "server_started",
            bind=f"{host}:{port}",
            window=self.config.window,
            congestion=self.config.congestion,
            udp_gso=self._adapter.gso.status,
            udp_gro=self._adapter.gro.status,
        )
        return self.address

    async def _run(self, running: asyncio.Future[None]) -> None:
        """Own the task group for the server's lifetime; :meth:`stop` cancels this."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks, self._accepting = tasks, True
                self._tick_task = tasks.create_task(self._tick_forever())
                tasks.create_task(self.validation.run_forever())
                tasks.create_task(self.assimilation.run_forever())
                running.set_result(None)
                await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._tasks, self._accepting = None, False

    async def stop(self) -> None:
        """Close sessions politely; leased jobs stay leased and recoverable."""
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        if self.endpoint is not None and self._adapter is not None:
            now = asyncio.get_running_loop().time()
            for session in list(self.endpoint.sessions.values()):
                session.close("server shutting down", ErrorCode.SERVER_SHUTDOWN, now)
                self.endpoint.touch(session.session_id)
            self._adapter.flush()
            self._adapter.close()
        if self._runner is not None:
            # Work still running is cancelled: a result whose commit was cut short
            # gets no ACK, so its agent resends it to the next server.
            self._accepting = False
            self._runner.cancel()
            (outcome,) = await asyncio.gather(self._runner, return_exceptions=True)
            if not isinstance(outcome, asyncio.CancelledError | None):
                logfmt.event(log, "internal_error", logging.ERROR, error=loggable(outcome))
        if self._pending_clocks or self._pending_touches:
            with contextlib.suppress(StoreUnavailable):  # last-seen times: harmless to lose
                await self.committer.run(
                    self._flush_agent_updates, self._pending_clocks, self._pending_touches
                )
        await asyncio.gather(self.validation.close(), self.assimilation.close())
        await self.committer.close()
        self.store.close()
        if self._lock is not None:
            self._lock.release()
        if self.address is not None:
            logfmt.event(log, "server_stopped")

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        """Run ``work`` in the server's task group (dropped once the server is stopping)."""
        if self._tasks is None or not self._accepting:
            work.close()
            return
        self._tasks.create_task(self._guarded(work))

    @staticmethod
    async def _guarded(work: Coroutine[Any, Any, object]) -> None:
        # Failures the work can act on (a vanished session, a refused upload) are handled
        # inside it. Whatever escapes (a store error no one can act on, or a bug) ends
        # only this piece: logged here, never cancelling its siblings or the tick.
        try:
            await work
        except StoreUnavailable:
            pass  # the store's health logged the outage; what must not be lost retries
        except Exception as exc:
            logfmt.event(
                log,
                "internal_error",
                logging.ERROR,
                work=getattr(work, "__qualname__", "?"),
                error=loggable(exc),
            )

    # ---- trust ---------------------------------------------------------------

    def _load_trust(self) -> None:
        """Pick up enrolments and allowlist changes made by the CLI while we run."""
        enrolled: dict[bytes, rsa.RSAPublicKey] = {}
        revoked: list[bytes] = []
        for agent in self.store.list_agents():
            if agent.revoked_at is not None:
                revoked.append(bytes.fromhex(agent.agent_id))
                continue
            cached = self._ak_cache.get(agent.agent_id)
            if cached is not None and cached[0] == agent.ak_public_pem:
                key: object = cached[1]
            else:
                key = serialization.load_pem_public_key(agent.ak_public_pem.encode())
                if isinstance(key, rsa.RSAPublicKey):
                    self._ak_cache[agent.agent_id] = (agent.ak_public_pem, key)
            if isinstance(key, rsa.RSAPublicKey):
                agent_id = bytes.fromhex(agent.agent_id)
                enrolled[agent_id] = key
                if agent_id not in self.trust.clocks:
                    clock = self.store.get_agent_clock(agent.agent_id)
                    if clock is not None:
                        self.trust.clocks[agent_id] = ClockInfo(
                            clock.clock, clock.reset_count, clock.restart_count, True
                        )
        self.trust.enrolled = enrolled
        if revoked and self.endpoint is not None:
            gone = set(revoked)
            for session in list(self.endpoint.sessions.values()):
                if session.agent_id in gone and session.channel is not None:
                    # Trust withdrawn: the next handshake is refused as unknown_key.
                    self.close_session(
                        session.session_id, "agent revoked", ErrorCode.ATTESTATION_FAILED
                    )
        self.trust.allowlist = {Measurement.parse(m.text) for m in self.store.list_measurements()}

    def _remember_clock(self, agent_id: bytes, clock: ClockInfo) -> None:
        # Written once per tick, not per handshake. Losing the newest value in a
        # crash only makes the next check less strict, never wrongly strict.
        self._pending_clocks[agent_id.hex()] = clock

    def _flush_agent_updates(
        self, clocks: dict[str, ClockInfo], touches: dict[str, tuple[float, str]]
    ) -> None:
        for agent, c in clocks.items():
            self.store.set_agent_clock(agent, c.clock, c.reset_count, c.restart_count)
        for agent, (when, address) in touches.items():
            self.store.touch_agent(agent, when, address)

    # ---- events in -----------------------------------------------------------

    def on_event(self, e: ev.Event) -> None:
        """The adapter's callback: every event the endpoint produces comes through here."""
        if isinstance(e, ev.ResultChunk):
            self.intake.on_chunk(e)
        elif isinstance(e, ev.ResultComplete):
            self.spawn(self.intake.commit(e))
        elif isinstance(e, ev.CheckpointChunk):
            self.checkpoints.on_chunk(e)
        elif isinstance(e, ev.CheckpointComplete):
            self.checkpoints.on_complete(e)
        elif isinstance(e, ev.AgentIdle):
            self.scheduler.agent_idle(e.session_id)
        elif isinstance(e, ev.SessionEstablished):
            self._on_established(e)
        elif isinstance(e, ev.HandshakeRejected):
            self.stats.handshakes_rejected += 1
            logfmt.event(
                log,
                "handshake_rejected",
                logging.WARNING,
                agent=e.agent_id.hex()[:16],
                addr=f"{e.address[0]}:{e.address[1]}",
                reason=logfmt.peer_text(e.reason),
                detail=logfmt.peer_text(e.detail),
            )
        elif isinstance(e, ev.JobDelivered):
            took = self.scheduler.delivered((e.job, e.attempt))
            logfmt.event(
                log,
                "job_delivered",
                job=e.job,
                attempt=e.attempt,
                session=f"{e.session_id:016x}",
                transfer_ms=took,
            )
        elif isinstance(e, ev.JobRefused):
            self._on_refused(e)
        elif isinstance(e, ev.ResultUnverified):
            self._on_unverified(e)
        elif isinstance(e, ev.SessionClosed):
            self._lost_reports.pop(e.session_id, None)
            self.scheduler.session_closed(e.session_id)
            self.intake.abandon(e.session_id)
            self.checkpoints.abandon(e.session_id)
            logfmt.event(
                log,
                "session_closed",
                session=f"{e.session_id:016x}",
                reason=logfmt.peer_text(e.reason),
                code=e.code,
            )
        elif isinstance(e, ev.ResetDone):
            logfmt.event(log, "reset_done", session=f"{e.session_id:016x}", epoch=e.epoch)

    def _on_established(self, e: ev.SessionEstablished) -> None:
        self.stats.sessions_established += 1
        address = f"{e.address[0]}:{e.address[1]}"
        logfmt.event(
            log,
            "session_established",
            session=f"{e.session_id:016x}",
            agent=e.agent_id.hex()[:16],
            addr=address,
        )
        self._pending_touches[e.agent_id.hex()] = (time.time(), address)

    def _on_refused(self, e: ev.JobRefused) -> None:
        # Only the agent holding the lease may give it back (job ids are guessable),
        # and only its text is worth logging.
        session = self.session(e.session_id)
        if session is not None and e.code == ErrorCode.JOB_LOST:
            self._on_lost(session, e)
            return
        if session is None or not self.scheduler.held_by((e.job, e.attempt), session.agent_id):
            return
        logfmt.event(
            log,
            "job_refused",
            logging.WARNING,
            by="agent",
            agent=session.agent_id.hex()[:16],
            job=e.job,
            attempt=e.attempt,
            code=e.code,
            message=e.message,
        )
        again = e.code == ErrorCode.JOB_ABANDONED  # a shutdown: it may come back
        self.scheduler.hand_back(session.agent_id, (e.job, e.attempt), again)

    def _on_unverified(self, e: ev.ResultUnverified) -> None:
        """This server refused the agent's result (it does not match its SHA-256). The
        lease goes back as a refusal would (never to this agent again), and the record
        says who refused what."""
        session = self.session(e.session_id)
        agent = None if session is None else session.agent_id
        logfmt.event(
            log,
            "result_refused",
            logging.WARNING,
            by="server",
            agent=None if agent is None else agent.hex()[:16],
            job=e.job,
            attempt=e.attempt,
            reason=e.reason,
        )
        if agent is not None and self.scheduler.held_by((e.job, e.attempt), agent):
            reason = f"result refused by the server: {e.reason}"
            self.scheduler.hand_back(agent, (e.job, e.attempt), False, reason=reason)

    def _on_lost(self, session: ServerSession, e: ev.JobRefused) -> None:
        """The agent's earlier session (here or on another server) ended with this job.

        Bounded per session, since each report may cost a store lookup; the store
        decides whether the attempt is still leased to this agent.
        """
        taken = self._lost_reports.get(session.session_id, 0)
        if taken >= LOST_REPORTS_PER_SESSION:
            self.stats.lost_reports_dropped += 1
            if taken == LOST_REPORTS_PER_SESSION:  # logged once per session
                logfmt.event(
                    log,
                    "lost_reports_dropped",
                    logging.WARNING,
                    session=f"{session.session_id:016x}",
                    agent=session.agent_id.hex()[:16],
                    limit=LOST_REPORTS_PER_SESSION,
                )
                self._lost_reports[session.session_id] = taken + 1
            return
        self._lost_reports[session.session_id] = taken + 1
        self.scheduler.release_lost(session.agent_id, (e.job, e.attempt))

    # ---- datagrams out (what the scheduler and the intake call) --------------

    def session(self, sid: int) -> ServerSession | None:
        return None if self.endpoint is None else self.endpoint.session(sid)

    def live_session_of(self, agent_id: bytes) -> ServerSession | None:
        if self.endpoint is None:
            return None
        sessions = self.endpoint.sessions.values()
        return next((s for s in sessions if s.agent_id == agent_id and s.channel), None)

    def send(self, session: ServerSession) -> None:
        """Send what the application just queued on ``session``."""
        if self.endpoint is not None and self._adapter is not None:
            self.endpoint.touch(session.session_id)
            self._adapter.kick()

    def start_job(self, session: ServerSession, job: ev.JobDescription) -> None:
        session.start_job(job)
        self.send(session)

    def reset_session(self, session: ServerSession, reason: str) -> None:
        session.reset(reason, asyncio.get_running_loop().time())
        # The agent resends uncommitted results from offset 0 after a reset.
        self.intake.abandon(session.session_id)
        self.checkpoints.abandon(session.session_id)
        self.send(session)

    def close_session(self, sid: int, reason: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        session = self.session(sid)
        if session is not None:
            session.close(reason, code, asyncio.get_running_loop().time())
            self.send(session)

    def _reset_agent(self, agent_hex: str) -> None:
        if self.endpoint is None or self._adapter is None:
            return
        for session in list(self.endpoint.sessions.values()):
            if session.agent_id.hex() != agent_hex:
                continue
            job = session.current_job
            self.reset_session(session, "reset requested by the operator")
            logfmt.event(
                log,
                "reset_sent",
                session=f"{session.session_id:016x}",
                agent=agent_hex[:16],
                job=job and job[0],
            )
            if job is not None:
                self.scheduler.take_back(job, "reset by the operator")

    # ---- periodic work -------------------------------------------------------

    async def _tick_forever(self) -> None:
        health = self.committer.health
        while True:
            if not health.available:
                await asyncio.sleep(health.retry_delay())
                await self._probe()
                continue
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self._tick()
            except StoreUnavailable as exc:
                health.lost(exc)  # logged once; the probe takes over
            except VcompError as exc:
                logfmt.event(log, "tick_failed", logging.ERROR, error=str(exc))
            except Exception as exc:  # a bug: log it and keep ticking, expiry must go on
                logfmt.event(log, "internal_error", logging.ERROR, work="tick", error=loggable(exc))

    async def _probe(self) -> None:
        """One write that changes nothing (no reset request is older than 1970)."""
        try:
            await self.committer.run(self.store.prune_reset_requests, 0.0)
        except StoreUnavailable:
            return
        except VcompError as exc:  # the store answered, if with an error: it is there
            logfmt.event(log, "tick_failed", logging.ERROR, error=str(exc))
        self.committer.health.answered()

    @property
    def _upload_ttl(self) -> float:
        """How old a staged upload must be before any server may take it for dead."""
        return 2 * max(self.config.jobs.transfer_seconds, UPLOAD_SWEEP_SECONDS)

    async def _poll_reset_requests(self, now: float) -> None:
        # Every server sees every request and resets the sessions it holds; rows
        # are pruned by age, not when taken, since the agent may be on several.
        for request_id, agent in await self.committer.run(
            self.store.reset_requests_after, self._reset_cursor
        ):
            self._reset_cursor = request_id
            self._reset_agent(agent)
        if now >= self._reset_pruned + RESET_PRUNE_SECONDS:
            self._reset_pruned = now
            await self.committer.run(self.store.prune_reset_requests, now - RESET_REQUEST_TTL)

    async def _heartbeat(self, now: float) -> None:
        self._heartbeat_at = now
        # Every live session's agent is seen now: "connected" in status and the API is
        # an agent seen within CONNECTED_SECONDS, on whichever server holds its session.
        if self.endpoint is not None:
            for s in self.endpoint.sessions.values():
                if s.channel is not None and s.agent_id:
                    address = f"{s.address[0]}:{s.address[1]}"
                    self._pending_touches[s.agent_id.hex()] = (now, address)
        host, port = self.address or (self.config.bind_host, self.config.bind_port)
        await self.committer.run(self.store.server_alive, self.server_id, f"{host}:{port}", now)

    async def _tick(self) -> None:
        now = time.time()
        if now >= self._heartbeat_at + HEARTBEAT_SECONDS or self._heartbeat_at > now:
            await self._heartbeat(now)
        await self.scheduler.expire_and_renew(now)
        if self._pending_clocks or self._pending_touches:
            clocks, self._pending_clocks = self._pending_clocks, {}
            touches, self._pending_touches = self._pending_touches, {}
            try:
                await self.committer.run(self._flush_agent_updates, clocks, touches)
            except StoreUnavailable:
                # Not written: kept for the next tick, unless a newer value came meanwhile.
                self._pending_clocks = clocks | self._pending_clocks
                self._pending_touches = touches | self._pending_touches
                raise
        await self._poll_reset_requests(now)
        if now >= self._uploads_swept + UPLOAD_SWEEP_SECONDS:
            self._uploads_swept = now  # uploads whose server died mid-transfer
            await self.committer.run(self.store.discard_stale_uploads, now - self._upload_ttl)
            # Checkpoints of jobs that are done or failed: no attempt resumes from them.
            await self.committer.run(self.store.drop_finished_checkpoints, CHECKPOINT_SWEEP)
        self._load_trust()
        await self.scheduler.offer()


def serve(config: ServerConfig, *, log_file: Path | None = None) -> None:
    """Run until SIGINT or SIGTERM (``vcomp-server serve``)."""
    logfmt.setup(log_file=log_file)
    faulthandler.enable()  # a crash in a C extension leaves every thread's stack on stderr
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - platforms without uvloop
        logfmt.event(log, "uvloop_unavailable", logging.WARNING)
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    server = OrganisationServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = None
    if config.http.enabled:
        from vcomp.server.http.app import HttpListener  # aiohttp only when serving HTTP

        http = HttpListener(server, config.http)
    try:
        host, port = await server.start()
        udp = server.adapter.offload_summary if server.adapter is not None else "closed"
        print(
            f"vcomp-server listening on {host}:{port} key {server.fingerprint} udp {udp}",
            flush=True,
        )
        if http is not None:
            await http.start()
            print(f"vcomp-server http on {http.url}", flush=True)
        await stop.wait()
    finally:
        if http is not None:
            await http.stop()
        await server.stop()

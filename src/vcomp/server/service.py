"""The organisation server: the protocol endpoint wired to the job store.

:class:`OrganisationServer` reacts to protocol events: it leases jobs to idle
attested agents, streams their code and input out of the store, streams
results back in, and sends the final ACK only after the result's transaction
has committed. Store writes go through one :class:`GroupCommitter` thread;
chunk reads use the event-loop thread's own read connection.

One enrolled key gets a bounded share: at most ``max_leases_per_agent`` jobs at
once, and no lease outlives its hard deadline (``renew_lease``). Result bytes
are buffered only for the agent that holds the job, within the job's output
limit and the server-wide upload budget. (Longer than 500 lines: leasing and
result intake share the assignment table; splitting them waits for the merge
of issue 13's server branches.)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp import logfmt
from vcomp.errors import StoreError, VcompError
from vcomp.protocol import events as ev
from vcomp.protocol.attestation import Measurement
from vcomp.protocol.capacity import JobCapacity
from vcomp.protocol.messages import ErrorCode
from vcomp.protocol.server_endpoint import ServerEndpoint
from vcomp.protocol.server_session import ServerSession, ServerState
from vcomp.protocol.tpm_format import ClockInfo
from vcomp.protocol.trust import TrustPolicy
from vcomp.server.commit import GroupCommitter
from vcomp.server.config import ServerConfig, load_signing_key
from vcomp.server.results import ResultSink, UploadBudget
from vcomp.server.store import REFUSAL_WINDOW, Lease, ResultSubmission, open_store
from vcomp.transport import ServerAdapter, open_server

log = logging.getLogger("vcomp.server")

TICK_SECONDS = 0.5
REFUSED = "refused"
"""The RESULT status an agent sends for a job above its limits (vcomp.agent.runtime)."""


@dataclass
class _Assignment:
    lease: Lease
    session_id: int
    code: Any
    data: Any
    code_size: int
    leased_at: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)


@dataclass
class ServerStats:
    leases: int = 0
    results_committed: int = 0
    handshakes_rejected: int = 0
    sessions_established: int = 0
    started_at: float = field(default_factory=time.monotonic)


class OrganisationServer:
    def __init__(self, config: ServerConfig, *, signing_key: Ed25519PrivateKey | None = None):
        self.config = config
        self.store = open_store(config.store_url)
        self.committer = GroupCommitter(self.store)
        self._signing_key = signing_key or load_signing_key(config.key_path)
        self.trust = TrustPolicy(on_clock=self._remember_clock)
        self.stats = ServerStats()
        self._assignments: dict[tuple[int, int], _Assignment] = {}
        self._idle: set[int] = set()
        self._sinks: dict[tuple[int, int, int], ResultSink] = {}
        self._upload_budget = UploadBudget(config.upload_memory_bytes)
        self._leases_held: Counter[str] = Counter()  # assignments per agent (hex id)
        self._cooling: dict[str, float] = {}  # agent -> monotonic time its cool-down ends
        self._tasks: set[asyncio.Task[Any]] = set()
        self._adapter: ServerAdapter | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self._queue_hint = True
        self._ak_cache: dict[str, tuple[str, rsa.RSAPublicKey]] = {}
        self._pending_clocks: dict[str, ClockInfo] = {}
        self._pending_touches: dict[str, tuple[float, str]] = {}
        self._prefetching: set[int] = set()
        self.endpoint: ServerEndpoint | None = None
        self.address: tuple[str, int] | None = None

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        await self.committer.run(self.store.discard_stale_uploads, time.time())
        self._load_trust()
        self.endpoint = ServerEndpoint(
            signing_key=self._signing_key,
            trust=self.trust,
            code_source=self._read_code,
            now=loop.time(),
            window=self.config.window,
            max_sessions=self.config.max_sessions,
            max_sessions_per_agent=self.config.max_sessions_per_agent,
            idle_timeout=self.config.idle_timeout,
        )
        endpoint = self.endpoint
        self._adapter = await open_server(
            endpoint, self._on_event, self.config.bind_host, self.config.bind_port
        )
        host, port = self._adapter.local_address
        self.address = (host, port)
        self._tick_task = asyncio.create_task(self._tick_forever())
        logfmt.event(log, "server_started", bind=f"{host}:{port}", window=self.config.window)
        return self.address

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
            self._adapter._flush()
            self._adapter.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending_clocks or self._pending_touches:
            await self.committer.run(
                self._flush_agent_updates, self._pending_clocks, self._pending_touches
            )
        await self.committer.close()
        self.store.close()
        logfmt.event(log, "server_stopped")

    # ---- trust ---------------------------------------------------------------

    def _load_trust(self) -> None:
        """Pick up enrolments and allowlist changes made by the CLI while we run."""
        enrolled: dict[bytes, rsa.RSAPublicKey] = {}
        for agent in self.store.list_agents():
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

    # ---- events --------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logfmt.event(log, "internal_error", logging.ERROR, error=repr(task.exception()))

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.ResultChunk):
            self._on_chunk(e)
        elif isinstance(e, ev.ResultComplete):
            self._spawn(self._commit(e))
        elif isinstance(e, ev.AgentIdle):
            self._idle.add(e.session_id)
            self._spawn(self._assign())
        elif isinstance(e, ev.SessionEstablished):
            self.stats.sessions_established += 1
            logfmt.event(
                log,
                "session_established",
                session=f"{e.session_id:016x}",
                agent=e.agent_id.hex()[:16],
                addr=f"{e.address[0]}:{e.address[1]}",
            )
            self._pending_touches[e.agent_id.hex()] = (
                time.time(),
                f"{e.address[0]}:{e.address[1]}",
            )
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
            a = self._assignments.get((e.job, e.attempt))
            took = None if a is None else int((time.monotonic() - a.leased_at) * 1000)
            if a is not None:  # every byte is acknowledged: release the read snapshot
                a.code.close()
                a.data.close()
            logfmt.event(
                log,
                "job_delivered",
                job=e.job,
                attempt=e.attempt,
                session=f"{e.session_id:016x}",
                transfer_ms=took,
            )
        elif isinstance(e, ev.JobRefused):
            # Only the agent holding the lease may give it back (job ids are guessable),
            # and only its text is worth logging.
            session = self._session(e.session_id)
            if session is not None and self._holder_sent(e.session_id, (e.job, e.attempt)):
                logfmt.event(
                    log,
                    "job_refused",
                    logging.WARNING,
                    job=e.job,
                    attempt=e.attempt,
                    code=e.code,
                    message=e.message,
                )
                self._drop_assignment(e.job, e.attempt)
                again = e.code == ErrorCode.JOB_ABANDONED  # a shutdown: it may come back
                self._spawn(self._record_refusal(session.agent_id, e.job, e.attempt, again))
        elif isinstance(e, ev.SessionClosed):
            self._idle.discard(e.session_id)
            self._abandon_uploads(e.session_id)
            logfmt.event(
                log,
                "session_closed",
                session=f"{e.session_id:016x}",
                reason=logfmt.peer_text(e.reason),
                code=e.code,
            )
        elif isinstance(e, ev.ResetDone):
            logfmt.event(log, "reset_done", session=f"{e.session_id:016x}", epoch=e.epoch)

    # ---- jobs out ------------------------------------------------------------

    async def _assign(self) -> None:
        endpoint = self.endpoint
        if endpoint is None:
            return
        # A None lease is about one agent (distinct-agent replicas, its capacity, its
        # refusals), not the queue: try every idle agent once per pass before
        # concluding the queue is empty.
        refused: set[tuple[bytes, JobCapacity]] = set()
        for sid in list(self._idle):
            if sid not in self._idle or sid in self._prefetching:
                continue  # taken by another _assign task, or its next job is on the way
            session = endpoint.session(sid)
            if session is None or session.state is not ServerState.IDLE:
                self._idle.discard(sid)
                continue
            if not self._queue_hint:
                return
            if (session.agent_id, session.capacity) in refused:
                continue
            if not self._reserve_lease(session.agent_id):
                continue  # it holds its share of the queue; a finished job frees a slot
            self._idle.discard(sid)
            lease = await self._lease_for(session)
            if lease is None:
                self._unreserve_lease(session.agent_id.hex())
                refused.add((session.agent_id, session.capacity))
                self._idle.add(sid)
                continue
            session = endpoint.session(sid)
            if session is None or session.state is not ServerState.IDLE:
                # The agent vanished while we leased: hand the job straight back.
                self._unreserve_lease(lease.agent_id)
                await self._release(lease.job_id, lease.attempt, "agent left before START")
                continue
            self._start(session, lease)
        if refused and not any(
            (s := endpoint.session(sid)) is not None and (s.agent_id, s.capacity) not in refused
            for sid in self._idle
        ):
            self._queue_hint = False

    def _lease_for(self, session: ServerSession) -> asyncio.Future[Lease | None]:
        """A lease of a job within the session's declared capacity (or None)."""
        return asyncio.ensure_future(
            self.committer.lease(
                session.agent_id.hex(),
                time.time(),
                self.config.jobs.lease_seconds,
                capacity=session.capacity,
                refusal_cap=self.config.jobs.refusals_per_hour,
            )
        )

    def _start(self, session: ServerSession, lease: Lease) -> None:
        assert self.endpoint is not None and self._adapter is not None
        app = lease.app
        self._assignments[(lease.job_id, lease.attempt)] = _Assignment(
            lease=lease,
            session_id=session.session_id,
            code=self.store.open_code(app.app_id),
            data=self.store.open_input(lease.job_id),
            code_size=app.size,
        )
        limits = lease.limits
        session.start_job(
            ev.JobDescription(
                job=lease.job_id,
                attempt=lease.attempt,
                kind=str(app.kind),
                code_size=app.size,
                code_sha256=app.sha256,
                input_size=lease.input_size,
                input_sha256=lease.input_sha256,
                cpu_seconds=max(1, int(limits.cpu_seconds)),
                memory_bytes=limits.memory_bytes,
                wall_seconds=max(1, int(limits.wall_seconds)),
                output_bytes=limits.output_bytes,
                disk_bytes=limits.disk_bytes,
            )
        )
        self.stats.leases += 1
        logfmt.event(
            log,
            "job_leased",
            job=lease.job_id,
            attempt=lease.attempt,
            batch=lease.batch_id,
            index=lease.index,
            agent=session.agent_id.hex()[:16],
        )
        self._flush(session)

    def _read_code(self, job: int, attempt: int, offset: int, length: int) -> bytes:
        a = self._assignments.get((job, attempt))
        if a is None:
            return b""
        out = b""
        if offset < a.code_size:
            take = min(length, a.code_size - offset)
            out = a.code.read(offset, take)
            offset, length = offset + take, length - take
        if length > 0:
            out += a.data.read(offset - a.code_size, length)
        return bytes(out)

    def _reserve_lease(self, agent_id: bytes) -> bool:
        """Count a lease ``agent_id`` is about to get; False at its cap.

        Counted before the store is asked, so concurrent _assign tasks cannot overshoot.
        Assignments count until dropped, including those of sessions that closed.
        """
        agent = agent_id.hex()
        if self._leases_held[agent] >= self.config.max_leases_per_agent:
            return False
        if agent in self._cooling:
            if time.monotonic() < self._cooling[agent]:
                return False
            del self._cooling[agent]
        self._leases_held[agent] += 1
        return True

    def _unreserve_lease(self, agent: str) -> None:
        self._leases_held[agent] -= 1
        if self._leases_held[agent] <= 0:
            del self._leases_held[agent]

    def _drop_assignment(self, job: int, attempt: int) -> None:
        a = self._assignments.pop((job, attempt), None)
        if a is not None:
            a.code.close()
            a.data.close()
            self._unreserve_lease(a.lease.agent_id)

    async def _release(self, job: int, attempt: int, reason: str) -> None:
        await self.committer.run(self._release_now, job, attempt, reason)
        self._queue_hint = True
        self._spawn(self._assign())

    def _release_now(self, job: int, attempt: int, reason: str) -> bool:
        return self.store.release_lease(job, attempt, reason, now=time.time())

    async def _record_refusal(
        self, agent_id: bytes, job: int, attempt: int, again: bool
    ) -> int | None:
        """The lease holder refused its job: requeue it without charging its budget.

        Returns the agent's refusals in the last hour, or None if it did not hold the lease.
        """
        agent, cap = agent_id.hex(), self.config.jobs.refusals_per_hour
        count = await self.committer.run(self._refuse_now, agent, job, attempt, again)
        if count is None:
            return None
        if count == cap:
            logfmt.event(
                log,
                "refusal_cap_reached",
                logging.WARNING,
                agent=agent[:16],
                refusals=count,
                cap=cap,
                window_s=int(REFUSAL_WINDOW),
                action="no leases to this agent until its refusals in the last hour fall below cap",
            )
        self._queue_hint = True
        self._spawn(self._assign())
        return count

    def _refuse_now(self, agent: str, job: int, attempt: int, again: bool) -> int | None:
        reason = "handed back by the agent" if again else "refused by the agent"
        try:
            return self.store.refuse_lease(
                job, attempt, agent, reason, now=time.time(), offer_again=again
            )
        except StoreError:
            return None  # no such attempt: nothing this agent holds

    # ---- results in ----------------------------------------------------------

    def _held_by(self, key: tuple[int, int], agent_id: bytes) -> bool:
        """True if this server handed ``key`` to ``agent_id`` (in any of its sessions)."""
        a = self._assignments.get(key)
        return a is not None and a.lease.agent_id == agent_id.hex()

    def _holder_sent(self, session_id: int, key: tuple[int, int]) -> bool:
        session = self._session(session_id)
        return session is not None and self._held_by(key, session.agent_id)

    def _on_chunk(self, e: ev.ResultChunk) -> None:
        # Per session: another agent cannot feed chunks into this upload.
        key = (e.session_id, e.job, e.attempt)
        sink = self._sinks.get(key)
        if sink is None:
            if e.offset != 0:
                return  # the rest of an upload refused at its first chunk
            refusal = self._upload_refusal(e.session_id, e.job, e.attempt, e.total)
            if refusal is not None:
                logfmt.event(
                    log,
                    "result_chunks_dropped",
                    logging.WARNING,
                    job=e.job,
                    attempt=e.attempt,
                    session=f"{e.session_id:016x}",
                    reason=refusal,
                )
                return
            sink = self._sinks[key] = ResultSink(
                self.store, self.committer, e.job, e.attempt, e.total, self._upload_budget
            )
        if not sink.feed(e.offset, e.data):
            # Past the server-wide budget: cut this upload off. Nothing was acknowledged
            # as committed, so the agent resends the spooled result on a later session.
            self._spawn(self._sinks.pop(key).abandon())
            logfmt.event(
                log,
                "upload_aborted",
                logging.WARNING,
                job=e.job,
                attempt=e.attempt,
                session=f"{e.session_id:016x}",
                in_flight=self._upload_budget.used,
            )
            self._close_session(
                e.session_id, "server busy: too many results in flight", ErrorCode.BUSY
            )

    def _upload_refusal(self, sid: int, job: int, attempt: int, total: int) -> str | None:
        """Why a result upload may not start (None: it may); checked before any buffering."""
        limit = self._sender_limit(sid, job, attempt)
        if limit is None:
            return "sender does not hold this job"
        if total > limit:
            return f"result of {total} bytes exceeds the job's limit of {limit}"
        return None

    def _sender_limit(self, sid: int, job: int, attempt: int) -> int | None:
        """The output limit of ``(job, attempt)`` if the session's agent was leased it.

        Held in this server's memory, or (after a restart, or an expired lease whose
        late result the store still takes) according to the store.
        """
        session = self._session(sid)
        if session is None:
            return None
        agent = session.agent_id.hex()
        a = self._assignments.get((job, attempt))
        if a is not None and a.lease.agent_id == agent:
            return a.lease.limits.output_bytes
        owner = self.store.attempt_owner(job, attempt)
        return owner[1] if owner is not None and owner[0] == agent else None

    async def _commit(self, e: ev.ResultComplete) -> None:
        key = (e.job, e.attempt)
        agent = e.agent_id.hex()
        if e.status == REFUSED and await self._commit_refusal(e):
            return
        sink = self._sinks.pop((e.session_id, e.job, e.attempt), None)
        if sink is None and (
            refusal := self._upload_refusal(e.session_id, e.job, e.attempt, e.total)
        ):
            await self._commit_unadmitted(e, refusal)
            return
        if self._held_by(key, e.agent_id):
            self._drop_assignment(*key)
        if sink is None:
            if e.total:  # its chunks were dropped: the agent must send them again
                self._close_session(e.session_id, "result upload was interrupted")
                return
            sink = ResultSink(self.store, self.committer, e.job, e.attempt, 0, self._upload_budget)
        try:
            output, upload = await sink.finish(e.sha256)
        except VcompError as exc:
            # Staging failed (a store problem, not the agent's): drop the session so
            # the agent resends the spooled result on its next one.
            logfmt.event(
                log,
                "result_staging_failed",
                logging.ERROR,
                job=e.job,
                attempt=e.attempt,
                reason=str(exc),
            )
            self._close_session(e.session_id, "result could not be stored")
            return
        submission = ResultSubmission(
            job_id=e.job,
            attempt=e.attempt,
            agent_id=agent,
            status=e.status or "ok",
            output=output,
            upload=upload,
            output_size=e.total,
            output_sha256=e.sha256,
            cpu_ms=e.cpu_ms,
            wall_ms=e.wall_ms,
            received_at=time.time(),
            error=e.detail,
        )
        await self._record(e, submission)

    async def _commit_unadmitted(self, e: ev.ResultComplete, refusal: str) -> None:
        """A result whose chunks were dropped: record the holder's over-limit failure, or
        refuse a result from an agent that does not hold the job (the store never sees it)."""
        if self._sender_limit(e.session_id, e.job, e.attempt) is None:
            self._refuse(e, refusal)
            return
        if self._held_by((e.job, e.attempt), e.agent_id):
            self._drop_assignment(e.job, e.attempt)
        submission = ResultSubmission(
            job_id=e.job,
            attempt=e.attempt,
            agent_id=e.agent_id.hex(),
            status="output_too_large",
            output=None,
            upload=None,
            output_size=None,
            output_sha256=None,
            cpu_ms=e.cpu_ms,
            wall_ms=e.wall_ms,
            received_at=time.time(),
            error=refusal,
        )
        await self._record(e, submission)

    async def _record(self, e: ev.ResultComplete, submission: ResultSubmission) -> None:
        key = (e.job, e.attempt)
        agent = e.agent_id.hex()
        # Lease this agent's next job in the same group commit as its result.
        prefetch = self._prefetch(e)
        outcome = await self.committer.submit_result(submission)
        logfmt.event(
            log,
            "result_recorded",
            job=e.job,
            attempt=e.attempt,
            agent=agent[:16],
            status=logfmt.peer_text(submission.status),
            outcome=str(outcome.kind),
            job_state=outcome.job_state,
            bytes=e.total,
            cpu_ms=e.cpu_ms,
        )
        if outcome.durable:
            self.stats.results_committed += 1
            self._confirm(e, [key])
        else:
            self._refuse(e, outcome.detail or str(outcome.kind))
        if prefetch is not None:
            await self._use_prefetched(e.session_id, e.agent_id, prefetch)
        if outcome.job_state is not None and str(outcome.job_state) == "queued":
            self._queue_hint = True
            self._spawn(self._assign())

    async def _commit_refusal(self, e: ev.ResultComplete) -> bool:
        """A RESULT of status ``refused``: a refusal, not a failed run, if it is the
        holder's (the store checks, so a spooled refusal resent after a server restart
        counts too). False: not this agent's live lease; record it as any result."""
        if await self._record_refusal(e.agent_id, e.job, e.attempt, again=False) is None:
            return False
        logfmt.event(
            log,
            "job_refused",
            logging.WARNING,
            job=e.job,
            attempt=e.attempt,
            message=logfmt.peer_text(e.detail),
        )
        self._drop_assignment(e.job, e.attempt)
        sink = self._sinks.pop((e.session_id, e.job, e.attempt), None)
        if sink is not None:
            await sink.abandon()
        self._confirm(e, [(e.job, e.attempt)])  # the agent may drop it from its spool
        return True

    def _prefetch(self, e: ev.ResultComplete) -> asyncio.Future[Lease | None] | None:
        session = self._session(e.session_id)
        if (
            not self._queue_hint
            or session is None
            or session.current_job != (e.job, e.attempt)
            or e.session_id in self._prefetching
            or not self._reserve_lease(e.agent_id)
        ):
            return None
        self._prefetching.add(e.session_id)
        return self._lease_for(session)

    async def _use_prefetched(
        self, sid: int, agent_id: bytes, prefetch: asyncio.Future[Lease | None]
    ) -> None:
        try:
            lease = await prefetch
        finally:
            self._prefetching.discard(sid)
        if lease is None:
            self._unreserve_lease(agent_id.hex())
            self._queue_hint = False
            return
        session = self._session(sid)
        if session is None or session.state is not ServerState.IDLE:
            self._unreserve_lease(lease.agent_id)
            await self._release(lease.job_id, lease.attempt, "agent left before START")
            return
        self._idle.discard(sid)
        self._start(session, lease)

    def _session(self, sid: int) -> ServerSession | None:
        return None if self.endpoint is None else self.endpoint.session(sid)

    def _flush(self, session: ServerSession) -> None:
        """Send what the application just queued on ``session``."""
        if self.endpoint is not None and self._adapter is not None:
            self.endpoint.touch(session.session_id)
            self._adapter.kick()

    def _refuse(self, e: ev.ResultComplete, reason: str) -> None:
        logfmt.event(
            log,
            "result_refused",
            logging.WARNING,
            job=e.job,
            attempt=e.attempt,
            reason=logfmt.peer_text(reason),
        )
        session = self._session(e.session_id)
        if session is not None:
            session.refuse_result(e.job, e.attempt, ErrorCode.HASH_MISMATCH, reason)
            self._flush(session)

    def _close_session(self, sid: int, reason: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        session = self._session(sid)
        if session is not None:
            session.close(reason, code, asyncio.get_running_loop().time())
            self._flush(session)

    def _confirm(self, e: ev.ResultComplete, entries: list[tuple[int, int]]) -> None:
        """Send the final ACK on the session the result came from, or the agent's new one."""
        session = self._session(e.session_id)
        if session is None and self.endpoint is not None:
            session = next(
                (
                    s
                    for s in self.endpoint.sessions.values()
                    if s.agent_id == e.agent_id and s.channel is not None
                ),
                None,
            )
        if session is None:
            return  # the agent resends after reconnecting; the store dedupes
        session.confirm_committed(entries, asyncio.get_running_loop().time())
        self._flush(session)

    # ---- periodic work -------------------------------------------------------

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self._tick()
            except VcompError as exc:
                logfmt.event(log, "tick_failed", logging.ERROR, error=str(exc))

    async def _tick(self) -> None:
        now = time.time()
        expired = await self.committer.run(self.store.expire_leases, now)
        for x in expired:
            self._abort_on_holder(x.job_id, x.attempt)
            self._drop_assignment(x.job_id, x.attempt)
            logfmt.event(
                log,
                "lease_expired",
                logging.WARNING,
                job=x.job_id,
                attempt=x.attempt,
                agent=x.agent_id[:16],
                job_state=x.job_state,
            )
        live = self._live_leases()
        if live:
            await self.committer.run(self._renew, live, now)
        if self._pending_clocks or self._pending_touches:
            clocks, self._pending_clocks = self._pending_clocks, {}
            touches, self._pending_touches = self._pending_touches, {}
            await self.committer.run(self._flush_agent_updates, clocks, touches)
        for agent in await self.committer.run(self.store.take_reset_requests):
            self._reset_agent(agent)
        self._load_trust()
        # New batches or requeued jobs: let idle agents ask again.
        self._queue_hint = True
        if self._idle:
            await self._assign()

    def _live_leases(self) -> list[tuple[int, int]]:
        """Leases of jobs still in their session, due for renewal (a third used up)."""
        endpoint = self.endpoint
        if endpoint is None:
            return []
        due = time.monotonic() - self.config.jobs.lease_seconds / 3
        keys = []
        for key, a in self._assignments.items():
            s = endpoint.session(a.session_id)
            if s is not None and s.current_job == key and a.renewed_at <= due:
                a.renewed_at = time.monotonic()
                keys.append(key)
        return keys

    def _renew(self, keys: list[tuple[int, int]], now: float) -> None:
        jobs = self.config.jobs
        for job, attempt in keys:
            self.store.renew_lease(
                job, attempt, now, jobs.lease_seconds, transfer_seconds=jobs.transfer_seconds
            )

    def _abort_on_holder(self, job: int, attempt: int) -> None:
        """A lapsed lease is reissued: RESET its holder's session if it still works on it.

        Renewals stop at the hard deadline (see ``renew_lease``), so this is how a holder
        that keeps its session alive but never finishes loses the job. Its agent then
        gets no lease for ``lease_seconds``, so the job goes to someone else if anyone
        is there, rather than straight back to the agent that sat on it.
        """
        a = self._assignments.get((job, attempt))
        session = None if a is None else self._session(a.session_id)
        if a is None or session is None or session.current_job != (job, attempt):
            return
        self._cooling[a.lease.agent_id] = time.monotonic() + self.config.jobs.lease_seconds
        session.reset("lease expired; the job was reissued", asyncio.get_running_loop().time())
        self._abandon_uploads(session.session_id)
        self._flush(session)
        logfmt.event(
            log,
            "holder_reset",
            logging.WARNING,
            job=job,
            attempt=attempt,
            session=f"{session.session_id:016x}",
        )

    def _abandon_uploads(self, sid: int) -> None:
        for key in [k for k in self._sinks if k[0] == sid]:
            self._spawn(self._sinks.pop(key).abandon())

    def _reset_agent(self, agent_hex: str) -> None:
        endpoint, adapter = self.endpoint, self._adapter
        if endpoint is None or adapter is None:
            return
        now = asyncio.get_running_loop().time()
        for session in list(endpoint.sessions.values()):
            if session.agent_id.hex() != agent_hex:
                continue
            job = session.current_job
            session.reset("reset requested by the operator", now)
            # The agent resends uncommitted results from offset 0 after a reset.
            self._abandon_uploads(session.session_id)
            endpoint.touch(session.session_id)
            logfmt.event(
                log,
                "reset_sent",
                session=f"{session.session_id:016x}",
                agent=agent_hex[:16],
                job=job and job[0],
            )
            if job is not None:
                self._drop_assignment(*job)
                self._spawn(self._release(job[0], job[1], "reset by the operator"))
        adapter.kick()


def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM (``vcomp-server serve``)."""
    logfmt.setup()
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
    host, port = await server.start()
    fingerprint = hashlib.sha256(
        server._signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    ).hexdigest()
    print(f"vcomp-server listening on {host}:{port} key {fingerprint}", flush=True)
    await stop.wait()
    await server.stop()

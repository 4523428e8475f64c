"""Scheduling: which idle agent gets which job, and for how long it may keep it.

:class:`Scheduler` owns the assignment table (the jobs this server handed out and
has not yet taken back). It leases through the :class:`GroupCommitter`, renews
leases whose job is still in its session, expires lapsed ones, and counts refusals.
It never sends a datagram: it asks the session glue (:class:`Sessions`) to start a
job on a session or to reset one, and it runs background work through ``spawn``,
which the server binds to its task group.

One enrolled key gets a bounded share: at most ``max_leases_per_agent`` jobs at
once, counted before the store is asked, and no lease outlives its hard deadline
(``renew_lease``). A holder that lets its lease lapse is reset and cools down for
one lease period, so the job goes to someone else first.

An agent whose lease request found nothing is not asked about again until the queue
changes (a new batch, a requeued job) or its agent declares another capacity, with
a slow refresh for what changes with time alone (refusals leaving their window).
A scan is per agent key: the capacity of its latest READY, not one per session.

Through a store outage (see :mod:`vcomp.server.outage`) nothing is leased; renewals
that could not be written are retried; releases and refusals wait for the store. When
it is back, every live lease is renewed at the next tick and expiry waits
:func:`expiry_grace` first: a lease whose deadline passed during the outage while its
agent kept working is renewed, not expired, on this server and on every other server
sharing the store (each detects the return within one probe interval, RETRY_MAX).
The hard deadline (``renew_lease``) still holds: an outage counts against it.

Every server runs expiry, so a lease held in this server's memory may have been
expired (or finished) through another server: its renewal then returns None, and the
assignment is dropped here; the agent's later result is taken as late or as evidence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from vcomp import logfmt
from vcomp.errors import StoreError, StoreUnavailable
from vcomp.protocol import events as ev
from vcomp.protocol.capacity import JobCapacity
from vcomp.protocol.server_session import ServerSession, ServerState
from vcomp.server.commit import GroupCommitter
from vcomp.server.config import ServerConfig
from vcomp.server.outage import RETRY_MAX
from vcomp.server.store import REFUSAL_WINDOW, BlobReader, Lease, Store

log = logging.getLogger("vcomp.server")

LOST_REASON = "its session ended"

Spawn = Callable[[Coroutine[Any, Any, object]], None]
"""Run a coroutine as background work of the server (its failure is logged, not raised)."""
Key = tuple[int, int]
"""(job, attempt)"""
RESCAN_SECONDS = 60.0
"""At most this long before an agent that found nothing is asked about again anyway."""
NEW_CAPACITY_SECONDS = 5.0
"""An agent that found nothing is asked about again for a new capacity at most this often
(each of its sessions may declare another one; it is one agent, not one scan each)."""
SILENT_SERVER_SECONDS = 30.0
"""A server not heard from this long (it heartbeats every 2 s) has its leases released."""
ORPHAN_GRACE_MIN = 5.0
"""An orphaned assignment is kept at least this long (and a lease) past its lease."""
TICK_SECONDS = 0.5
"""How often the server runs expiry and renewals (``OrganisationServer``'s tick)."""


def expiry_grace(lease_seconds: float) -> float:
    """Seconds expiry waits after the store comes back from an outage.

    One renewal period (a third of a lease), and at least long enough for every server
    sharing the store to notice its return (one probe interval) and renew at its next
    tick: until then, leases that lapsed during the outage may belong to agents that
    kept working."""
    return max(lease_seconds / 3, RETRY_MAX + 2 * TICK_SECONDS)


class Sessions(Protocol):
    """What scheduling needs from the session glue."""

    def session(self, sid: int) -> ServerSession | None: ...

    def start_job(self, session: ServerSession, job: ev.JobDescription) -> None:
        """Send START on ``session``."""

    def reset_session(self, session: ServerSession, reason: str) -> None:
        """RESET ``session`` and drop its half-received results."""


@dataclass
class ServerStats:
    leases: int = 0
    results_committed: int = 0
    handshakes_rejected: int = 0
    sessions_established: int = 0
    lost_released: int = 0  # leases released at once because the agent reported them lost
    lost_reports_dropped: int = 0  # JOB_LOST reports past a session's budget
    started_at: float = field(default_factory=time.monotonic)


def _resume_fields(resume: tuple[int, BlobReader] | None) -> dict[str, Any]:
    if resume is None:
        return {}
    attempt, reader = resume
    return {"resume_attempt": attempt, "resume_size": reader.size, "resume_sha256": reader.sha256}


@dataclass
class _Assignment:
    lease: Lease
    session_id: int
    code: BlobReader
    data: BlobReader
    code_size: int
    input_size: int = 0
    resume: BlobReader | None = None  # an earlier attempt's checkpoint, sent after the input
    leased_at: float = field(default_factory=time.monotonic)
    renewed_at: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.code.close()
        self.data.close()
        if self.resume is not None:
            self.resume.close()


class Scheduler:
    def __init__(
        self,
        config: ServerConfig,
        store: Store,
        committer: GroupCommitter,
        sessions: Sessions,
        spawn: Spawn,
        stats: ServerStats,
    ) -> None:
        self._config = config
        self._store = store
        self._committer = committer
        self._sessions = sessions
        self._spawn = spawn
        self._stats = stats
        self._assignments: dict[Key, _Assignment] = {}
        self._single_result: dict[int, bool] = {}  # batch -> one replica (batches never change)
        self._idle: set[int] = set()
        self._leases_held: Counter[str] = Counter()  # assignments per agent (hex id)
        self._cooling: dict[str, float] = {}  # agent -> monotonic time its cool-down ends
        # Agents whose lease request found nothing since the queue last changed, with
        # the capacity they asked with.
        self._found_nothing: dict[bytes, tuple[JobCapacity, float]] = {}
        self._asking: set[bytes] = set()  # agents with a lease request of assign in flight
        self._ask_again = False  # a session waited for one of those: assign once more
        self._newest_batch = -1
        self._rescan_at = time.monotonic() + RESCAN_SECONDS
        self._prefetching: set[int] = set()
        self._health = committer.health
        self._expire_after = 0.0  # monotonic; expiry waits until then after an outage
        self._health.on_back(self.store_back)

    def store_back(self) -> None:
        """The store answers again: renew every live lease next, expire only after the
        grace, and let idle agents ask."""
        for a in self._assignments.values():
            a.renewed_at = 0.0
        grace = expiry_grace(self._config.jobs.lease_seconds)
        self._expire_after = time.monotonic() + grace
        self.requeued()

    # ---- what the session glue tells us --------------------------------------

    def agent_idle(self, sid: int) -> None:
        session = self._sessions.session(sid)
        if session is not None:
            tried = self._found_nothing.get(session.agent_id)
            if (
                tried is not None
                and tried[0] != session.capacity
                and time.monotonic() >= tried[1] + NEW_CAPACITY_SECONDS
            ):
                del self._found_nothing[session.agent_id]  # a new capacity may fit a job
        self._idle.add(sid)
        self._spawn(self.assign())

    def session_closed(self, sid: int) -> None:
        self._idle.discard(sid)

    def delivered(self, key: Key) -> int | None:
        """Every byte of ``key`` is acknowledged: release its read snapshot.

        Returns the milliseconds since it was leased (None: not ours)."""
        a = self._assignments.get(key)
        if a is None:
            return None
        a.close()
        return int((time.monotonic() - a.leased_at) * 1000)

    def held_by(self, key: Key, agent_id: bytes) -> bool:
        """True if this server handed ``key`` to ``agent_id`` (in any of its sessions)."""
        a = self._assignments.get(key)
        return a is not None and a.lease.agent_id == agent_id.hex()

    def output_limit(self, agent_id: bytes, key: Key) -> int | None:
        """The output limit of ``key`` if ``agent_id`` was leased it.

        Held in this server's memory, or (after a restart, or an expired lease whose
        late result the store still takes) according to the store.
        """
        agent = agent_id.hex()
        a = self._assignments.get(key)
        if a is not None and a.lease.agent_id == agent:
            return a.lease.limits.output_bytes
        owner = self._store.attempt_owner(*key)
        return owner[1] if owner is not None and owner[0] == agent else None

    def drop(self, key: Key) -> None:
        """Forget ``key``: its result came in, or it was refused or taken back."""
        a = self._assignments.pop(key, None)
        if a is not None:
            a.close()
            self._unreserve_lease(a.lease.agent_id)

    def take_back(self, key: Key, reason: str) -> None:
        """Requeue ``key`` now (its holder was reset by the operator)."""
        self.drop(key)
        self._spawn(self._release(key, reason))

    def hand_back(
        self, agent_id: bytes, key: Key, again: bool, *, reason: str | None = None
    ) -> None:
        """The holder refused ``key`` (``again``: a shutdown, it may be offered again);
        ``reason`` replaces the attempt's default "refused by the agent"."""
        self.drop(key)
        self._spawn(self.record_refusal(agent_id, key, again, reason=reason))

    def release_lost(self, agent_id: bytes, key: Key) -> None:
        """``agent_id`` reports that the session holding ``key`` ended and the job stopped.

        Released at once if the store says the attempt is leased to this very agent;
        not a refusal (the agent did not choose it). Anything else is ignored. The old
        session may still look alive here (its idle timeout has not fired yet): the
        agent knows better, it stopped the job.
        """
        a = self._assignments.get(key)
        if a is not None and a.lease.agent_id != agent_id.hex():
            return  # another agent's job, known without asking the store
        self._spawn(self._release_lost(agent_id.hex(), key))

    async def _release_lost(self, agent: str, key: Key) -> None:
        released = await self._committer.run(self._release_lost_now, agent, key)
        if not released:
            return
        self.drop(key)
        self._stats.lost_released += 1
        logfmt.event(log, "lease_released", job=key[0], attempt=key[1], agent=agent[:16])
        self.requeued()

    def _release_lost_now(self, agent: str, key: Key) -> bool:
        # Attempts are never reused, so an attempt owned by this agent and still leased
        # (release_lease checks) is the very lease the report is about.
        owner = self._store.attempt_owner(*key)
        if owner is None or owner[0] != agent:
            return False
        return self._store.release_lease(*key, LOST_REASON, now=time.time())

    def requeued(self) -> None:
        """A job went back to the queue: let idle agents ask again."""
        self._found_nothing.clear()
        self._spawn(self.assign())

    def read_code(self, job: int, attempt: int, offset: int, length: int) -> bytes:
        """The endpoint's ``CodeSource``: a slice of code || input of a leased job."""
        a = self._assignments.get((job, attempt))
        if a is None:
            return b""
        out = b""
        try:
            if offset < a.code_size:
                take = min(length, a.code_size - offset)
                out = a.code.read(offset, take)
                offset, length = offset + take, length - take
            input_end = a.code_size + a.input_size
            if length > 0 and offset < input_end:
                take = min(length, input_end - offset)
                out += a.data.read(offset - a.code_size, take)
                offset, length = offset + take, length - take
            if length > 0 and a.resume is not None:
                out += a.resume.read(offset - input_end, length)
        except StoreUnavailable as exc:
            # A backend whose reads fail in an outage (SQLite's do not): the endpoint
            # closes this one session (short code) rather than the error escaping it.
            self._health.lost(exc)
            return b""
        return bytes(out)

    # ---- jobs out ------------------------------------------------------------

    async def assign(self) -> None:
        # A None lease is about one agent (distinct-agent replicas, its capacity, its
        # refusals, its attempts of the job), not the queue: other agents still ask.
        for sid in list(self._idle):
            if not self._health.available:
                return  # no lease attempts while the store is away; store_back resumes
            if sid not in self._idle or sid in self._prefetching:
                continue  # taken by another assign task, or its next job is on the way
            session = self._sessions.session(sid)
            if session is None or session.state is not ServerState.IDLE:
                self._idle.discard(sid)
                continue
            agent = session.agent_id
            if agent in self._found_nothing:
                continue  # nothing for this agent until the queue changes
            if agent in self._asking:
                self._ask_again = True  # one request per agent at a time, not per session
                continue
            if not self._reserve_lease(agent):
                continue  # it holds its share of the queue; a finished job frees a slot
            self._idle.discard(sid)
            self._asking.add(agent)
            try:
                lease = await self._lease_for(session)
            except StoreUnavailable:
                self._unreserve_lease(agent.hex())
                self._idle.add(sid)
                return  # logged once by the store's health; store_back asks again
            finally:
                self._asking.discard(agent)
                if self._ask_again:
                    self._ask_again = False
                    self._spawn(self.assign())
            if lease is None:
                self._unreserve_lease(session.agent_id.hex())
                self._nothing_for(session)
                self._idle.add(sid)
                continue
            await self._start_or_release(sid, lease)

    def _nothing_for(self, session: ServerSession) -> None:
        self._found_nothing[session.agent_id] = (session.capacity, time.monotonic())

    def prefetch(self, session: ServerSession, key: Key) -> asyncio.Future[Lease | None] | None:
        """Lease the next job of the agent whose result ``key`` is being recorded, so
        both go in one group commit; hand the future to :meth:`use_prefetched`."""
        sid = session.session_id
        if (
            not self._health.available
            or session.agent_id in self._found_nothing
            or session.current_job != key
            or sid in self._prefetching
            or not self._reserve_lease(session.agent_id)
        ):
            return None
        self._prefetching.add(sid)
        return self._lease_for(session)

    async def use_prefetched(
        self, sid: int, agent_id: bytes, prefetch: asyncio.Future[Lease | None]
    ) -> None:
        try:
            lease = await prefetch
        except StoreUnavailable:
            self._unreserve_lease(agent_id.hex())
            return  # the session asks again (READY), or store_back offers to it
        except BaseException:
            self._unreserve_lease(agent_id.hex())
            raise
        finally:
            self._prefetching.discard(sid)
        if lease is None:
            self._unreserve_lease(agent_id.hex())
            session = self._sessions.session(sid)
            if session is not None:
                self._nothing_for(session)
            return
        await self._start_or_release(sid, lease)

    def _lease_for(self, session: ServerSession) -> asyncio.Future[Lease | None]:
        """A lease of a job within the session's declared capacity (or None).

        A future, started now: a prefetch must reach the committer before the result
        it rides with. Its caller always awaits it."""
        return asyncio.ensure_future(
            self._committer.lease(
                session.agent_id.hex(),
                time.time(),
                self._config.jobs.lease_seconds,
                capacity=session.capacity,
                refusal_cap=self._config.jobs.refusals_per_hour,
            )
        )

    async def _start_or_release(self, sid: int, lease: Lease) -> None:
        session = self._sessions.session(sid)
        if session is None or session.state is not ServerState.IDLE:
            # The agent vanished while we leased: hand the job straight back.
            self._unreserve_lease(lease.agent_id)
            await self._release_unstarted(lease, "agent left before START")
            return
        self._idle.discard(sid)
        try:
            self._start(session, lease)
        except StoreUnavailable as exc:
            # The job's code or input could not be opened: hand the lease back.
            self._health.lost(exc)
            self._unreserve_lease(lease.agent_id)
            self._idle.add(sid)
            await self._release_unstarted(lease, "store unavailable at START")

    async def _release_unstarted(self, lease: Lease, reason: str) -> None:
        """Release a lease whose START was never sent. Its attempt number is used up
        (the next lease takes the next one), so the log says which and why."""
        await self._release((lease.job_id, lease.attempt), reason)
        logfmt.event(
            log,
            "lease_unstarted",
            job=lease.job_id,
            attempt=lease.attempt,
            agent=lease.agent_id[:16],
            reason=reason,
        )

    def _start(self, session: ServerSession, lease: Lease) -> None:
        app = lease.app
        # Store reads first: one that fails leaves no assignment behind.
        uploads = self._uploads_checkpoints(lease)
        resume = self._resume_state(lease, session) if uploads else None
        try:
            code, data = self._store.open_code(app.app_id), self._store.open_input(lease.job_id)
        except BaseException:
            if resume is not None:
                resume[1].close()
            raise
        self._assignments[(lease.job_id, lease.attempt)] = _Assignment(
            lease=lease,
            session_id=session.session_id,
            code=code,
            data=data,
            code_size=app.size,
            input_size=lease.input_size,
            resume=None if resume is None else resume[1],
        )
        limits, jobs = lease.limits, self._config.jobs
        job = ev.JobDescription(
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
            checkpoint_bytes=jobs.checkpoint_bytes if uploads else 0,
            **_resume_fields(resume),
        )
        self._stats.leases += 1
        logfmt.event(
            log,
            "job_leased",
            job=lease.job_id,
            attempt=lease.attempt,
            batch=lease.batch_id,
            index=lease.index,
            agent=session.agent_id.hex()[:16],
        )
        self._sessions.start_job(session, job)

    def _uploads_checkpoints(self, lease: Lease) -> bool:
        """Whether this job's attempts upload checkpoints and resume from them.

        Only for jobs with one replica: a replica resumed from another agent's state
        would not be an independent result (one hostile agent could make two replicas
        agree on its answer), and replicas running side by side would overwrite each
        other's checkpoints.
        """
        if not self._config.jobs.upload_checkpoints:
            return False
        single = self._single_result.get(lease.batch_id)
        if single is None:
            if len(self._single_result) >= 4096:
                self._single_result.clear()
            single = self._store.get_batch(lease.batch_id).replicas == 1
            self._single_result[lease.batch_id] = single
        return single

    def _resume_state(self, lease: Lease, session: ServerSession) -> tuple[int, BlobReader] | None:
        """An earlier attempt's uploaded checkpoint to send after the input, if any fits."""
        if lease.attempt <= 1:
            return None
        try:
            stored = self._store.open_checkpoint(lease.job_id)
        except StoreUnavailable:
            raise
        except StoreError as exc:  # the job still runs, from the start
            logfmt.event(
                log, "checkpoint_unreadable", logging.ERROR, job=lease.job_id, error=str(exc)
            )
            return None
        if stored is None:
            return None
        attempt, reader = stored
        total = lease.app.size + lease.input_size + reader.size
        if attempt >= lease.attempt or total > session.capacity.job_bytes:
            # The agent would refuse a job that large: better a fresh start than none.
            reader.close()
            return None
        logfmt.event(
            log,
            "job_resumes_from_upload",
            job=lease.job_id,
            attempt=lease.attempt,
            from_attempt=attempt,
            state_bytes=reader.size,
        )
        return attempt, reader

    def _reserve_lease(self, agent_id: bytes) -> bool:
        """Count a lease ``agent_id`` is about to get; False at its cap.

        Counted before the store is asked, so concurrent assign tasks cannot overshoot.
        Assignments count until dropped, including those of sessions that closed.
        """
        agent = agent_id.hex()
        if self._leases_held[agent] >= self._config.max_leases_per_agent:
            return False
        if agent in self._cooling:
            if time.monotonic() < self._cooling[agent]:
                return False
            del self._cooling[agent]
        self._leases_held[agent] += 1
        return True

    def leases_held(self, agent: str) -> int:
        """Assignments (and lease requests in flight) counted against ``agent``'s cap."""
        return self._leases_held[agent]

    def _unreserve_lease(self, agent: str) -> None:
        self._leases_held[agent] -= 1
        if self._leases_held[agent] <= 0:
            del self._leases_held[agent]

    async def _release(self, key: Key, reason: str) -> None:
        await self._committer.run_retrying(self._release_now, key, reason)
        self.requeued()

    def _release_now(self, key: Key, reason: str) -> bool:
        return self._store.release_lease(*key, reason, now=time.time())

    async def record_refusal(
        self, agent_id: bytes, key: Key, again: bool, *, reason: str | None = None
    ) -> int | None:
        """The lease holder refused its job: requeue it without charging its budget.

        Returns the agent's refusals in the last hour, or None if it did not hold the lease.
        """
        agent, cap = agent_id.hex(), self._config.jobs.refusals_per_hour
        count = await self._committer.run_retrying(self._refuse_now, agent, key, again, reason)
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
        self.requeued()
        return count

    def _refuse_now(self, agent: str, key: Key, again: bool, reason: str | None) -> int | None:
        if reason is None:
            reason = "handed back by the agent" if again else "refused by the agent"
        try:
            return self._store.refuse_lease(*key, agent, reason, now=time.time(), offer_again=again)
        except StoreError:
            return None  # no such attempt: nothing this agent holds

    # ---- periodic work -------------------------------------------------------

    async def expire_and_renew(self, now: float) -> None:
        """Renew live leases, then requeue lapsed ones (resetting holders still on them).

        Renewals go first, so a lease that lapsed while its renewal could not be written
        is renewed rather than expired; expiry waits the grace after an outage."""
        live = self._live_leases()
        if live:
            try:
                gone = await self._committer.run(self._renew, live, now)
            except StoreUnavailable:
                for key in live:  # not written: due again at the next tick
                    if (a := self._assignments.get(key)) is not None:
                        a.renewed_at = 0.0
                raise
            for key in gone:
                self._lease_gone(key)
        if time.monotonic() < self._expire_after:
            return
        self._forget_orphans()
        expired = await self._committer.run(self._store.expire_leases, now)
        if expired:
            self._found_nothing.clear()  # their jobs are queued again
        # Leases of a server that fell silent: their START may never have reached the
        # agent, which then has nothing to hand back (JOB_LOST) when it moves on.
        orphans = await self._committer.run(
            self._store.release_orphaned_leases, now, now - SILENT_SERVER_SECONDS
        )
        for x in orphans:
            self.drop((x.job_id, x.attempt))
            logfmt.event(
                log,
                "lease_orphaned",
                logging.WARNING,
                job=x.job_id,
                attempt=x.attempt,
                agent=x.agent_id[:16],
            )
        if orphans:
            self._found_nothing.clear()
            self.requeued()
        for x in expired:
            self._abort_on_holder((x.job_id, x.attempt))
            self.drop((x.job_id, x.attempt))
            logfmt.event(
                log,
                "lease_expired",
                logging.WARNING,
                job=x.job_id,
                attempt=x.attempt,
                agent=x.agent_id[:16],
                job_state=x.job_state,
            )

    async def offer(self) -> None:
        """Let idle agents ask again if a new batch came (or it is time to anyway)."""
        newest = await self._committer.run(self._store.newest_batch_id)
        if newest != self._newest_batch or time.monotonic() >= self._rescan_at:
            self._newest_batch = newest
            self._rescan_at = time.monotonic() + RESCAN_SECONDS
            self._found_nothing.clear()
        if self._idle:
            await self.assign()

    def _forget_orphans(self) -> None:
        """Drop assignments whose session is gone and whose lease ran out a grace ago.

        This server's expiry drops those it expires; these were settled elsewhere (a
        result resent to another server, a JOB_LOST there, another server's expiry)
        and would otherwise count against ``max_leases_per_agent`` for good. A result
        that still comes here is judged by the store, not by this memory."""
        lease = self._config.jobs.lease_seconds
        cutoff = time.monotonic() - lease - max(lease, ORPHAN_GRACE_MIN)
        for key, a in list(self._assignments.items()):
            if a.renewed_at < cutoff and self._sessions.session(a.session_id) is None:
                self.drop(key)
                logfmt.event(log, "lease_forgotten", job=key[0], attempt=key[1])

    def _live_leases(self) -> list[Key]:
        """Leases of jobs still in their session, due for renewal (a third used up)."""
        due = time.monotonic() - self._config.jobs.lease_seconds / 3
        keys = []
        for key, a in self._assignments.items():
            s = self._sessions.session(a.session_id)
            if s is not None and s.current_job == key and a.renewed_at <= due:
                a.renewed_at = time.monotonic()
                keys.append(key)
        return keys

    def _renew(self, keys: list[Key], now: float) -> list[Key]:
        """Renew ``keys`` (on the store thread); returns those no longer leased."""
        jobs = self._config.jobs
        gone = []
        for job, attempt in keys:
            deadline = self._store.renew_lease(
                job, attempt, now, jobs.lease_seconds, transfer_seconds=jobs.transfer_seconds
            )
            if deadline is None:
                gone.append((job, attempt))
        return gone

    def _lease_gone(self, key: Key) -> None:
        """The store no longer has ``key`` leased (another server expired it, or its job
        is finished): forget it here. Its holder may still send the result, which the
        store takes as late or as evidence; the job is not this server's to reset."""
        if key not in self._assignments:
            return
        self.drop(key)
        logfmt.event(log, "lease_gone", job=key[0], attempt=key[1])

    def _abort_on_holder(self, key: Key) -> None:
        """A lapsed lease is reissued: RESET its holder's session if it still works on it.

        Renewals stop at the hard deadline (see ``renew_lease``), so this is how a holder
        that keeps its session alive but never finishes loses the job. Its agent then
        gets no lease for ``lease_seconds``, so the job goes to someone else if anyone
        is there, rather than straight back to the agent that sat on it.
        """
        a = self._assignments.get(key)
        session = None if a is None else self._sessions.session(a.session_id)
        if a is None or session is None or session.current_job != key:
            return
        self._cooling[a.lease.agent_id] = time.monotonic() + self._config.jobs.lease_seconds
        self._sessions.reset_session(session, "lease expired; the job was reissued")
        logfmt.event(
            log,
            "holder_reset",
            logging.WARNING,
            job=key[0],
            attempt=key[1],
            session=f"{session.session_id:016x}",
        )

"""Result intake: RESULT chunks in, committed results out, the final ACK last.

:class:`ResultIntake` buffers an upload only for the agent that holds the job,
within the job's output limit and the server-wide :class:`UploadBudget`, and
checks that before the first byte is kept. It sends the final ACK only after the
result's transaction has committed; anything else (a refusal, a closed session)
leaves the agent's spooled copy in place, so the result is never lost.

A result whose commit fails because the store is unavailable is kept here and
committed again once the store is back, then ACKed. The agent does not resend a result
on a live session (only after a new session or a RESET), so leaving it unACKed would
strand it until the session ends; closing or resetting the session instead would cost
the agent its running job. Repeating the commit is safe: results are idempotent on
``(job, attempt)``, so a first try that did commit (its answer lost) is not doubled.
A held result stays charged to the upload budget; one that does not fit closes its
session as BUSY, as an upload over the budget does, and the agent resends it later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from vcomp import logfmt
from vcomp.errors import StoreUnavailable, VcompError
from vcomp.protocol import events as ev
from vcomp.protocol.messages import ErrorCode
from vcomp.protocol.server_session import ServerSession
from vcomp.server.commit import GroupCommitter
from vcomp.server.results import ResultSink, UploadBudget
from vcomp.server.scheduler import Key, Scheduler, ServerStats, Spawn
from vcomp.server.store import RecordOutcome, ResultSubmission, Store, UploadHandle

log = logging.getLogger("vcomp.server")

REFUSED = "refused"
"""The RESULT status an agent sends for a job above its limits (vcomp.agent.runtime)."""

UNHELD_RESULTS_ALLOWED = 3
"""Results (or first chunks) for attempts the sender never held that one session may
send, each refused with a WARNING line; the next closes it as a protocol violation.
An honest agent sends none (its spooled results are of attempts it was leased)."""
NOT_HELD = "sender does not hold this job"
STORE_AWAY = "job store unavailable"
"""Who holds the job could not be read (a lease not in this server's memory, asked of a
store that is away): the session is closed as BUSY, and the agent resends later."""


class Replies(Protocol):
    """What result intake needs from the session glue."""

    def session(self, sid: int) -> ServerSession | None: ...

    def live_session_of(self, agent_id: bytes) -> ServerSession | None:
        """A session of ``agent_id`` that can still carry an ACK."""

    def send(self, session: ServerSession) -> None:
        """Send what was just queued on ``session``."""

    def close_session(
        self, sid: int, reason: str, code: ErrorCode = ErrorCode.INTERNAL
    ) -> None: ...


class ResultIntake:
    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        scheduler: Scheduler,
        replies: Replies,
        spawn: Spawn,
        stats: ServerStats,
        upload_memory_bytes: int,
    ) -> None:
        self._store = store
        self._committer = committer
        self._scheduler = scheduler
        self._replies = replies
        self._spawn = spawn
        self._stats = stats
        self.budget = UploadBudget(upload_memory_bytes)
        self._sinks: dict[tuple[int, int, int], ResultSink] = {}  # (session, job, attempt)
        # Per session: attempts found not to be the sender's (so the store is asked
        # once each), and how many results for them it sent. Bounded: the session is
        # closed after UNHELD_RESULTS_ALLOWED of them.
        self._unheld: dict[int, set[Key]] = {}
        self._reported: dict[int, set[Key]] = {}

    def abandon(self, sid: int) -> None:
        """Drop the half-received results of session ``sid`` (the agent resends them)."""
        for key in [k for k in self._sinks if k[0] == sid]:
            self._drop(key)
        self._unheld.pop(sid, None)
        self._reported.pop(sid, None)

    def _unheld_result(self, sid: int, key: Key) -> bool:
        """Count a result for an attempt session ``sid`` never held. True: log it (one of
        the first few); past them, close the session once, with one summary line."""
        reported = self._reported.setdefault(sid, set())
        if key in reported:
            return False  # its chunks and its RESULT are one result; logged once
        reported.add(key)
        count = len(reported)
        if count <= UNHELD_RESULTS_ALLOWED:
            return True
        if count == UNHELD_RESULTS_ALLOWED + 1:
            logfmt.event(
                log,
                "unheld_results",
                logging.WARNING,
                session=f"{sid:016x}",
                count=count,
                job=key[0],
                attempt=key[1],
            )
            self._replies.close_session(
                sid, "results for jobs this agent does not hold", ErrorCode.PROTOCOL_VIOLATION
            )
        return False

    # ---- chunks --------------------------------------------------------------

    def on_chunk(self, e: ev.ResultChunk) -> None:
        # Per session: another agent cannot feed chunks into this upload.
        key = (e.session_id, e.job, e.attempt)
        sink = self._sinks.get(key)
        if sink is None:
            if e.offset != 0:
                return  # the rest of an upload refused at its first chunk
            refusal = self._upload_refusal(e.session_id, (e.job, e.attempt), e.total)
            if refusal is not None:
                if refusal == STORE_AWAY:
                    return
                if refusal == NOT_HELD and not self._log_unheld(e.session_id, (e.job, e.attempt)):
                    return
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
            sink = self._sinks[key] = self._sink(e.job, e.attempt, e.total)
        if not sink.feed(e.offset, e.data):
            # Past the server-wide budget: cut this upload off. Nothing was acknowledged
            # as committed, so the agent resends the spooled result on a later session.
            self._drop(key)
            logfmt.event(
                log,
                "upload_aborted",
                logging.WARNING,
                job=e.job,
                attempt=e.attempt,
                session=f"{e.session_id:016x}",
                in_flight=self.budget.used,
            )
            self._replies.close_session(
                e.session_id, "server busy: too many results in flight", ErrorCode.BUSY
            )

    def _drop(self, key: tuple[int, int, int]) -> None:
        sink = self._sinks.pop(key)
        sink.drop_buffer()  # at once: the abandon task runs only after this batch
        self._spawn(sink.abandon())

    def _sink(self, job: int, attempt: int, total: int) -> ResultSink:
        return ResultSink(self._store, self._committer, job, attempt, total, self.budget)

    def _upload_refusal(self, sid: int, key: Key, total: int) -> str | None:
        """Why a result upload may not start (None: it may); checked before any buffering."""
        try:
            limit = self._sender_limit(sid, key)
        except StoreUnavailable as exc:
            self._committer.health.lost(exc)
            self._replies.close_session(sid, f"busy: {STORE_AWAY}", ErrorCode.BUSY)
            return STORE_AWAY
        if limit is None:
            return NOT_HELD
        if total > limit:
            return f"result of {total} bytes exceeds the job's limit of {limit}"
        return None

    def _sender_limit(self, sid: int, key: Key) -> int | None:
        session = self._replies.session(sid)
        if session is None or key in self._unheld.get(sid, ()):
            return None
        limit = self._scheduler.output_limit(session.agent_id, key)
        if limit is None:
            self._unheld.setdefault(sid, set()).add(key)
        return limit

    def _log_unheld(self, sid: int, key: Key) -> bool:
        """A result for ``key`` the sender does not hold: False if it is not to be logged
        (the session is gone, or past its allowance and closed)."""
        if self._replies.session(sid) is None:
            return False  # the session closed meanwhile: nothing to refuse it on
        return self._unheld_result(sid, key)

    # ---- complete results ----------------------------------------------------

    async def commit(self, e: ev.ResultComplete) -> None:
        key = (e.job, e.attempt)
        if e.status == REFUSED and await self._commit_refusal(e):
            return
        sink = self._sinks.pop((e.session_id, e.job, e.attempt), None)
        if sink is None and (refusal := self._upload_refusal(e.session_id, key, e.total)):
            if refusal != STORE_AWAY:
                await self._commit_unadmitted(e, refusal)
            return
        if self._scheduler.held_by(key, e.agent_id):
            self._scheduler.drop(key)
        if sink is None:
            if e.total:  # its chunks were dropped: the agent must send them again
                self._replies.close_session(e.session_id, "result upload was interrupted")
                return
            sink = self._sink(e.job, e.attempt, 0)
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
            self._replies.close_session(e.session_id, "result could not be stored")
            return
        submission = self._submission(
            e, status=e.status or "ok", error=e.detail, output=output, upload=upload
        )
        await self._record(e, submission)

    async def _commit_unadmitted(self, e: ev.ResultComplete, refusal: str) -> None:
        """A result whose chunks were dropped: record the holder's over-limit failure, or
        refuse a result from an agent that does not hold the job (the store never sees it)."""
        key = (e.job, e.attempt)
        if self._sender_limit(e.session_id, key) is None:
            if self._log_unheld(e.session_id, key):
                self._refuse(e, refusal)
            return
        if self._scheduler.held_by(key, e.agent_id):
            self._scheduler.drop(key)
        submission = self._submission(e, status="output_too_large", error=refusal, received=False)
        await self._record(e, submission)

    @staticmethod
    def _submission(
        e: ev.ResultComplete,
        *,
        status: str,
        error: str,
        output: bytes | None = None,
        upload: UploadHandle | None = None,
        received: bool = True,
    ) -> ResultSubmission:
        """``received``: the bytes were taken (else their size and hash mean nothing)."""
        return ResultSubmission(
            job_id=e.job,
            attempt=e.attempt,
            agent_id=e.agent_id.hex(),
            status=status,
            output=output,
            upload=upload,
            output_size=e.total if received else None,
            output_sha256=e.sha256 if received else None,
            cpu_ms=e.cpu_ms,
            wall_ms=e.wall_ms,
            received_at=time.time(),
            error=error,
        )

    async def _record(self, e: ev.ResultComplete, submission: ResultSubmission) -> None:
        key = (e.job, e.attempt)
        agent = e.agent_id.hex()
        # Lease this agent's next job in the same group commit as its result.
        session = self._replies.session(e.session_id)
        prefetch = None if session is None else self._scheduler.prefetch(session, key)
        try:
            outcome = await self._commit_through_outage(submission)
            if outcome is None:
                self._replies.close_session(
                    e.session_id, "server busy: too many results in flight", ErrorCode.BUSY
                )
                return
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
                self._stats.results_committed += 1
                self._confirm(e, [key])
            else:
                self._refuse(e, outcome.detail or str(outcome.kind))
        finally:
            # Always awaited, so a failed commit does not strand the prefetched lease.
            if prefetch is not None:
                await self._scheduler.use_prefetched(e.session_id, e.agent_id, prefetch)
        if outcome.job_state is not None and str(outcome.job_state) == "queued":
            self._scheduler.requeued()

    async def _commit_through_outage(self, submission: ResultSubmission) -> RecordOutcome | None:
        """Commit ``submission``, holding it through a store outage (None: the upload
        budget cannot hold it meanwhile; nothing was ACKed)."""
        health, held = self._committer.health, 0
        try:
            while True:
                if health.available:  # while it is away, the probe alone asks the store
                    try:
                        return await self._committer.submit_result(submission)
                    except StoreUnavailable:
                        pass
                if not held:
                    held = max(1, len(submission.output or b""))
                    if not self.budget.take(held):
                        held = 0
                        return None
                await health.wait_back()
        finally:
            if held:
                self.budget.give(held)

    async def _commit_refusal(self, e: ev.ResultComplete) -> bool:
        """A RESULT of status ``refused``: a refusal, not a failed run, if it is the
        holder's (the store checks, so a spooled refusal resent after a server restart
        counts too). False: not this agent's live lease; record it as any result."""
        key = (e.job, e.attempt)
        if await self._scheduler.record_refusal(e.agent_id, key, again=False) is None:
            return False
        logfmt.event(
            log,
            "job_refused",
            logging.WARNING,
            job=e.job,
            attempt=e.attempt,
            message=logfmt.peer_text(e.detail),
        )
        self._scheduler.drop(key)
        sink = self._sinks.pop((e.session_id, e.job, e.attempt), None)
        if sink is not None:
            await sink.abandon()
        self._confirm(e, [key])  # the agent may drop it from its spool
        return True

    # ---- replies -------------------------------------------------------------

    def _refuse(self, e: ev.ResultComplete, reason: str) -> None:
        logfmt.event(
            log,
            "result_refused",
            logging.WARNING,
            job=e.job,
            attempt=e.attempt,
            reason=logfmt.peer_text(reason),
        )
        session = self._replies.session(e.session_id)
        if session is not None:
            session.refuse_result(e.job, e.attempt, ErrorCode.HASH_MISMATCH, reason)
            self._replies.send(session)

    def _confirm(self, e: ev.ResultComplete, entries: list[Key]) -> None:
        """Send the final ACK on the session the result came from, or the agent's new one."""
        session = self._replies.session(e.session_id) or self._replies.live_session_of(e.agent_id)
        if session is None:
            return  # the agent resends after reconnecting; the store dedupes
        session.confirm_committed(entries, asyncio.get_running_loop().time())
        self._replies.send(session)

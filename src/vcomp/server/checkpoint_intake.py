"""Checkpoints agents upload (``[jobs] upload_checkpoints``): assembled in memory within
one server-wide budget, then kept in the store for the job's next attempt.

A checkpoint is a convenience, never accepted work: one that does not fit the budget,
or whose lease has ended by the time it is complete, is dropped with a log line and
the job simply resumes from an older state (or from the start). The protocol session
has already checked order, bounds and the SHA-256; the store checks that the uploader
still holds the live lease.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from vcomp import logfmt
from vcomp.errors import StoreError, StoreUnavailable
from vcomp.protocol import events as ev
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import Store

log = logging.getLogger("vcomp.server")

MEMORY_BUDGET = 64 * 1024 * 1024
"""Bytes of checkpoints being assembled, over every session together."""
SAVE_INTERVAL = 5.0
"""Seconds between two saves of one attempt's checkpoints (agents upload every 10 s)."""

_Attempt = tuple[int, int]  # job, attempt


class _Part:
    """The checkpoint a session is uploading: the protocol sends one at a time."""

    __slots__ = ("attempt", "data", "dropped")

    def __init__(self, attempt: _Attempt) -> None:
        self.attempt = attempt
        self.data = bytearray()
        self.dropped = False  # over the budget: ignored until the next one starts


class CheckpointIntake:
    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        spawn: Callable[[Coroutine[Any, Any, object]], None],
        *,
        max_bytes: int,
        budget: int = MEMORY_BUDGET,
    ) -> None:
        self._store = store
        self._committer = committer
        self._spawn = spawn
        self._max_bytes = max_bytes
        self._budget = budget
        self._held = 0
        self._parts: dict[int, _Part] = {}  # by session
        self._saved_at: dict[_Attempt, float] = {}  # monotonic time of the last save
        self.saved = 0
        self.dropped = 0

    @property
    def held_bytes(self) -> int:
        return self._held

    def on_chunk(self, e: ev.CheckpointChunk) -> None:
        attempt = (e.job, e.attempt)
        part = self._parts.get(e.session_id)
        if e.offset == 0 or part is None or part.attempt != attempt:
            # A new checkpoint replaces whatever this session left unfinished.
            self.abandon(e.session_id)
            part = self._parts[e.session_id] = _Part(attempt)
        if part.dropped:
            return
        if self._held + len(e.data) > self._budget:
            self._held -= len(part.data)
            part.data, part.dropped = bytearray(), True
            self.dropped += 1
            logfmt.event(
                log,
                "checkpoint_dropped",
                logging.WARNING,
                job=e.job,
                attempt=e.attempt,
                reason="server checkpoint memory budget",
            )
            return
        part.data += e.data
        self._held += len(e.data)

    def on_complete(self, e: ev.CheckpointComplete) -> None:
        attempt = (e.job, e.attempt)
        part = self._parts.get(e.session_id)
        if part is None or part.attempt != attempt:
            if e.total:
                return  # its chunks went to a checkpoint already dropped
            part = _Part(attempt)  # an empty checkpoint is its fin alone
        self.abandon(e.session_id)
        if part.dropped or len(part.data) != e.total:
            return
        now = time.monotonic()
        if now < self._saved_at.get(attempt, -SAVE_INTERVAL) + SAVE_INTERVAL:
            self.dropped += 1  # faster than any honest agent uploads: a store write saved
            return
        if len(self._saved_at) >= 65536:
            self._saved_at = {k: t for k, t in self._saved_at.items() if now < t + SAVE_INTERVAL}
        self._saved_at[attempt] = now
        self._spawn(self._save(e, bytes(part.data)))

    def abandon(self, sid: int) -> None:
        """The session closed, or started another checkpoint: its unfinished one goes."""
        part = self._parts.pop(sid, None)
        if part is not None:
            self._held -= len(part.data)

    async def _save(self, e: ev.CheckpointComplete, data: bytes) -> None:
        try:
            await self._committer.run(
                functools.partial(self._store.save_checkpoint, max_bytes=self._max_bytes),
                e.job,
                e.attempt,
                e.agent_id.hex(),
                data,
            )
        except StoreUnavailable:
            return  # the agent uploads a newer one later
        except StoreError as exc:
            self.dropped += 1
            logfmt.event(
                log,
                "checkpoint_refused",
                logging.WARNING,
                job=e.job,
                attempt=e.attempt,
                agent=e.agent_id.hex()[:16],
                error=str(exc),
            )
            return
        self.saved += 1
        logfmt.event(log, "checkpoint_saved", job=e.job, attempt=e.attempt, state_bytes=len(data))

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

_Key = tuple[int, int, int]  # session, job, attempt


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
        self._parts: dict[_Key, bytearray] = {}
        self._dropped: set[_Key] = set()  # over the budget: ignored until complete
        self.saved = 0
        self.dropped = 0

    @property
    def held_bytes(self) -> int:
        return self._held

    def on_chunk(self, e: ev.CheckpointChunk) -> None:
        key = (e.session_id, e.job, e.attempt)
        if e.offset == 0:
            self._forget(key)  # a new checkpoint replaces one cut off mid-way
        if key in self._dropped:
            return
        if self._held + len(e.data) > self._budget:
            self._forget(key)
            self._dropped.add(key)
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
        part = self._parts.setdefault(key, bytearray())
        part += e.data
        self._held += len(e.data)

    def on_complete(self, e: ev.CheckpointComplete) -> None:
        key = (e.session_id, e.job, e.attempt)
        if key in self._dropped:
            self._dropped.discard(key)
            return
        data = bytes(self._forget(key))
        if len(data) != e.total:
            return  # its first chunks went to a session state we already dropped
        self._spawn(self._save(e, data))

    def abandon(self, sid: int) -> None:
        """The session closed: its half-uploaded checkpoints go."""
        for key in [k for k in self._parts if k[0] == sid]:
            self._forget(key)
        self._dropped = {k for k in self._dropped if k[0] != sid}

    def _forget(self, key: _Key) -> bytearray:
        part = self._parts.pop(key, bytearray())
        self._held -= len(part)
        return part

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

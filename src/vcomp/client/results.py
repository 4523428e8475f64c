"""Following a batch's results stream through drops: every final job once, none lost.

``GET /api/v1/batches/{id}/results?follow=true`` sends one line per job that is
final, old ones first, then each new one, and ends when every job is final. When
the stream breaks (connection lost, server restarting, a 503 from the store), the
follower connects again: the server replays every final job, and the follower
skips the ones it already yielded. A job is yielded again only if it changed (a
failed job that a retry ran again). A stream that ends cleanly before every job was
seen is checked against the batch's status and followed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable

from vcomp.client.api import RETRYABLE_STATUS, ApiSession, StreamDropped, segment
from vcomp.client.records import JobResult, as_object, bad_response
from vcomp.errors import ApiError, ApiUnreachable

RECONNECT_ATTEMPTS = 30
"""Consecutive failed reconnects (with no result in between) before giving up."""
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0
"""Seconds before the first reconnect, doubling up to the cap (about a minute in all)."""


def backoff(failures: int) -> float:
    """Seconds to wait before reconnect number ``failures`` (1, 2, ...)."""
    return float(min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)))


def parse_line(line: bytes, jobs: int) -> JobResult:
    """One results line, checked (an index outside the batch is a bad answer: it would
    also let a hostile server grow the follower's memory without bound)."""
    try:
        obj = json.loads(line)
    except ValueError:
        raise bad_response("a results line is not JSON") from None
    result = JobResult.parse(as_object(obj, "a results line"))
    if result.index >= jobs:
        raise bad_response(f"result index {result.index} is outside a batch of {jobs} jobs")
    return result


class ResultFollower:
    """One pass over a batch's final jobs, reconnecting as needed (see the module doc)."""

    def __init__(
        self,
        api: ApiSession,
        batch: int,
        jobs: int,
        count_jobs: Callable[[], Awaitable[int]],
        *,
        follow: bool = True,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
    ) -> None:
        self._api = api
        self._batch = batch
        self._jobs = jobs
        self._count_jobs = count_jobs  # -> jobs in the batch now
        self._follow = follow
        self._attempts = reconnect_attempts
        self._seen: dict[int, tuple[str, int]] = {}  # index -> (state, attempts) yielded
        self.reconnects = 0

    async def __aiter__(self) -> AsyncGenerator[JobResult, None]:
        failures = 0
        params = {"follow": "true"} if self._follow else None
        path = f"/api/v1/batches/{segment(self._batch)}/results"
        while True:
            try:
                async with contextlib.aclosing(self._api.lines(path, params)) as lines:
                    async for line in lines:
                        result = self._new(line)
                        if result is not None:
                            failures = 0
                            yield result
            except StreamDropped as exc:
                failures = await self._pause(failures, str(exc))
                continue
            if not self._follow or await self._complete():
                return
            failures = await self._pause(failures, "the stream ended before every job was final")

    def _new(self, line: bytes) -> JobResult | None:
        if not line.strip():
            return None  # a keep-alive
        result = parse_line(line, self._jobs)
        key = (result.state, result.attempts)
        if self._seen.get(result.index) == key:
            return None  # replayed after a reconnect
        self._seen[result.index] = key
        return result

    async def _complete(self) -> bool:
        try:
            self._jobs = await self._count_jobs()
        except ApiUnreachable:
            return False
        except ApiError as exc:
            if exc.status not in RETRYABLE_STATUS:
                raise
            return False
        return len(self._seen) >= self._jobs

    async def _pause(self, failures: int, why: str) -> int:
        failures += 1
        if failures > self._attempts:
            raise ApiUnreachable(
                f"gave up following the results of batch {self._batch} after {failures - 1}"
                f" reconnects: {why}"
            )
        self.reconnects += 1
        await asyncio.sleep(backoff(failures))
        return failures

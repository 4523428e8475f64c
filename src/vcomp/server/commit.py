"""Group commit: one writer thread, many results per fsync.

The server must not ACK a result before its transaction is durable, and an fsync per
result would cap the dispatch rate at the disk's sync rate. :class:`GroupCommitter` owns
the one thread that writes to the store. Whatever arrived while the previous commit was
running goes into the next transaction together, so many results share one fsync:
under load the group grows by itself, and a lone result still commits at once.

Within one group, results are recorded first (one transaction), then leases are handed
out (one transaction), then :meth:`GroupCommitter.run` calls execute one by one in
arrival order. A ``run`` call therefore sees every result and lease submitted before it.

Every StoreUnavailable that comes back is reported to the committer's
:class:`~vcomp.server.outage.StoreHealth`, and so is every committed group of results
or leases (the store answered). :meth:`GroupCommitter.run_retrying` rides out an outage
for calls that are safe to repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from vcomp.errors import StoreError, StoreUnavailable
from vcomp.protocol.capacity import UNLIMITED, JobCapacity
from vcomp.server.commit_stats import LatencyHistogram, Throughput
from vcomp.server.outage import StoreHealth
from vcomp.server.store import (
    Lease,
    LeaseRequest,
    OutcomeKind,
    RecordOutcome,
    ResultSubmission,
    Store,
)

__all__ = ["GroupCommitter"]

T = TypeVar("T")

_Kind = Literal["result", "lease", "run", "stop"]
_COUNTED = (OutcomeKind.ACCEPTED, OutcomeKind.LATE)  # the results that count for their job


@dataclass(slots=True)
class _Request:
    kind: _Kind
    payload: Any
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the commit happened regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class GroupCommitter:
    """Serialises store writes on one thread and batches results into group commits."""

    def __init__(
        self,
        store: Store,
        *,
        max_group: int = 4096,
        name: str = "vcomp-store",
        health: StoreHealth | None = None,
        server_id: str | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self._store = store
        self._server_id = server_id  # stamped on every lease (see release_orphaned_leases)
        self.health = StoreHealth() if health is None else health
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._closing = False
        self._stopped: asyncio.Future[None] | None = None
        self.commits = 0  # write transactions issued for results and leases
        self.results_committed = 0
        self.leases_committed = 0
        self.groups = 0
        self.largest_group = 0
        # For /metrics, updated once per committed group on the writer thread.
        # Results by OutcomeKind; every key present from the start, so a scrape on the
        # event loop can copy it while this thread adds (its size never changes).
        self.outcomes: Counter[str] = Counter(dict.fromkeys(map(str, OutcomeKind), 0))
        # From a result's arrival (upload complete) to its transaction committed.
        self.result_latency = LatencyHistogram()
        self.throughput = Throughput()  # results that counted, per 10 s, last 15 min
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ asyncio side

    async def submit_result(self, submission: ResultSubmission) -> RecordOutcome:
        """Resolve once the transaction holding this result has committed."""
        outcome: RecordOutcome = await self._submit("result", submission)
        self.health.answered()
        return outcome

    async def lease(
        self,
        agent_id: str,
        now: float,
        lease_seconds: float,
        *,
        capacity: JobCapacity = UNLIMITED,
        refusal_cap: int | None = None,
    ) -> Lease | None:
        """``Store.lease_next``, batched with other lease requests into one commit."""
        request = LeaseRequest(
            agent_id, now, lease_seconds, capacity, refusal_cap, server_id=self._server_id
        )
        lease: Lease | None = await self._submit("lease", request)
        self.health.answered()
        return lease

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run any store call on the writer thread (so one thread owns the writes)."""
        result: T = await self._submit("run", (fn, args))
        return result

    async def run_retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run` through a store outage: wait until the store is back, call again.

        Only for calls that are safe to repeat (their first try may have committed)."""
        while True:
            await self.health.wait_back()
            try:
                return await self.run(fn, *args)
            except StoreUnavailable:
                continue  # reported to the health by _submit; wait for the store

    async def _submit(self, kind: _Kind, payload: Any) -> Any:
        if self._closing:
            raise StoreError("the group committer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_Request(kind, payload, future, loop))
        try:
            return await future
        except StoreUnavailable as exc:
            self.health.lost(exc)
            raise

    async def close(self) -> None:
        """Stop taking work, finish everything already submitted, stop the thread."""
        if self._stopped is None:
            self._closing = True
            loop = asyncio.get_running_loop()
            self._stopped = loop.create_future()
            self._queue.put(_Request("stop", None, self._stopped, loop))
        await asyncio.shield(self._stopped)
        self._thread.join()

    async def __aenter__(self) -> GroupCommitter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ writer thread

    def _work(self) -> None:
        while True:
            group = [self._queue.get()]  # block for the first request ...
            while len(group) < self._max_group:  # ... then take all that queued up meanwhile
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.groups += 1
            self.largest_group = max(self.largest_group, len(group))
            if self._run_group(group):
                return

    def _run_group(self, group: list[_Request]) -> bool:
        results: list[_Request] = []
        leases: list[_Request] = []
        for request in group:
            if request.kind == "result":
                results.append(request)
            elif request.kind == "lease":
                leases.append(request)
            else:
                self._flush(results, leases)
                results, leases = [], []
                if request.kind == "stop":
                    # Nothing can follow "stop": _submit refuses work once closing is set
                    # and requests are only made on the event loop.
                    self._reply(request, None, None)
                    return True
                fn, args = request.payload
                try:
                    value = fn(*args)
                except Exception as exc:
                    self._reply(request, None, exc)
                else:
                    self._reply(request, value, None)
        self._flush(results, leases)
        return False

    def _flush(self, results: list[_Request], leases: list[_Request]) -> None:
        if results:
            try:
                outcomes = self._store.record_results([r.payload for r in results])
            except Exception as exc:
                for request in results:
                    self._reply(request, None, exc)
            else:
                self.commits += 1
                self.results_committed += len(results)
                done = time.time()
                self.result_latency.observe_many(
                    done - r.payload.received_at for r in results if r.payload.received_at
                )
                self.outcomes.update(str(o.kind) for o in outcomes)
                self.throughput.add(sum(o.kind in _COUNTED for o in outcomes), done)
                for request, outcome in zip(results, outcomes, strict=True):
                    self._reply(request, outcome, None)
        if leases:
            try:
                granted = self._store.lease_many([r.payload for r in leases])
            except StoreUnavailable as exc:
                for request in leases:  # one by one would only wait out the outage N times
                    self._reply(request, None, exc)
            except StoreError:
                # One bad request (say, an unknown agent) must not fail its neighbours:
                # retry them one by one so each caller gets its own answer.
                for request in leases:
                    self._lease_alone(request)
            except Exception as exc:
                for request in leases:
                    self._reply(request, None, exc)
            else:
                self.commits += 1
                self.leases_committed += sum(lease is not None for lease in granted)
                for request, lease in zip(leases, granted, strict=True):
                    self._reply(request, lease, None)

    def _lease_alone(self, request: _Request) -> None:
        try:
            (lease,) = self._store.lease_many([request.payload])
        except Exception as exc:
            self._reply(request, None, exc)
        else:
            self.commits += 1
            self.leases_committed += lease is not None
            self._reply(request, lease, None)

    @staticmethod
    def _reply(request: _Request, value: Any, error: BaseException | None) -> None:
        if request.future is None or request.loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            request.loop.call_soon_threadsafe(_settle, request.future, value, error)

"""The blocking client for scripts and notebooks: :func:`connect_sync`.

It runs the asyncio :class:`~vcomp.client.client.Client` on its own event loop in a
background thread and waits for each call, so it works where a loop is already
running in the caller's thread (Jupyter) as well as where none is. Interrupting a
call (Ctrl-C) cancels the request it was waiting for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_module
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vcomp.client.client import Batch, Client, Job
from vcomp.client.records import Agent, App, BatchStatus, JobInfo, JobResult
from vcomp.client.results import RECONNECT_ATTEMPTS
from vcomp.errors import ConfigError

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread, and a way to wait on it from outside."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vcomp-client", daemon=True
        )
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise ConfigError("a blocking vcomp client call from inside its own event loop")
        if self._loop.is_closed():
            coro.close()
            raise ConfigError("the blocking vcomp client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: stop the request too
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.call(_next(items))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self.call(_aclose(items))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _next(items: AsyncIterator[T]) -> T:
    return await items.__anext__()


async def _aclose(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


class SyncBatch:
    """:class:`~vcomp.client.client.Batch` without ``await``."""

    def __init__(self, batch: Batch, runner: _LoopThread) -> None:
        self._batch = batch
        self._run = runner

    def __repr__(self) -> str:
        return repr(self._batch)

    @property
    def id(self) -> int:
        """The batch id."""
        return self._batch.id

    @property
    def jobs(self) -> int:
        """How many jobs the batch has."""
        return self._batch.jobs

    def status(self) -> BatchStatus:
        """The batch's state and its jobs per state."""
        return self._run.call(self._batch.status())

    def as_completed(self, *, follow: bool = True) -> Iterator[JobResult]:
        """Each job as it reaches a final state, every job once (see ``Batch.as_completed``)."""
        return self._run.iterate(self._batch.as_completed(follow=follow))

    def gather(self) -> list[bytes]:
        """Every output in input order; raises ``JobFailed`` on a failed job."""
        return self._run.call(self._batch.gather())

    def gather_json(self) -> list[Any]:
        """:meth:`gather` with each output decoded as JSON."""
        return self._run.call(self._batch.gather_json())

    def cancel(self) -> int:
        """Cancel the jobs not yet final; returns how many."""
        return self._run.call(self._batch.cancel())

    def retry(self) -> tuple[SyncBatch, tuple[int, ...]] | None:
        """Submit the failed jobs again as a new batch (see ``Batch.retry``): the new
        batch and the original index of each of its jobs; None when none failed."""
        again = self._run.call(self._batch.retry())
        return None if again is None else (SyncBatch(again.batch, self._run), again.indices)

    def job(self, index: int) -> JobInfo:
        """One job's state, error and attempts."""
        return self._run.call(self._batch.job(index))


class SyncJob:
    """:class:`~vcomp.client.client.Job` without ``await``."""

    def __init__(self, job: Job, runner: _LoopThread) -> None:
        self._job = job
        self._run = runner
        self.batch = SyncBatch(job.batch, runner)

    def result(self) -> bytes:
        """The output once done (raises ``JobFailed`` if the job failed)."""
        return self._run.call(self._job.result())

    def json(self) -> Any:
        """The output decoded as JSON."""
        return self._run.call(self._job.json())

    def info(self) -> JobInfo:
        """The job's state, error and attempts now."""
        return self._run.call(self._job.info())

    def cancel(self) -> int:
        """Cancel the job unless it is final already."""
        return self._run.call(self._job.cancel())


class SyncClient:
    """:class:`~vcomp.client.client.Client` without ``await``; a context manager."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._run = _LoopThread()
        try:
            self._run.call(client.open())
        except BaseException:
            self._run.close()
            raise

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP session and stop the background loop."""
        with contextlib.suppress(ConfigError):  # closed already
            self._run.call(self._client.close())
        self._run.close()

    def map(self, app: str, inputs: Iterable[object], **options: Any) -> SyncBatch:
        """Submit one job per input as one batch (options as ``Client.map``)."""
        return SyncBatch(self._run.call(self._client.map(app, inputs, **options)), self._run)

    def submit(self, app: str, input: object, **options: Any) -> SyncJob:
        """Submit one job (a batch of one)."""
        return SyncJob(self._run.call(self._client.submit(app, input, **options)), self._run)

    def batch(self, batch_id: int) -> SyncBatch:
        """A handle on an existing batch."""
        return SyncBatch(self._run.call(self._client.batch(batch_id)), self._run)

    def batches(self) -> list[BatchStatus]:
        """The status of every batch."""
        return self._run.call(self._client.batches())

    def job(self, batch_id: int, index: int) -> JobInfo:
        """One job's state, error and attempts."""
        return self._run.call(self._client.job(batch_id, index))

    def add_app(self, name: str, path: str | Path, **options: Any) -> App:
        """Add a version of an app from a file (options as ``Client.add_app``)."""
        return self._run.call(self._client.add_app(name, path, **options))

    def retire_app(self, name: str, version: int) -> App:
        """Retire one version of an app."""
        return self._run.call(self._client.retire_app(name, version))

    def apps(self) -> list[App]:
        """Every version of every app."""
        return self._run.call(self._client.apps())

    def agents(self) -> list[Agent]:
        """The enrolled agents with their credit."""
        return self._run.call(self._client.agents())

    def revoke_agent(self, agent_id: str) -> Agent:
        """Revoke an agent."""
        return self._run.call(self._client.revoke_agent(agent_id))


def connect_sync(
    url: str,
    token: str | None = None,
    *,
    timeout: float = 60.0,
    ssl: ssl_module.SSLContext | None = None,
    reconnect_attempts: int = RECONNECT_ATTEMPTS,
) -> SyncClient:
    """A blocking client for the API at ``url``; use it in ``with`` (or call ``close``)::

    with connect_sync("http://127.0.0.1:7462", token=TOKEN) as client:
        outputs = client.map("pi", inputs).gather_json()
    """
    client = Client(url, token, timeout=timeout, ssl=ssl, reconnect_attempts=reconnect_attempts)
    return SyncClient(client)

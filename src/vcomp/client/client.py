"""The asyncio client: :class:`Client`, and the :class:`Batch` and :class:`Job` handles.

It speaks only the HTTP API (``/api/v1``); it never opens the store. A batch is
a handle on the server's batch: results are read from the server when asked for,
so a handle can be dropped and made again later with :meth:`Client.batch`.
"""

from __future__ import annotations

import contextlib
import json
import ssl as ssl_module
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vcomp.client.api import ApiSession, base_url, segment
from vcomp.client.inputs import Inputs, header_line, ndjson_body
from vcomp.client.records import (
    Agent,
    App,
    BatchStatus,
    JobInfo,
    JobResult,
    as_list,
    as_object,
    bad_response,
)
from vcomp.client.results import RECONNECT_ATTEMPTS, ResultFollower
from vcomp.errors import ConfigError, VcompError

NDJSON = "application/x-ndjson"


def _count(answer: Mapping[str, Any], key: str) -> int:
    value = answer.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad_response(f"{key!r} is not a count")
    return value


@dataclass(frozen=True)
class Retry:
    """A batch's failed jobs submitted again: the new batch, and for each of its jobs
    the index it had in the original batch."""

    batch: Batch
    indices: tuple[int, ...]


class Batch:
    """A handle on one batch on the server: follow its results, cancel it, retry it."""

    def __init__(self, client: Client, batch_id: int, jobs: int) -> None:
        self._client = client
        self.id = batch_id
        self.jobs = jobs
        """How many jobs the batch has."""

    def __repr__(self) -> str:
        return f"<Batch {self.id} of {self.jobs} jobs>"

    @property
    def _path(self) -> str:
        return f"/api/v1/batches/{segment(self.id)}"

    async def status(self) -> BatchStatus:
        """The batch's state and how many of its jobs are in each state."""
        return BatchStatus.parse(await self._client.api.request("GET", self._path))

    async def _jobs_now(self) -> int:
        self.jobs = (await self.status()).jobs
        return self.jobs

    def as_completed(self, *, follow: bool = True) -> AsyncGenerator[JobResult, None]:
        """Each job as it reaches a final state (``done``, ``failed`` or ``cancelled``),
        in the order they finish, every job exactly once.

        With ``follow=False`` only the jobs final now are yielded. The stream survives
        the connection dropping or the server restarting: it reconnects, and the jobs it
        had already yielded are not yielded again. To leave the loop early and close the
        stream at once, wrap it: ``async with contextlib.aclosing(batch.as_completed()) as
        jobs:`` (otherwise it closes when the generator is garbage-collected).
        """
        follower = ResultFollower(
            self._client.api,
            self.id,
            self.jobs,
            self._jobs_now,
            follow=follow,
            reconnect_attempts=self._client.reconnect_attempts,
        )
        return follower.__aiter__()

    async def gather(self) -> list[bytes]:
        """Every job's output, in input order, once all are done.

        Raises :class:`~vcomp.errors.JobFailed` (index, error kind, stderr tail, with the
        job's error text in its message) as soon as a job is failed or cancelled.
        """
        outputs: dict[int, bytes] = {}
        async with contextlib.aclosing(self.as_completed()) as results:  # closes the stream
            async for result in results:
                outputs[result.index] = result.value()
        missing = [i for i in range(self.jobs) if i not in outputs]
        if missing:
            raise bad_response(f"the results of batch {self.id} lack job {missing[0]}")
        return [outputs[i] for i in range(self.jobs)]

    async def gather_json(self) -> list[Any]:
        """:meth:`gather`, with each output decoded as JSON."""
        return [_json(i, out) for i, out in enumerate(await self.gather())]

    async def cancel(self) -> int:
        """Cancel the jobs not yet final (queued ones are never leased; results of leased
        ones are ignored). Returns how many jobs were cancelled."""
        answer = await self._client.api.request("POST", self._path + "/cancel")
        return _count(answer, "cancelled")

    async def retry(self) -> Retry | None:
        """Submit the failed (not cancelled) jobs again, as a new batch with the same app
        version and limits; None when no job failed.

        The failed jobs keep their attempts and errors in this batch; ``Retry.batch`` is
        the new one, and its job ``i`` is this batch's job ``Retry.indices[i]``.
        """
        answer = await self._client.api.request("POST", self._path + "/retry")
        count = _count(answer, "requeued")
        new, indices = answer.get("retry_batch"), answer.get("indices")
        if new is None and count == 0:
            return None
        if (
            not isinstance(new, int)
            or isinstance(new, bool)
            or not isinstance(indices, list)
            or len(indices) != count
            or not all(isinstance(i, int) and 0 <= i < self.jobs for i in indices)
        ):
            raise bad_response("retry: retry_batch and indices do not fit the batch")
        return Retry(Batch(self._client, new, count), tuple(indices))

    async def job(self, index: int) -> JobInfo:
        """One job's state, error and every attempt at it."""
        return await self._client.job(self.id, index)


class Job:
    """A handle on one job submitted alone (a batch of one)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def __repr__(self) -> str:
        return f"<Job 0 of batch {self.batch.id}>"

    async def result(self) -> bytes:
        """The job's output once it is done (raises ``JobFailed`` if it failed)."""
        return (await self.batch.gather())[0]

    async def json(self) -> Any:
        """The job's output decoded as JSON."""
        return _json(0, await self.result())

    async def info(self) -> JobInfo:
        """The job's state, error and attempts now."""
        return await self.batch.job(0)

    async def cancel(self) -> int:
        """Cancel the job unless it is final already; returns 1 if it was cancelled."""
        return await self.batch.cancel()


def _json(index: int, output: bytes) -> Any:
    try:
        return json.loads(output)
    except ValueError:
        raise VcompError(f"the output of job {index} is not JSON") from None


class Client:
    """A connection to a vcomp server's HTTP API.

    Use it as an async context manager::

        async with Client.connect("http://127.0.0.1:7462", token=TOKEN) as client:
            batch = await client.map("pi", [{"points": 10**6, "seed": i} for i in range(100)])
            outputs = await batch.gather_json()
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        ssl: ssl_module.SSLContext | None = None,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
    ) -> None:
        base_url(url)  # a bad URL fails here, not at the first request
        self._settings = (url, token, timeout, ssl)
        self.reconnect_attempts = reconnect_attempts
        """How many reconnects in a row a results stream makes before it gives up."""
        self._api: ApiSession | None = None

    @classmethod
    def connect(
        cls,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        ssl: ssl_module.SSLContext | None = None,
        reconnect_attempts: int = RECONNECT_ATTEMPTS,
    ) -> Client:
        """A client for the API at ``url`` (``http(s)://host:port``), to use in ``async
        with``. ``token`` is a bearer token from ``vcomp-server token create``; ``timeout``
        bounds how long the server may stay silent in a request (not in a followed
        results stream); ``ssl`` verifies a server
        whose certificate the system does not trust."""
        return cls(url, token, timeout=timeout, ssl=ssl, reconnect_attempts=reconnect_attempts)

    async def __aenter__(self) -> Client:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Make the HTTP session (``async with`` does this)."""
        if self._api is None:
            url, token, timeout, ssl = self._settings
            self._api = ApiSession(url, token, timeout=timeout, ssl=ssl)

    async def close(self) -> None:
        """Close the HTTP session; handles made through this client stop working."""
        if self._api is not None:
            await self._api.close()
            self._api = None

    @property
    def api(self) -> ApiSession:
        """The open HTTP session."""
        if self._api is None:
            raise ConfigError("the client is not open: use `async with Client.connect(...)`")
        return self._api

    # ---- batches -----------------------------------------------------------------

    async def map(
        self,
        app: str,
        inputs: Inputs,
        *,
        version: int | None = None,
        replicas: int | None = None,
        memory: int | None = None,
        wall_seconds: float | None = None,
        cpu_seconds: float | None = None,
    ) -> Batch:
        """Submit one job per input of ``inputs`` as one batch of ``app``.

        An input is ``bytes`` (sent as they are) or any JSON-able value (the job gets it
        as compact UTF-8 JSON). ``inputs`` may be any iterable or async iterable; it is
        streamed to the server, never held whole. Options left ``None`` take the
        server's defaults from ``server.toml``.
        """
        options = {
            "version": version,
            "replicas": replicas,
            "memory": memory,
            "wall_seconds": wall_seconds,
            "cpu_seconds": cpu_seconds,
        }
        body = ndjson_body(header_line(app, options), inputs)
        answer = await self.api.request("POST", "/api/v1/batches", data=body, content_type=NDJSON)
        batch_id = answer.get("batch")
        if not isinstance(batch_id, int) or isinstance(batch_id, bool):
            raise bad_response("'batch' is not a batch id")
        return Batch(self, batch_id, _count(answer, "jobs"))

    async def submit(self, app: str, input: object, **options: Any) -> Job:
        """Submit one job (a batch of one); ``options`` are those of :meth:`map`."""
        return Job(await self.map(app, [input], **options))

    async def batch(self, batch_id: int) -> Batch:
        """A handle on an existing batch (raises ``NotFound`` if there is none)."""
        status = await Batch(self, batch_id, 0).status()
        return Batch(self, status.id, status.jobs)

    async def batches(self) -> list[BatchStatus]:
        """The status of every batch."""
        answer = await self.api.request("GET", "/api/v1/batches")
        return [BatchStatus.parse(as_object(b, "a batch")) for b in as_list(answer, "batches")]

    async def job(self, batch_id: int, index: int) -> JobInfo:
        """One job's state, error and attempts."""
        path = f"/api/v1/batches/{segment(batch_id)}/jobs/{segment(index)}"
        return JobInfo.parse(await self.api.request("GET", path))

    # ---- apps --------------------------------------------------------------------

    async def add_app(
        self,
        name: str,
        path: str | Path,
        *,
        kind: str = "python",
        validator: str | None = None,
        assimilator: str | None = None,
    ) -> App:
        """Add a new version of app ``name`` from the file at ``path`` (streamed).

        ``validator`` and ``assimilator`` name the app's server-side hooks as
        ``module:function``. Needs an admin token.
        """
        params = {"kind": kind}
        if validator is not None:
            params["validator"] = validator
        if assimilator is not None:
            params["assimilator"] = assimilator
        try:
            with Path(path).open("rb") as code:
                answer = await self.api.request(
                    "POST",
                    f"/api/v1/apps/{segment(name)}/versions",
                    params=params,
                    data=code,
                    content_type="application/octet-stream",
                )
        except OSError as exc:
            raise ConfigError(f"cannot read app code {str(path)!r}: {exc.strerror}") from None
        return App.parse(answer)

    async def retire_app(self, name: str, version: int) -> App:
        """Retire one version of an app: new batches cannot use it. Needs admin."""
        path = f"/api/v1/apps/{segment(name)}/versions/{segment(version)}/retire"
        return App.parse(await self.api.request("POST", path))

    async def apps(self) -> list[App]:
        """Every version of every app."""
        answer = await self.api.request("GET", "/api/v1/apps")
        return [App.parse(as_object(a, "an app")) for a in as_list(answer, "apps")]

    # ---- agents ------------------------------------------------------------------

    async def agents(self) -> list[Agent]:
        """The enrolled agents: connected now or not, last seen, jobs done, credit."""
        answer = await self.api.request("GET", "/api/v1/agents")
        return [Agent.parse(as_object(a, "an agent")) for a in as_list(answer, "agents")]

    async def revoke_agent(self, agent_id: str) -> Agent:
        """Revoke an agent: its key is refused from now on. Needs admin."""
        path = f"/api/v1/agents/{segment(agent_id)}/revoke"
        return Agent.parse(await self.api.request("POST", path))

"""The blocking client (vcomp.client.sync): in a plain script and under a running loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from tests.client.conftest import ContractServer
from vcomp.client import ApiUnreachable, JobFailed, NotFound, connect_sync
from vcomp.errors import ConfigError

T = TypeVar("T")


class ServerThread:
    """The contract server on its own loop in a thread (the test's thread blocks in the
    client, so the server cannot share its loop)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ContractServer()
        self.url = self.run(self._start())

    async def _start(self) -> str:
        self.server.changed = asyncio.Condition()  # made on this loop
        return await self.server.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def close(self) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[ServerThread]:
    server = ServerThread()
    try:
        yield server
    finally:
        server.close()


def finish_all(served: ServerThread, batch: int, n: int) -> None:
    for i in range(n):
        served.run(served.server.finish(batch, i, output=str(i * i).encode()))


def test_map_and_gather_without_await(served: ServerThread) -> None:
    with connect_sync(served.url, token="submit-tok") as client:
        batch = client.map("pi", range(4))
        finish_all(served, batch.id, 4)
        assert batch.gather_json() == [0, 1, 4, 9]
        assert sorted(r.index for r in batch.as_completed()) == [0, 1, 2, 3]
        assert batch.status().counts["done"] == 4
        assert client.batch(batch.id).jobs == 4
        assert [a.name for a in client.agents()] == ["volunteer-1"]
        with pytest.raises(NotFound):
            client.batch(404)


def test_a_failed_job_raises_job_failed(served: ServerThread) -> None:
    with connect_sync(served.url, token="submit-tok") as client:
        job = client.submit("pi", b"\x00")
        error = {"kind": "exit", "message": "ZeroDivisionError", "stderr_tail": "line 3"}
        served.run(served.server.finish(job.batch.id, 0, "failed", error=error))
        with pytest.raises(JobFailed, match=r"job 0 failed \(exit\): ZeroDivisionError"):
            job.result()
        assert job.info().state == "failed"


def test_it_works_where_a_loop_already_runs_in_the_thread(served: ServerThread) -> None:
    """As in Jupyter: the caller's thread runs an event loop when it calls the client."""

    async def notebook_cell() -> list[bytes]:
        with connect_sync(served.url, token="submit-tok") as client:
            batch = client.map("pi", [1, 2])
            finish_all(served, batch.id, 2)
            return batch.gather()

    assert asyncio.run(notebook_cell()) == [b"0", b"1"]


def test_leaving_as_completed_early_closes_the_stream(served: ServerThread) -> None:
    with connect_sync(served.url, token="submit-tok") as client:
        batch = client.map("pi", [1, 2, 3])
        served.run(served.server.finish(batch.id, 0, output=b"x"))
        for result in batch.as_completed():
            assert result.index == 0
            break  # jobs 1 and 2 are still open: the stream must not stay open
        for _ in range(300):  # the server notices the hang-up on its own loop
            if served.server.open_streams == 0:
                break
            time.sleep(0.05)
        assert served.server.open_streams == 0


def test_errors_and_a_closed_client(served: ServerThread) -> None:
    client = connect_sync("http://127.0.0.1:1", token="t")
    with pytest.raises(ApiUnreachable, match="cannot reach the vcomp HTTP API"):
        client.agents()
    client.close()
    client.close()  # twice is fine
    with pytest.raises(ConfigError, match="closed"):
        client.agents()

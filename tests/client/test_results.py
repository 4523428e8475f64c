"""Following a results stream through drops (vcomp.client.results), over a real socket."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
from typing import Any

import pytest
from aiohttp import web

from tests.client.conftest import ContractServer, serve_app, stop_after
from vcomp.client import ApiError, ApiUnreachable, Client, JobResult
from vcomp.client.api import ApiSession
from vcomp.client.results import backoff

TOKEN = "submit-tok"


async def collect(client: Client, batch_id: int, into: list[JobResult]) -> None:
    batch = await client.batch(batch_id)
    async for result in batch.as_completed():
        into.append(result)


async def test_stream_dropping_mid_line_loses_nothing_and_repeats_nothing(
    contract: ContractServer,
) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [{"seed": i} for i in range(6)])
        for i in (4, 0, 2):
            await contract.finish(batch.id, i, output=f"out{i}".encode())
        # first stream: 2 lines, half of the third, drop; second: 1 more line, drop
        contract.stream_plans = [stop_after(2), stop_after(4)]
        seen: list[JobResult] = []
        task = asyncio.ensure_future(collect(client, batch.id, seen))
        await asyncio.sleep(0.3)
        for i in (1, 5, 3):
            await contract.finish(batch.id, i, output=f"out{i}".encode())
        await asyncio.wait_for(task, 30)

    assert sorted(r.index for r in seen) == list(range(6))  # every job once
    assert {r.index: r.output for r in seen} == {i: f"out{i}".encode() for i in range(6)}
    assert contract.result_requests >= 3  # it did reconnect (twice at least)


async def test_a_stream_that_ends_cleanly_too_early_is_followed_again(
    contract: ContractServer,
) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2, 3])
        for i in range(3):
            await contract.finish(batch.id, i, output=b"x")
        contract.stream_plans = [stop_after(1, "end", partial=False)]
        results = [r async for r in batch.as_completed()]
    assert sorted(r.index for r in results) == [0, 1, 2]
    assert contract.result_requests == 2


async def test_a_job_whose_line_changed_while_the_stream_was_down_is_yielded_again(
    contract: ContractServer,
) -> None:
    """The replay rule: a line equal in (index, state, attempts) to one yielded is
    skipped, any other is new (the server only ever sends final lines; this pins the
    client's side of it should a job's final line change)."""
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2, 3])
        await contract.finish(batch.id, 0, output=b"a")
        err = {"kind": "exit", "message": "boom", "stderr_tail": "Traceback"}
        await contract.finish(batch.id, 1, "failed", error=err)
        contract.stream_plans = [stop_after(2)]  # drops at the next line after these two
        got: list[tuple[int, str]] = []
        async for result in batch.as_completed():
            got.append((result.index, result.state))
            if result.state == "failed":
                await contract.finish(batch.id, 1, output=b"b", attempts=2)
            if len(got) == 3:
                await contract.finish(batch.id, 2, output=b"c")
    # the replay after the drop holds 0 (done, skipped) and 1 (done now: yielded again)
    assert got == [(0, "done"), (1, "failed"), (1, "done"), (2, "done")]
    assert contract.result_requests == 2


async def follow_batch_1(served: tuple[web.AppRunner, str], **options: Any) -> Exception:
    """Follow batch 1's results on ``served`` to the end; the error that ended it."""
    runner, url = served
    try:
        async with Client.connect(url, token=TOKEN, **options) as client:
            batch = await client.batch(1)
            with pytest.raises(Exception) as caught:
                async for _ in batch.as_completed():
                    pass
    finally:
        await runner.cleanup()
    return caught.value


async def test_a_store_outage_is_waited_out_and_then_given_up_on() -> None:
    calls = [0]

    async def status(request: web.Request) -> web.Response:
        return web.json_response(
            {"batch": 1, "app": "pi", "state": "open", "jobs": 2, "counts": {}, "version": 1}
        )

    async def results(request: web.Request) -> web.Response:
        calls[0] += 1
        return web.json_response(
            {"error": "store_unavailable", "message": "the store is restarting"}, status=503
        )

    app = web.Application()
    app.router.add_get("/api/v1/batches/1", status)
    app.router.add_get("/api/v1/batches/1/results", results)
    error = await follow_batch_1(await serve_app(app), reconnect_attempts=3)
    assert isinstance(error, ApiUnreachable)
    assert calls[0] == 4  # the first try and three reconnects, then it gave up
    assert "store_unavailable" in str(error)
    assert "gave up following the results of batch 1" in str(error)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [0.1, 0.2, 0.4]
    assert backoff(50) == 2.0


# ---- a hostile or broken server ------------------------------------------------------


async def stream_server(body: bytes | None, *, endless: bool = False) -> tuple[web.AppRunner, str]:
    """A server whose batch 1 has 2 jobs and whose results stream sends ``body``
    (or, if ``endless``, megabytes without a newline until the client hangs up)."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response(
            {"batch": 1, "app": "pi", "state": "open", "jobs": 2, "counts": {}, "version": 1}
        )

    async def results(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        if endless:
            chunk = b"A" * (1 << 20)
            for _ in range(64):
                await response.write(chunk)
        else:
            assert body is not None
            await response.write(body)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/api/v1/batches/1", status)
    app.router.add_get("/api/v1/batches/1/results", results)
    return await serve_app(app)


def good_line(index: int) -> bytes:
    return json.dumps(
        {"index": index, "job": 7, "state": "done", "output_b64": "eA==", "error": None}
    ).encode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"<html>oops</html>\n", "a results line is not JSON"),
        (b"[1, 2]\n", "a results line is not a JSON object"),
        (good_line(5) + b"\n", "outside a batch of 2 jobs"),
        (good_line(-1) + b"\n", "'index' is negative"),
        (good_line(0).replace(b'"eA=="', b'"!!"') + b"\n", "output_b64 is not base64"),
        (good_line(0).replace(b'"done"', b'"queued"') + b"\n", "is not final"),
        (good_line(0).replace(b'"index": 0', b'"index": true') + b"\n", "'index' is a boolean"),
    ],
)
async def test_a_bad_results_line_is_a_clear_api_error(body: bytes, says: str) -> None:
    error = await follow_batch_1(await stream_server(body))
    assert isinstance(error, ApiError)
    assert error.code == "bad_response"
    assert says in str(error)


async def test_an_endless_line_is_refused_before_it_is_held_in_memory() -> None:
    runner, url = await stream_server(None, endless=True)
    api = ApiSession(url, TOKEN, max_line_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ApiError) as caught:
            async for _ in api.lines("/api/v1/batches/1/results"):
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await api.close()
        await runner.cleanup()
    assert "a streamed line is over 1048576 bytes" in str(caught.value)
    assert peak < 16 << 20  # the server sent 64 MiB without a newline

"""A real aiohttp server on 127.0.0.1 that answers as the HTTP API contract says.

These tests check the client's own logic (error mapping, streaming the body,
following a results stream through drops), so the server side is an in-memory
stand-in for the contract's answers, served over a real socket. The client against
the real ``vcomp-server serve`` is tests/integration/test_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

StreamPlan = Callable[[web.StreamResponse, list[bytes]], Awaitable[str | None]]
"""Writes (some of) a results request's lines; returns "drop", "end" or None (go on)."""

TOKENS = {"read-tok": 0, "submit-tok": 1, "admin-tok": 2}
SCOPES = {"read": 0, "submit": 1, "admin": 2}


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@dataclasses.dataclass
class FakeBatch:
    id: int
    app: str
    header: dict[str, Any]
    inputs: list[dict[str, Any]]
    # every state change in order: results lines, and {"index", "state": "queued"} on retry
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    state: str = "open"
    cancel_calls: int = 0

    def latest(self, upto: int | None = None) -> dict[int, dict[str, Any]]:
        return {line["index"]: line for line in self.history[:upto]}

    def final_indices(self) -> set[int]:
        return {i for i, line in self.latest().items() if line["state"] != "queued"}

    def all_final(self) -> bool:
        return len(self.final_indices()) >= len(self.inputs)

    def status(self) -> dict[str, Any]:
        counts = {"queued": 0, "leased": 0, "done": 0, "failed": 0, "cancelled": 0}
        latest = self.latest()
        for i in range(len(self.inputs)):
            counts[latest[i]["state"] if i in latest else "queued"] += 1
        return {
            "batch": self.id,
            "app": self.app,
            "version": 1,
            "state": self.state,
            "jobs": len(self.inputs),
            "counts": counts,
            "replicas": 1,
            "created": "2026-12-04T11:00:00Z",
        }


class ContractServer:
    """The contract's answers from memory; tests drive which jobs finish and how streams drop."""

    def __init__(self) -> None:
        self.batches: dict[int, FakeBatch] = {}
        self.apps: list[dict[str, Any]] = []
        self.app_bodies: list[bytes] = []
        self.changed = asyncio.Condition()
        self.stream_plans: list[StreamPlan | None] = []
        self.result_requests = 0
        self.open_streams = 0
        self.on_input_line: Callable[[int], None] | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    # ---- driving it --------------------------------------------------------------

    async def finish(
        self,
        batch: int,
        index: int,
        state: str = "done",
        output: bytes | None = None,
        error: dict[str, str] | None = None,
        attempts: int = 1,
    ) -> None:
        b = self.batches[batch]
        line = {
            "index": index,
            "job": 1000 * batch + index,
            "state": state,
            "output_b64": None if output is None else base64.b64encode(output).decode(),
            "error": error,
            "agent": "ab" * 8,
            "cpu_seconds": 0.5,
            "attempts": attempts,
        }
        async with self.changed:
            b.history.append(line)
            if b.all_final() and b.state == "open":
                b.state = "finished"
            self.changed.notify_all()

    # ---- the app -----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        r = app.router
        r.add_get("/api/v1/apps", self.list_apps)
        r.add_post("/api/v1/apps/{name}/versions", self.add_app)
        r.add_post("/api/v1/apps/{name}/versions/{version}/retire", self.retire)
        r.add_get("/api/v1/batches", self.list_batches)
        r.add_post("/api/v1/batches", self.create_batch)
        r.add_get("/api/v1/batches/{id}", self.batch_status)
        r.add_get("/api/v1/batches/{id}/results", self.results)
        r.add_post("/api/v1/batches/{id}/cancel", self.cancel)
        r.add_post("/api/v1/batches/{id}/retry", self.retry)
        r.add_get("/api/v1/batches/{id}/jobs/{index}", self.job)
        r.add_get("/api/v1/agents", self.agents)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return error(401, "missing_token", "this endpoint needs a bearer token")
        level = TOKENS.get(header.removeprefix("Bearer "))
        if level is None:
            return error(401, "bad_token", "unknown or revoked token")
        needed = "read" if request.method == "GET" else "submit"
        if request.path.startswith(("/api/v1/apps", "/api/v1/agents")) and request.method != "GET":
            needed = "admin"
        if level < SCOPES[needed]:
            return error(403, "wrong_scope", f"this endpoint needs scope {needed}")
        result: web.StreamResponse = await handler(request)
        return result

    def _batch(self, request: web.Request) -> FakeBatch:
        b = self.batches.get(int(request.match_info["id"]))
        if b is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "unknown_batch", "message": "no such batch"}),
                content_type="application/json",
            )
        return b

    async def list_apps(self, request: web.Request) -> web.Response:
        return web.json_response({"apps": self.apps})

    async def add_app(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.app_bodies.append(body)
        name = request.match_info["name"]
        app = {
            "name": name,
            "version": sum(a["name"] == name for a in self.apps) + 1,
            "kind": request.query["kind"],
            "sha256": "00" * 32,
            "size": len(body),
            "retired": False,
            "validator": request.query.get("validator"),
            "assimilator": request.query.get("assimilator"),
            "created": "2026-12-04T11:00:00Z",
        }
        self.apps.append(app)
        return web.json_response(app, status=201)

    async def retire(self, request: web.Request) -> web.Response:
        for app in self.apps:
            if (
                app["name"] == request.match_info["name"]
                and str(app["version"]) == (request.match_info["version"])
            ):
                app["retired"] = True
                return web.json_response(app)
        return error(404, "unknown_app", "no such app version")

    async def list_batches(self, request: web.Request) -> web.Response:
        return web.json_response({"batches": [b.status() for b in self.batches.values()]})

    async def create_batch(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-ndjson":
            return error(415, "unsupported_media_type", request.content_type)
        lines: list[dict[str, Any]] = []
        pending = b""
        async for chunk in request.content.iter_any():
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                lines.append(json.loads(raw))
                if self.on_input_line is not None and len(lines) > 1:
                    self.on_input_line(len(lines) - 2)
        if pending:
            return error(400, "bad_json", "the body ends inside a line")
        header, inputs = lines[0], lines[1:]
        if header["app"] != "pi":
            return error(404, "unknown_app", f"no app {header['app']!r}")
        made = self.new_batch(inputs, header)
        return web.json_response({"batch": made.id, "jobs": len(inputs)}, status=201)

    def new_batch(
        self, inputs: list[dict[str, Any]], header: dict[str, Any] | None = None
    ) -> FakeBatch:
        batch_id = len(self.batches) + 1
        header = header or {"app": "pi"}
        made = self.batches[batch_id] = FakeBatch(batch_id, header["app"], header, inputs)
        return made

    async def batch_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._batch(request).status())

    async def results(self, request: web.Request) -> web.StreamResponse:
        self.open_streams += 1
        try:
            return await self._results(request)
        finally:
            self.open_streams -= 1

    async def _results(self, request: web.Request) -> web.StreamResponse:
        b = self._batch(request)
        plan = self.stream_plans.pop(0) if self.stream_plans else None
        self.result_requests += 1
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        follow = request.query.get("follow") == "true"
        async with self.changed:  # first what is final now, then each change
            sent = len(b.history)
            snapshot = b.latest(sent)
            fresh = [line for line in b.history[:sent] if snapshot[line["index"]] is line]
        while True:
            if fresh is None:
                async with self.changed:
                    if follow and sent == len(b.history) and not b.all_final():
                        await self.changed.wait()
                    fresh = b.history[sent:]
                    sent = len(b.history)
            lines = [json.dumps(x).encode() + b"\n" for x in fresh if x["state"] != "queued"]
            fresh = None
            action = None if plan is None else await plan(response, lines)
            if plan is None:
                for line in lines:
                    await response.write(line)
            if action == "drop":
                assert request.transport is not None
                request.transport.close()  # the connection drops mid-stream
                return response
            if action == "end" or not follow or b.all_final():
                await response.write_eof()
                return response

    async def cancel(self, request: web.Request) -> web.Response:
        b = self._batch(request)
        b.cancel_calls += 1
        open_indices = [i for i in range(len(b.inputs)) if i not in b.final_indices()]
        for i in open_indices:
            await self.finish(b.id, i, "cancelled", error={"kind": "cancelled", "message": ""})
        b.state = "cancelled"
        return web.json_response({"batch": b.id, "cancelled": len(open_indices)})

    async def retry(self, request: web.Request) -> web.Response:
        """Resubmission: the failed jobs' inputs as a new batch."""
        b = self._batch(request)
        failed = sorted(i for i, line in b.latest().items() if line["state"] == "failed")
        if not failed:
            return web.json_response(
                {"batch": b.id, "retry_batch": None, "requeued": 0, "indices": []}
            )
        again = self.new_batch([b.inputs[i] for i in failed])
        return web.json_response(
            {"batch": b.id, "retry_batch": again.id, "requeued": len(failed), "indices": failed}
        )

    async def job(self, request: web.Request) -> web.Response:
        b = self._batch(request)
        index = int(request.match_info["index"])
        if index >= len(b.inputs):
            return error(404, "unknown_job", "no such job")
        latest = b.latest().get(index)
        return web.json_response(
            {
                "batch": b.id,
                "index": index,
                "job": 1000 * b.id + index,
                "state": "queued" if latest is None else latest["state"],
                "error": None if latest is None else latest["error"],
                "attempts": [
                    {
                        "attempt": 1,
                        "agent": "ab" * 8,
                        "outcome": "ok",
                        "error_kind": None,
                        "detail": None,
                        "stderr_tail": None,
                        "cpu_seconds": 0.5,
                        "started": 1.0,
                        "finished": 2.0,
                    }
                ],
            }
        )

    async def agents(self, request: web.Request) -> web.Response:
        agent = {
            "id": "ab" * 8,
            "name": "volunteer-1",
            "connected": True,
            "last_seen": "2026-12-04T11:00:00Z",
            "jobs_done": 3,
            "cpu_seconds": 1.5,
            "revoked": False,
        }
        return web.json_response({"agents": [agent]})

    # ---- lifetime ----------------------------------------------------------------

    async def start(self) -> str:
        self._runner, self.url = await serve_app(self.app())
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def contract() -> AsyncIterator[ContractServer]:
    server = ContractServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Any aiohttp app on 127.0.0.1 (for answers the contract server never gives)."""
    runner = web.AppRunner(app, handler_cancellation=True)  # a hung-up stream ends its handler
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def stop_after(lines: int, how: str = "drop", partial: bool = True) -> StreamPlan:
    """A plan: send ``lines`` lines, then (half of the next line, if ``partial`` and there is
    one, and) drop the connection (``how="drop"``) or end the stream cleanly ("end")."""
    left = [lines]

    async def plan(response: web.StreamResponse, fresh: list[bytes]) -> str | None:
        for line in fresh:
            if left[0] == 0:
                if partial:
                    await response.write(line[: len(line) // 2])
                return how
            left[0] -= 1
            await response.write(line)
        return None

    return plan

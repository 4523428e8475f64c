"""``/api/v1/batches``: create a batch, follow it, read its results and jobs."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from vcomp.errors import StoreError
from vcomp.protocol import limits
from vcomp.server.http.context import HttpContext, context_of
from vcomp.server.http.errors import HttpError
from vcomp.server.http.intake import NDJSON, SpooledBatch, read_batch
from vcomp.server.store.records import CANCELLED_REASON, BatchStatus, JobState, ResultRecord

FOLLOW_POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
CANCELLED = CANCELLED_REASON  # a cancelled job is failed with this reason


def path_int(request: web.Request, key: str) -> int:
    text = request.match_info[key]
    if not text.isdigit() or len(text) > 18:
        raise HttpError(404, "not_found", f"{key} must be a number")
    return int(text)


def api_state(state: JobState, reason: str | None) -> str:
    return CANCELLED if state is JobState.FAILED and reason == CANCELLED else state.value


def status_json(s: BatchStatus) -> dict[str, Any]:
    state = "cancelled" if s.cancelled_at is not None else "finished" if s.finished else "open"
    return {
        "batch": s.batch_id,
        "app": s.app_name,
        "version": s.app_version,
        "state": state,
        "jobs": s.total,
        "counts": {
            "queued": s.queued,
            "leased": s.leased,
            "done": s.done,
            "failed": s.failed,
            "cancelled": s.cancelled,
        },
        "disagreements": s.disagreements,
        "created": s.created_at,
        "deadline": s.deadline,
    }


async def batch_status(ctx: HttpContext, batch_id: int) -> BatchStatus:
    try:
        return await ctx.run(ctx.store.batch_status, batch_id)
    except StoreError:
        raise HttpError(404, "unknown_batch", f"no batch {batch_id}") from None


async def list_batches(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    batches = await ctx.run(ctx.store.list_batches)
    out = [status_json(await ctx.run(ctx.store.batch_status, b.batch_id)) for b in batches]
    return web.json_response({"batches": out})


async def get_batch(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    return web.json_response(status_json(await batch_status(ctx, path_int(request, "batch"))))


async def create_batch(request: web.Request) -> web.Response:
    ctx = context_of(request)
    token = await ctx.authorize(request, "submit")
    spooled = await read_batch(request, ctx.settings.max_request_bytes, limits.MAX_INPUT_SIZE)
    try:
        h = spooled.header
        try:
            app = await ctx.run(ctx.store.get_app, h["app"], h.get("version"))
        except StoreError as exc:
            code, status = ("retired_app", 409) if "retired" in str(exc) else ("unknown_app", 404)
            raise HttpError(status, code, str(exc)) from None
        if app.retired_at is not None:
            raise HttpError(409, "retired_app", f"app {app.name!r} v{app.version} is retired")
        try:
            batch_id = await ctx.run(_create, ctx, spooled)
        except StoreError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
    finally:
        spooled.close()
    ctx.server.spawn(ctx.server.scheduler.offer())  # hand the new jobs out now
    _ = token
    return web.json_response({"batch": batch_id, "jobs": spooled.count}, status=201)


def _create(ctx: HttpContext, spooled: SpooledBatch) -> int:
    """On the store's thread: the same defaults as ``vcomp-server submit``."""
    h, d = spooled.header, ctx.server.config.jobs

    def pick(key: str, default: Any) -> Any:
        value = h.get(key)
        return default if value is None else value

    replicas = pick("replicas", d.replicas)
    quorum = pick("quorum", d.quorum if h.get("replicas") is None else replicas // 2 + 1)
    deadline = h.get("deadline")
    return ctx.store.create_batch(
        h["app"],
        spooled.inputs(),
        app_version=h.get("version"),
        replicas=replicas,
        quorum=quorum,
        max_attempts=pick("max_attempts", d.max_attempts),
        cpu_seconds=pick("cpu_seconds", d.cpu_seconds),
        memory_bytes=pick("memory", d.memory_bytes),
        wall_seconds=pick("wall_seconds", d.wall_seconds),
        output_bytes=pick("output_bytes", d.output_bytes),
        disk_bytes=pick("disk_bytes", d.disk_bytes),
        deadline=None if deadline is None else time.time() + float(deadline),
    )


OUTPUT_CHUNK = 3 << 18  # a multiple of 3: base64 pieces concatenate into one string


@dataclass(frozen=True, slots=True)
class FinalJob:
    """A final job's results line, without its output (read later in chunks)."""

    head: dict[str, Any]
    output: tuple[int, int, int] | None  # (job id, attempt, size) of a done job's output


def _newly_final(ctx: HttpContext, batch_id: int, sent: set[tuple[int, str]]) -> list[FinalJob]:
    """On the store's thread: the jobs that became final since ``sent``, outputs not read."""
    out = []
    for rec in ctx.store.iter_results(batch_id):
        if not rec.state.terminal:
            continue
        state = api_state(rec.state, rec.reason)
        if (rec.index, state) in sent:
            continue
        sent.add((rec.index, state))
        out.append(_final_job(ctx, rec, state))
    return out


def _final_job(ctx: HttpContext, rec: ResultRecord, state: str) -> FinalJob:
    r = rec.result
    error = None
    if rec.state is JobState.FAILED:
        message = rec.reason or (r.error if r else "") or "failed"
        error = {
            "kind": CANCELLED if state == CANCELLED else (r.status if r else "failed"),
            "message": message,
            "stderr_tail": r.error if r else "",
        }
    head = {
        "index": rec.index,
        "job": rec.job_id,
        "state": state,
        "error": error,
        "agent": r.agent_id if r else None,
        "cpu_seconds": r.cpu_ms / 1000 if r else None,
        "attempts": len(ctx.store.list_attempts(rec.job_id)),
    }
    done = r is not None and rec.state is JobState.DONE
    return FinalJob(head, (r.job_id, r.attempt, r.output_size) if done and r else None)


def _read_output(ctx: HttpContext, job_id: int, attempt: int, offset: int, n: int) -> bytes:
    with ctx.store.open_output(job_id, attempt) as blob:
        return blob.read(offset, n)


async def _write_line(ctx: HttpContext, response: web.StreamResponse, job: FinalJob) -> None:
    """One results line; a large output goes out in base64 pieces, one chunk in memory."""
    if job.output is None:
        await response.write(json.dumps({**job.head, "output_b64": None}).encode() + b"\n")
        return
    job_id, attempt, size = job.output
    await response.write(json.dumps(job.head).encode()[:-1] + b', "output_b64": "')
    for offset in range(0, size, OUTPUT_CHUNK):
        piece = await ctx.run(_read_output, ctx, job_id, attempt, offset, OUTPUT_CHUNK)
        await response.write(base64.b64encode(piece))
    await response.write(b'"}\n')


async def batch_results(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    batch_id = path_int(request, "batch")
    status = await batch_status(ctx, batch_id)
    follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    sent: set[tuple[int, str]] = set()
    quiet_since = time.monotonic()
    while True:
        for job in await ctx.run(_newly_final, ctx, batch_id, sent):
            await _write_line(ctx, response, job)
            quiet_since = time.monotonic()
        if not follow or (len(sent) >= status.total and _all_final(sent, status.total)):
            break
        if time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            await response.write(b"\n")  # keeps idle proxies from cutting the stream
            quiet_since = time.monotonic()
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
    await response.write_eof()
    return response


def _all_final(sent: set[tuple[int, str]], total: int) -> bool:
    return len({index for index, _ in sent}) >= total


async def get_job(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    batch_id, index = path_int(request, "batch"), path_int(request, "index")
    try:
        job = await ctx.run(ctx.store.get_job_by_index, batch_id, index)
    except StoreError:
        raise HttpError(404, "unknown_job", f"no job {index} in batch {batch_id}") from None
    attempts = await ctx.run(ctx.store.list_attempts, job.job_id)
    results = {r.attempt: r for r in await ctx.run(ctx.store.list_results, job.job_id)}
    out = []
    for a in attempts:
        r = results.get(a.attempt)
        out.append(
            {
                "attempt": a.attempt,
                "agent": a.agent_id,
                "state": a.state.value,
                "outcome": r.status if r else None,
                "detail": a.reason,
                "stderr_tail": r.error if r else None,
                "cpu_seconds": r.cpu_ms / 1000 if r else None,
                "started": a.leased_at,
                "finished": a.ended_at,
            }
        )
    failed = job.state is JobState.FAILED
    return web.json_response(
        {
            "batch": batch_id,
            "index": index,
            "job": job.job_id,
            "state": api_state(job.state, job.reason),
            "error": {"kind": "failed", "message": job.reason} if failed else None,
            "attempts": out,
        }
    )


async def cancel_batch(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "submit")
    batch_id = path_int(request, "batch")
    try:
        cancelled = await ctx.run(ctx.store.cancel_batch, batch_id)
    except StoreError:
        raise HttpError(404, "unknown_batch", f"no batch {batch_id}") from None
    return web.json_response({"batch": batch_id, "cancelled": cancelled})


async def retry_batch(request: web.Request) -> web.Response:
    """Resubmission: the failed jobs' inputs as a new batch (their attempts stay as they were)."""
    ctx = context_of(request)
    await ctx.authorize(request, "submit")
    batch_id = path_int(request, "batch")
    try:
        new, indices = await ctx.run(ctx.store.retry_failed, batch_id)
    except StoreError as exc:
        if "unknown batch" in str(exc):
            raise HttpError(404, "unknown_batch", f"no batch {batch_id}") from None
        raise HttpError(409, "retired_app", str(exc)) from None
    if new is not None:
        ctx.server.spawn(ctx.server.scheduler.offer())
    return web.json_response(
        {"batch": batch_id, "retry_batch": new, "requeued": len(indices), "indices": indices}
    )


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/batches", list_batches)
    app.router.add_post("/api/v1/batches", create_batch)
    app.router.add_get("/api/v1/batches/{batch}", get_batch)
    app.router.add_get("/api/v1/batches/{batch}/results", batch_results)
    app.router.add_get("/api/v1/batches/{batch}/jobs/{index}", get_job)
    app.router.add_post("/api/v1/batches/{batch}/cancel", cancel_batch)
    app.router.add_post("/api/v1/batches/{batch}/retry", retry_batch)

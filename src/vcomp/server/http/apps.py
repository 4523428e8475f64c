"""``/api/v1/apps``: the registered job code, and adding a version of it."""

from __future__ import annotations

import tempfile
from typing import IO, Any, BinaryIO

from aiohttp import web

from vcomp.errors import HookError, StoreError
from vcomp.protocol import limits
from vcomp.server.hooks import load as load_hook
from vcomp.server.http.context import HttpContext, context_of
from vcomp.server.http.errors import HttpError
from vcomp.server.store.records import App

KINDS = ("python", "exec")
READ_CHUNK = 1 << 16


def app_json(app: App) -> dict[str, Any]:
    return {
        "name": app.name,
        "version": app.version,
        "kind": app.kind.value if hasattr(app.kind, "value") else str(app.kind),
        "sha256": app.sha256.hex(),
        "size": app.size,
        "created": app.created_at,
        "validator": app.validator,
        "assimilator": app.assimilator,
        "retired": app.retired_at is not None,
    }


async def list_apps(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "read")
    apps = await ctx.run(ctx.store.list_apps)
    return web.json_response({"apps": [app_json(a) for a in apps]})


async def add_version(request: web.Request) -> web.Response:
    """The body is the code, streamed to a temporary file within the code size limit."""
    ctx = context_of(request)
    await ctx.authorize(request, "admin")
    name = request.match_info["name"]
    kind = request.query.get("kind", "")
    if kind not in KINDS:
        raise HttpError(400, "bad_request", f"kind must be one of {', '.join(KINDS)}")
    hooks = {key: request.query.get(key) for key in ("validator", "assimilator")}
    for spec in hooks.values():
        if spec is not None:
            try:
                # Imported off the loop, as `app add` does, so a bad spec fails now.
                await ctx.run(load_hook, spec)
            except HookError as exc:
                raise HttpError(400, "bad_request", str(exc)) from None
    with tempfile.TemporaryFile(prefix="vcomp-app-") as code:
        size = await _spool(request, code)
        code.seek(0)
        try:
            added = await ctx.run(_add, ctx, name, kind, code, size, hooks)
        except StoreError as exc:
            raise HttpError(400, "bad_request", str(exc)) from None
    return web.json_response(app_json(added), status=201)


async def _spool(request: web.Request, out: IO[bytes]) -> int:
    size = 0
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limits.MAX_CODE_SIZE:
            raise HttpError(413, "too_large", f"code over {limits.MAX_CODE_SIZE} bytes")
        out.write(chunk)
    if size == 0:
        raise HttpError(400, "bad_request", "the body (the app's code) is empty")
    return size


def _add(
    ctx: HttpContext, name: str, kind: str, code: BinaryIO, size: int, hooks: dict[str, str | None]
) -> App:
    return ctx.store.add_app(
        name, kind, code, size=size, validator=hooks["validator"], assimilator=hooks["assimilator"]
    )


async def retire_version(request: web.Request) -> web.Response:
    ctx = context_of(request)
    await ctx.authorize(request, "admin")
    name, text = request.match_info["name"], request.match_info["version"]
    if not text.isdigit() or len(text) > 18:
        raise HttpError(404, "unknown_app", "the version must be a number")
    try:
        retired = await ctx.run(ctx.store.retire_app, name, int(text))
    except StoreError as exc:
        raise HttpError(404, "unknown_app", str(exc)) from None
    return web.json_response(app_json(retired))


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/apps", list_apps)
    app.router.add_post("/api/v1/apps/{name}/versions/{version}/retire", retire_version)
    app.router.add_post("/api/v1/apps/{name}/versions", add_version)

"""Every failure of an HTTP request as ``{"error": CODE, "message": ...}``.

Handlers raise :class:`HttpError`; the middleware turns it, aiohttp's own HTTP errors
(404, 405, 413, ...) and anything unexpected into that body. An unexpected exception is
logged here with its traceback and shown to the client only as ``internal``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from vcomp import logfmt
from vcomp.errors import StoreUnavailable

log = logging.getLogger("vcomp.server.http")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_AIOHTTP_CODES = {
    400: "bad_request",
    401: "missing_token",
    403: "wrong_scope",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


class HttpError(Exception):
    """A request the server refuses: ``status``, a stable ``code`` and a message for the client.

    Server side only; the client's view of the same answer is :class:`vcomp.errors.ApiError`.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HttpError as exc:
        return error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _AIOHTTP_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        return error_response(exc.status, code, message)
    except StoreUnavailable:
        return error_response(503, "store_unavailable", "the job store is unavailable; retry")
    except Exception:
        # Not shown to the client: it may hold paths or store details.
        log.exception("event=http_internal_error path=%s", logfmt.peer_text(request.path))
        return error_response(500, "internal", "internal server error (logged by the server)")

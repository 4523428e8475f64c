"""The HTTP API's aiohttp application, and its listener on the server's event loop.

aiohttp because it is the long-maintained asyncio HTTP server and client in one
package: the API, ``/metrics``, the dashboard's static files and streamed responses
all run on the loop that already runs the UDP endpoint, with no second framework, and
the Python client (:mod:`vcomp.client`) speaks through the same library.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vcomp import logfmt
from vcomp.errors import ConfigError
from vcomp.server.http import agents, apps, batches, dashboard, metrics
from vcomp.server.http.context import CONTEXT_KEY, HttpContext
from vcomp.server.http.errors import json_errors
from vcomp.server.http.settings import HttpSettings

if TYPE_CHECKING:
    from vcomp.server.service import OrganisationServer

log = logging.getLogger("vcomp.server.http")


class QuietMalformedRequests(logging.Filter):
    """aiohttp answers a request it cannot parse (an over-long header line, a bad
    request line) with a plain 400 itself, and logs an ERROR with a traceback. A client
    can send those at will, so they become one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = "event=http_malformed_request error=%s", (type(exc).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


logging.getLogger("aiohttp.server").addFilter(QuietMalformedRequests())


def build_app(ctx: HttpContext) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=ctx.settings.max_request_bytes)
    app[CONTEXT_KEY] = ctx
    apps.register(app)
    batches.register(app)
    agents.register(app)
    metrics.register(app, ctx)
    dashboard.register(app, ctx)
    return app


class HttpListener:
    """The API's TCP listener; :meth:`start` binds, :meth:`stop` closes every connection."""

    def __init__(self, server: OrganisationServer, settings: HttpSettings) -> None:
        self.context = HttpContext(server, settings)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        assert self.address is not None
        host, port = self.address
        scheme = "https" if self.context.settings.tls else "http"
        return f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}"

    async def start(self) -> tuple[str, int]:
        settings = self.context.settings
        host, port = settings.host_port
        runner = self._runner = web.AppRunner(
            build_app(self.context), access_log=None, handle_signals=False
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=_tls(settings))
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"[http] bind {settings.bind}: {exc.strerror or exc}") from None
        bound = runner.addresses[0]
        self.address = (str(bound[0]), int(bound[1]))
        logfmt.event(log, "http_started", url=self.url, open_metrics=settings.open_metrics)
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


def _tls(settings: HttpSettings) -> ssl.SSLContext | None:
    if settings.cert is None or settings.key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.cert, settings.key)
    return context

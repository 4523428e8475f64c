"""The client's one connection to the HTTP API: requests, bounded reads, error mapping.

Every error the server reports (``{"error": CODE, "message": ...}`` with a 4xx/5xx
status) becomes an :class:`~vcomp.errors.ApiError` subclass carrying that code;
every failure to talk to the server at all becomes
:class:`~vcomp.errors.ApiUnreachable` naming the URL. No aiohttp exception escapes.
The token is sent in the ``Authorization`` header and never appears in a message.
"""

from __future__ import annotations

import json
import ssl as ssl_module
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from vcomp.client.records import as_object, bad_response
from vcomp.errors import (
    ApiError,
    ApiUnreachable,
    AuthError,
    ConfigError,
    NotFound,
    VcompError,
)

MAX_ANSWER_BYTES = 64 << 20
"""Largest JSON answer read into memory (a list of many batches or agents fits easily)."""
MAX_ERROR_BYTES = 64 << 10
"""Largest error body read: an error's message is short; a proxy's HTML page is cut."""
MAX_LINE_BYTES = 256 << 20
"""Largest results line: a job output (bounded by the server's output limit) in base64."""
RETRYABLE_STATUS = frozenset({502, 503, 504})
"""Statuses a results stream reconnects after (the store or a proxy is briefly down)."""


class StreamDropped(ApiUnreachable):
    """A streamed answer broke off (connection lost, a line cut short, a 503): reconnect."""


def segment(value: str | int) -> str:
    """One path segment, percent-encoded (an app name may hold ``/`` or ``?``)."""
    return quote(str(value), safe="")


def api_error(status: int, body: bytes) -> ApiError:
    """The typed error for an error answer: the server's code and message when the body
    is the API's error object, else ``http_<status>`` with the start of the body."""
    code, message = f"http_{status}", body[:200].decode("utf-8", "replace").strip()
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        code = obj["error"][:100]
        message = str(obj.get("message", ""))[:2000]
    kind = {401: AuthError, 403: AuthError, 404: NotFound}.get(status, ApiError)
    return kind(status, code, message or "(no message)")


def base_url(url: str) -> URL:
    """The API's base URL (``http(s)://host:port[/prefix]``), checked."""
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the API URL must be http://HOST:PORT or https://HOST:PORT, not {url!r}")
    if parsed.user or parsed.password:
        raise ConfigError("put the token in token=..., not in the URL")
    return parsed.with_query(None).with_fragment(None)


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refusing (not allocating) one longer than ``limit`` bytes."""
    if response.content_length is not None and response.content_length > limit:
        raise bad_response(f"answer of {response.content_length} bytes is over {limit}")
    body = bytearray()
    async for chunk in response.content.iter_any():
        if len(body) + len(chunk) > limit:
            raise bad_response(f"answer is over {limit} bytes")
        body += chunk
    return bytes(body)


class ApiSession:
    """One ``aiohttp.ClientSession`` to one API base URL, with the bearer token."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        ssl: ssl_module.SSLContext | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.base = base_url(url)
        self._prefix = str(self.base).rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # a bound on silence, not on the whole request: a large upload may take long
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=timeout
        )
        self._timeout_seconds = timeout
        # a followed stream may be quiet for as long as jobs run: no total, no read bound
        self._stream_timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        self._ssl: ssl_module.SSLContext | bool = True if ssl is None else ssl
        self._max_line = max_line_bytes
        self._http = aiohttp.ClientSession(headers=headers, raise_for_status=False)

    async def close(self) -> None:
        await self._http.close()

    def url(self, path: str, params: Mapping[str, str] | None = None) -> URL:
        """``path`` (already segment-encoded, starting with ``/``) under the base URL."""
        url = URL(self._prefix + path, encoded=True)
        return url.with_query(dict(params)) if params else url

    def _unreachable(self, exc: BaseException, kind: type[ApiUnreachable]) -> VcompError:
        cause = _own_cause(exc)
        if cause is not None:
            return cause  # e.g. a bad input met while aiohttp was sending the body
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self._timeout_seconds:g} s"
        return kind(f"cannot reach the vcomp HTTP API at {self.base}: {reason}")

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Any = None,
        content_type: str | None = None,
    ) -> Mapping[str, Any]:
        """Send one request and return its JSON object answer (or raise the typed error)."""
        headers = {"Content-Type": content_type} if content_type else None
        try:
            async with self._http.request(
                method,
                self.url(path, params),
                data=data,
                headers=headers,
                timeout=self._timeout,
                ssl=self._ssl,
            ) as response:
                if response.status >= 400:
                    raise api_error(response.status, await _error_body(response))
                body = await read_bounded(response, MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(exc, ApiUnreachable) from None
        try:
            return as_object(json.loads(body), f"the answer to {method} {path}")
        except ValueError:
            raise bad_response(f"the answer to {method} {path} is not JSON") from None

    async def lines(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The lines of a streamed answer, each complete (with its newline removed).

        A stream that breaks off (even mid-line) raises :class:`StreamDropped`; a line
        longer than the bound raises ``bad_response`` before it is held in memory.
        """
        try:
            async with self._http.get(
                self.url(path, params), timeout=self._stream_timeout, ssl=self._ssl
            ) as response:
                if response.status in RETRYABLE_STATUS:
                    raise StreamDropped(
                        str(api_error(response.status, await _error_body(response)))
                    )
                if response.status >= 400:
                    raise api_error(response.status, await _error_body(response))
                async for line in self._split(response):
                    yield line
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(exc, StreamDropped) from None

    async def _split(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        pending = bytearray()
        async for chunk in response.content.iter_any():
            pending += chunk
            start = 0
            while (end := pending.find(b"\n", start)) >= 0:
                yield bytes(pending[start:end])
                start = end + 1
            del pending[:start]
            if len(pending) > self._max_line:
                raise bad_response(f"a streamed line is over {self._max_line} bytes")
        if pending:
            raise StreamDropped(f"the stream from {self.base} ended inside a line")


def _own_cause(exc: BaseException) -> VcompError | None:
    """The vcomp error behind an aiohttp error, if there is one (aiohttp wraps an error
    raised by the body generator in its own connection error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, VcompError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


async def _error_body(response: aiohttp.ClientResponse) -> bytes:
    """The start of an error answer (at most MAX_ERROR_BYTES; the rest is not read)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk[: MAX_ERROR_BYTES - len(body)]
        if len(body) >= MAX_ERROR_BYTES:
            break
    return bytes(body)

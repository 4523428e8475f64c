"""Job inputs as the NDJSON body of ``POST /api/v1/batches``, produced as it is sent.

The body is an async generator: the header line first, then one line per input,
handed to aiohttp in chunks of about :data:`CHUNK_BYTES`. A batch of a million
inputs (or a generator that computes them) never exists in memory as one body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping

from vcomp.errors import ConfigError

CHUNK_BYTES = 64 * 1024
"""Lines are gathered into chunks of about this size before they are written."""

Inputs = Iterable[object] | AsyncIterable[object]
"""What ``Client.map`` takes: a (possibly lazy, possibly async) sequence of inputs."""


def input_line(value: object) -> bytes:
    """One input as its NDJSON line: ``bytes`` as ``{"b64": ...}``, anything else as
    ``{"json": value}`` (which the server stores as compact UTF-8 JSON)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return b'{"b64":"' + base64.b64encode(bytes(value)) + b'"}\n'
    try:
        text = json.dumps({"json": value}, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"a job input must be bytes or JSON-able: {exc}") from None
    return text.encode() + b"\n"


def header_line(app: str, options: Mapping[str, object]) -> bytes:
    """The first line: the app and the batch's options (``None`` = the server's default)."""
    return json.dumps({"app": app, **options}, separators=(",", ":")).encode() + b"\n"


async def _values(inputs: Inputs) -> AsyncIterator[object]:
    if isinstance(inputs, AsyncIterable):
        async for value in inputs:
            yield value
    else:
        for value in inputs:
            yield value


async def ndjson_body(header: bytes, inputs: Inputs) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk."""
    chunk = bytearray(header)
    async for value in _values(inputs):
        chunk += input_line(value)
        if len(chunk) >= CHUNK_BYTES:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)

"""Reading a batch-creation request: a header and one input per line, spooled to disk.

The body is NDJSON (streamed; line 1 the batch's settings, then one ``{"json": V}`` or
``{"b64": "..."}`` per job) or one JSON document ``{"app": ..., "inputs": [...]}``.
Inputs go to a temporary file as they arrive, so a large batch costs disk, not
memory; every line and the whole body are bounded before anything is kept.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from aiohttp import web

from vcomp.server.http.errors import HttpError

NDJSON = "application/x-ndjson"
HEADER_KEYS = frozenset(
    {"app", "version", "replicas", "quorum", "max_attempts", "memory", "wall_seconds",
     "cpu_seconds", "output_bytes", "disk_bytes", "deadline"}
)  # fmt: skip
MAX_HEADER_BYTES = 64 << 10
MAX_JSON_BODY = 4 << 20  # a JSON document is parsed whole: larger batches come as NDJSON
INT_KEYS = ("version", "replicas", "quorum", "max_attempts", "memory", "output_bytes", "disk_bytes")
NUMBER_KEYS = ("wall_seconds", "cpu_seconds", "deadline")
READ_CHUNK = 1 << 16
_LENGTH = struct.Struct(">Q")


@dataclass
class SpooledBatch:
    """The header's settings and the inputs, kept in a temporary file until stored."""

    header: dict[str, Any]
    # Closed by close(), which every caller reaches through try/finally.
    file: IO[bytes] = field(default_factory=lambda: tempfile.TemporaryFile(prefix="vcomp-batch-"))  # noqa: SIM115
    count: int = 0

    def add(self, data: bytes) -> None:
        self.file.write(_LENGTH.pack(len(data)))
        self.file.write(data)
        self.count += 1

    def inputs(self) -> Iterator[bytes]:
        """The inputs in order (runs on the store's thread, inside create_batch)."""
        self.file.seek(0)
        for _ in range(self.count):
            (size,) = _LENGTH.unpack(self.file.read(_LENGTH.size))
            yield self.file.read(size)

    def close(self) -> None:
        self.file.close()


def decode_input(item: object, where: str, max_input: int) -> bytes:
    if not isinstance(item, dict) or len(item) != 1 or not ({"json", "b64"} & item.keys()):
        raise HttpError(
            400, "bad_request", f'{where}: an input is {{"json": VALUE}} or {{"b64": "..."}}'
        )
    if "json" in item:
        data = json.dumps(item["json"], separators=(",", ":")).encode()
    else:
        text = item["b64"]
        if not isinstance(text, str):
            raise HttpError(400, "bad_request", f"{where}: b64 must be a string")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise HttpError(400, "bad_request", f"{where}: b64 is not valid base64") from None
    if len(data) > max_input:
        raise HttpError(
            413, "too_large", f"{where}: input of {len(data)} bytes; at most {max_input}"
        )
    return data


def check_header(header: object) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise HttpError(
            400, "bad_request", "the first line must be a JSON object of batch settings"
        )
    unknown = sorted(set(header) - HEADER_KEYS)
    if unknown:
        raise HttpError(400, "bad_request", f"unknown batch setting {unknown[0]!r}")
    if not isinstance(header.get("app"), str) or not header["app"]:
        raise HttpError(400, "bad_request", '"app" (the app\'s name) is required')
    for key in INT_KEYS:
        value = header.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 63
        ):
            raise HttpError(400, "bad_request", f'"{key}" must be a positive integer or null')
    for key in NUMBER_KEYS:
        value = header.get(key)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise HttpError(400, "bad_request", f'"{key}" must be a positive number or null')
    return header


def parse_json(raw: bytes, where: str) -> object:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HttpError(400, "bad_json", f"{where}: not JSON ({exc})") from None
    except RecursionError:
        raise HttpError(400, "bad_json", f"{where}: nested too deeply") from None


async def _lines(request: web.Request, limit: int, max_line: int) -> AsyncIterator[bytes]:
    """The body's lines, counting every byte against ``limit`` as it arrives."""
    total = 0
    pending = bytearray()
    async for chunk in request.content.iter_chunked(READ_CHUNK):
        total += len(chunk)
        if total > limit:
            raise HttpError(413, "too_large", f"request body over {limit} bytes")
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[: end + 1]
            if line.strip():
                yield line
        if len(pending) > max_line:
            raise HttpError(413, "too_large", f"a line over {max_line} bytes")
    if pending.strip():
        yield bytes(pending)


async def read_batch(request: web.Request, limit: int, max_input: int) -> SpooledBatch:
    """The batch in ``request``; HttpError on anything malformed or too large."""
    max_line = max_input * 4 // 3 + 64  # base64 of the largest input, and the wrapper
    if request.content_type == "application/json":
        raw = bytearray()
        async for chunk in request.content.iter_chunked(READ_CHUNK):
            raw += chunk
            if len(raw) > MAX_JSON_BODY:
                break
        if len(raw) > MAX_JSON_BODY:
            raise HttpError(
                413, "too_large", f"a JSON body is at most {MAX_JSON_BODY} bytes; send NDJSON"
            )
        body = parse_json(bytes(raw), "body")
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
            raise HttpError(400, "bad_request", 'the body is {"app": NAME, "inputs": [...], ...}')
        items = body.pop("inputs")
        whole = SpooledBatch(check_header(body))
        try:
            for i, item in enumerate(items):
                whole.add(decode_input(item, f"input {i}", max_input))
        except BaseException:
            whole.close()
            raise
        return whole
    if request.content_type != NDJSON:
        raise HttpError(415, "unsupported_media_type", f"send {NDJSON} or application/json")
    spooled: SpooledBatch | None = None
    try:
        number = 0
        async for line in _lines(request, limit, max(max_line, MAX_HEADER_BYTES)):
            number += 1
            item = parse_json(line, f"line {number}")
            if spooled is None:
                spooled = SpooledBatch(check_header(item))
            else:
                spooled.add(decode_input(item, f"line {number}", max_input))
        if spooled is None:
            raise HttpError(400, "bad_request", "empty body: no batch settings line")
        return spooled
    except BaseException:
        if spooled is not None:
            spooled.close()
        raise

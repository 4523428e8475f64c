"""Argument checks and size bounds every store backend applies to what callers give it.

Each check raises :class:`~vcomp.errors.StoreError` naming the argument, before anything
is stored or allocated.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from typing import BinaryIO

from vcomp.errors import StoreError
from vcomp.server.store.records import ResultSubmission

#: Largest code, input or output blob (SQLite's own default limit is ~1e9 bytes).
MAX_BLOB_BYTES = 512 << 20
#: Largest output accepted inline in a ResultSubmission; bigger ones are staged.
INLINE_OUTPUT_MAX = 1 << 20
#: Largest single BlobReader.read.
MAX_READ_BYTES = 16 << 20
COPY_CHUNK = 1 << 20  # streaming granularity for add_app and SHA-256 checks
MAX_REPLICAS = 100
MAX_ATTEMPTS = 1000
MAX_TEXT = 1024
U64 = (1 << 64) - 1
INT64_MAX = (1 << 63) - 1  # the largest integer either backend stores
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_AGENT_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise StoreError(f"{what} must be 1-128 of [A-Za-z0-9._-], starting alphanumeric")
    return name


def check_text(text: str, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise StoreError(f"{what} must be a non-empty string")
    if len(text) > MAX_TEXT or not text.isprintable():
        raise StoreError(f"{what} must be printable and at most {MAX_TEXT} characters")
    return text


def check_int(value: int, what: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StoreError(f"{what} must be an integer in [{low}, {high}], not {value!r}")


def check_positive(value: float, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (math.isfinite(value) and value > 0)
    ):
        raise StoreError(f"{what} must be a positive finite number, not {value!r}")


def check_finite(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise StoreError(f"{what} must be a finite number, not {value!r}")


def check_size(size: int, what: str) -> None:
    if not 0 <= size <= MAX_BLOB_BYTES:
        raise StoreError(f"{what} of {size} bytes is outside [0, {MAX_BLOB_BYTES}]")


def check_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not _AGENT_ID_RE.fullmatch(agent_id.lower()):
        raise StoreError("agent id must be 64 hex digits (SHA-256 of the AK's SPKI)")
    return agent_id.lower()


def check_submission(sub: ResultSubmission) -> None:
    if sub.output is not None and sub.upload is not None:
        raise StoreError("give the output inline or as a staged upload, not both")
    if sub.output is not None and len(sub.output) > INLINE_OUTPUT_MAX:
        raise StoreError(f"inline output above {INLINE_OUTPUT_MAX} bytes; stage it instead")
    if sub.upload is not None and (sub.output_sha256 is None or len(sub.output_sha256) != 32):
        raise StoreError("a staged output needs its 32-byte output_sha256")
    if not sub.status or len(sub.status) > 64 or not sub.status.isprintable():
        raise StoreError("result status must be 1-64 printable characters")
    check_int(sub.cpu_ms, "cpu_ms", 0, U64 >> 1)
    check_int(sub.wall_ms, "wall_ms", 0, U64 >> 1)


def spki_der(pem: str) -> bytes:
    if not isinstance(pem, str) or len(pem) > 8192:
        raise StoreError("attestation key must be a PEM public key of at most 8 KiB")
    lines = [line.strip() for line in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _PEM_BEGIN or lines[-1] != _PEM_END:
        raise StoreError("attestation key must be a PEM 'PUBLIC KEY' (SubjectPublicKeyInfo)")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise StoreError("attestation key PEM body is not valid base64") from None


def stream_remaining(stream: BinaryIO) -> int:
    try:
        if not stream.seekable():
            raise StoreError("give the size of a non-seekable code stream")
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
    except OSError as exc:
        raise StoreError(f"cannot size the code stream: {exc}") from exc
    return end - here

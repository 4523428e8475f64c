"""Framing of the domain interface between the agent and a job (spec: protocol/spec/domain.md).

A frame is one type byte, a u32 big-endian payload length, then the payload. The
agent sends an optional RESUME (the job's last checkpoint) then one START; the job
answers with PROGRESS and CHECKPOINT frames and one RESULT or ERROR.

Standard library only: the guest SDK ships this module into the sandbox, where it is
imported at every job start. So it avoids costly imports (dataclasses alone pulls in
inspect and re, ~10 ms): Frame is a small hand-written value class.
"""

from __future__ import annotations

import struct

from vcomp.errors import SandboxError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the guest must not import typing
if TYPE_CHECKING:
    import re
    from collections.abc import Callable

START = 0x01  # agent -> job: the input bytes
RESULT = 0x02  # job -> agent: the output bytes
PROGRESS = 0x03  # job -> agent: u32 BE millionths of completion, 0..1_000_000
ERROR = 0x04  # job -> agent: UTF-8 text, at most MAX_ERROR_BYTES
CHECKPOINT = 0x05  # job -> agent: opaque state to resume from, at most max_checkpoint bytes
RESUME = 0x06  # agent -> job, before START: the last CHECKPOINT payload of this job

FRAME_NAMES = {
    START: "START",
    RESULT: "RESULT",
    PROGRESS: "PROGRESS",
    ERROR: "ERROR",
    CHECKPOINT: "CHECKPOINT",
    RESUME: "RESUME",
}
JOB_FRAME_TYPES = frozenset({RESULT, PROGRESS, ERROR, CHECKPOINT})
AGENT_FRAME_TYPES = frozenset({START, RESUME})

HEADER_SIZE = 5
MAX_ERROR_BYTES = 4096
PROGRESS_SCALE = 1_000_000
MAX_PAYLOAD = 0xFFFF_FFFF
DEFAULT_MAX_CHECKPOINT = 4 * 1024 * 1024  # [jobs] max_checkpoint_bytes when not set

PROGRESS_FRAME_SIZE = 9
_HEADER = struct.Struct(">BI")
# One or more whole PROGRESS frames whose value is at most 1_000_000 (0x000F4240).
_PROGRESS_RUN = (
    rb"(?:\x03\x00\x00\x00\x04\x00"
    rb"(?:[\x00-\x0e][\x00-\xff]{2}|\x0f(?:[\x00-\x41][\x00-\xff]|\x42[\x00-\x40])))+"
)


class DomainProtocolError(SandboxError):
    """Bytes on a domain pipe that are not a valid frame (type, size or value)."""


class FrameTooLarge(DomainProtocolError):
    """A frame's declared length is above its bound (the job's output cap for RESULT)."""


class Frame:
    """One decoded frame (immutable)."""

    __slots__ = ("payload", "type")
    type: int
    payload: bytes

    def __init__(self, type: int, payload: bytes) -> None:
        object.__setattr__(self, "type", type)
        object.__setattr__(self, "payload", payload)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Frame is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Frame):
            return NotImplemented
        return (self.type, self.payload) == (other.type, other.payload)

    def __hash__(self) -> int:
        return hash((self.type, self.payload))

    def __repr__(self) -> str:
        return f"Frame({self.name}, {len(self.payload)} bytes)"

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.type, f"0x{self.type:02x}")


def encode_frame(frame_type: int, payload: bytes) -> bytes:
    if frame_type not in FRAME_NAMES:
        raise DomainProtocolError(f"unknown frame type 0x{frame_type:02x}")
    if len(payload) > MAX_PAYLOAD:
        raise DomainProtocolError(f"payload of {len(payload)} bytes does not fit a u32 length")
    return _HEADER.pack(frame_type, len(payload)) + payload


def encode_start(data: bytes) -> bytes:
    return encode_frame(START, data)


def encode_result(data: bytes) -> bytes:
    return encode_frame(RESULT, data)


def encode_checkpoint(state: bytes) -> bytes:
    return encode_frame(CHECKPOINT, state)


def encode_resume(state: bytes) -> bytes:
    return encode_frame(RESUME, state)


def encode_progress(fraction: float) -> bytes:
    """Encode a completion fraction; values outside [0, 1] are clamped, NaN is refused."""
    if fraction != fraction:  # NaN
        raise DomainProtocolError("progress fraction is NaN")
    millionths = round(min(1.0, max(0.0, fraction)) * PROGRESS_SCALE)
    return encode_frame(PROGRESS, millionths.to_bytes(4, "big"))


def encode_error(text: str) -> bytes:
    """Encode an error message, truncated to MAX_ERROR_BYTES on a character boundary."""
    data = text.encode("utf-8", "replace")
    if len(data) > MAX_ERROR_BYTES:
        data = data[:MAX_ERROR_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(ERROR, data)


def decode_progress(payload: bytes) -> float:
    if len(payload) != 4:
        raise DomainProtocolError(f"PROGRESS payload must be 4 bytes, got {len(payload)}")
    value = int.from_bytes(payload, "big")
    if value > PROGRESS_SCALE:
        raise DomainProtocolError(f"PROGRESS value {value} is above {PROGRESS_SCALE}")
    return value / PROGRESS_SCALE


def decode_error(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


class FrameDecoder:
    """Incremental decoder. Every length is checked against its bound before buffering.

    ``max_payload`` bounds RESULT, START and RESUME payloads (the job's output cap on
    the agent side), ``max_checkpoint`` bounds CHECKPOINT payloads. ``allowed`` is the
    set of frame types the peer may send.

    With ``coalesce_progress`` (the agent's side), a run of consecutive valid PROGRESS
    frames in the buffer yields only its last frame, found by one regular-expression
    match instead of a Python step per frame: a flooding job cannot make the agent
    spend more than a scan of the bytes. Nothing else changes (order, validation, and
    every other frame are the same); ``progress_coalesced`` counts the dropped frames.
    """

    def __init__(
        self,
        max_payload: int,
        allowed: frozenset[int] = JOB_FRAME_TYPES,
        *,
        coalesce_progress: bool = False,
        max_checkpoint: int = DEFAULT_MAX_CHECKPOINT,
    ) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in [0, {MAX_PAYLOAD}]")
        if not 0 <= max_checkpoint <= MAX_PAYLOAD:
            raise ValueError(f"max_checkpoint must be in [0, {MAX_PAYLOAD}]")
        self._max_payload = max_payload
        self._max_checkpoint = max_checkpoint
        self._allowed = allowed
        self._buffer = bytearray()
        self._need: tuple[int, int] | None = None  # (type, length) of the frame in progress
        self._progress_run = _progress_run_matcher() if coalesce_progress else None
        self.bytes_received = 0
        self.progress_coalesced = 0

    @property
    def pending(self) -> int:
        """Bytes buffered for a frame that is not complete yet (0 at a frame boundary)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        self.bytes_received += len(data)
        buf = self._buffer
        buf += data
        frames: list[Frame] = []
        pos = 0  # consumed bytes, deleted once at the end
        try:
            while True:
                if self._need is None:
                    run = self._progress_run(buf, pos) if self._progress_run else None
                    if run is not None:
                        end = run.end()
                        self.progress_coalesced += (end - pos) // PROGRESS_FRAME_SIZE - 1
                        frames.append(Frame(PROGRESS, bytes(buf[end - 4 : end])))
                        pos = end
                        continue
                    if len(buf) - pos < HEADER_SIZE:
                        return frames
                    frame_type, length = _HEADER.unpack_from(buf, pos)
                    self._check_header(frame_type, length)
                    pos += HEADER_SIZE
                    self._need = (frame_type, length)
                frame_type, length = self._need
                if len(buf) - pos < length:
                    return frames
                payload = bytes(buf[pos : pos + length])
                pos += length
                self._need = None
                if frame_type == PROGRESS:
                    decode_progress(payload)
                frames.append(Frame(frame_type, payload))
        finally:
            del buf[:pos]

    def _check_header(self, frame_type: int, length: int) -> None:
        if frame_type not in self._allowed:
            raise DomainProtocolError(f"unexpected frame type 0x{frame_type:02x}")
        if frame_type == PROGRESS:
            limit = 4
        elif frame_type == ERROR:
            limit = MAX_ERROR_BYTES
        elif frame_type == CHECKPOINT:
            limit = self._max_checkpoint
        else:
            limit = self._max_payload
        if length > limit:
            name = FRAME_NAMES[frame_type]
            raise FrameTooLarge(f"{name} frame of {length} bytes exceeds {limit}")


def _progress_run_matcher() -> Callable[[bytearray, int], re.Match[bytes] | None]:
    import re  # only the agent coalesces; the guest, which imports this module, never pays

    return re.compile(_PROGRESS_RUN).match

"""Packet bodies: schemas, round trips, and "any bytes give a message or DecodeError"."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.capacity import UNLIMITED, JobCapacity
from vcomp.protocol.messages import (
    Ack,
    Attest,
    Challenge,
    Checkpoint,
    Code,
    End,
    Error,
    ErrorCode,
    Hello,
    Key,
    Message,
    Ping,
    Pong,
    Ready,
    Reject,
    Reset,
    Result,
    Retry,
    Start,
    decode_body,
    decode_plaintext_packet,
    encode_body,
    encode_plaintext_packet,
    pad_hello,
    with_sequence,
)
from vcomp.protocol.schema import MAX_TRANSFER
from vcomp.protocol.wire import Flag, PacketType, pack_header

U32 = 2**32 - 1
U64 = 2**64 - 1

# ---- strategies -----------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, U32)
u64 = st.integers(0, U64)
digest = st.binary(min_size=32, max_size=32)


def text(max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_bytes).filter(lambda s: len(s.encode()) <= max_bytes)


def pairs_descending(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    points = sorted(
        draw(st.sets(u64, min_size=2, max_size=2 * limits.MAX_ACK_RANGES)), reverse=True
    )
    points = points[: len(points) // 2 * 2]
    # Consecutive points pair up as (lo, hi); sets have no repeats, so pairs are disjoint.
    return tuple((points[i + 1], points[i]) for i in range(0, len(points), 2))


@st.composite
def ack_ranges(draw: st.DrawFn) -> tuple[tuple[int, int], ...]:
    ranges = pairs_descending(draw)
    if draw(st.booleans()):  # also single-number ranges
        ranges = tuple((hi, hi) for _, hi in ranges)
    return ranges


@st.composite
def results(draw: st.DrawFn) -> Result:
    common: dict[str, Any] = {
        "seq": draw(u64),
        "epoch": draw(u32),
        "job": draw(u64),
        "attempt": draw(u32),
    }
    if draw(st.booleans()):
        total = draw(st.integers(0, limits.MAX_RESULT_SIZE))
        return Result(
            **common,
            offset=total,
            total=total,
            data=b"",
            fin=True,
            sha256=draw(digest),
            status=draw(text(limits.MAX_STATUS)),
            detail=draw(text(limits.MAX_TEXT)),
            cpu_ms=draw(u32),
            wall_ms=draw(u32),
        )
    data = draw(st.binary(min_size=1, max_size=limits.MAX_CHUNK))
    total = draw(st.integers(len(data), limits.MAX_RESULT_SIZE))
    offset = draw(st.integers(0, total - len(data)))
    return Result(**common, offset=offset, total=total, data=data, fin=False)


@st.composite
def checkpoints(draw: st.DrawFn) -> Checkpoint:
    common: dict[str, Any] = {
        "seq": draw(u64),
        "epoch": draw(u32),
        "job": draw(u64),
        "attempt": draw(u32),
    }
    if draw(st.booleans()):
        total = draw(st.integers(0, limits.MAX_CHECKPOINT_SIZE))
        return Checkpoint(
            **common, offset=total, total=total, data=b"", fin=True, sha256=draw(digest)
        )
    data = draw(st.binary(min_size=1, max_size=limits.MAX_CHUNK))
    total = draw(st.integers(len(data), limits.MAX_CHECKPOINT_SIZE))
    offset = draw(st.integers(0, total - len(data)))
    return Checkpoint(**common, offset=offset, total=total, data=data, fin=False)


@st.composite
def starts(draw: st.DrawFn) -> Start:
    attempt = draw(st.integers(1, U32))
    code_size = draw(st.integers(1, limits.MAX_CODE_SIZE))
    input_size = draw(st.integers(0, limits.MAX_INPUT_SIZE))
    room = min(limits.MAX_CHECKPOINT_SIZE, MAX_TRANSFER - code_size - input_size)
    resume: dict[str, Any] = {}
    if draw(st.booleans()):
        resume = {
            "resume_attempt": draw(st.integers(0, attempt - 1)),
            "resume_size": draw(st.integers(0, room)),
            "resume_sha256": draw(digest),
        }
    return Start(
        seq=draw(u64),
        epoch=draw(u32),
        job=draw(u64),
        attempt=attempt,
        kind=draw(st.sampled_from(["python", "exec"])),
        code_size=code_size,
        code_sha256=draw(digest),
        input_size=input_size,
        input_sha256=draw(digest),
        cpu_seconds=draw(st.integers(1, U32)),
        memory_bytes=draw(st.integers(1, U64)),
        wall_seconds=draw(st.integers(1, U32)),
        output_bytes=draw(st.integers(0, limits.MAX_RESULT_SIZE)),
        disk_bytes=draw(st.integers(1, U64)),
        checkpoint_bytes=draw(st.none() | st.integers(1, limits.MAX_CHECKPOINT_SIZE)),
        **resume,
    )


@st.composite
def errors(draw: st.DrawFn) -> Error:
    seq_epoch = draw(st.none() | st.tuples(u64, u32))
    job_attempt = draw(st.none() | st.tuples(u64, u32))
    return Error(
        seq=None if seq_epoch is None else seq_epoch[0],
        epoch=None if seq_epoch is None else seq_epoch[1],
        code=draw(u16),
        message=draw(text(limits.MAX_TEXT)),
        job=None if job_attempt is None else job_attempt[0],
        attempt=None if job_attempt is None else job_attempt[1],
    )


@st.composite
def codes(draw: st.DrawFn) -> Code:
    data = draw(st.binary(min_size=1, max_size=limits.MAX_CHUNK))
    max_transfer = limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE
    return Code(
        seq=draw(u64),
        epoch=draw(u32),
        job=draw(u64),
        attempt=draw(u32),
        offset=draw(st.integers(0, max_transfer - len(data))),
        data=data,
    )


@st.composite
def hellos(draw: st.DrawFn) -> Hello:
    hello = Hello(
        versions=tuple(draw(st.lists(u8, min_size=1, max_size=limits.MAX_VERSIONS))),
        agent=draw(digest),
        nonce=draw(digest),
        cookie=draw(st.binary(max_size=limits.MAX_COOKIE)),
    )
    size = draw(st.integers(limits.MIN_HELLO_DATAGRAM, limits.MAX_DATAGRAM))
    return pad_hello(hello, size)


MESSAGES: dict[type[Message], st.SearchStrategy[Any]] = {
    Hello: hellos(),
    Retry: st.builds(Retry, cookie=st.binary(min_size=1, max_size=limits.MAX_COOKIE)),
    Challenge: st.builds(
        Challenge,
        nonce=digest,
        pcrs=st.sets(st.integers(0, 23), min_size=1).map(lambda s: tuple(sorted(s))),
    ),
    # Realistic sizes: the field bounds together exceed one datagram (PROTOCOL.md).
    Attest: st.builds(
        Attest,
        ephemeral=st.binary(min_size=1, max_size=300),
        quote=st.binary(min_size=1, max_size=300),
        signature=st.binary(min_size=1, max_size=300),
        pcr_values=st.lists(digest, min_size=1, max_size=8).map(tuple),
    ),
    Key: st.builds(
        Key,
        wrapped=st.binary(min_size=1, max_size=limits.MAX_WRAPPED_KEY),
        server_key=digest,
        signature=st.binary(min_size=64, max_size=64),
        window=st.integers(1, limits.MAX_WINDOW),
        idle_timeout_ms=u32,
    ),
    Reject: st.builds(Reject, code=u16, reason=text(limits.MAX_TEXT)),
    Ready: st.builds(
        Ready,
        seq=u64,
        epoch=u32,
        slots=st.integers(1, 255),
        max_memory_bytes=st.integers(1, U64),
        max_cpu_seconds=st.integers(1, U32),
        max_wall_seconds=st.integers(1, U32),
        max_output_bytes=st.integers(0, limits.MAX_RESULT_SIZE),
        max_job_bytes=st.integers(1, limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE),
        max_disk_bytes=st.integers(1, U64),
        kinds=st.sampled_from([("python",), ("exec",), ("python", "exec"), ("exec", "python")]),
    ),
    Start: starts(),
    Code: codes(),
    End: st.builds(
        End,
        seq=u64,
        epoch=u32,
        job=u64,
        attempt=u32,
        total=st.integers(0, limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE),
    ),
    Result: results(),
    Checkpoint: checkpoints(),
    Ack: st.builds(
        Ack,
        ranges=ack_ranges(),
        delay_us=u32,
        committed=st.lists(st.tuples(u64, u32), max_size=limits.MAX_COMMITTED).map(tuple),
    ),
    Reset: st.builds(Reset, epoch=u32, reason=text(limits.MAX_TEXT)),
    Ping: st.builds(Ping, token=u64),
    Pong: st.builds(Pong, token=u64),
    Error: errors(),
}
any_message = st.one_of(*MESSAGES.values())

# ---- round trips ------------------------------------------------------------------


def test_every_packet_type_has_a_strategy() -> None:
    assert {cls.ptype for cls in MESSAGES} == set(PacketType)


@pytest.mark.parametrize("cls", list(MESSAGES), ids=lambda c: c.__name__)
def test_round_trip(cls: type[Message]) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(MESSAGES[cls])
    def check(message: Message) -> None:
        body = encode_body(message)
        assert decode_body(cls.ptype, body) == message
        assert encode_body(decode_body(cls.ptype, body)) == body

    check()


def test_largest_messages_fit_in_one_datagram() -> None:
    """Every schema but ATTEST fits in one encrypted datagram even at its bounds."""
    text_max = "x" * limits.MAX_TEXT
    largest: list[Message] = [
        Retry(cookie=bytes(limits.MAX_COOKIE)),
        Challenge(nonce=bytes(32), pcrs=tuple(range(24))),
        Key(
            wrapped=bytes(limits.MAX_WRAPPED_KEY),
            server_key=bytes(32),
            signature=bytes(64),
            window=limits.MAX_WINDOW,
            idle_timeout_ms=U32,
        ),
        Reject(code=0xFFFF, reason=text_max),
        Ready(seq=U64, epoch=U32, slots=255),
        Start(
            seq=U64,
            epoch=U32,
            job=U64,
            attempt=U32,
            kind="python",
            code_size=limits.MAX_CODE_SIZE,
            code_sha256=bytes(32),
            # The stream is at most MAX_TRANSFER: input gives way to the resume state.
            input_size=limits.MAX_INPUT_SIZE - limits.MAX_CHECKPOINT_SIZE,
            input_sha256=bytes(32),
            cpu_seconds=U32,
            memory_bytes=U64,
            wall_seconds=U32,
            output_bytes=limits.MAX_RESULT_SIZE,
            disk_bytes=U64,
            checkpoint_bytes=limits.MAX_CHECKPOINT_SIZE,
            resume_attempt=U32 - 1,
            resume_size=limits.MAX_CHECKPOINT_SIZE,
            resume_sha256=bytes(32),
        ),
        Code(seq=U64, epoch=U32, job=U64, attempt=U32, offset=2**20, data=bytes(1280)),
        End(seq=U64, epoch=U32, job=U64, attempt=U32, total=2**29),
        Result(
            seq=U64,
            epoch=U32,
            job=U64,
            attempt=U32,
            offset=0,
            total=limits.MAX_RESULT_SIZE,
            data=bytes(limits.MAX_CHUNK),
            fin=False,
        ),
        Result(
            seq=U64,
            epoch=U32,
            job=U64,
            attempt=U32,
            offset=limits.MAX_RESULT_SIZE,
            total=limits.MAX_RESULT_SIZE,
            data=b"",
            fin=True,
            sha256=bytes(32),
            status="s" * limits.MAX_STATUS,
            detail=text_max,
            cpu_ms=U32,
            wall_ms=U32,
        ),
        Checkpoint(
            seq=U64,
            epoch=U32,
            job=U64,
            attempt=U32,
            offset=0,
            total=limits.MAX_CHECKPOINT_SIZE,
            data=bytes(limits.MAX_CHUNK),
            fin=False,
        ),
        Checkpoint(
            seq=U64,
            epoch=U32,
            job=U64,
            attempt=U32,
            offset=limits.MAX_CHECKPOINT_SIZE,
            total=limits.MAX_CHECKPOINT_SIZE,
            data=b"",
            fin=True,
            sha256=bytes(32),
        ),
        Ack(
            ranges=tuple((U64 - 2 * i - 1, U64 - 2 * i) for i in range(limits.MAX_ACK_RANGES)),
            delay_us=U32,
            committed=((U64, U32),) * limits.MAX_COMMITTED,
        ),
        Reset(epoch=U32, reason=text_max),
        Ping(token=U64),
        Pong(token=U64),
        Error(seq=U64, epoch=U32, code=0xFFFF, message=text_max, job=U64, attempt=U32),
    ]
    assert {type(m) for m in largest} == set(MESSAGES) - {Hello, Attest}
    for message in largest:
        assert len(encode_body(message)) <= limits.MAX_PLAINTEXT_BODY, message.ptype


# ---- HELLO padding -------------------------------------------------------------------


def hello(**overrides: Any) -> Hello:
    fields: dict[str, Any] = {"versions": (1,), "agent": bytes(32), "nonce": b"\x01" * 32}
    fields.update(overrides)
    return Hello(**fields)


@pytest.mark.parametrize("cookie", [b"", bytes(20), bytes(64)])
@pytest.mark.parametrize("size", [1200, 1201, 1472])
def test_pad_hello_gives_exact_datagram_size(cookie: bytes, size: int) -> None:
    padded = pad_hello(hello(cookie=cookie), size)
    assert padded.pad == bytes(len(padded.pad))
    assert len(encode_plaintext_packet(padded, 0, 0)) == size


def test_encoder_pads_a_short_hello() -> None:
    body = encode_body(hello())
    assert len(body) + limits.HEADER_LEN == limits.MIN_HELLO_DATAGRAM
    assert decode_body(PacketType.HELLO, body) == pad_hello(hello())


def test_short_hello_is_dropped_by_the_decoder() -> None:
    body = msgpack.packb(dataclasses.asdict(hello()))
    assert len(body) < limits.MIN_HELLO_BODY
    with pytest.raises(DecodeError):
        decode_body(PacketType.HELLO, body)


def test_pad_hello_rejects_impossible_sizes() -> None:
    with pytest.raises(LimitExceeded):
        pad_hello(hello(), limits.MIN_HELLO_DATAGRAM - 1)
    with pytest.raises(LimitExceeded):
        pad_hello(hello(), limits.MAX_DATAGRAM + 1)


# ---- schema rules ---------------------------------------------------------------------


def code_map(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "seq": 1,
        "epoch": 0,
        "job": 7,
        "attempt": 1,
        "offset": 0,
        "data": b"x",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not _DROP}


_DROP = object()


def decode_code(fields: dict[Any, Any]) -> Message:
    return decode_body(PacketType.CODE, msgpack.packb(fields))


def test_code_map_is_valid() -> None:
    assert decode_code(code_map()) == Code(seq=1, epoch=0, job=7, attempt=1, offset=0, data=b"x")


@pytest.mark.parametrize(
    "changes",
    [
        {"seq": True},  # bool is not an int
        {"seq": -1},
        {"seq": 1.0},
        {"epoch": 2**32},
        {"attempt": None},
        {"data": "x"},  # str is not bin
        {"data": b""},
        {"data": bytes(limits.MAX_CHUNK + 1)},
        {"offset": limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE},
        {"job": [1]},
        {"seq": _DROP},
        {"extra": 1},
    ],
    ids=repr,
)
def test_code_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(DecodeError):
        decode_code(code_map(**changes))


def test_non_str_keys_are_rejected() -> None:
    fields: dict[Any, Any] = code_map()
    fields[b"seq"] = fields.pop("seq")
    with pytest.raises(DecodeError):
        decode_code(fields)
    with pytest.raises(DecodeError):
        decode_body(PacketType.PING, b"\x81\x01\x01")  # int key


def test_duplicate_keys_are_rejected() -> None:
    body = b"\x82\xa5token\x01\xa5token\x02"
    with pytest.raises(DecodeError):
        decode_body(PacketType.PING, body)


def test_non_minimal_encodings_are_accepted() -> None:
    # map16 with one entry, and token as a uint64 although it fits a fixint.
    body = b"\xde\x00\x01\xa5token\xcf" + (5).to_bytes(8, "big")
    assert decode_body(PacketType.PING, body) == Ping(token=5)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc0",  # nil
        b"\x91\x01",  # array
        b"\x81\xa5token",  # truncated
        b"\x81\xa5token\x01\x00",  # trailing byte
        b"\x81\xa5token\xd4\x01\x00",  # ext
        b"\x81\xa5token\xd6\xff\x00\x00\x00\x00",  # timestamp ext
        b"\x81\xa5token\xc1",  # never-used byte
        b"\xdf\x00\x00\x00\x01\xa5token\x01",  # map32
        b"\x81\xa5tok\xffn\x01",  # invalid UTF-8 key
        b"\x81\xa5token" + b"\x91" * 200 + b"\x01",  # deep nesting
        b"\x81\xa5token\xdd\xff\xff\xff\xff",  # array32 claiming 4 Gi items
        b"\x81\xa5token\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    ],
    ids=lambda b: b[:12].hex(),
)
def test_malformed_msgpack(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_body(PacketType.PING, body)


def test_oversized_bodies_raise_limit_exceeded() -> None:
    with pytest.raises(LimitExceeded):
        decode_body(PacketType.CODE, bytes(limits.MAX_PLAINTEXT_BODY + 1))
    with pytest.raises(LimitExceeded):
        decode_body(PacketType.ATTEST, bytes(limits.MAX_BODY + 1))
    with pytest.raises(LimitExceeded):
        encode_body(
            Attest(ephemeral=bytes(600), quote=bytes(1024), signature=b"s", pcr_values=(bytes(32),))
        )


def test_unknown_packet_type() -> None:
    with pytest.raises(DecodeError):
        decode_body(0x99, b"\x80")


def test_str_bounds_are_in_utf8_bytes() -> None:
    Reject(code=1, reason="é" * 128)
    with pytest.raises(LimitExceeded):
        Reject(code=1, reason="é" * 129)
    with pytest.raises(DecodeError):
        Reject(code=1, reason="\ud800")  # lone surrogate cannot be UTF-8


def test_challenge_pcrs_strictly_ascending_and_in_range() -> None:
    Challenge(nonce=bytes(32), pcrs=(17, 18))
    for pcrs in [(18, 17), (17, 17), (24,), ()]:
        with pytest.raises(DecodeError):
            Challenge(nonce=bytes(32), pcrs=pcrs)
    with pytest.raises(DecodeError):
        Challenge(nonce=bytes(32), pcrs=[17, 18])  # type: ignore[arg-type]


def test_ack_ranges_rules() -> None:
    Ack(ranges=((10, 20), (5, 8), (4, 4)), delay_us=0)
    Ack(ranges=((9, 20), (5, 8)), delay_us=0)  # adjacent is allowed, only overlap is not
    for ranges in [(), ((20, 10),), ((5, 8), (10, 20)), ((5, 10), (10, 20)), ((5, 10), (8, 9))]:
        with pytest.raises(DecodeError):
            Ack(ranges=ranges, delay_us=0)
    too_many = limits.MAX_ACK_RANGES + 1
    with pytest.raises(LimitExceeded):
        Ack(ranges=tuple((2 * i, 2 * i) for i in range(too_many, 0, -1)), delay_us=0)
    with pytest.raises(LimitExceeded):
        Ack(ranges=((1, 1),), delay_us=0, committed=((1, 1),) * (limits.MAX_COMMITTED + 1))
    with pytest.raises(DecodeError):
        Ack(ranges=((1, 1),), delay_us=0, committed=((1, 2**32),))


def result(**changes: Any) -> Result:
    fields: dict[str, Any] = {"job": 1, "attempt": 1, "offset": 0, "total": 10}
    fields.update(changes)
    return Result(**fields)


SUMMARY: dict[str, Any] = {
    "sha256": bytes(32),
    "status": "ok",
    "detail": "",
    "cpu_ms": 1,
    "wall_ms": 2,
}


def test_result_rules() -> None:
    result(data=b"0123456789", fin=False)
    result(offset=10, data=b"", fin=True, **SUMMARY)
    result(offset=0, total=0, data=b"", fin=True, **SUMMARY)
    bad: list[dict[str, Any]] = [
        {"data": b"", "fin": False},  # empty data chunk
        {"data": b"01234567890", "fin": False},  # beyond total
        {"data": b"x", "fin": False, "sha256": bytes(32)},  # summary without fin
        {"data": b"0123456789", "fin": True, **SUMMARY},  # fin carries data
        {"offset": 9, "data": b"", "fin": True, **SUMMARY},  # fin before total
        {"offset": 10, "data": b"", "fin": True, **{**SUMMARY, "wall_ms": None}},
        {"offset": 10, "data": b"", "fin": 1, **SUMMARY},
    ]
    for changes in bad:
        with pytest.raises(DecodeError):
            result(**changes)


def test_result_summary_keys_absent_unless_fin() -> None:
    body = encode_body(result(data=b"x", fin=False))
    assert set(msgpack.unpackb(body)) == {
        "seq", "epoch", "job", "attempt", "offset", "total", "data", "fin"
    }  # fmt: skip
    with pytest.raises(DecodeError):  # nil is not the same as absent
        decode_body(PacketType.RESULT, msgpack.packb({**msgpack.unpackb(body), "sha256": None}))


def test_error_pairs() -> None:
    plain = Error(code=ErrorCode.BUSY, message="busy")
    assert set(msgpack.unpackb(encode_body(plain))) == {"code", "message", "job", "attempt"}
    sealed = Error(seq=3, epoch=1, code=20, message="", job=5, attempt=1)
    assert list(msgpack.unpackb(encode_body(sealed))) == [
        "seq", "epoch", "code", "message", "job", "attempt"
    ]  # fmt: skip
    for fields in [{"seq": 1}, {"epoch": 1}, {"job": 1}, {"attempt": 1}]:
        with pytest.raises(DecodeError):
            Error(code=1, message="", **fields)
    with pytest.raises(DecodeError):  # job/attempt keys are required (as nil)
        decode_body(PacketType.ERROR, msgpack.packb({"code": 1, "message": ""}))


def test_start_rules() -> None:
    start = Start(
        job=1,
        attempt=1,
        kind="exec",
        code_size=10,
        code_sha256=bytes(32),
        input_size=0,
        input_sha256=bytes(32),
        cpu_seconds=1,
        memory_bytes=1,
        wall_seconds=1,
        output_bytes=0,
        disk_bytes=1,
    )
    cases: list[tuple[str, Any]] = [
        ("kind", "shell"),
        ("code_size", 0),
        ("code_size", limits.MAX_CODE_SIZE + 1),
        ("input_size", limits.MAX_INPUT_SIZE + 1),
        ("output_bytes", limits.MAX_RESULT_SIZE + 1),
        ("cpu_seconds", 0),
        ("wall_seconds", 0),
        ("memory_bytes", 0),
        ("code_sha256", bytes(31)),
        ("disk_bytes", 0),
        ("disk_bytes", U64 + 1),
    ]
    for field, value in cases:
        with pytest.raises(DecodeError):
            dataclasses.replace(start, **{field: value})


READY_OUT_OF_BOUNDS: list[tuple[str, Any]] = [
    ("max_memory_bytes", 0),
    ("max_memory_bytes", U64 + 1),
    ("max_cpu_seconds", 0),
    ("max_cpu_seconds", U32 + 1),
    ("max_wall_seconds", 0),
    ("max_wall_seconds", U32 + 1),
    ("max_output_bytes", limits.MAX_RESULT_SIZE + 1),
    ("max_job_bytes", 0),
    ("max_job_bytes", limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE + 1),
    ("max_disk_bytes", 0),
    ("max_disk_bytes", U64 + 1),
    ("max_memory_bytes", True),
    ("max_memory_bytes", 1.5),
    ("kinds", ()),
    ("kinds", ("python", "python")),
    ("kinds", ("python", "exec", "python")),
    ("kinds", ("shell",)),
    ("kinds", (b"python",)),
    ("kinds", "python"),
]


@pytest.mark.parametrize(("field", "value"), READY_OUT_OF_BOUNDS)
def test_ready_maxima_are_bounded_on_decode(field: str, value: Any) -> None:
    """Every maximum READY declares is checked when the body is decoded."""
    body = dict(Ready()._to_map())
    body[field] = list(value) if isinstance(value, tuple) else value
    if not (isinstance(value, int) and value > U64):  # msgpack has no integer above u64
        with pytest.raises(DecodeError):
            decode_body(PacketType.READY, msgpack.packb(body))
    with pytest.raises(DecodeError):
        dataclasses.replace(Ready(), **{field: value})


def test_ready_carries_the_agents_capacity() -> None:
    cap = JobCapacity(
        memory_bytes=256 << 20,
        cpu_seconds=60,
        wall_seconds=120,
        output_bytes=1 << 20,
        job_bytes=1 << 20,
        disk_bytes=1 << 30,
        kinds=("python",),
    )
    ready = Ready.declaring(cap)
    decoded = decode_body(PacketType.READY, encode_body(ready))
    assert isinstance(decoded, Ready)
    assert decoded.capacity == cap
    # An agent that declares nothing is bounded only by the protocol.
    assert Ready().capacity == UNLIMITED


def test_capacity_from_volunteer_limits_rounds_into_the_wire_bounds() -> None:
    cap = JobCapacity.clamped(
        memory_bytes=1 << 70,
        cpu_seconds=1 << 40,
        wall_seconds=7.9,
        output_bytes=1 << 40,
        job_bytes=1 << 40,
        disk_bytes=1 << 30,
    )
    assert cap.memory_bytes == U64
    assert cap.cpu_seconds == U32
    assert cap.wall_seconds == 7  # never more than the volunteer allows
    assert cap.output_bytes == limits.MAX_RESULT_SIZE
    assert cap.job_bytes == limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE
    assert cap.disk_bytes == 1 << 30


def test_error_codes_are_stable() -> None:
    assert {c.name: c.value for c in ErrorCode} == {
        "PROTOCOL_VIOLATION": 1,
        "UNSUPPORTED_VERSION": 2,
        "ATTESTATION_FAILED": 10,
        "SERVER_KEY_MISMATCH": 11,
        "SIZE_MISMATCH": 20,
        "HASH_MISMATCH": 21,
        "JOB_TOO_LARGE": 22,
        "SANDBOX_FAILURE": 23,
        "JOB_ABANDONED": 24,
        "JOB_LOST": 25,
        "SESSION_EXPIRED": 30,
        "IDLE_TIMEOUT": 31,
        "SERVER_SHUTDOWN": 32,
        "AGENT_SHUTDOWN": 33,
        "TRANSFER_FAILED": 40,
        "BUSY": 41,
        "INTERNAL": 50,
    }


def test_an_unknown_error_code_still_decodes() -> None:
    """A peer that does not know a code (JOB_LOST, to a release before it) still
    decodes the ERROR, with the number as it came: PROTOCOL.md section 6 has it treat
    the code as INTERNAL, which for a job ERROR is a refusal of that job."""
    for code in (int(ErrorCode.JOB_LOST), 777):
        message = Error(seq=1, epoch=0, code=code, message="lost", job=5, attempt=1)
        decoded = decode_body(PacketType.ERROR, encode_body(message))
        assert isinstance(decoded, Error) and decoded.code == code
    assert 777 not in {c.value for c in ErrorCode}


# ---- helpers ---------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.one_of(MESSAGES[Code], MESSAGES[Result], MESSAGES[Start], errors()), u64, u32)
def test_with_sequence_matches_replace(message: Any, seq: int, epoch: int) -> None:
    assert with_sequence(message, seq, epoch) == dataclasses.replace(message, seq=seq, epoch=epoch)


def test_with_sequence_validates() -> None:
    message = Ready()
    with pytest.raises(DecodeError):
        with_sequence(message, -1, 0)
    with pytest.raises(DecodeError):
        with_sequence(message, 0, 2**32)


def test_plaintext_packet_helpers() -> None:
    retry = Retry(cookie=b"c" * 20)
    raw = encode_plaintext_packet(retry, 0, 1)
    header, message = decode_plaintext_packet(raw)
    assert (header.ptype, header.session_id, header.packet_number) == (PacketType.RETRY, 0, 1)
    assert message == retry
    sealed = pack_header(PacketType.RETRY, Flag.ENCRYPTED, 0, 1, len(raw) - 24) + raw[24:]
    with pytest.raises(DecodeError):
        decode_plaintext_packet(sealed)


# ---- hostile input ----------------------------------------------------------------------

PTYPES = st.sampled_from(PacketType)


def decodes_or_rejects(ptype: PacketType, body: bytes) -> None:
    try:
        message = decode_body(ptype, body)
    except DecodeError:
        return
    assert message.ptype is ptype
    encode_body(message)  # anything accepted is re-encodable


@settings(max_examples=300, deadline=None)
@given(PTYPES, st.binary(max_size=limits.MAX_BODY + 4))
def test_random_bytes(ptype: PacketType, body: bytes) -> None:
    decodes_or_rejects(ptype, body)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=limits.MIN_HELLO_BODY, max_size=limits.MAX_BODY))
def test_random_hello_sized_bytes(body: bytes) -> None:
    decodes_or_rejects(PacketType.HELLO, body)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[PacketType, bytes]:
    message = draw(any_message)
    body = bytearray(encode_body(message))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "append", "insert", "delete"]))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        if kind == "flip" and body:
            body[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and body:
            body[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC2, 0xC3, 0xFF]))
        elif kind == "truncate":
            del body[at:]
        elif kind == "append":
            body += draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and body:
            del body[at]
    return message.ptype, bytes(body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_encodings(case: tuple[PacketType, bytes]) -> None:
    decodes_or_rejects(*case)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), U64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@st.composite
def plausible_maps(draw: st.DrawFn) -> tuple[PacketType, bytes]:
    """Maps with the right keys and wrong-typed values: reaches the field checks."""
    cls = draw(st.sampled_from(list(MESSAGES)))
    names = [f.name for f in dataclasses.fields(cls)]
    keys = draw(st.lists(st.sampled_from([*names, "x"]), unique=True))
    body = msgpack.packb({k: draw(msgpack_values) for k in keys})
    assume(len(body) <= limits.MAX_BODY)
    return cls.ptype, body


@settings(max_examples=200, deadline=None)
@given(plausible_maps())
def test_plausible_maps(case: tuple[PacketType, bytes]) -> None:
    decodes_or_rejects(*case)


def test_int_subclasses_are_accepted_and_sent_as_plain_ints() -> None:
    error = Error(code=ErrorCode.BUSY, message="")
    assert msgpack.unpackb(encode_body(error))["code"] == 41
    assert decode_body(PacketType.ERROR, encode_body(error)) == error
    assert Code(seq=ErrorCode.BUSY, epoch=0, job=1, attempt=1, offset=0, data=b"x").seq == 41
    with pytest.raises(LimitExceeded):
        Code(seq=ErrorCode.BUSY, epoch=0, job=1, attempt=1, offset=2**29, data=b"x")


def test_a_start_whose_stream_would_pass_the_transfer_bound_is_refused() -> None:
    fields: dict[str, Any] = dict(
        job=1,
        attempt=2,
        kind="python",
        code_size=limits.MAX_CODE_SIZE,
        code_sha256=bytes(32),
        input_size=limits.MAX_INPUT_SIZE,
        input_sha256=bytes(32),
        cpu_seconds=1,
        memory_bytes=1,
        wall_seconds=1,
        output_bytes=0,
        disk_bytes=1,
    )
    Start(**fields, resume_attempt=1, resume_size=0, resume_sha256=bytes(32))
    with pytest.raises(DecodeError, match="exceed"):
        Start(**fields, resume_attempt=1, resume_size=1, resume_sha256=bytes(32))
    with pytest.raises(DecodeError, match="go together"):
        Start(**fields, resume_attempt=1)
    with pytest.raises(DecodeError, match="earlier attempt"):
        Start(**fields, resume_attempt=2, resume_size=0, resume_sha256=bytes(32))

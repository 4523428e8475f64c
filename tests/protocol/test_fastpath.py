"""CODE and ACK: the fast predicates accept exactly what the schema accepts."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.fastpath import (
    Ack,
    Code,
    _ack_ok,
    _code_ok,
    code_with_sequence,
    encode_code,
)
from vcomp.protocol.messages import decode_body, encode_body
from vcomp.protocol.schema import MAX_TRANSFER, U32, U64, validate
from vcomp.protocol.wire import PacketType


def near(*bounds: int) -> st.SearchStrategy[int]:
    """Integers at and around each bound (where a wrong comparison would show)."""
    return st.sampled_from(sorted({b + d for b in bounds for d in (-1, 0, 1)}))


def oddities() -> st.SearchStrategy[object]:
    return st.sampled_from([None, True, 1.0, "1", b"1", (1, 2), [1, 2]])


def schema_accepts(cls: type[Any], **fields: object) -> bool:
    message = object.__new__(cls)
    for name, value in fields.items():
        cls.__dict__[name].__set__(message, value)
    try:
        validate(message)
    except DecodeError:
        return False
    if cls is Code:
        return fields["offset"] + len(fields["data"]) <= MAX_TRANSFER  # type: ignore[operator,arg-type]
    return True


@settings(max_examples=3000, deadline=None)
@given(
    seq=near(0, U64) | oddities(),
    epoch=near(0, U32) | oddities(),
    job=near(0, U64) | oddities(),
    attempt=near(0, U32) | oddities(),
    offset=near(0, MAX_TRANSFER - 1, MAX_TRANSFER - limits.MAX_CHUNK) | oddities(),
    size=near(0, limits.MAX_CHUNK),
    data_type=st.sampled_from([bytes, bytearray, str]),
)
def test_code_predicate_and_schema_agree(
    seq: object,
    epoch: object,
    job: object,
    attempt: object,
    offset: object,
    size: int,
    data_type: type,
) -> None:
    size = max(size, 0)
    data = data_type(size) if data_type is not str else "x" * size
    fields = dict(seq=seq, epoch=epoch, job=job, attempt=attempt, offset=offset, data=data)
    assert _code_ok(**fields) == schema_accepts(Code, **fields)


@settings(max_examples=3000, deadline=None)
@given(
    ranges=st.lists(st.tuples(near(0, U64), near(0, U64)), max_size=3).map(tuple)
    | st.just(tuple((i, i) for i in range(2 * limits.MAX_ACK_RANGES, 0, -2)))
    | oddities(),
    delay_us=near(0, U32) | oddities(),
    committed=st.lists(st.tuples(near(0, U64), near(0, U32)), max_size=3).map(tuple) | oddities(),
)
def test_ack_predicate_and_schema_agree(
    ranges: object, delay_us: object, committed: object
) -> None:
    fields = dict(ranges=ranges, delay_us=delay_us, committed=committed)
    assert _ack_ok(**fields) == schema_accepts(Ack, **fields)


def test_one_map_each_round_trips_through_the_fast_decoders() -> None:
    code = Code(seq=3, epoch=2, job=9, attempt=1, offset=1200, data=b"x" * 1200)
    assert decode_body(PacketType.CODE, encode_body(code)) == code
    ack = Ack(ranges=((10, 12), (1, 3)), delay_us=5, committed=((9, 1),))
    assert decode_body(PacketType.ACK, encode_body(ack)) == ack
    assert code_with_sequence(code, 7, 4) == Code(
        seq=7, epoch=4, job=9, attempt=1, offset=1200, data=b"x" * 1200
    )


def in_range(top: int) -> st.SearchStrategy[int]:
    """0..top, with every msgpack integer width's edges (where the encoding changes)."""
    edges = [e for b in (0, 127, 255, 2**16 - 1, 2**32 - 1, top) for e in (b, b + 1)]
    return st.integers(0, top) | st.sampled_from([e for e in edges if e <= top])


@settings(max_examples=500, deadline=None)
@given(
    seq=in_range(U64),
    epoch=in_range(U32),
    job=in_range(U64),
    attempt=in_range(U32),
    offset=in_range(MAX_TRANSFER - limits.MAX_CHUNK),
    size=st.integers(1, limits.MAX_CHUNK),
)
def test_encode_code_is_the_body_of_the_code_byte_for_byte(
    seq: int, epoch: int, job: int, attempt: int, offset: int, size: int
) -> None:
    fields = dict(seq=seq, epoch=epoch, job=job, attempt=attempt, offset=offset)
    code = Code(**fields, data=bytes(size))
    body = encode_code(**fields, data=bytes(size))  # type: ignore[arg-type]
    assert body == encode_body(code)
    assert decode_body(PacketType.CODE, body) == code


def test_encode_code_refuses_what_code_refuses_with_the_same_error() -> None:
    good: dict[str, Any] = dict(seq=0, epoch=0, job=1, attempt=1, offset=0, data=b"x")
    for name, bad in [
        ("seq", -1),
        ("epoch", U32 + 1),
        ("job", U64 + 1),
        ("attempt", "1"),
        ("offset", -1),
        ("data", b""),
        ("data", bytes(limits.MAX_CHUNK + 1)),
        ("data", bytearray(4)),
    ]:
        fields = {**good, name: bad}
        with pytest.raises(DecodeError) as from_code:
            Code(**fields)
        with pytest.raises(type(from_code.value), match=re.escape(str(from_code.value))):
            encode_code(**fields)
    with pytest.raises(LimitExceeded):
        encode_code(**{**good, "offset": MAX_TRANSFER})

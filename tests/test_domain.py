"""The domain-interface framing (vcomp.domain)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vcomp.domain import (
    AGENT_FRAME_TYPES,
    CHECKPOINT,
    DEFAULT_MAX_CHECKPOINT,
    ERROR,
    MAX_ERROR_BYTES,
    PROGRESS,
    RESULT,
    RESUME,
    START,
    DomainProtocolError,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    decode_progress,
    encode_checkpoint,
    encode_error,
    encode_frame,
    encode_progress,
    encode_result,
    encode_resume,
    encode_start,
)
from vcomp.errors import SandboxError


def test_wire_layout_is_type_then_u32_be_length() -> None:
    assert encode_result(b"abc") == b"\x02\x00\x00\x00\x03abc"
    assert encode_start(b"") == b"\x01\x00\x00\x00\x00"
    assert encode_progress(0.5) == b"\x03\x00\x00\x00\x04" + (500_000).to_bytes(4, "big")


def test_errors_are_sandbox_errors() -> None:
    assert issubclass(DomainProtocolError, SandboxError)
    assert issubclass(FrameTooLarge, DomainProtocolError)


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=17))
def test_decoder_reassembles_any_split(payloads: list[bytes], step: int) -> None:
    stream = b"".join(encode_result(p) for p in payloads)
    decoder = FrameDecoder(300)
    frames: list[Frame] = []
    for i in range(0, len(stream), step):
        frames += decoder.feed(stream[i : i + step])
    assert [f.payload for f in frames] == payloads
    assert all(f.type == RESULT for f in frames)
    assert decoder.pending == 0


@pytest.mark.parametrize(
    ("fraction", "millionths"),
    [
        # domain.md 8.2: clamp to [0, 1], multiply by 1e6 in IEEE-754 double precision,
        # round half to even (C: nearbyint() in the default rounding mode).
        (0.1, 100_000),
        (2 / 3, 666_667),
        (1 / 3, 333_333),
        (5e-07, 0),  # 0.5 exactly: to even
        (1.5e-06, 2),  # 1.5: to even
        (2.5e-06, 2),  # 2.5: to even, down
        (3.5e-06, 4),
        (0.9999995, 1_000_000),  # 999999.5: to even, up
        (0.9999994999, 999_999),
        (5e-324, 0),
        (1.0000000001, 1_000_000),
        (float("inf"), 1_000_000),
        (-0.0, 0),
        (float("-inf"), 0),
        (-1e-9, 0),
    ],
)
def test_progress_millionths_are_rounded_half_to_even_after_clamping(
    fraction: float, millionths: int
) -> None:
    assert encode_progress(fraction) == b"\x03\x00\x00\x00\x04" + millionths.to_bytes(4, "big")


def test_progress_round_trip_and_clamping() -> None:
    (frame,) = FrameDecoder(10).feed(encode_progress(0.25))
    assert decode_progress(frame.payload) == 0.25
    assert decode_progress(FrameDecoder(10).feed(encode_progress(7.0))[0].payload) == 1.0
    assert decode_progress(FrameDecoder(10).feed(encode_progress(-1.0))[0].payload) == 0.0
    with pytest.raises(DomainProtocolError):
        encode_progress(float("nan"))


def test_oversize_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\x02\x00\x00\x00\x65")  # 101 > 100, before any payload arrives
    with pytest.raises(FrameTooLarge):
        FrameDecoder(1 << 20).feed(b"\x04" + (MAX_ERROR_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge):
        FrameDecoder(1 << 20).feed(b"\x03\x00\x00\x00\x05")


@pytest.mark.parametrize(
    "data",
    [
        b"\x7f\x00\x00\x00\x00",  # unknown type
        b"\x00\x00\x00\x00\x00",
        b"\x01\x00\x00\x00\x00",  # START is not a job frame
        b"\x03\x00\x00\x00\x04" + (1_000_001).to_bytes(4, "big"),  # progress above 1
        b"\x03\x00\x00\x00\x02\x00\x00",  # progress of the wrong size
    ],
)
def test_malformed_frames_raise(data: bytes) -> None:
    with pytest.raises(DomainProtocolError):
        FrameDecoder(1 << 20).feed(data)


def test_allowed_types_are_per_direction() -> None:
    agent_side = FrameDecoder(10, allowed=AGENT_FRAME_TYPES)
    assert agent_side.feed(encode_start(b"in")) == [Frame(START, b"in")]
    with pytest.raises(DomainProtocolError):
        agent_side.feed(encode_result(b""))


def test_error_text_is_truncated_on_a_character_boundary() -> None:
    frame = encode_error("é" * 5000)
    assert frame[0] == ERROR
    length = int.from_bytes(frame[1:5], "big")
    assert length <= MAX_ERROR_BYTES
    assert frame[5:].decode("utf-8") == "é" * (length // 2)


def test_encode_refuses_unknown_types() -> None:
    with pytest.raises(DomainProtocolError):
        encode_frame(0x09, b"")
    assert encode_frame(PROGRESS, b"\x00" * 4)[0] == PROGRESS


def test_frame_names() -> None:
    assert Frame(RESULT, b"").name == "RESULT"
    assert Frame(0x55, b"").name == "0x55"


def collapse(frames: list[Frame]) -> list[Frame]:
    """Consecutive PROGRESS frames reduced to the last of each run."""
    out: list[Frame] = []
    for f in frames:
        if out and f.type == PROGRESS and out[-1].type == PROGRESS:
            out[-1] = f
        else:
            out.append(f)
    return out


frame_st = st.one_of(
    st.integers(min_value=0, max_value=1_000_000).map(
        lambda v: encode_frame(PROGRESS, v.to_bytes(4, "big"))
    ),
    st.binary(max_size=40).map(encode_result),
    st.text(max_size=20).map(encode_error),
)


@given(st.lists(frame_st, max_size=40), st.integers(min_value=1, max_value=64))
def test_coalescing_keeps_every_frame_but_repeated_progress(
    encoded: list[bytes], step: int
) -> None:
    stream = b"".join(encoded)
    plain, coalescing = FrameDecoder(100), FrameDecoder(100, coalesce_progress=True)
    got_plain: list[Frame] = []
    got: list[Frame] = []
    for i in range(0, len(stream), step):
        got_plain += plain.feed(stream[i : i + step])
        got += coalescing.feed(stream[i : i + step])
    assert collapse(got) == collapse(got_plain)
    assert len(got) + coalescing.progress_coalesced == len(got_plain)
    assert coalescing.pending == 0


def test_a_progress_flood_is_one_frame_per_feed() -> None:
    burst = b"".join(encode_progress(i / 7000) for i in range(7001))
    decoder = FrameDecoder(100, coalesce_progress=True)
    assert decoder.feed(burst + encode_result(b"done")) == [
        Frame(PROGRESS, (1_000_000).to_bytes(4, "big")),
        Frame(RESULT, b"done"),
    ]
    assert decoder.progress_coalesced == 7000


def test_coalescing_still_refuses_a_bad_progress_inside_a_run() -> None:
    bad = b"\x03\x00\x00\x00\x04" + (1_000_001).to_bytes(4, "big")
    with pytest.raises(DomainProtocolError):
        FrameDecoder(100, coalesce_progress=True).feed(encode_progress(0.5) * 50 + bad)


def test_checkpoint_and_resume_layout() -> None:
    assert encode_checkpoint(b"st") == b"\x05\x00\x00\x00\x02st"
    assert encode_resume(b"") == b"\x06\x00\x00\x00\x00"


def test_checkpoint_is_a_job_frame_bounded_by_its_own_limit() -> None:
    decoder = FrameDecoder(10, max_checkpoint=1000)  # above the RESULT bound, on purpose
    state = bytes(range(256)) * 3
    frames = decoder.feed(encode_checkpoint(state) + encode_result(b"ok"))
    assert frames == [Frame(CHECKPOINT, state), Frame(RESULT, b"ok")]
    with pytest.raises(FrameTooLarge, match="CHECKPOINT frame of 1001 bytes exceeds 1000"):
        FrameDecoder(10, max_checkpoint=1000).feed(b"\x05" + (1001).to_bytes(4, "big"))
    default = FrameDecoder(1 << 30)
    with pytest.raises(FrameTooLarge):  # the default bound holds even under a big output cap
        default.feed(b"\x05" + (DEFAULT_MAX_CHECKPOINT + 1).to_bytes(4, "big"))
    assert default.pending == 5  # refused from the header: only the header is held


def test_resume_goes_agent_to_job_only() -> None:
    agent_side = FrameDecoder(100, allowed=AGENT_FRAME_TYPES)
    frames = agent_side.feed(encode_resume(b"state") + encode_start(b"in"))
    assert frames == [Frame(RESUME, b"state"), Frame(START, b"in")]
    with pytest.raises(DomainProtocolError, match="unexpected frame type 0x06"):
        FrameDecoder(100).feed(encode_resume(b"state"))  # a job cannot send RESUME
    with pytest.raises(DomainProtocolError, match="unexpected frame type 0x05"):
        FrameDecoder(100, allowed=AGENT_FRAME_TYPES).feed(encode_checkpoint(b""))
    with pytest.raises(FrameTooLarge):
        FrameDecoder(4, allowed=AGENT_FRAME_TYPES).feed(b"\x06\x00\x00\x00\x05")


def test_max_checkpoint_must_fit_a_u32() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(10, max_checkpoint=1 << 32)

"""logfmt: one event, one line, whatever text a peer put in a field."""

from __future__ import annotations

import io
import logging
import sys
import unicodedata
from pathlib import Path

import pytest

from vcomp import logfmt
from vcomp.errors import ConfigError

LINE_BREAKS = [c for c in map(chr, range(sys.maxunicode + 1)) if len(f"a{c}b".splitlines()) > 1]
CONTROLS = [chr(c) for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]]


def _logged(**fields: object) -> str:
    stream = io.StringIO()
    logger = logging.getLogger("vcomp.test_logfmt")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logfmt.event(logger, "probe", **fields)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_every_line_break_and_control_is_escaped() -> None:
    assert set(LINE_BREAKS) >= {"\n", "\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"}
    for c in [*LINE_BREAKS, *CONTROLS, "\u202e", "\u200b", "\ufeff", "\udc80"]:
        out = _logged(message=f"a{c}b")
        assert out.count("\n") == 1 and out.endswith("\n"), repr(c)
        line = out[:-1]
        assert line.splitlines() == [line], repr(c)
        raw = [x for x in line if unicodedata.category(x) in ("Cc", "Cf", "Cs", "Zl", "Zp")]
        assert raw == [], repr(c)


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "plain"),
        (42, "42"),
        ("", '""'),
        ("two words", '"two words"'),
        ("a=b", '"a=b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("cr\r\x1b[2Kforged", '"cr\\r\\x1b[2Kforged"'),
        ("nel\x85ls\u2028ps\u2029", '"nel\\x85ls\\u2028ps\\u2029"'),
        ("del\x7f nul\x00", '"del\\x7f nul\\x00"'),
        ("bidi\u202eoverride", '"bidi\\u202eoverride"'),
        ("héllo", "héllo"),
        ("日本語 テキスト", '"日本語 テキスト"'),
    ],
)
def test_quote(value: object, quoted: str) -> None:
    assert logfmt._quote(value) == quoted


def test_forged_record_stays_inside_its_field() -> None:
    forged = "x\r\x1b[2K2026-01-01T00:00:00.000 INFO vcomp.server event=result_recorded status=ok"
    out = _logged(job=1, message=forged)
    assert out == (
        'event=probe job=1 message="x\\r\\x1b[2K2026-01-01T00:00:00.000 INFO vcomp.server '
        'event=result_recorded status=ok"\n'
    )


def test_peer_text_is_capped() -> None:
    assert logfmt.peer_text("short") == "short"
    long = "y" * 10_000
    capped = logfmt.peer_text(long)
    assert capped.startswith("y" * logfmt.PEER_TEXT_LIMIT)
    assert capped.endswith(f"...(+{10_000 - logfmt.PEER_TEXT_LIMIT} chars)")
    assert len(capped) < logfmt.PEER_TEXT_LIMIT + 32
    assert logfmt.peer_text("abcdef", 3) == "abc...(+3 chars)"
    # The escaped form of a capped field is bounded too (at most \\U plus 8 digits a char).
    out = _logged(message=logfmt.peer_text("\u2028" * 10_000))
    assert len(out) < 10 * logfmt.PEER_TEXT_LIMIT


@pytest.mark.parametrize(
    ("value", "level", "warned"),
    [
        ("warning", logging.WARNING, False),
        ("DEBUG", logging.DEBUG, False),
        ("loud", logging.INFO, True),
    ],
)
def test_log_level_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str, level: int, warned: bool
) -> None:
    monkeypatch.setenv("VCOMP_LOG_LEVEL", value)
    stream = io.StringIO()
    root = logging.getLogger("vcomp")
    saved = root.handlers[:], root.level, root.propagate
    try:
        logfmt.setup(stream=stream)
        assert root.level == level
        assert ("event=bad_log_level" in stream.getvalue()) is warned
    finally:
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def test_log_file_appends_and_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "vcomp.log"
    path.write_text("an older line\n")
    root = logging.getLogger("vcomp")
    saved = root.handlers[:], root.level, root.propagate
    try:
        logfmt.setup(log_file=path)
        logfmt.event(logging.getLogger("vcomp.test"), "first")
        # logrotate (the default, create mode) renames the file and the process goes on:
        path.rename(tmp_path / "vcomp.log.1")
        logfmt.event(logging.getLogger("vcomp.test"), "second")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]
    rotated = (tmp_path / "vcomp.log.1").read_text().splitlines()
    assert rotated[0] == "an older line" and rotated[1].endswith("event=first")
    assert len(rotated) == 2
    (line,) = path.read_text().splitlines()  # reopened at the path
    assert line.endswith("event=second")


def test_a_log_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--log-file .*nope"):
        logfmt.setup(log_file=tmp_path / "nope" / "vcomp.log")

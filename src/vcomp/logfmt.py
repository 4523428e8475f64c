"""One structured log line per event, in logfmt (``event=... key=value``).

Callers pass identifiers and counts only: never key material or payloads.
Text that a peer chose (refusal messages, error details, reasons) goes through
:func:`peer_text` first, which caps its length. Every value is escaped so a log
line stays one line: control characters (C0, DEL, C1), invisible format
characters and every character ``str.splitlines()`` breaks on become ``\\xNN``
or ``\\uNNNN``, so a peer can neither forge a record nor rewrite one on a terminal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import unicodedata
from pathlib import Path

from vcomp.errors import ConfigError

PEER_TEXT_LIMIT = 256
"""Characters of peer-chosen text kept in a log field (the wire's MAX_TEXT is 256 bytes)."""

_SIMPLE = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ASCII_UNSAFE = re.compile(r'[\x00-\x1f\x7f "=\\]')
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _needs_escape(c: str) -> bool:
    if c in _SIMPLE:
        return True
    if c.isascii():
        return not c.isprintable()
    return unicodedata.category(c) in _ESCAPED_CATEGORIES


def _escape(c: str) -> str:
    simple = _SIMPLE.get(c)
    if simple is not None:
        return simple
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _quote(value: object) -> str:
    text = str(value)
    if text and text.isascii() and _ASCII_UNSAFE.search(text) is None:
        return text  # the common case: an identifier or a number
    if text and all(not _needs_escape(c) and c not in " =" for c in text):
        return text
    return '"' + "".join(_escape(c) if _needs_escape(c) else c for c in text) + '"'


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """Text a peer chose, cut to ``limit`` characters for a log field (escaped on output)."""
    text = str(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
    logger.log(level, " ".join(parts))


LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING}
LEVELS["ERROR"] = logging.ERROR


def setup(
    level: int = logging.INFO, stream: object = None, *, log_file: Path | None = None
) -> None:
    """Log lines as ``<time> <level> <logger> event=...`` on stderr, or appended to
    ``log_file`` (``--log-file``).

    Rotation is left to the system: the file is a WatchedFileHandler, which reopens the
    path when the file was renamed or removed (logrotate's default ``create`` mode; no
    ``copytruncate`` needed). ``$VCOMP_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR)
    overrides ``level``: a busy server may not want a line per job."""
    wanted = os.environ.get("VCOMP_LOG_LEVEL", "").strip().upper()
    bad_level = bool(wanted) and wanted not in LEVELS
    if wanted in LEVELS:
        level = LEVELS[wanted]
    handler: logging.Handler
    if log_file is not None:
        try:
            handler = logging.handlers.WatchedFileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--log-file {log_file}: {exc.strerror or exc}") from None
    else:
        handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger("vcomp")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if bad_level:
        event(
            root,
            "bad_log_level",
            logging.WARNING,
            value=wanted[:20],
            using=logging.getLevelName(level),
        )

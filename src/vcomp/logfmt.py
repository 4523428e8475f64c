"""One structured log line per event, in logfmt (``event=... key=value``).

Callers pass identifiers and counts only: never key material or payloads.
"""

from __future__ import annotations

import logging
import sys


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    if not logger.isEnabledFor(level):
        return
    parts = [f"event={name}"]
    parts.extend(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
    logger.log(level, " ".join(parts))


def setup(level: int = logging.INFO, stream: object = None) -> None:
    """Log lines as ``<time> <level> <logger> event=...`` on stderr."""
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

"""Ready-made validators for ``vcomp-server app add --validator`` (see vcomp.server.hooks).

A validator is called with the replicas' outputs (a list of bytes) and returns the
canonical output, which must be one of them, or :data:`DISAGREE`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Final

__all__ = ["DISAGREE", "Disagree", "json_close"]


class Disagree:
    """The type of :data:`DISAGREE` (one instance)."""

    _instance: Disagree | None = None

    def __new__(cls) -> Disagree:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DISAGREE"


#: What a validator returns when the outputs do not agree.
DISAGREE: Final = Disagree()


def _close(a: Any, b: Any, rel_tol: float, abs_tol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel_tol, abs_tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(
            _close(x, y, rel_tol, abs_tol) for x, y in zip(a, b, strict=True)
        )
    return type(a) is type(b) and bool(a == b)


def json_close(
    outputs: Sequence[bytes], *, rel_tol: float = 1e-9, abs_tol: float = 0.0
) -> bytes | Disagree:
    """JSON outputs agree when they have the same structure, keys, strings and booleans,
    and every pair of numbers is within ``rel_tol`` (relative) or ``abs_tol``
    (absolute), as :func:`math.isclose`. The first output is canonical. Outputs that are
    not JSON disagree. Set the tolerance in the spec:
    ``vcomp.validators:json_close?rel_tol=1e-6``.
    """
    if not outputs:
        return DISAGREE
    try:
        values = [json.loads(o) for o in outputs]
    except (ValueError, RecursionError):
        return DISAGREE
    first = values[0]
    if all(_close(first, v, rel_tol, abs_tol) for v in values[1:]):
        return outputs[0]
    return DISAGREE

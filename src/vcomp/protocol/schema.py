"""Field checks for packet bodies, and the base class every body dataclass shares.

A check is a function that raises :class:`~vcomp.errors.DecodeError`
(:class:`~vcomp.errors.LimitExceeded` for a size bound) or returns None. The body
classes (:mod:`vcomp.protocol.bodies`, :mod:`vcomp.protocol.fastpath`) list one
check per field in ``_schema``; :func:`validate` runs them and names the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Final, TypeAlias

from vcomp.errors import DecodeError, LimitExceeded
from vcomp.protocol import limits
from vcomp.protocol.wire import PacketType

__all__ = [
    "JOB_ATTEMPT",
    "MAX_ARRAY",
    "MAX_BIN",
    "MAX_MAP",
    "MAX_STR",
    "MAX_TRANSFER",
    "SEQ_EPOCH",
    "U8",
    "U16",
    "U32",
    "U64",
    "Body",
    "Check",
    "array",
    "binary",
    "boolean",
    "choice",
    "digest",
    "optional",
    "pair",
    "text",
    "u8",
    "u16",
    "u32",
    "u64",
    "uint",
    "validate",
    "validate_field",
]

MAX_TRANSFER: Final = limits.MAX_CODE_SIZE + limits.MAX_INPUT_SIZE
"""Largest ``code || input`` stream a START may announce."""

U8: Final = 0xFF
U16: Final = 0xFFFF
U32: Final = 0xFFFF_FFFF
U64: Final = 0xFFFF_FFFF_FFFF_FFFF

# msgpack refuses any object longer than these before allocating it. (The decoders
# pass them as literal keywords: a **dict or functools.partial call costs more than
# the parse of a CODE body.)
MAX_BIN: Final = limits.MAX_BODY
MAX_STR: Final = limits.MAX_TEXT
MAX_ARRAY: Final = max(
    limits.MAX_VERSIONS, limits.MAX_PCRS, limits.MAX_ACK_RANGES, limits.MAX_COMMITTED
)
MAX_MAP: Final = limits.MAX_BODY_KEYS

# ---- field checks ---------------------------------------------------------------
# A check raises DecodeError (LimitExceeded for a size bound) or returns None.
# validate adds the class and field name to the message.
Check: TypeAlias = Callable[[object], None]


def uint(maximum: int, minimum: int = 0) -> Check:
    def check(value: object) -> None:
        # Int subclasses such as ErrorCode are fine; bool is not a number here.
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError(f"expected an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise DecodeError(f"{value} is outside {minimum}..{maximum}")

    return check


def binary(minimum: int, maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not bytes:
            raise DecodeError(f"expected bin, got {type(value).__name__}")
        if len(value) > maximum:
            raise LimitExceeded(f"{len(value)} bytes, at most {maximum} allowed")
        if len(value) < minimum:
            raise DecodeError(f"{len(value)} bytes, at least {minimum} required")

    return check


def text(maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not str:
            raise DecodeError(f"expected str, got {type(value).__name__}")
        if len(value) > maximum:  # cheap pre-check; UTF-8 is never shorter
            raise LimitExceeded(f"text longer than {maximum} bytes")
        if not value.isascii():
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise DecodeError("text is not valid Unicode") from None
            if size > maximum:
                raise LimitExceeded(f"text of {size} UTF-8 bytes, at most {maximum}")

    return check


def choice(options: frozenset[str]) -> Check:
    def check(value: object) -> None:
        if type(value) is not str or value not in options:
            raise DecodeError(f"expected one of {sorted(options)}")

    return check


def boolean(value: object) -> None:
    if type(value) is not bool:
        raise DecodeError(f"expected bool, got {type(value).__name__}")


def optional(inner: Check) -> Check:
    def check(value: object) -> None:
        if value is not None:
            inner(value)

    return check


def array(item: Check, minimum: int, maximum: int) -> Check:
    def check(value: object) -> None:
        if type(value) is not tuple:
            raise DecodeError(f"expected array, got {type(value).__name__}")
        if len(value) > maximum:
            raise LimitExceeded(f"{len(value)} items, at most {maximum} allowed")
        if len(value) < minimum:
            raise DecodeError(f"{len(value)} items, at least {minimum} required")
        for element in value:
            item(element)

    return check


def pair(first: Check, second: Check) -> Check:
    def check(value: object) -> None:
        if type(value) is not tuple or len(value) != 2:
            raise DecodeError("expected an array of 2 items")
        first(value[0])
        second(value[1])

    return check


u8 = uint(U8)
u16 = uint(U16)
u32 = uint(U32)
u64 = uint(U64)
digest = binary(limits.DIGEST_LEN, limits.DIGEST_LEN)

# The leading fields of reliable messages, and of messages about one job attempt.
SEQ_EPOCH: Final = (("seq", u64), ("epoch", u32))
JOB_ATTEMPT: Final = (("job", u64), ("attempt", u32))


def validate(message: Body) -> None:
    for name, check in message._schema:
        validate_field(type(message), name, check, getattr(message, name))


def validate_field(cls: type, name: str, check: Check, value: object) -> None:
    try:
        check(value)
    except DecodeError as exc:
        raise type(exc)(f"{cls.__name__}.{name}: {exc}") from None


class Body:
    """Behaviour shared by every body class (not itself a message)."""

    __slots__ = ()
    ptype: ClassVar[PacketType]
    _schema: ClassVar[tuple[tuple[str, Check], ...]]
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()
    """Optional keys that are left out of the map (rather than sent as nil) when None."""
    _max_body: ClassVar[int] = limits.MAX_PLAINTEXT_BODY
    _min_body: ClassVar[int] = 1

    def __post_init__(self) -> None:
        validate(self)

    def _to_map(self) -> dict[str, object]:
        """The msgpack map: every field, minus optional keys that are None."""
        omit = self._omit_if_none
        values: dict[str, object] = {}
        for name, _ in self._schema:
            value = getattr(self, name)
            if value is None and name in omit:
                continue
            values[name] = value
        return values

"""What the HTTP API answers, as frozen records, parsed defensively.

The client trusts the server no more than it must: every answer is checked for the
fields and types the contract promises, and anything else becomes
:class:`~vcomp.errors.ApiError` with code ``bad_response`` (never a KeyError or a
TypeError from deep inside the caller's loop).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Mapping
from typing import Any, TypeVar

from vcomp.errors import ApiError, JobFailed

T = TypeVar("T")

FINAL_STATES = frozenset({"done", "failed", "cancelled"})
"""Job states that never change again (unless the batch is retried)."""


def bad_response(what: str) -> ApiError:
    """The error for an answer that is not what the API contract promises."""
    return ApiError(0, "bad_response", f"the server's answer is not valid: {what}")


def _field(obj: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T:
    value = obj.get(key)
    # bool is an int in Python; a count or id that arrives as true/false is a bad answer
    if isinstance(value, bool) and kind is not bool and bool not in _as_tuple(kind):
        raise bad_response(f"{key!r} is a boolean")
    if not isinstance(value, kind):
        raise bad_response(f"{key!r} is {type(value).__name__}, expected {_names(kind)}")
    return value  # type: ignore[return-value]


def _optional(obj: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...]) -> T | None:
    return None if obj.get(key) is None else _field(obj, key, kind)


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _names(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


def _number(obj: Mapping[str, Any], key: str) -> float | None:
    value = _optional(obj, key, (int, float))
    return None if value is None else float(value)


def as_object(value: object, what: str) -> Mapping[str, Any]:
    """``value`` if it is a JSON object, else a ``bad_response`` error naming ``what``."""
    if not isinstance(value, Mapping):
        raise bad_response(f"{what} is not a JSON object")
    return value


def as_list(obj: Mapping[str, Any], key: str) -> list[Any]:
    """The JSON array at ``obj[key]``."""
    return _field(obj, key, list)


@dataclasses.dataclass(frozen=True, slots=True)
class JobError:
    """Why a job failed: the error kind (``exit``, ``timeout``, ``memory``, ...), its text
    and the tail of the job's stderr."""

    kind: str
    message: str
    stderr_tail: str

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> JobError:
        return cls(
            kind=_field(obj, "kind", str),
            message=_optional(obj, "message", str) or "",
            stderr_tail=_optional(obj, "stderr_tail", str) or "",
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobResult:
    """One job of a batch that reached a final state (``done``, ``failed`` or ``cancelled``).

    ``output`` holds the job's output bytes when it is done; ``error`` says why not
    otherwise. ``attempts`` counts the attempts the server made.
    """

    index: int
    job: int
    state: str
    output: bytes | None
    error: JobError | None
    agent: str | None
    cpu_seconds: float | None
    attempts: int

    @property
    def ok(self) -> bool:
        """Whether the job is done (it has an output)."""
        return self.state == "done"

    def value(self) -> bytes:
        """The output bytes; raises :class:`~vcomp.errors.JobFailed` if the job is not done."""
        if self.state != "done" or self.output is None:
            err = self.error or JobError(self.state, f"the job is {self.state}", "")
            raise JobFailed(self.index, err.kind, err.message, err.stderr_tail)
        return self.output

    def json(self) -> Any:
        """The output decoded as JSON (raises ``JobFailed`` if the job is not done, and
        ``ValueError`` if the output is not JSON)."""
        return json.loads(self.value())

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> JobResult:
        state = _field(obj, "state", str)
        if state not in FINAL_STATES:
            raise bad_response(f"result state {state[:40]!r} is not final")
        encoded = _optional(obj, "output_b64", str)
        try:
            output = None if encoded is None else base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad_response("output_b64 is not base64") from None
        error_obj = obj.get("error")
        attempts = obj.get("attempts")
        return cls(
            index=_nonnegative(obj, "index"),
            job=_field(obj, "job", int),
            state=state,
            output=output,
            error=None if error_obj is None else JobError.parse(as_object(error_obj, "error")),
            agent=_optional(obj, "agent", str),
            cpu_seconds=_number(obj, "cpu_seconds"),
            # the results stream counts attempts; the jobs resource lists them
            attempts=len(attempts) if isinstance(attempts, list) else _optional_int(obj),
        )


def _optional_int(obj: Mapping[str, Any]) -> int:
    value = _optional(obj, "attempts", int)
    return 0 if value is None else value


def _nonnegative(obj: Mapping[str, Any], key: str) -> int:
    value = _field(obj, key, int)
    if value < 0:
        raise bad_response(f"{key!r} is negative")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class BatchStatus:
    """A batch's state (``open``, ``finished`` or ``cancelled``) and its jobs per state."""

    id: int
    app: str
    version: int | None
    state: str
    jobs: int
    counts: Mapping[str, int]
    replicas: int | None
    created: str | float | None

    @property
    def finished(self) -> bool:
        """Whether no job of the batch will change state any more (without a retry)."""
        return self.state != "open"

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> BatchStatus:
        counts = as_object(obj.get("counts"), "counts")
        return cls(
            id=_field(obj, "batch", int),
            app=_field(obj, "app", str),
            version=_optional(obj, "version", int),
            state=_field(obj, "state", str),
            jobs=_nonnegative(obj, "jobs"),
            counts={str(k): _field(counts, k, int) for k in counts},
            replicas=_optional(obj, "replicas", int),
            created=_optional(obj, "created", (str, int, float)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at a job: which agent ran it and how it ended."""

    attempt: int
    agent: str | None
    outcome: str | None
    error_kind: str | None
    detail: str | None
    stderr_tail: str | None
    cpu_seconds: float | None
    started: str | float | None
    finished: str | float | None

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> Attempt:
        return cls(
            attempt=_field(obj, "attempt", int),
            agent=_optional(obj, "agent", str),
            outcome=_optional(obj, "outcome", str),
            error_kind=_optional(obj, "error_kind", str),
            detail=_optional(obj, "detail", str),
            stderr_tail=_optional(obj, "stderr_tail", str),
            cpu_seconds=_number(obj, "cpu_seconds"),
            started=_optional(obj, "started", (str, int, float)),
            finished=_optional(obj, "finished", (str, int, float)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class JobInfo:
    """One job's state, its error if it failed, and every attempt made at it."""

    batch: int
    index: int
    job: int
    state: str
    error: JobError | None
    attempts: tuple[Attempt, ...]

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> JobInfo:
        error_obj = obj.get("error")
        return cls(
            batch=_field(obj, "batch", int),
            index=_nonnegative(obj, "index"),
            job=_field(obj, "job", int),
            state=_field(obj, "state", str),
            error=None if error_obj is None else JobError.parse(as_object(error_obj, "error")),
            attempts=tuple(
                Attempt.parse(as_object(a, "attempt")) for a in as_list(obj, "attempts")
            ),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class App:
    """One version of an application, as the server stores it."""

    name: str
    version: int
    kind: str
    sha256: str | None
    size: int | None
    retired: bool
    validator: str | None
    assimilator: str | None
    created: str | float | None

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> App:
        return cls(
            name=_field(obj, "name", str),
            version=_field(obj, "version", int),
            kind=_field(obj, "kind", str),
            sha256=_optional(obj, "sha256", str),
            size=_optional(obj, "size", int),
            retired=bool(_optional(obj, "retired", bool)),
            validator=_optional(obj, "validator", str),
            assimilator=_optional(obj, "assimilator", str),
            created=_optional(obj, "created", (str, int, float)),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Agent:
    """A volunteer agent: whether it is connected now, and the credit it earned."""

    id: str
    name: str | None
    connected: bool
    last_seen: str | float | None
    jobs_done: int
    cpu_seconds: float
    revoked: bool

    @classmethod
    def parse(cls, obj: Mapping[str, Any]) -> Agent:
        return cls(
            id=_field(obj, "id", str),
            name=_optional(obj, "name", str),
            connected=bool(_optional(obj, "connected", bool)),
            last_seen=_optional(obj, "last_seen", (str, int, float)),
            jobs_done=_optional(obj, "jobs_done", int) or 0,
            cpu_seconds=_number(obj, "cpu_seconds") or 0.0,
            revoked=bool(_optional(obj, "revoked", bool)),
        )

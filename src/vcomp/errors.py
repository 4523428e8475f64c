"""The one error hierarchy of vcomp.

Every layer raises a subclass of :class:`VcompError`, so callers can catch one
type at a boundary (a datagram handler, a CLI command) and never see a stray
KeyError or a library's private exception.
"""

from __future__ import annotations


class VcompError(Exception):
    """Base class of every error vcomp raises on purpose."""


class ConfigError(VcompError):
    """A configuration file, key file or command-line value is unusable."""


class ProtocolError(VcompError):
    """A peer broke the wire protocol."""


class DecodeError(ProtocolError):
    """Bytes that are not a valid packet, body or frame."""


class LimitExceeded(DecodeError):
    """A length or count is above its documented bound."""


class CryptoError(ProtocolError):
    """Record protection or key exchange failed."""


class AuthenticationFailed(CryptoError):
    """An AEAD tag or signature did not verify."""


class ReplayDetected(CryptoError):
    """A packet number was already seen or is older than the replay window."""


class KeyExhausted(CryptoError):
    """The session key reached its usage limit; the session must end."""


class AttestationError(VcompError):
    """A quote was rejected; ``reason`` says which check failed."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class TransferFailed(ProtocolError):
    """Reliable delivery gave up (retry limit reached or peer unreachable)."""


class SessionClosed(ProtocolError):
    """The session ended (idle expiry, key exhausted, peer error)."""


class IllegalTransition(ProtocolError):
    """An event the session's transition table does not allow in its current state."""


class SandboxError(VcompError):
    """The sandbox could not be set up or the job broke the domain interface."""


class StoreError(VcompError):
    """The job store refused an operation or is inconsistent."""


class StoreUnavailable(StoreError):
    """The job store cannot be reached now (connection refused or lost, database
    restarting); the operation did not happen, or its commit is unknown. Retry later."""


class SchemaVersionError(StoreError):
    """The job store's schema is not the version this vcomp uses; ``migrate`` fixes it."""


class AgentUnreachable(VcompError):
    """The running agent's status socket could not be reached, or answered wrongly."""


class ApiError(VcompError):
    """The HTTP API answered with an error (``code`` and ``message`` are the server's), or
    with something that is not the API's answer at all (``code`` ``bad_response``)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{code} (HTTP {status}): {message}" if status else f"{code}: {message}")


class AuthError(ApiError):
    """The API refused the token: missing or unknown (401), or its scope is too low (403)."""


class NotFound(ApiError):
    """The app, batch, job or agent the request named does not exist (404)."""


class ApiUnreachable(VcompError):
    """The HTTP API could not be reached (refused, reset, timed out) or kept dropping."""


class JobFailed(VcompError):
    """A job of a batch ended failed (or cancelled); ``stderr_tail`` is its last stderr."""

    def __init__(self, index: int, kind: str, message: str, stderr_tail: str = "") -> None:
        self.index = index
        self.kind = kind
        self.message = message
        self.stderr_tail = stderr_tail
        text = (
            f"job {index} failed ({kind}): {message}" if message else f"job {index} failed ({kind})"
        )
        if stderr_tail:
            text += "\n--- stderr (tail) ---\n" + stderr_tail
        super().__init__(text)


def loggable(exc: BaseException) -> str:
    """What an unexpected exception may say in a log line: vcomp's own messages, an
    OSError's errno text (not its file names, which a job may have chosen), else the
    type alone (a library's message may echo a payload)."""
    name = type(exc).__name__
    if isinstance(exc, VcompError):
        return f"{name}: {exc}"[:300]
    if isinstance(exc, OSError) and exc.strerror:
        return f"{name}: {exc.strerror}"
    return name


class HookError(VcompError):
    """An operator hook (a validator or assimilator named ``module:function``) is
    malformed, cannot be imported, or raised; the job it was called for is kept."""

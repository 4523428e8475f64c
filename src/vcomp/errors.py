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

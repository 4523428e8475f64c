"""``[http]`` in server.toml: where the HTTP API listens and how it is protected."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from vcomp.errors import ConfigError
from vcomp.tomlconfig import parse_host_port

DEFAULT_HTTP_BIND = "127.0.0.1:7462"
DEFAULT_MAX_REQUEST_BYTES = 64 << 20
"""A batch's inputs arrive in one request; code is bounded by the store's own limit."""


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """``bind`` empty: no HTTP listener. A bind that is not loopback needs ``cert`` and
    ``key`` (TLS), unless ``allow_plaintext`` says the operator knows better."""

    bind: str = ""
    open_metrics: bool = False
    cert: Path | None = None
    key: Path | None = None
    allow_plaintext: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("[http] cert and key go together: give both or neither")
        if not 1024 <= self.max_request_bytes <= 1 << 40:
            raise ConfigError(
                f"[http] max_request_bytes must be between 1024 and 2^40, "
                f"got {self.max_request_bytes}"
            )
        if not self.bind:
            return
        host, _ = self.host_port
        if not self.tls and not is_loopback(host) and not self.allow_plaintext:
            raise ConfigError(
                f"[http] bind {self.bind!r} is not loopback and has no TLS: API tokens would "
                "cross the network in clear. Set [http] cert and key, or allow_plaintext = true "
                "behind a TLS-terminating proxy"
            )
        if self.open_metrics and not is_loopback(host):
            raise ConfigError("[http] open_metrics = true is only allowed on a loopback bind")

    @property
    def enabled(self) -> bool:
        return bool(self.bind)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_host_port(self.bind, what="[http] bind", allow_zero=True)

    @property
    def loopback(self) -> bool:
        return self.enabled and is_loopback(self.host_port[0])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

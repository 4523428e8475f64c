"""Reading both applications' TOML files (server.toml, agent.toml) and the value checks
their settings share. Every problem is a :class:`~vcomp.errors.ConfigError` naming the file
or the key, so a command line prints one line instead of a traceback."""

from __future__ import annotations

import tomllib
from pathlib import Path

from vcomp.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; refuse anything huge


def check_int(name: str, value: object, low: int, high: int) -> None:
    """``value`` is an integer (not a bool) in ``[low, high]``; else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")


def parse_host_port(text: str, *, what: str, allow_zero: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"{what} must look like HOST:PORT, got {text!r}")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ConfigError(f"{what}: port {port} is out of range")
    return host, port


def read_toml(path: Path) -> dict[str, object]:
    """Parse a TOML file, turning every failure into a ConfigError naming it."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


class Table:
    """One ``[section]`` of a TOML document, read with type checks.

    Missing keys take the given default; a value of the wrong type is an error; after
    reading, :meth:`finish` rejects keys nobody asked for (typos must not pass silently).
    """

    def __init__(self, doc: dict[str, object], section: str) -> None:
        table = doc.get(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table")
        self._table: dict[str, object] = table
        self._section = section
        self._read: list[str] = []

    def _take(self, key: str) -> object | None:
        self._read.append(key)
        return self._table.get(key)

    def _wrong(self, key: str, what: str, value: object) -> ConfigError:
        return ConfigError(f"[{self._section}] {key} must be {what}, got {value!r}")

    def integer(self, key: str, default: int) -> int:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise self._wrong(key, "an integer", value)

    def number(self, key: str, default: float) -> float:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise self._wrong(key, "a number", value)

    def text(self, key: str, default: str) -> str:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, str):
            return value
        raise self._wrong(key, "a string", value)

    def texts(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise self._wrong(key, "a list of strings", value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        raise self._wrong(key, "true or false", value)

    def finish(self) -> None:
        unknown = sorted(set(self._table) - set(self._read))
        if unknown:
            raise ConfigError(
                f"[{self._section}] unknown key {unknown[0]!r}; known: {', '.join(self._read)}"
            )


def check_sections(doc: dict[str, object], known: tuple[str, ...]) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        names = ", ".join(f"[{k}]" for k in known)
        raise ConfigError(f"unknown section or key {unknown[0]!r} at top level; known: {names}")

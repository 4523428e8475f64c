"""Results the server has not yet confirmed, kept on disk and sealed to the TPM.

A fresh spool key is sealed to PCR 17 and 18 (TPM2 PolicyPCR semantics), so
only this agent build with this sandbox policy can unseal it: a modified
agent cannot read or forge spooled results, and the volunteer cannot read
them at rest. Each entry is AES-256-GCM under that key, bound to its file
name, written atomically and fsynced before the result is sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vcomp.agent.tpm import SimulatedTpm
from vcomp.errors import VcompError

KEY_FILE = "spool.key.sealed"
SUFFIX = ".result"
_META_LEN = struct.Struct(">I")
MAX_META = 4096


class SpoolError(VcompError):
    """The spool cannot be used (e.g. it was sealed to another measurement)."""


@dataclass(frozen=True, slots=True)
class SpooledResult:
    job: int
    attempt: int
    status: str
    detail: str
    cpu_ms: int
    wall_ms: int
    output: bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ResultSpool:
    def __init__(self, directory: Path, tpm: SimulatedTpm) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.set_aside: Path | None = None
        key_path = directory / KEY_FILE
        key: bytes | None = None
        if key_path.exists():
            try:
                key = tpm.unseal(key_path.read_bytes())
            except VcompError:
                # Another build or policy sealed it (an upgrade, or a modified agent).
                # Its results stay sealed; keep them aside, untouched, and start afresh.
                self.set_aside = self._set_aside(key_path)
        if key is None:
            key = os.urandom(32)
            _write_atomically(key_path, tpm.seal(key))
        self._aead = AESGCM(key)

    def _set_aside(self, key_path: Path) -> Path:
        n = 1
        while (target := self.directory / f"sealed-elsewhere-{n}").exists():
            n += 1
        target.mkdir(mode=0o700)
        for path in [key_path, *self.directory.glob("*" + SUFFIX)]:
            path.rename(target / path.name)
        return target

    def __repr__(self) -> str:
        return f"ResultSpool({str(self.directory)!r})"

    @staticmethod
    def _name(job: int, attempt: int) -> str:
        return f"{job}-{attempt}{SUFFIX}"

    def put(self, result: SpooledResult) -> None:
        meta = json.dumps(
            {
                "job": result.job,
                "attempt": result.attempt,
                "status": result.status,
                "detail": result.detail,
                "cpu_ms": result.cpu_ms,
                "wall_ms": result.wall_ms,
            }
        ).encode()
        name = self._name(result.job, result.attempt)
        plaintext = _META_LEN.pack(len(meta)) + meta + result.output
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, plaintext, name.encode())
        _write_atomically(self.directory / name, sealed)

    def has(self, job: int, attempt: int) -> bool:
        return (self.directory / self._name(job, attempt)).exists()

    def remove(self, job: int, attempt: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / self._name(job, attempt)).unlink()

    def _load(self, path: Path) -> SpooledResult:
        blob = path.read_bytes()
        try:
            plaintext = self._aead.decrypt(blob[:12], blob[12:], path.name.encode())
        except (InvalidTag, ValueError):
            raise SpoolError(f"spooled result {path.name} was tampered with") from None
        (n,) = _META_LEN.unpack_from(plaintext)
        if n > MAX_META or 4 + n > len(plaintext):
            raise SpoolError(f"spooled result {path.name} is malformed")
        meta = json.loads(plaintext[4 : 4 + n])
        return SpooledResult(
            job=int(meta["job"]),
            attempt=int(meta["attempt"]),
            status=str(meta["status"]),
            detail=str(meta["detail"]),
            cpu_ms=int(meta["cpu_ms"]),
            wall_ms=int(meta["wall_ms"]),
            output=bytes(plaintext[4 + n :]),
        )

    def pending(self) -> Iterator[SpooledResult | SpoolError]:
        """Every spooled result, oldest first; unreadable ones as SpoolError."""
        paths = sorted(self.directory.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime)
        for path in paths:
            try:
                yield self._load(path)
            except (SpoolError, OSError, ValueError, KeyError) as exc:
                yield exc if isinstance(exc, SpoolError) else SpoolError(str(exc))

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*" + SUFFIX))

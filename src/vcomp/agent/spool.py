"""Results the server has not yet confirmed, kept on disk and sealed to the TPM.

A fresh spool key is sealed to PCR 17 and 18 (TPM2 PolicyPCR semantics), so
only this agent build with this sandbox policy can unseal it: a modified
agent cannot read or forge spooled results, and the volunteer cannot read
them at rest. Each entry is AES-256-GCM under that key, bound to its file
name, written atomically and fsynced before the result is sent.

The latest checkpoint of each running job is kept the same way
(``<job>-<attempt>.checkpoint``),
bound to its file name and to a digest of the job's code and input, so a checkpoint
is only ever handed back to the very job that wrote it.
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

from vcomp.agent.tpm_backend import Tpm
from vcomp.errors import VcompError

KEY_FILE = "spool.key.sealed"
SUFFIX = ".result"
CHECKPOINT_SUFFIX = ".checkpoint"
_SEAL_OVERHEAD = 12 + 16  # nonce and GCM tag
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


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


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
    def __init__(self, directory: Path, tpm: Tpm) -> None:
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
        sealed = [*self.directory.glob("*" + SUFFIX), *self.directory.glob("*" + CHECKPOINT_SUFFIX)]
        for path in [key_path, *sealed]:
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

    # --- checkpoints -------------------------------------------------------------------

    @staticmethod
    def _checkpoint_name(job: int, attempt: int) -> str:
        return f"{job}-{attempt}{CHECKPOINT_SUFFIX}"

    def _checkpoint_paths(self, job: int) -> list[Path]:
        return list(self.directory.glob(f"{job}-*{CHECKPOINT_SUFFIX}"))

    @staticmethod
    def _checkpoint_aad(name: str, binding: bytes) -> bytes:
        return name.encode() + b"\0" + binding

    def put_checkpoint(self, job: int, attempt: int, binding: bytes, state: bytes) -> None:
        """Keep ``state`` as job's latest checkpoint (sealed, atomic, fsynced).

        ``binding`` names the job's content (a digest of its code and input); the
        attempt that wrote it is in the (authenticated) file name.
        """
        name = self._checkpoint_name(job, attempt)
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, state, self._checkpoint_aad(name, binding))
        _write_atomically(self.directory / name, sealed)
        for path in self._checkpoint_paths(job):  # an earlier attempt's
            if path.name != name:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def checkpoint(self, job: int, binding: bytes, max_bytes: int) -> bytes | None:
        """Job's latest checkpoint (of whichever attempt), or None if there is none.

        Raises SpoolError (and removes the file) when the file is larger than
        ``max_bytes`` allows, was tampered with, or belongs to another job's content.
        """
        found = self.checkpoint_of(job, binding, max_bytes)
        return None if found is None else found[1]

    def checkpoint_of(self, job: int, binding: bytes, max_bytes: int) -> tuple[int, bytes] | None:
        """As :meth:`checkpoint`, with the attempt that wrote it (from the sealed name)."""
        paths = sorted(self._checkpoint_paths(job), key=_mtime, reverse=True)
        if not paths:
            return None
        path = paths[0]
        try:
            attempt = int(path.name[: -len(CHECKPOINT_SUFFIX)].partition("-")[2])
        except ValueError:
            self.remove_checkpoint(job)
            raise SpoolError(f"checkpoint {path.name} has no attempt in its name") from None
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > max_bytes + _SEAL_OVERHEAD:  # checked before reading it in
                blob = None
            else:
                with os.fdopen(os.dup(fd), "rb") as f:
                    blob = f.read(size + 1)
        finally:
            os.close(fd)
        if blob is None or len(blob) > max_bytes + _SEAL_OVERHEAD:
            self.remove_checkpoint(job)
            raise SpoolError(f"checkpoint {path.name} is over {max_bytes} bytes")
        try:
            return attempt, self._aead.decrypt(
                blob[:12], blob[12:], self._checkpoint_aad(path.name, binding)
            )
        except (InvalidTag, ValueError):
            self.remove_checkpoint(job)
            raise SpoolError(
                f"checkpoint {path.name} was tampered with or is another job's"
            ) from None

    def remove_checkpoint(self, job: int) -> None:
        for path in self._checkpoint_paths(job):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def checkpoint_holdings(self) -> list[tuple[int, int]]:
        """(job, attempt) of every kept checkpoint, from the file names."""
        held = []
        for path in self.directory.glob("*" + CHECKPOINT_SUFFIX):
            job, _, attempt = path.name[: -len(CHECKPOINT_SUFFIX)].partition("-")
            with contextlib.suppress(ValueError):
                held.append((int(job), int(attempt)))
        return sorted(held)

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

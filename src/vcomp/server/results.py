"""Streams one incoming result into the store.

Small results (the common case) are collected in memory and committed inline
with the result row. A result larger than :data:`INLINE_LIMIT` goes into a
staged blob in the store as it arrives, in coalesced writes, so the server
never holds a large result in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from vcomp.errors import StoreError
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import UploadHandle
from vcomp.server.store_sqlite import SqliteStore

INLINE_LIMIT = 64 * 1024
WRITE_BATCH = 256 * 1024


class ResultSink:
    def __init__(
        self, store: SqliteStore, committer: GroupCommitter, job: int, attempt: int, total: int
    ) -> None:
        self._store = store
        self._committer = committer
        self._job = job
        self._attempt = attempt
        self._total = total
        self._buffer = bytearray()
        self._hasher = hashlib.sha256()
        self._received = 0
        self._upload: UploadHandle | None = None
        self._upload_offset = 0
        self._writes: asyncio.Queue[tuple[int, bytes] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    def feed(self, offset: int, data: bytes) -> None:
        # The session machine already enforces contiguous chunks; this guards the store.
        if offset != self._received:
            raise StoreError(f"result chunk at {offset}, expected {self._received}")
        self._received += len(data)
        self._hasher.update(data)
        self._buffer += data
        if self._total > INLINE_LIMIT and len(self._buffer) >= WRITE_BATCH:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writes is None:
            self._writes = asyncio.Queue()
            self._writer = asyncio.ensure_future(self._write_loop(self._writes))
        self._writes.put_nowait((self._upload_offset, bytes(self._buffer)))
        self._upload_offset += len(self._buffer)
        self._buffer.clear()

    async def _write_loop(self, queue: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        try:
            self._upload = await self._committer.run(
                self._store.begin_result_upload, self._job, self._attempt, self._total
            )
            while (item := await queue.get()) is not None:
                offset, data = item
                await self._committer.run(
                    self._store.write_result_chunk, self._upload, offset, data
                )
        except BaseException as exc:  # surfaced by finish()
            self._failed = exc
            raise

    async def finish(self, sha256: bytes) -> tuple[bytes | None, UploadHandle | None]:
        """(inline output, None) or (None, finished upload); raises StoreError."""
        if self._received != self._total or not hmac.compare_digest(self._hasher.digest(), sha256):
            await self.abandon()
            raise StoreError("result does not match its announced size and SHA-256")
        if self._writes is None:
            return bytes(self._buffer), None
        self._flush()
        assert self._writes is not None and self._writer is not None
        self._writes.put_nowait(None)
        await asyncio.gather(self._writer, return_exceptions=True)
        if self._failed is not None or self._upload is None:
            raise StoreError(f"staging the result failed: {self._failed!r}")
        upload = self._upload
        # Hashing a big blob must not stall the writer thread's group commits.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._store.finish_upload, upload, sha256)
        return None, upload

    async def abandon(self) -> None:
        if self._writer is not None and self._writes is not None:
            self._writes.put_nowait(None)
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._upload is not None:
            await self._committer.run(self._store.discard_upload, self._upload)
        self._buffer.clear()

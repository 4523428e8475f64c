"""Streams one incoming result into the store.

Small results (the common case) are collected in memory and committed inline
with the result row. A result larger than :data:`INLINE_LIMIT` goes into a
staged blob in the store as it arrives, in coalesced writes, so the server
never holds a large result in memory.

Every byte a sink holds (buffered, or queued for the writer) is charged to one
server-wide :class:`UploadBudget`; :meth:`ResultSink.feed` returns False once
the budget is spent, and the caller cuts that upload off. A sink whose writer
has failed keeps nothing more: its result can no longer be stored anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

from vcomp import logfmt
from vcomp.errors import StoreError, StoreUnavailable
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import Store, UploadHandle

log = logging.getLogger("vcomp.server")

INLINE_LIMIT = 64 * 1024
WRITE_BATCH = 256 * 1024


class UploadBudget:
    """Result bytes held in memory by all uploads in flight, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class ResultSink:
    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        job: int,
        attempt: int,
        total: int,
        budget: UploadBudget,
    ) -> None:
        self._store = store
        self._committer = committer
        self._job = job
        self._attempt = attempt
        self._total = total
        self._budget = budget
        self._held = 0  # bytes charged to the budget: the buffer plus queued batches
        self._buffer = bytearray()
        self._hasher = hashlib.sha256()
        self._received = 0
        self._upload: UploadHandle | None = None
        self._upload_offset = 0
        self._writes: asyncio.Queue[tuple[int, bytes] | None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None

    def feed(self, offset: int, data: bytes) -> bool:
        """Take the next chunk; False if the server's upload budget cannot hold it."""
        # The session machine already enforces contiguous chunks; this guards the store.
        if offset != self._received:
            raise StoreError(f"result chunk at {offset}, expected {self._received}")
        self._received += len(data)
        self._hasher.update(data)
        if self._failed is not None:
            return True  # finish() reports the failure; nothing more is kept meanwhile
        if not self._budget.take(len(data)):
            return False
        self._held += len(data)
        self._buffer += data
        if self._total > INLINE_LIMIT and len(self._buffer) >= WRITE_BATCH:
            self._flush()
        return True

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._writes is None:
            self._writes = asyncio.Queue()
            self._writer = asyncio.ensure_future(self._write_loop(self._writes))
        self._writes.put_nowait((self._upload_offset, bytes(self._buffer)))
        self._upload_offset += len(self._buffer)
        self._buffer.clear()

    def _release(self, n: int) -> None:
        self._held -= n
        self._budget.give(n)

    async def _write_loop(self, queue: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        try:
            # Through a store outage these wait and repeat: a repeated begin at worst
            # leaves a stale staged upload (discarded at the next start), and a chunk
            # write is positional.
            self._upload = await self._committer.run_retrying(
                self._store.begin_result_upload, self._job, self._attempt, self._total
            )
            while (item := await queue.get()) is not None:
                offset, data = item
                try:
                    await self._committer.run_retrying(
                        self._store.write_result_chunk, self._upload, offset, data
                    )
                finally:
                    self._release(len(data))
        except Exception as exc:  # surfaced by finish(); nothing more is kept meanwhile
            self._failed = exc
            self._drop_held(queue)
            logfmt.event(
                log,
                "result_writer_failed",
                logging.ERROR,
                job=self._job,
                attempt=self._attempt,
                error=str(exc),
            )

    def _drop_held(self, queue: asyncio.Queue[tuple[int, bytes] | None]) -> None:
        """The writer is gone: free every byte still waiting for it."""
        while not queue.empty():
            item = queue.get_nowait()
            if item is not None:
                self._release(len(item[1]))
        self._release(len(self._buffer))
        self._buffer = bytearray()

    async def finish(self, sha256: bytes) -> tuple[bytes | None, UploadHandle | None]:
        """(inline output, None) or (None, finished upload); raises StoreError."""
        if self._received != self._total or not hmac.compare_digest(self._hasher.digest(), sha256):
            await self.abandon()
            raise StoreError("result does not match its announced size and SHA-256")
        if self._writes is None:
            output = bytes(self._buffer)
            self._release(len(self._buffer))
            self._buffer.clear()
            return output, None
        self._flush()
        assert self._writes is not None and self._writer is not None
        self._writes.put_nowait(None)
        await asyncio.gather(self._writer, return_exceptions=True)
        if self._failed is not None or self._upload is None:
            raise StoreError(f"staging the result failed: {self._failed!r}")
        upload = self._upload
        # Hashing a big blob must not stall the writer thread's group commits.
        loop = asyncio.get_running_loop()
        health = self._committer.health
        while True:
            await health.wait_back()
            try:
                await loop.run_in_executor(None, self._store.finish_upload, upload, sha256)
            except StoreUnavailable as exc:
                health.lost(exc)
                continue
            return None, upload

    def drop_buffer(self) -> None:
        """Give the budget back what this sink buffers, now: the upload is being dropped,
        and uploads arriving in the same batch of datagrams must see the room."""
        self._release(len(self._buffer))
        self._buffer.clear()

    async def abandon(self) -> None:
        self.drop_buffer()
        if self._writer is not None and self._writes is not None:
            self._writes.put_nowait(None)
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._upload is not None:
            await self._committer.run_retrying(self._store.discard_upload, self._upload)
        self._release(len(self._buffer))
        self._buffer.clear()

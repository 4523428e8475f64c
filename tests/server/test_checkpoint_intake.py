"""The server's assembly of uploaded checkpoints: one memory budget over every session,
the store's lease check, and nothing left behind by sessions that go away."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from tests.server.store.support import enroll, lease
from vcomp.protocol import events as ev
from vcomp.server.checkpoint_intake import CheckpointIntake
from vcomp.server.commit import GroupCommitter
from vcomp.server.store.sqlite import SqliteStore


class Harness:
    def __init__(self, tmp_path: Path, budget: int) -> None:
        self.store = SqliteStore(tmp_path / "store.db")
        self.committer = GroupCommitter(self.store)
        self.tasks: list[asyncio.Task[object]] = []
        self.intake = CheckpointIntake(
            self.store, self.committer, self.spawn, max_bytes=1 << 20, budget=budget
        )

    def spawn(self, work: Coroutine[Any, Any, object]) -> None:
        self.tasks.append(asyncio.ensure_future(work))

    async def settle(self) -> None:
        await asyncio.gather(*self.tasks)
        self.tasks.clear()

    def upload(self, sid: int, agent: str, job: int, attempt: int, state: bytes) -> None:
        for offset in range(0, len(state), 1000):
            self.intake.on_chunk(
                ev.CheckpointChunk(
                    sid, job, attempt, offset, len(state), state[offset : offset + 1000]
                )
            )
        self.intake.on_complete(
            ev.CheckpointComplete(sid, bytes.fromhex(agent), job, attempt, len(state))
        )

    async def close(self) -> None:
        await self.committer.close()
        self.store.close()


async def test_uploads_past_the_budget_are_dropped_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, budget=10_000)
    h.store.add_app("pi", "python", io.BytesIO(b"code"))
    agent = enroll(h.store, "volunteer")
    h.store.create_batch("pi", [b"a", b"b"])
    first, second = lease(h.store, agent, 1.0, 600.0), lease(h.store, agent, 1.0, 600.0)
    # Two sessions each hold 6000 bytes half-sent: the second does not fit beside the first.
    for sid, held in ((1, first), (2, second)):
        for offset in range(0, 6000, 1000):
            h.intake.on_chunk(
                ev.CheckpointChunk(sid, held.job_id, held.attempt, offset, 8000, b"x" * 1000)
            )
    assert h.intake.held_bytes <= 10_000 and h.intake.dropped == 1
    h.intake.abandon(1)  # its session closed
    h.intake.abandon(2)
    assert h.intake.held_bytes == 0
    # With room again, a whole one goes to the store.
    h.upload(3, agent, second.job_id, second.attempt, b"y" * 8000)
    await h.settle()
    kept = h.store.latest_checkpoint(second.job_id)
    assert kept is not None and kept.data == b"y" * 8000 and h.intake.saved == 1
    assert h.intake.held_bytes == 0
    await h.close()


async def test_a_checkpoint_from_an_agent_without_the_lease_is_not_kept(tmp_path: Path) -> None:
    h = Harness(tmp_path, budget=1 << 20)
    h.store.add_app("pi", "python", io.BytesIO(b"code"))
    holder, other = enroll(h.store, "holder"), enroll(h.store, "other")
    h.store.create_batch("pi", [b"a"])
    held = lease(h.store, holder, 1.0, 600.0)
    h.upload(1, other, held.job_id, held.attempt, b"forged")
    await h.settle()
    assert h.store.latest_checkpoint(held.job_id) is None
    assert (h.intake.saved, h.intake.dropped, h.intake.held_bytes) == (0, 1, 0)
    await h.close()


async def test_a_session_holds_one_unfinished_checkpoint_and_saves_are_spaced(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, budget=1 << 20)
    h.store.add_app("pi", "python", io.BytesIO(b"code"))
    agent = enroll(h.store, "volunteer")
    h.store.create_batch("pi", [b"a", b"b"])
    one, two = lease(h.store, agent, 1.0, 600.0), lease(h.store, agent, 1.0, 600.0)
    # Job one's upload stops part-way (its result came); job two's starts: one part held.
    h.intake.on_chunk(ev.CheckpointChunk(1, one.job_id, one.attempt, 0, 5000, b"x" * 1000))
    h.intake.on_chunk(ev.CheckpointChunk(1, two.job_id, two.attempt, 0, 3000, b"y" * 1000))
    assert h.intake.held_bytes == 1000
    # Two whole checkpoints of one attempt in quick succession: the second is not written.
    h.upload(1, agent, two.job_id, two.attempt, b"first")
    h.upload(1, agent, two.job_id, two.attempt, b"second")
    await h.settle()
    kept = h.store.latest_checkpoint(two.job_id)
    assert kept is not None and kept.data == b"first"
    assert (h.intake.saved, h.intake.dropped, h.intake.held_bytes) == (1, 1, 0)
    await h.close()

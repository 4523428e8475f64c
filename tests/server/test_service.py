"""The server's lifetime: one task group for its background work, guarded per piece.

A real in-process server with a protocol-level agent on loopback; the oracle is
work the server does afterwards (a job leased, run and recorded), not what it says.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.hostile.harness import add_batch, new_tpm, start_org, until
from vcomp.protocol import handshake


async def test_a_failure_in_one_piece_of_work_does_not_stop_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bare TaskGroup cancels every sibling when one task fails: the tick (which
    picks up new batches) would stop and later work would be refused."""
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    agent = org.agent()
    try:

        async def broken() -> None:
            raise RuntimeError("a bug in one job's handling")

        with caplog.at_level(logging.ERROR, logger="vcomp.server"):
            org.server.spawn(broken())
            await until(lambda: "internal_error" in caplog.text, 10, "the failure logged")
        assert "a bug in one job" not in caplog.text  # only the type: messages may echo data
        assert "RuntimeError" in caplog.text
        await agent.start()
        batch = add_batch(org.store, 3)  # picked up by the tick, after the failure
        await until(lambda: org.store.batch_status(batch).done == 3, 60, "the batch")
        assert agent.stats.committed == 3
    finally:
        await agent.stop()
        await org.server.stop()


async def test_stop_ends_all_background_work(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            ended.append(name)

    org.server.spawn(forever("a"))
    org.server.spawn(forever("b"))
    await asyncio.sleep(0)
    await org.server.stop()
    assert sorted(ended) == ["a", "b"]  # none outlives the server
    late = forever("late")
    org.server.spawn(late)  # refused once stopped, and closed rather than leaked
    assert late.cr_frame is None


async def test_fingerprint_is_what_agents_pin(tmp_path: Path) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    try:
        assert bytes.fromhex(org.server.fingerprint) == org.fingerprint
        raw = (tmp_path / "srv" / "server.pub").read_text().strip()
        assert org.server.fingerprint == handshake.key_fingerprint(bytes.fromhex(raw)).hex()
    finally:
        await org.server.stop()

"""The server's lifetime: one task group for its background work, guarded per piece.

A real in-process server with a protocol-level agent on loopback; the oracle is
work the server does afterwards (a job leased, run and recorded), not what it says.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from pathlib import Path

import pytest

from tests.hostile.harness import add_batch, new_tpm, prepare_store, start_org, until
from tests.pg import fresh_schema_url
from vcomp.errors import StoreError
from vcomp.pgcluster import PostgresCluster
from vcomp.server.config import init_server_home, load_server_config
from vcomp.server.service import OrganisationServer
from vcomp.server.store import open_store
from vcomp.server.store.postgres import PostgresStore


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
        # The ACK of the last result follows its commit over UDP: wait for it too.
        await until(lambda: agent.stats.committed == 3, 10, "the last ACK")
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
        assert org.server.fingerprint == (tmp_path / "srv" / "server.pub").read_text().strip()
    finally:
        await org.server.stop()


async def test_a_server_starting_on_a_shared_store_keeps_the_others_uploads(
    tmp_path: Path, pg_cluster: PostgresCluster
) -> None:
    """On PostgreSQL another server may be receiving a result: a server that starts must
    not throw its staged upload away, only uploads old enough to be dead (on SQLite a
    server has the store to itself, and every staged upload it finds at start is dead)."""
    url = fresh_schema_url(pg_cluster)
    home = tmp_path / "srv"
    init_server_home(home, store_url=url)
    toml = home / "server.toml"
    toml.write_text(re.sub(r'bind = "[^"]*"', 'bind = "127.0.0.1:0"', toml.read_text()))
    long_ago = time.time() - 24 * 3600
    with PostgresStore(url, clock=lambda: long_ago) as past:
        prepare_store(past, new_tpm(tmp_path / "tpm"))
        batch = add_batch(past, 2)
        agent = past.list_agents()[0].agent_id
        leases = [past.lease_next(agent, long_ago, 48 * 3600) for _ in range(2)]
        keys = [(lease.job_id, lease.attempt) for lease in leases if lease is not None]
        dead = past.begin_result_upload(*keys[1], 10)  # its server died a day ago
    with open_store(url) as admin:
        live = admin.begin_result_upload(*keys[0], 10)  # another server is receiving it
        admin.write_result_chunk(live, 0, b"01234")
        server = OrganisationServer(load_server_config(home))
        try:
            await server.start()
        finally:
            await server.stop()
        admin.write_result_chunk(live, 5, b"56789")
        admin.finish_upload(live, hashlib.sha256(b"0123456789").digest())
        with pytest.raises(StoreError):
            admin.write_result_chunk(dead, 0, b"01234")
    assert batch

"""Senders that stop in the middle of a result upload.

A real agent cut off mid-upload keeps the result in its spool and sends it
again, from offset 0, on its next session. A hostile (but enrolled) agent can
start uploads and abandon them on purpose. Either way the server must record a
resent result cleanly and must not keep anything for an upload whose session
has gone.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import tracemalloc
from pathlib import Path

import pytest

from vcomp.protocol import events as ev
from vcomp.protocol.messages import Result
from vcomp.protocol.wire import PacketType

from .capture import CaptureProxy
from .harness import HoldingAgent, Org, add_batch, new_tpm, start_org, until

OUTPUT = os.urandom(60 * 1024)  # within the job's 64 KiB output limit
CHUNKS_BEFORE_THE_CUT = 10
SESSIONS = 12
ABANDONED_BYTES = 1200 * 200  # under the sink's 256 KiB write batch: all of it in memory
MAX_GROWTH = 1 << 20  # an abandoned upload that is forgotten costs nothing


async def test_result_resent_after_a_cut_is_recorded_without_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    proxy = CaptureProxy(org.address)
    await proxy.start()
    first = HoldingAgent(org, org.tpm, proxy.address)
    second = HoldingAgent(org, org.tpm)
    sent = [0]

    def cut(datagram: bytes) -> bool:
        sent[0] += datagram[3] == PacketType.RESULT
        return sent[0] > CHUNKS_BEFORE_THE_CUT

    caplog.set_level(logging.ERROR, logger="vcomp")
    try:
        await first.start()
        batch = add_batch(org.store, 1, tag="cut")
        await until(lambda: bool(first.jobs), 20, "the job")
        d = first.jobs[0].description
        proxy.hold_when = cut  # the link dies after ten RESULT chunks
        first.finish(first.jobs[0], OUTPUT)
        await until(lambda: sent[0] > CHUNKS_BEFORE_THE_CUT, 10, "the cut")
        first.close()

        # A new session of the same agent resends the spooled result.
        await second.start()
        await until(lambda: bool(second.of_type(ev.Connected)), 20, "the new session")
        second.submit(d.job, d.attempt, OUTPUT)
        await until(lambda: bool(second.of_type(ev.ResultCommitted)), 10, "the commit")
        assert org.store.batch_status(batch).done == 1
        (stored,) = org.store.list_results(d.job)
        assert stored.output_sha256 == hashlib.sha256(OUTPUT).digest()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
    finally:
        first.close()
        second.close()
        proxy.close()
        await org.server.stop()


def _summary(job: int, chunk: bytes) -> Result:
    """The closing RESULT of an upload of ``chunk`` repeated to ABANDONED_BYTES."""
    digest = hashlib.sha256(chunk * (ABANDONED_BYTES // len(chunk))).digest()
    return Result(
        job=job,
        attempt=1,
        offset=ABANDONED_BYTES,
        total=ABANDONED_BYTES,
        data=b"",
        fin=True,
        sha256=digest,
        status="ok",
        detail="",
        cpu_ms=0,
        wall_ms=0,
    )


async def _upload_and_leave(org: Org, job: int, abandon: bool) -> None:
    """One session that sends a result's chunks, and its summary only if not ``abandon``.

    Nothing is leased, so the store refuses the result anyway: only what the
    server buffers for the upload matters here.
    """
    chunk = b"x" * 1200
    agent = HoldingAgent(org, org.tpm)
    try:
        await agent.start()
        await until(lambda: bool(agent.of_type(ev.Connected)), 20, "a session")
        assert agent.session is not None and agent.session.channel is not None
        channel = agent.session.channel
        for offset in range(0, ABANDONED_BYTES, len(chunk)):
            channel.send_reliable(
                Result(
                    job=job, attempt=1, offset=offset, total=ABANDONED_BYTES, data=chunk, fin=False
                )
            )
        if not abandon:
            channel.send_reliable(_summary(job, chunk))
        assert agent.adapter is not None
        agent.adapter.kick()
        await until(lambda: channel.send_idle, 20, "the server to take the chunks")
        agent.leave()
        await until(lambda: not org.endpoint.sessions, 10, "the session to close")
    finally:
        agent.close()


@pytest.mark.parametrize(
    "abandon",
    [True, False],
    ids=["abandoned", "completed-control"],
)
async def test_abandoned_uploads_leave_nothing_behind(tmp_path: Path, abandon: bool) -> None:
    org = await start_org(tmp_path, new_tpm(tmp_path / "tpm"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for job in range(1, SESSIONS + 1):
            await _upload_and_leave(org, job, abandon)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        print(
            f"\n{'abandoned' if abandon else 'completed'} uploads: {SESSIONS} sessions x "
            f"{ABANDONED_BYTES // 1024} KiB; the server kept {grown / 2**20:.1f} MiB"
        )
        assert grown < MAX_GROWTH
    finally:
        tracemalloc.stop()
        await org.server.stop()

"""Result uploads must not exhaust the server's memory.

An enrolled agent streams RESULT chunks with a huge ``total`` and never sends
the final chunk: for jobs it does not hold (several sessions at once), or for
its own job while the store cannot take the bytes (the server home on a full
tmpfs). The server is a real ``vcomp-server serve`` process; the oracle is its
resident memory (VmRSS in /proc) and whether an honest agent still gets its
jobs done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.protocol import limits
from vcomp.protocol.messages import Result

from .harness import (
    HoldingAgent,
    ProcessOrg,
    add_batch,
    new_tpm,
    start_process_org,
    until,
)

MIB = 1 << 20
ATTACKERS = 3
STREAMED = 16 * MIB  # per attacking session, never finished
HUGE_TOTAL = limits.MAX_RESULT_SIZE
MAX_GROWTH = 32 * MIB  # the stated bound on the server's RSS over its warmed-up baseline
CHUNK = b"z" * limits.DEFAULT_CHUNK


async def _stream(agent: HoldingAgent, job: int, attempt: int, total: int, length: int) -> None:
    """Send ``length`` bytes of a ``total``-byte result, never the final chunk."""
    assert agent.session is not None and agent.session.channel is not None
    assert agent.adapter is not None
    channel = agent.session.channel
    offset = 0
    while offset < length:
        while offset < length and channel.queue_space > 0:
            channel.send_reliable(
                Result(job=job, attempt=attempt, offset=offset, total=total, data=CHUNK, fin=False)
            )
            offset += len(CHUNK)
        agent.adapter.kick()
        await asyncio.sleep(0.002)
    await until(lambda: channel.send_idle or channel.close_reason is not None, 120, "the acks")


class RssWatch:
    """The server process's peak VmRSS, sampled while the attack runs."""

    def __init__(self, org: ProcessOrg) -> None:
        self._org = org
        self.peak = org.server.rss_bytes()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._org.server.rss_bytes())
            await asyncio.sleep(0.02)

    def __enter__(self) -> RssWatch:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak = max(self.peak, self._org.server.rss_bytes())


async def _warm_up(org: ProcessOrg) -> int:
    """One honest job end to end, so the baseline includes a used server."""
    honest = org.agent()
    await honest.start()
    add_batch(org.store, 1, max_attempts=3)
    await until(lambda: honest.stats.committed == 1, 30, "the warm-up job")
    await _leave(honest)
    return org.server.rss_bytes()


async def _leave(agent: LiteAgent) -> None:
    """Close the session politely, so the server offers it no more jobs."""
    assert agent.session is not None and agent.adapter is not None
    agent.session.close("leaving", asyncio.get_running_loop().time())
    agent.adapter.kick()
    await asyncio.sleep(0.2)  # the ERROR is sent at once; it is not acknowledged
    agent.adapter.close()


async def test_unleased_huge_results_do_not_exhaust_server_memory(tmp_path: Path) -> None:
    honest_tpm = new_tpm(tmp_path / "honest-tpm")
    org = start_process_org(
        tmp_path / "srv",
        new_tpm(tmp_path / "tpm"),
        tmp_path / "server.log",
        others=(honest_tpm,),
    )
    attackers: list[HoldingAgent] = []
    honest = org.agent(honest_tpm)
    try:
        baseline = await _warm_up(org)
        attackers = [HoldingAgent(org, org.tpm) for _ in range(ATTACKERS)]  # type: ignore[arg-type]
        for agent in attackers:
            await agent.start()
        await until(lambda: all(a.of_type(ev.Connected) for a in attackers), 30, "sessions")
        with RssWatch(org) as watch:
            # Job ids are guessable; none of these is leased to the attacker.
            await asyncio.gather(
                *(_stream(a, 1000 + i, 1, HUGE_TOTAL, STREAMED) for i, a in enumerate(attackers))
            )
            # Idle attacker sessions may take (and sit on) one job each.
            add_batch(org.store, ATTACKERS + 4, max_attempts=3)
            await honest.start()
            await until(lambda: honest.stats.committed >= 4, 60, "the honest jobs")
        grown = watch.peak - baseline
        print(
            f"\n{ATTACKERS} sessions x {STREAMED // MIB} MiB of unleased results: server RSS "
            f"{baseline / MIB:.0f} MiB -> peak {watch.peak / MIB:.0f} MiB"
        )
        assert org.server.alive()
        assert grown <= MAX_GROWTH, f"server RSS grew by {grown / MIB:.0f} MiB"
    finally:
        for agent in attackers:
            agent.close()
        if honest.adapter is not None:
            honest.adapter.close()
        assert org.stop() == 0


@contextlib.contextmanager
def _small_tmpfs(path: Path, size: int) -> Iterator[None]:
    """A tmpfs of ``size`` bytes at ``path``: a filesystem that fills up for real."""
    path.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"size={size},mode=0700".encode()
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", 0, options) != 0:
        errno = ctypes.get_errno()
        pytest.skip(f"cannot mount a tmpfs here ({os.strerror(errno)}); needs CAP_SYS_ADMIN")
    try:
        yield
    finally:
        libc.umount2(str(path).encode(), 2)  # MNT_DETACH


async def test_own_result_while_the_store_is_full_does_not_grow_memory(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    with _small_tmpfs(home, 8 * MIB):
        org = start_process_org(
            home,
            new_tpm(tmp_path / "tpm"),
            tmp_path / "server.log",
            server={"upload_memory_bytes": 1 << 30},  # only the failed writer is under test
        )
        holder = HoldingAgent(org, org.tpm)  # type: ignore[arg-type]
        try:
            baseline = await _warm_up(org)
            add_batch(org.store, 1, output_bytes=limits.MAX_RESULT_SIZE, max_attempts=3)
            await holder.start()
            await until(lambda: bool(holder.jobs), 30, "the holder's job")
            d = holder.jobs[0].description
            with RssWatch(org) as watch:
                # A 60 MiB staging blob cannot fit on an 8 MiB filesystem: the writer fails.
                await _stream(holder, d.job, d.attempt, 60 * MIB, 40 * MIB)
            grown = watch.peak - baseline
            print(
                f"\n40 MiB of a result the full store cannot take: server RSS "
                f"{baseline / MIB:.0f} MiB -> peak {watch.peak / MIB:.0f} MiB"
            )
            assert org.server.alive()
            assert grown <= MAX_GROWTH, f"server RSS grew by {grown / MIB:.0f} MiB"
            log = tmp_path / "server.log"  # the bytes reached a real, failed writer
            await until(lambda: "result_writer_failed" in log.read_text(), 10, "the failure")
        finally:
            holder.close()
            assert org.stop() == 0


BUDGET = 1 << 20  # the smallest upload_memory_bytes the config allows
HOLDERS = 20
OUTPUT = b"z" * (60 * 1024)  # inline-sized: a sink keeps it all until the final chunk
SENT_FIRST = 50 * len(CHUNK)


async def _finish_upload(agent: HoldingAgent, job: int, attempt: int) -> None:
    """Send the rest of OUTPUT after SENT_FIRST bytes, and the final chunk."""
    assert agent.session is not None and agent.session.channel is not None
    assert agent.adapter is not None
    channel = agent.session.channel
    for offset in range(SENT_FIRST, len(OUTPUT), len(CHUNK)):
        data = OUTPUT[offset : offset + len(CHUNK)]
        channel.send_reliable(
            Result(job=job, attempt=attempt, offset=offset, total=len(OUTPUT), data=data, fin=False)
        )
    channel.send_reliable(
        Result(
            job=job,
            attempt=attempt,
            offset=len(OUTPUT),
            total=len(OUTPUT),
            data=b"",
            fin=True,
            sha256=hashlib.sha256(OUTPUT).digest(),
            status="ok",
            detail="",
            cpu_ms=0,
            wall_ms=0,
        )
    )
    agent.adapter.kick()


async def test_uploads_past_the_memory_budget_are_resent_not_lost(tmp_path: Path) -> None:
    """Holders of real leases stream their own results at once: past the server-wide
    budget an upload is cut off (its session closed), and the agent's resend commits."""
    org = start_process_org(
        tmp_path / "srv",
        new_tpm(tmp_path / "tpm"),
        tmp_path / "server.log",
        # Every holder shares one identity: lift its session and lease caps (default 16).
        server={
            "upload_memory_bytes": BUDGET,
            "max_sessions_per_agent": HOLDERS,
            "max_leases_per_agent": HOLDERS,
        },
    )
    holders = [HoldingAgent(org, org.tpm) for _ in range(HOLDERS)]  # type: ignore[arg-type]
    resent: list[HoldingAgent] = []
    try:
        batch = add_batch(org.store, HOLDERS, output_bytes=len(OUTPUT), max_attempts=3)
        for agent in holders:
            await agent.start()
        await until(lambda: all(a.jobs for a in holders), 60, "a job for every holder")
        jobs = {a: a.jobs[0].description for a in holders}
        await asyncio.gather(
            *(_stream(a, jobs[a].job, jobs[a].attempt, len(OUTPUT), SENT_FIRST) for a in holders)
        )
        cut = [a for a in holders if a.of_type(ev.SessionClosed)]
        print(
            f"\n{HOLDERS} x {SENT_FIRST // 1024} KiB under a {BUDGET >> 20} MiB budget: "
            f"{len(cut)} uploads cut off"
        )
        assert cut, "the budget never bit"
        assert len(cut) < HOLDERS
        for agent in holders:
            d = jobs[agent]
            if agent in cut:  # a new session resends the spooled result from offset 0
                again = HoldingAgent(org, org.tpm)  # type: ignore[arg-type]
                resent.append(again)
                await again.start()
                await until(lambda a=again: bool(a.of_type(ev.Connected)), 30, "a new session")
                again.submit(d.job, d.attempt, OUTPUT)
            else:
                await _finish_upload(agent, d.job, d.attempt)
        await until(lambda: org.store.batch_status(batch).done == HOLDERS, 60, "every result")
        digest = hashlib.sha256(OUTPUT).digest()
        assert all(
            r.result is not None and r.result.output_sha256 == digest
            for r in org.store.iter_results(batch)
        )
        assert org.server.alive()
    finally:
        for agent in holders + resent:
            agent.close()
        assert org.stop() == 0

"""Agents that refuse jobs, against a real ``vcomp-server serve``.

A refusal says "not on this host", not "the job is broken". Before, each refusal
was charged to the job's attempt budget and the job went straight back to the
same agent: a few hostile sessions failed whole batches in seconds, and an honest
volunteer whose ``max_memory_bytes`` is below a batch's limit refused the same job
until it failed. Now agents declare their maxima in READY and are leased only
jobs that fit, a refusal costs the job nothing and is never offered to that agent
again, and an agent's refusals per hour are capped.

The oracle is the store: failed jobs, attempts charged, leases per agent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from pathlib import Path

from vcomp.agent.config import AgentConfig, VolunteerLimits, init_agent_home
from vcomp.agent.measure import golden_measurement
from vcomp.agent.runtime import AgentRuntime
from vcomp.agent.tpm import SimulatedTpm
from vcomp.loadgen import LiteAgent
from vcomp.protocol import handshake as hs
from vcomp.server.store import AttemptState, JobState
from vcomp.server.store.sqlite import SqliteStore

from .harness import (
    APP,
    RefusingAgent,
    ServerProcess,
    enroll,
    make_server_home,
    new_tpm,
    prepare_store,
    until,
)

JOBS_PER_BATCH = 10
MAX_ATTEMPTS = 3
DEFAULT_REFUSAL_CAP = 30  # [jobs] refusals_per_hour when server.toml does not set it
MiB = 1 << 20


def _batches(store: SqliteStore, count: int, jobs: int) -> list[int]:
    return [
        store.create_batch(
            APP,
            [json.dumps({"batch": b, "i": i}).encode() for i in range(jobs)],
            cpu_seconds=5,
            memory_bytes=64 * MiB,
            wall_seconds=10,
            output_bytes=1 << 16,
            max_attempts=MAX_ATTEMPTS,
        )
        for b in range(count)
    ]


def _jobs(store: SqliteStore, batch_ids: list[int]) -> list[int]:
    return [store.get_job_by_index(b, i).job_id for b in batch_ids for i in range(JOBS_PER_BATCH)]


def _charged(store: SqliteStore, job_id: int) -> int:
    """Attempts that drew on the job's budget (everything but refusals)."""
    return sum(a.state is not AttemptState.REFUSED for a in store.list_attempts(job_id))


def _leases_of(store: SqliteStore, job_ids: list[int], agent_id: str) -> int:
    return sum(a.agent_id == agent_id for j in job_ids for a in store.list_attempts(j))


async def test_refusing_sessions_fail_no_job_and_spend_no_budget(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    make_server_home(home)
    hostile = [new_tpm(tmp_path / f"hostile{n}") for n in range(2)]
    honest = new_tpm(tmp_path / "honest")
    with SqliteStore(home / "jobs.sqlite") as store:
        prepare_store(store, hostile[0])
        enroll(store, hostile[1], "hostile-2")
        enroll(store, honest, "honest")
        batch_ids = _batches(store, 2, JOBS_PER_BATCH)
        job_ids = _jobs(store, batch_ids)
    server = ServerProcess(home, tmp_path / "server.log")
    ephemeral = hs.generate_ephemeral()
    # Two enrolled keys, two sessions each; every job they get, they refuse
    # (one session of each key by RESULT status "refused", one by ERROR).
    refusers = [
        RefusingAgent(tpm, server.fingerprint, server.address, ephemeral, by_error=n % 2 == 1)
        for tpm in hostile
        for n in range(2)
    ]
    store = SqliteStore(home / "jobs.sqlite")
    try:
        for agent in refusers:
            await agent.start()
        every = len(job_ids) * len(hostile)

        def settled() -> bool:
            jobs = [store.get_job(j) for j in job_ids]
            if all(job.state is JobState.FAILED for job in jobs):
                return True
            ended = sum(
                a.state is not AttemptState.LEASED for j in job_ids for a in store.list_attempts(j)
            )
            return ended >= every  # the server has dealt with every refusal

        await until(settled, 60, "each hostile key to refuse every job once")
        states = [store.get_job(j).state for j in job_ids]
        print(
            f"\n{len(refusers)} refusing sessions: {sum(a.refused for a in refusers)} refusals, "
            f"{states.count(JobState.FAILED)} of {len(job_ids)} jobs failed"
        )
        assert states.count(JobState.FAILED) == 0
        charged = {j: store.list_attempts(j) for j in job_ids if _charged(store, j)}
        assert charged == {}
        # Each key refused each job once and was never offered it again.
        for tpm in hostile:
            assert _leases_of(store, job_ids, tpm.agent_id.hex()) == len(job_ids)

        # An honest agent then completes both batches.
        worker = LiteAgent(
            tpm=honest, pinned=server.fingerprint, server=server.address, ephemeral=ephemeral
        )
        await worker.start()
        try:
            await until(lambda: worker.stats.committed >= len(job_ids), 60, "the honest agent")
        finally:
            await worker.stop()
        for b in batch_ids:
            assert store.batch_status(b).done == JOBS_PER_BATCH
        assert server.alive()
    finally:
        for agent in refusers:
            agent.close()
        store.close()
        server.stop()


async def test_refusals_per_hour_are_capped(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    make_server_home(home)
    hostile, honest = new_tpm(tmp_path / "hostile"), new_tpm(tmp_path / "honest")
    jobs = DEFAULT_REFUSAL_CAP + 10
    with SqliteStore(home / "jobs.sqlite") as store:
        prepare_store(store, hostile)
        enroll(store, honest, "honest")
        (batch,) = _batches(store, 1, jobs)
        job_ids = [store.get_job_by_index(batch, i).job_id for i in range(jobs)]
    server = ServerProcess(home, tmp_path / "server.log")
    ephemeral = hs.generate_ephemeral()
    refuser = RefusingAgent(hostile, server.fingerprint, server.address, ephemeral)
    store = SqliteStore(home / "jobs.sqlite")
    try:
        await refuser.start()
        await until(lambda: refuser.refused >= DEFAULT_REFUSAL_CAP, 60, "the hostile agent")
        # The refuser stays connected and idle while an honest agent does the batch.
        worker = LiteAgent(
            tpm=honest, pinned=server.fingerprint, server=server.address, ephemeral=ephemeral
        )
        await worker.start()
        try:

            def finished() -> bool:
                s = store.batch_status(batch)
                return s.done + s.failed == jobs

            await until(finished, 90, "the batch to finish")
        finally:
            await worker.stop()
        leases = _leases_of(store, job_ids, hostile.agent_id.hex())
        print(f"\nrefusal cap {DEFAULT_REFUSAL_CAP}/h: the refuser was leased {leases} jobs")
        assert store.batch_status(batch).failed == 0
        assert leases == DEFAULT_REFUSAL_CAP
        assert refuser.session_alive()
        log = (tmp_path / "server.log").read_text()
        assert "event=refusal_cap_reached" in log
    finally:
        refuser.close()
        store.close()
        server.stop()


def _agent_home(root: Path, server: ServerProcess, max_memory: int) -> AgentConfig:
    host, port = server.address
    config = init_agent_home(
        root, name="small", servers=[f"{host}:{port}"], server_key=server.fingerprint.hex()
    )
    return dataclasses.replace(
        config,
        mode="full",
        cores=1,
        limits=dataclasses.replace(VolunteerLimits(), max_memory_bytes=max_memory),
    )


ECHO_JOB = b"from vcomp.guest import run\nrun(lambda data, progress: data)\n"


async def test_an_undersized_agent_is_never_offered_a_batch_it_cannot_run(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    make_server_home(home)
    with SqliteStore(home / "jobs.sqlite") as store:
        store.add_app("echo", "python", io.BytesIO(ECHO_JOB))
        # The big batch comes first, so a scheduler that ignores fit offers it first.
        big = store.create_batch(
            "echo", [b"big-%d" % i for i in range(3)], memory_bytes=512 * MiB, max_attempts=3
        )
        small = store.create_batch(
            "echo", [b"small-%d" % i for i in range(3)], memory_bytes=128 * MiB, max_attempts=3
        )
    server = ServerProcess(home, tmp_path / "server.log")
    config = _agent_home(tmp_path / "agent", server, max_memory=256 * MiB)
    tpm = SimulatedTpm.open(config.tpm_dir)
    with SqliteStore(home / "jobs.sqlite") as store:
        enroll(store, tpm, "small")
        store.allow_measurement(golden_measurement(config.policy()).format())
    runtime = AgentRuntime(config, shutdown_grace=1.0)
    task = asyncio.ensure_future(runtime.run())
    store = SqliteStore(home / "jobs.sqlite")
    try:
        await until(lambda: store.batch_status(small).done == 3, 90, "the small batch")
        big_jobs = [store.get_job_by_index(big, i) for i in range(3)]
        attempts = sum(len(store.list_attempts(j.job_id)) for j in big_jobs)
        print(f"\nbig batch: {attempts} leases to the 256 MiB agent, states {big_jobs}")
        assert attempts == 0
        assert [j.state for j in big_jobs] == [JobState.QUEUED] * 3
    finally:
        runtime.stop()
        await asyncio.wait_for(task, 30)
        store.close()
        server.stop()

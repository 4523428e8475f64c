"""A hostile enrolled agent against an app whose validator parses the outputs.

The agent answers every replica with output built to hurt ``json_close`` (deep
nesting, not JSON, NaN, numbers that overflow). The oracle is what it achieved: the
server kept serving, every job finished with an honest canonical output, the
validator never failed, and the hostile results count only as disagreements.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

from vcomp.loadgen import LiteAgent
from vcomp.protocol import events as ev
from vcomp.server.store import JobState

from .harness import enroll, new_tpm, start_org, until

POISON = [
    b"[" * 200_000 + b"]" * 200_000,  # deeper than the recursion limit
    b"\xff\xfe not json",
    b'{"x": NaN}',
    b'{"x": 1e999999}',
    b'{"x": ' + b"9" * 5000 + b"}",  # beyond int() digit limits
]


def honest(job: ev.JobReceived) -> bytes:
    return json.dumps({"x": int(job.input) * 0.1, "input": job.input.decode()}).encode()


async def test_poisoned_outputs_only_disagree(tmp_path: Path) -> None:
    hostile_tpm = new_tpm(tmp_path / "tpm-hostile")
    org = await start_org(tmp_path, hostile_tpm)
    agents: list[LiteAgent] = []
    try:
        tpms = [new_tpm(tmp_path / f"tpm-{i}") for i in range(2)]
        for i, tpm in enumerate(tpms):
            enroll(org.store, tpm, f"honest-{i}")
        store = org.store
        store.add_app(
            "validated", "python", io.BytesIO(b"x"), validator="vcomp.validators:json_close"
        )
        poison = itertools.cycle(POISON)
        hostile = LiteAgent(
            tpm=hostile_tpm,
            pinned=org.fingerprint,
            server=org.address,
            ephemeral=org.ephemeral,
            compute=lambda _job: next(poison),
        )
        agents.append(hostile)
        await hostile.start()
        await until(lambda: hostile.ready, 20, "the hostile agent")
        inputs = [b"%d" % i for i in range(len(POISON))]
        batch = store.create_batch(
            "validated",
            inputs,
            replicas=2,
            quorum=2,
            max_attempts=2,
            cpu_seconds=5,
            memory_bytes=1 << 26,
            wall_seconds=10,
            output_bytes=1 << 20,
        )
        await until(lambda: hostile.stats.jobs >= len(POISON), 20, "the poison sent")
        ids = {t.agent_id for t in tpms}
        await until(lambda: ids <= set(org.server.trust.enrolled), 20, "enrolments loaded")
        for tpm in tpms:
            agent = LiteAgent(
                tpm=tpm,
                pinned=org.fingerprint,
                server=org.address,
                ephemeral=org.ephemeral,
                compute=honest,
            )
            agents.append(agent)
            await agent.start()
        await until(lambda: store.batch_status(batch).finished, 30, "the batch")
        hostile_id = hostile_tpm.agent_id.hex()
        for index, data in enumerate(inputs):
            job = store.get_job_by_index(batch, index)
            assert job.state is JobState.DONE, job.reason
            assert job.disagreements >= 1  # the poison was compared, and disagreed
            assert job.canonical_attempt is not None
            (canonical,) = [
                r for r in store.list_results(job.job_id) if r.attempt == job.canonical_attempt
            ]
            assert canonical.agent_id != hostile_id
            with store.open_output(job.job_id, canonical.attempt) as blob:
                assert json.loads(blob.read(0, blob.size))["input"] == data.decode()
        assert store.hook_failures() == []
    finally:
        for agent in agents:
            await agent.stop()
        await org.server.stop()

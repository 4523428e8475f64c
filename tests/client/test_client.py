"""The client's calls end to end against the contract's answers (vcomp.client.client)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.client.conftest import ContractServer
from vcomp.client import Client, JobFailed
from vcomp.errors import ConfigError

TOKEN = "admin-tok"


async def test_gather_returns_outputs_in_input_order(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [{"seed": i} for i in range(5)])
        for i in (3, 1, 4, 0, 2):  # finish out of order
            await contract.finish(batch.id, i, output=json.dumps({"i": i}).encode())
        assert await batch.gather() == [json.dumps({"i": i}).encode() for i in range(5)]
        assert await batch.gather_json() == [{"i": i} for i in range(5)]
        status = await batch.status()
    assert (status.id, status.state, status.jobs) == (batch.id, "finished", 5)
    assert status.counts["done"] == 5 and status.finished


async def test_gather_raises_job_failed_with_the_jobs_error_text(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2, 3])
        await contract.finish(batch.id, 0, output=b"1")
        error = {"kind": "exit", "message": "ValueError: bad seed", "stderr_tail": "Traceback..."}
        await contract.finish(batch.id, 2, "failed", error=error)
        with pytest.raises(JobFailed) as caught:
            await batch.gather()
    failed = caught.value
    assert (failed.index, failed.kind, failed.stderr_tail) == (2, "exit", "Traceback...")
    assert "job 2 failed (exit): ValueError: bad seed" in str(failed)
    assert "Traceback..." in str(failed)


async def test_as_completed_yields_each_job_with_its_state(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2])
        await contract.finish(batch.id, 1, output=b"out")
        seen = []
        async for job in batch.as_completed():
            seen.append(job)
            if len(seen) == 1:
                await contract.finish(batch.id, 0, "failed", error={"kind": "timeout"})
    assert [(j.index, j.state, j.output, j.ok) for j in seen] == [
        (1, "done", b"out", True),
        (0, "failed", None, False),
    ]
    assert seen[1].error is not None and seen[1].error.kind == "timeout"
    with pytest.raises(JobFailed, match=r"job 0 failed \(timeout\)"):
        seen[1].value()


async def test_cancel_ends_the_open_jobs_and_gather_says_so(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2, 3])
        await contract.finish(batch.id, 0, output=b"x")
        assert await batch.cancel() == 2
        with pytest.raises(JobFailed, match="cancelled"):
            await batch.gather()
        assert (await batch.status()).state == "cancelled"


async def test_retry_resubmits_the_failed_jobs_as_a_new_batch(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1, 2, 3])
        await contract.finish(batch.id, 0, output=b"a")
        await contract.finish(batch.id, 1, "failed", error={"kind": "exit", "message": "x"})
        await contract.finish(batch.id, 2, output=b"c")
        again = await batch.retry()
        assert again is not None and again.indices == (1,) and again.batch.jobs == 1
        assert contract.batches[again.batch.id].inputs == [{"json": 2}]
        await contract.finish(again.batch.id, 0, output=b"b")
        assert await again.batch.gather() == [b"b"]
        with pytest.raises(JobFailed):
            await batch.gather()  # the original keeps its failure
        assert await again.batch.retry() is None


async def test_submit_is_a_batch_of_one(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        job = await client.submit("pi", {"points": 10})
        assert contract.batches[job.batch.id].inputs == [{"json": {"points": 10}}]
        waiter = asyncio.ensure_future(job.json())
        await contract.finish(job.batch.id, 0, output=b"3.14")
        assert await asyncio.wait_for(waiter, 30) == 3.14
        info = await job.info()
    assert (info.index, info.state, len(info.attempts)) == (0, "done", 1)
    assert info.attempts[0].agent == "ab" * 8


async def test_add_app_streams_the_file_and_names_its_hooks(
    contract: ContractServer, tmp_path: Path
) -> None:
    code = tmp_path / "pi.py"
    code.write_bytes(b"# pi\n" * 50_000)
    async with Client.connect(contract.url, token=TOKEN) as client:
        app = await client.add_app(
            "pi/odd name", code, kind="python", validator="vcomp.validators:json_close"
        )
        listed = await client.apps()
        retired = await client.retire_app("pi/odd name", 1)
        with pytest.raises(ConfigError, match="cannot read app code"):
            await client.add_app("pi", tmp_path / "missing.py")
    assert contract.app_bodies == [code.read_bytes()]
    assert (app.name, app.version, app.kind, app.size) == ("pi/odd name", 1, "python", 250_000)
    assert app.validator == "vcomp.validators:json_close" and app.assimilator is None
    assert [a.name for a in listed] == ["pi/odd name"]
    assert retired.retired


async def test_agents_and_batches_are_listed(contract: ContractServer) -> None:
    async with Client.connect(contract.url, token=TOKEN) as client:
        batch = await client.map("pi", [1])
        agents = await client.agents()
        batches = await client.batches()
        again = await client.batch(batch.id)
    assert [(a.name, a.connected, a.jobs_done, a.cpu_seconds) for a in agents] == [
        ("volunteer-1", True, 3, 1.5)
    ]
    assert [b.id for b in batches] == [batch.id]
    assert (again.id, again.jobs) == (batch.id, 1)

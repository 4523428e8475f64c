"""Checkpoint and resume across an agent SIGKILL: real `vcomp-agent join` processes,
real UDP, the real sandbox.

The agent is killed mid-job once it has a checkpoint in its spool; a new agent process
on the same home (same TPM, same sealed spool) reports the interrupted attempt lost,
gets the job back at once (the lease is 10 minutes: expiry plays no part), resumes
from the checkpoint (the job says where it started), and the π counts are exactly
those of an uninterrupted run.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import AGENT_CLI, EXAMPLES, PI_PY, Lab, python_job, wait_until
from vcomp.domain import RESULT, FrameDecoder, encode_start
from vcomp.server.store import AttemptState


def _pi_c(tmp_path: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; cannot build server/examples/pi.c")
    out = tmp_path / "pi"
    subprocess.run([gcc, "-O2", "-o", str(out), str(EXAMPLES / "pi.c")], check=True)
    return out


def _uninterrupted_pi_c(binary: Path, data: bytes) -> dict[str, int]:
    """pi.c run outside any sandbox, speaking fds 3 and 4 through pipes."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    proc = subprocess.Popen([str(binary)], close_fds=False, preexec_fn=lambda: _wire(in_r, out_w))
    os.close(in_r)
    os.close(out_w)
    os.write(in_w, encode_start(data))
    os.close(in_w)
    decoder = FrameDecoder(1 << 20, max_checkpoint=1 << 20)
    result = b""
    while chunk := os.read(out_r, 1 << 16):
        result = next((f.payload for f in decoder.feed(chunk) if f.type == RESULT), result)
    os.close(out_r)
    assert proc.wait(60) == 0
    answer: dict[str, int] = json.loads(result)
    return answer


def _wire(in_r: int, out_w: int) -> None:
    a = fcntl.fcntl(in_r, fcntl.F_DUPFD, 10)
    b = fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
    os.dup2(a, 3)
    os.dup2(b, 4)


def _uninterrupted_pi_py(data: bytes) -> dict[str, int]:
    spec = importlib.util.spec_from_file_location("vcomp_example_pi_ck", PI_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    answer: dict[str, int] = json.loads(module.handler(data, lambda _f: None))
    return answer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "exec"])
async def test_killed_agent_resumes_from_its_checkpoint(
    lab: Lab, tmp_path: Path, kind: str
) -> None:
    if kind == "python":
        app: Path | bytes = PI_PY
        # A few seconds of CPU either way: numpy draws ~50x faster than pure Python.
        points = 400_000_000 if importlib.util.find_spec("numpy") else 8_000_000
    else:
        app = _pi_c(tmp_path)
        points = 1_500_000_000  # about 3 s
    data = json.dumps({"points": points, "seed": 5, "report_resume": True}).encode()
    expected = (
        _uninterrupted_pi_py(data) if kind == "python" else _uninterrupted_pi_c(app, data)  # type: ignore[arg-type]
    )

    # A long lease: the job comes back at once only because the restarted agent reports
    # the attempt it holds a checkpoint of as lost (JOB_LOST).
    org = lab.org(lease_seconds=600, idle_timeout=600)
    await lab.start(org)
    home = lab.agent_config(org, "volunteer")
    await org.synced()
    org.add_app("pi", app, kind=kind)
    batch = org.submit("pi", [data], cpu_seconds=120, wall_seconds=300)
    job_id = org.store.get_job_by_index(batch, 0).job_id
    checkpoint = home.spool_dir / f"{job_id}-1.checkpoint"

    first, first_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(home.home), "--mode", "full"], "first"
    )
    await wait_until(checkpoint.exists, "a checkpoint in the agent's spool", 120)
    first.killpg()  # SIGKILL mid-job: no goodbye, the sandbox dies with it
    assert await first.wait(10) == -signal.SIGKILL
    assert first_log.events("job_finished") == []  # it really died mid-job
    assert checkpoint.exists()  # the checkpoint survived the kill

    second, second_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(home.home), "--mode", "full"], "second"
    )
    await org.wait_batch(batch, timeout=120)
    assert second_log.events("job_reported_lost", job=str(job_id), attempt="1")

    _result, output = org.outputs(batch)[0]
    answer = json.loads(output)
    resumed_at = answer.pop("resumed_at", 0)
    assert 0 < resumed_at < points  # it did not start from zero
    assert answer == expected  # and the π counts are exact
    assert second_log.events("job_resumed", job=str(job_id))
    await wait_until(
        lambda: not list(home.spool_dir.glob(f"{job_id}-*.checkpoint")),
        "the checkpoint removed after commit",
        30,
    )
    second.signal(signal.SIGTERM)
    await second.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python", "exec"])
async def test_another_agent_resumes_from_the_uploaded_checkpoint(
    lab: Lab, tmp_path: Path, kind: str
) -> None:
    """[jobs] upload_checkpoints: the first agent is SIGKILLed for good after its
    checkpoint reached the server; a second volunteer (another TPM, another spool) gets
    the job when the lease expires and resumes from the server's copy."""
    if kind == "python":
        app: Path | bytes = PI_PY
        points = 400_000_000 if importlib.util.find_spec("numpy") else 8_000_000
    else:
        app = _pi_c(tmp_path)
        points = 1_500_000_000
    data = json.dumps({"points": points, "seed": 9, "report_resume": True}).encode()
    expected = (
        _uninterrupted_pi_py(data) if kind == "python" else _uninterrupted_pi_c(app, data)  # type: ignore[arg-type]
    )
    org = lab.org(lease_seconds=5, idle_timeout=10, upload_checkpoints=True)
    await lab.start(org)
    first_home = lab.agent_config(org, "first")
    second_home = lab.agent_config(org, "second")
    await org.synced()
    org.add_app("pi", app, kind=kind)
    batch = org.submit("pi", [data], cpu_seconds=120, wall_seconds=300)
    job_id = org.store.get_job_by_index(batch, 0).job_id

    first, first_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(first_home.home), "--mode", "full"], "first"
    )
    await wait_until(
        lambda: org.store.latest_checkpoint(job_id) is not None, "an uploaded checkpoint", 120
    )
    first.killpg()  # gone for good: its spool never comes back
    assert await first.wait(10) == -signal.SIGKILL
    assert first_log.events("job_finished") == []  # it really died mid-job
    uploaded = org.store.latest_checkpoint(job_id)
    assert uploaded is not None and uploaded.attempt == 1

    second, second_log = lab.spawn(
        [AGENT_CLI, "join", "--config", str(second_home.home), "--mode", "full"], "second"
    )
    await org.wait_batch(batch, timeout=180)
    _result, output = org.outputs(batch)[0]
    answer = json.loads(output)
    resumed_at = answer.pop("resumed_at", 0)
    assert 0 < resumed_at < points  # it did not start from zero
    assert answer == expected  # and the π counts are exact
    [resumed] = second_log.events("job_resumed", job=str(job_id))
    assert resumed["source"] == "server" and resumed["from_attempt"] == "1"
    print(f"{kind}: resumed on the second agent at {resumed_at:,} of {points:,} points")
    attempts = {a.attempt: a for a in org.store.list_attempts(job_id)}
    assert attempts[1].agent_id != attempts[max(attempts)].agent_id
    second.signal(signal.SIGTERM)
    await second.wait(30)


@pytest.mark.slow
async def test_lease_is_renewed_while_the_job_makes_no_progress(lab: Lab) -> None:
    """Renewal follows the session, not the job: a job silent (or suspended) for four
    lease periods keeps its one lease and its result is committed as attempt 1."""
    org = lab.org(lease_seconds=2, idle_timeout=30)
    await lab.start(org)
    home = lab.agent_config(org, "volunteer")
    await org.synced()
    org.add_app("silent", python_job("time.sleep(8)\nreturn data"))
    batch = org.submit("silent", [b"quiet"])
    await lab.run_agent(home, org)
    await org.wait_batch(batch, timeout=120)
    job_id = org.store.get_job_by_index(batch, 0).job_id
    attempts = org.store.list_attempts(job_id)
    assert [(a.attempt, a.state) for a in attempts] == [(1, AttemptState.SUCCEEDED)]
    assert org.outputs(batch)[0][1] == b"quiet"

"""The volunteer's preferences with a real agent, a real server and real jobs.

Pause and resume go through the real CLI from another process; a paused job is judged
by the CPU-seconds its tree consumed (read from /proc) over the paused interval, and by
the result it delivers after resume. max_memory is judged by what ran at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import json
import signal
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.integration.conftest import (
    AGENT_CLI,
    PI_PY,
    AgentHandle,
    Lab,
    LogRecorder,
    pi_inputs,
    pi_reference,
    python_job,
    wait_until,
)
from vcomp.agent.preferences.memory import MemoryBudget
from vcomp.agent.preferences.settings import Preferences
from vcomp.server.store import AttemptState
from vcomp.server.store.records import AttemptRecord

# About 2-3 CPU-seconds of pi.py (numpy) on this machine: long enough to pause mid-job.
POINTS = 20_000_000


async def cli(*args: str) -> tuple[int, str, str]:
    """Run vcomp-agent in another process without blocking this loop (the agent runs here)."""
    proc = await asyncio.create_subprocess_exec(
        AGENT_CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def running_control(agent: AgentHandle):  # type: ignore[no-untyped-def]
    for w in agent.runtime.workers:
        if w.running is not None and w.running.control.tree is not None:
            return w.running.control
    return None


async def test_pause_stops_a_running_job_and_resume_finishes_it(lab: Lab) -> None:
    # A 2 s lease, paused for longer: the agent keeps answering, so it is renewed.
    org = lab.org(lease_seconds=2)
    await lab.start(org)
    config = lab.agent_config(org, "paused")
    agent = await lab.run_agent(config, org)
    home = str(config.home)
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, POINTS)
    batch = org.submit("pi", inputs, wall_seconds=30)

    control = await wait_until(lambda: running_control(agent), "the job to start", timeout=60)
    await wait_until(lambda: control.cpu_seconds() > 0.2, "the job to compute", timeout=60)
    code, out, err = await cli("pause", "--config", home)
    assert code == 0, err
    await wait_until(lambda: control.stopped, "the job to stop")
    await asyncio.sleep(0.3)
    before = control.cpu_seconds()
    await asyncio.sleep(5.0)
    during = control.cpu_seconds() - before

    code, out, err = await cli("status", "--json", "--config", home)
    assert code == 0, err
    status = json.loads(out)
    assert status["paused"] is True
    assert "pause" in status["paused_because"]
    job = status["workers"][0]["job"]
    assert job is not None and job["stopped"] is True
    # The session (and with it the lease) lives on while the job stands still.
    assert status["workers"][0]["session"] == "running"
    assert status["workers"][0]["server"] == org.server_str
    code, out, err = await cli("status", "--config", home)
    assert code == 0, err
    assert "PAUSED: pause: paused by the volunteer" in out
    assert f"worker 0: running {org.server_str}" in out and "(stopped)" in out

    code, out, err = await cli("resume", "--config", home)
    assert code == 0, err
    await org.wait_batch(batch, timeout=120)

    print(f"\npaused 5 s: the job's tree used {during:.3f} CPU-seconds")
    assert during < 0.05, f"the paused job used {during:.3f} CPU-seconds"
    outputs = org.outputs(batch)
    result, output = outputs[0]
    assert result.status == "ok"
    assert output == pi_reference(inputs[0])
    # The lease held through the pause: the first attempt delivered the result.
    assert result.attempt == 1
    job_id = org.store.get_job_by_index(batch, 0).job_id
    assert [a.state for a in org.store.list_attempts(job_id)] == [AttemptState.SUCCEEDED]

    code, out, err = await cli("status", "--json", "--config", home)
    status = json.loads(out)
    assert status["paused"] is False
    assert status["jobs_total"] == 1 and status["jobs_today"] == 1
    assert status["cpu_seconds_donated"] > 0.2


async def test_max_memory_runs_jobs_one_at_a_time_when_two_do_not_fit(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "memcap", cores=2)
    job_memory = 256 << 20
    config = dataclasses.replace(
        config, preferences=Preferences(max_memory=job_memory + job_memory // 2)
    )
    agent = await lab.run_agent(config, org)
    await wait_until(lambda: agent.connected_sessions >= 2, "two sessions")
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(4, POINTS // 8)
    batch = org.submit("pi", inputs, memory_bytes=job_memory)

    most_at_once = 0
    most_reserved = 0
    saw_waiting = False
    own_cpu: list[float] = []

    def sample() -> None:
        nonlocal most_at_once, most_reserved, saw_waiting
        own_cpu.append(agent.runtime.jobs_cpu_seconds())
        saw_waiting = saw_waiting or any(
            w.running is not None and w.running.waiting_for_memory for w in agent.runtime.workers
        )
        live = sum(
            1
            for w in agent.runtime.workers
            if w.running is not None and w.running.control.tree is not None
        )
        most_at_once = max(most_at_once, live)
        most_reserved = max(most_reserved, agent.runtime.memory.reserved)

    done = asyncio.ensure_future(org.wait_batch(batch, timeout=120))
    while not done.done():
        sample()
        await asyncio.sleep(0.01)
    await done
    outputs = org.outputs(batch)
    assert sorted(outputs) == [0, 1, 2, 3]
    for index, (result, output) in outputs.items():
        assert result.status == "ok"
        assert output == pi_reference(inputs[index])
    assert most_at_once == 1, "two jobs ran at once above max_memory"
    assert most_reserved <= config.preferences.max_memory
    assert saw_waiting, "no job ever waited for memory: the test did not exercise the cap"
    # The CPU-load fallback of run_if_user_active subtracts this from the machine's busy
    # time: it must count finished jobs too, or each job's end looks like the owner's load.
    drops = [(a, b) for a, b in itertools.pairwise(own_cpu) if b < a - 1e-9]
    assert drops == [], f"the agent's own job CPU went down: {drops[:3]}"
    assert own_cpu[-1] >= 4 * 0.05


async def test_a_job_above_max_memory_is_never_leased_here(lab: Lab) -> None:
    # READY declares the cap, so the server keeps the job for an agent it fits.
    org = lab.org()
    await lab.start(org)
    small = lab.agent_config(org, "small")
    small = dataclasses.replace(small, preferences=Preferences(max_memory=128 << 20))
    agent = await lab.run_agent(small, org)
    await wait_until(lambda: agent.connected_sessions >= 1, "a session")
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, 1000)
    batch = org.submit("pi", inputs, memory_bytes=256 << 20)
    await asyncio.sleep(3.0)
    job_id = org.store.get_job_by_index(batch, 0).job_id
    assert list(org.store.list_attempts(job_id)) == [], "leased to an agent it cannot fit"
    assert agent.runtime.totals.jobs_total == 0
    big = lab.agent_config(org, "big")
    await lab.run_agent(big, org)
    await org.wait_batch(batch, timeout=60)
    result, output = org.outputs(batch)[0]
    assert result.agent_id == lab.agent_ids["big"]
    assert output == pi_reference(inputs[0])


def battery_at(root: Path, percent: int) -> None:
    bat = root / "BAT0"
    bat.mkdir(parents=True, exist_ok=True)
    (bat / "type").write_text("Battery\n")
    tmp = bat / "capacity.tmp"
    tmp.write_text(f"{percent}\n")
    tmp.replace(bat / "capacity")


async def paused_cpu(control: Any, seconds: float) -> float:
    """CPU-seconds the job's tree used over ``seconds`` of wall time."""
    await asyncio.sleep(0.3)
    before = control.cpu_seconds()
    await asyncio.sleep(seconds)
    return control.cpu_seconds() - before


async def test_low_battery_stops_the_job_until_charged_above_the_hysteresis(
    lab: Lab, tmp_path: Path
) -> None:
    sysfs = tmp_path / "power_supply"
    battery_at(sysfs, 50)
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "laptop")
    prefs = Preferences(battery_below=20, battery_hysteresis=10, power_supply=str(sysfs))
    agent = await lab.run_agent(dataclasses.replace(config, preferences=prefs), org)
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, POINTS)
    batch = org.submit("pi", inputs, wall_seconds=30)
    control = await wait_until(lambda: running_control(agent), "the job to start", timeout=60)
    await wait_until(lambda: control.cpu_seconds() > 0.2, "the job to compute", timeout=60)

    battery_at(sysfs, 15)
    await wait_until(lambda: control.stopped, "the job to stop on low battery")
    assert "battery" in agent.runtime.hold.reasons
    during = await paused_cpu(control, 2.0)
    print(f"\nlow battery 2 s: the job's tree used {during:.3f} CPU-seconds")
    assert during < 0.05
    battery_at(sysfs, 25)  # above the threshold, below threshold + hysteresis: still stopped
    await asyncio.sleep(2.5)
    assert control.stopped and "battery" in agent.runtime.hold.reasons
    battery_at(sysfs, 31)
    await org.wait_batch(batch, timeout=120)
    result, output = org.outputs(batch)[0]
    assert result.status == "ok" and result.attempt == 1
    assert output == pi_reference(inputs[0])


async def test_schedule_stops_the_job_outside_its_window(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "nightly")
    prefs = Preferences(schedule="Mon-Fri 18:00-08:00, Sat-Sun all")
    agent = await lab.run_agent(dataclasses.replace(config, preferences=prefs), org)
    # The agent's local clock for the schedule, set by the test: Monday night first.
    now = [datetime(2026, 11, 30, 23, 0)]
    agent.runtime.preferences.wall = lambda: now[0]
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, POINTS)
    batch = org.submit("pi", inputs, wall_seconds=30)
    control = await wait_until(lambda: running_control(agent), "the job to start", timeout=60)
    await wait_until(lambda: control.cpu_seconds() > 0.2, "the job to compute", timeout=60)

    now[0] = datetime(2026, 12, 1, 8, 0)  # Tuesday 08:00: the window is over
    await wait_until(lambda: control.stopped, "the job to stop outside the schedule")
    assert "schedule" in agent.runtime.hold.reasons
    during = await paused_cpu(control, 2.0)
    print(f"\noutside the schedule 2 s: the job's tree used {during:.3f} CPU-seconds")
    assert during < 0.05
    now[0] = datetime(2026, 12, 5, 12, 0)  # Saturday
    await org.wait_batch(batch, timeout=120)
    result, output = org.outputs(batch)[0]
    assert result.status == "ok" and result.attempt == 1
    assert output == pi_reference(inputs[0])


async def test_rate_caps_still_deliver_the_job_and_its_result(lab: Lab) -> None:
    # 300 kB of code at 100 kB/s down, with upload capped too: the session copes.
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "slowlink")
    prefs = Preferences(max_download_rate=100_000, max_upload_rate=50_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    agent = await lab.run_agent(dataclasses.replace(config, preferences=prefs), org)
    code = python_job("return hashlib.sha256(data).hexdigest().encode() * 1000", pad=300_000)
    org.add_app("big", code)
    batch = org.submit("big", [b"x"])
    await org.wait_batch(batch, timeout=120)
    result, output = org.outputs(batch)[0]
    assert result.status == "ok"
    assert output == hashlib.sha256(b"x").hexdigest().encode() * 1000
    download, upload = agent.runtime.download, agent.runtime.upload
    assert download is not None and upload is not None
    elapsed = loop.time() - started
    print(
        f"\nrate caps: {download.taken} B read in {elapsed:.1f} s at a 100000 B/s cap "
        f"(burst {download.burst:.0f} B), {upload.taken} B sent at a 50000 B/s cap"
    )
    # Every byte read went through the cap, and no more than it allows went through.
    assert download.taken >= 300_000
    assert download.taken <= download.burst + 100_000 * elapsed + 2048
    assert upload.taken <= upload.burst + 50_000 * elapsed + 2048


async def test_a_paused_idle_agent_holds_no_session_and_takes_no_lease(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "idle")
    agent = await lab.run_agent(config, org)
    await wait_until(lambda: org.live_sessions() == 1, "the agent's session")
    code, _, err = await cli("pause", "--config", str(config.home))
    assert code == 0, err
    await wait_until(lambda: org.live_sessions() == 0, "the paused agent to leave")
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, 1000)
    batch = org.submit("pi", inputs)
    await asyncio.sleep(3.0)
    job_id = org.store.get_job_by_index(batch, 0).job_id
    assert list(org.store.list_attempts(job_id)) == [], "a paused agent took a lease"
    code, out, err = await cli("status", "--json", "--config", str(config.home))
    assert json.loads(out)["workers"][0]["session"] == "disconnected"
    code, _, err = await cli("resume", "--config", str(config.home))
    assert code == 0, err
    await org.wait_batch(batch, timeout=60)
    assert org.outputs(batch)[0][1] == pi_reference(inputs[0])
    assert agent.runtime.totals.jobs_total == 1


async def test_a_job_above_max_memory_that_arrives_anyway_is_refused_and_runs_elsewhere(
    lab: Lab, logs: LogRecorder
) -> None:
    # As from a server that ignores READY's capacity: this agent declares its [limits]
    # (2 GiB) but its memory budget is 128 MiB, so the job reaches it and must be refused.
    org = lab.org()
    await lab.start(org)
    small = lab.agent_config(org, "small")
    agent = await lab.run_agent(small, org)
    agent.runtime.memory = MemoryBudget(128 << 20)
    await wait_until(lambda: agent.connected_sessions >= 1, "a session")
    org.add_app("pi", PI_PY)
    inputs = pi_inputs(1, 1000)
    batch = org.submit("pi", inputs, memory_bytes=256 << 20, max_attempts=1)
    job_id = org.store.get_job_by_index(batch, 0).job_id

    def refused() -> list[AttemptRecord]:
        return [a for a in org.store.list_attempts(job_id) if a.state is AttemptState.REFUSED]

    attempts = await wait_until(refused, "the refusal", timeout=60)
    assert attempts[0].agent_id == lab.agent_ids["small"]
    # The server heard why (it logs the agent's reason).
    said = logs.events("job_refused", logger="vcomp.server")
    assert said and "max_memory 134217728" in said[0]["message"]
    assert agent.runtime.totals.jobs_total == 0  # nothing ran here
    await lab.run_agent(lab.agent_config(org, "big"), org)
    # max_attempts=1: the refusal cost the job nothing.
    await org.wait_batch(batch, timeout=60)
    result, output = org.outputs(batch)[0]
    assert result.agent_id == lab.agent_ids["big"]
    assert output == pi_reference(inputs[0])


async def test_join_flags_set_the_preferences_that_status_shows(lab: Lab) -> None:
    org = lab.org()
    await lab.start(org)
    config = lab.agent_config(org, "flags")
    await org.synced()
    join, join_log = lab.spawn(
        [
            AGENT_CLI,
            "join",
            "--config",
            str(config.home),
            "--mode",
            "full",
            "--max-memory",
            "512M",  # the shared size forms, as on every size option
            "--schedule",
            "Sat-Sun all",
            "--battery-below",
            "15",
            "--max-upload-rate",
            "1000000",
        ],
        "join",
    )
    sock = config.status_socket
    await wait_until(sock.exists, "the status socket", timeout=60)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    code, out, err = await cli("status", "--json", "--config", str(config.home))
    assert code == 0, err
    prefs = json.loads(out)["preferences"]
    assert prefs["max_memory"] == 512 << 20
    assert prefs["schedule"] == "Sat-Sun all"
    assert prefs["battery_below"] == 15
    assert prefs["max_upload_rate"] == 1_000_000
    assert prefs["run_if_user_active"] is True
    join.signal(signal.SIGTERM)
    assert await join.wait(30) == 0
    assert join_log.events("agent_stopped")
    assert not sock.exists(), "the socket outlived the agent"

"""The link cut (``ip link set down``) for 30 s in the middle of a CODE transfer.

Issue 5, section 2: afterwards either the agent resumes, or it re-handshakes and
the job completes, or the lease expires and another agent completes it. Nothing
is lost and nothing is counted twice. The test prints which path happened.

The app is the pi example padded to 8 MiB, and the link is rate-limited (netem
with 10 ms delay and 1% loss when the kernel has it, else tbf alone), so the CODE
transfer of two such jobs lasts seconds and the cut lands inside it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns.cluster import Cluster, LogEvent, check_nothing_twice
from tests.netns.nslib import NetnsPair, Support
from tests.netns.test_pi_batch import PI_APP, local_pi

pytestmark = [pytest.mark.netns, pytest.mark.slow]

APP_BYTES = 8 << 20
RATE = "32mbit"  # 4 MB/s: two 8 MiB transfers take about 4 s
NETEM = ["delay", "10ms", "loss", "1%", "rate", RATE]
CUT_SECONDS = 30.0
CUT_AFTER = 1.0  # seconds after the leases, well inside the transfer
LEASE_SECONDS = 45.0  # short enough for the lease-expiry path to finish within the test
BATCH_TIMEOUT = 150.0


def padded_pi_app(path: Path) -> Path:
    """The pi example followed by comment lines of random hex, APP_BYTES in all."""
    source = PI_APP.read_bytes()
    need = APP_BYTES - len(source)
    line = 100  # "# " + 97 hex digits + newline
    pad = os.urandom(need).hex().encode()
    body = b"".join(b"# " + pad[i : i + line - 3] + b"\n" for i in range(0, need, line))
    path.write_bytes(source + body[: need - 1] + b"\n")
    assert path.stat().st_size == APP_BYTES
    return path


def mid_code(events: list[LogEvent]) -> set[str]:
    """Jobs whose START went out and whose CODE+END are not all acknowledged yet."""
    leased = {e.fields["job"] for e in events if e.name == "job_leased"}
    delivered = {e.fields["job"] for e in events if e.name == "job_delivered"}
    return leased - delivered


def leased(events: list[LogEvent]) -> int:
    return len({e.fields["job"] for e in events if e.name == "job_leased"})


def recovery_path(events: list[LogEvent], job: str, cut_sessions: dict[str, str]) -> str:
    """Describe how ``job``, cut mid-CODE, completed."""
    leases = [e.fields for e in events if e.name == "job_leased" and e.fields["job"] == job]
    done = [
        e.fields
        for e in events
        if e.name == "result_recorded"
        and e.fields["job"] == job
        and e.fields["outcome"] in ("accepted", "late")  # the counted one
    ]
    expired = [e for e in events if e.name == "lease_expired" and e.fields["job"] == job]
    delivered = [e.fields for e in events if e.name == "job_delivered" and e.fields["job"] == job]
    first = leases[0]
    final = done[-1]
    if expired or final["attempt"] != first["attempt"]:
        how = "lease expired" if expired else "released"
        return (
            f"{how}; attempt {final['attempt']} by agent {final['agent']} "
            f"({'another' if final['agent'] != first['agent'] else 'the same'} agent)"
        )
    session = next((d["session"] for d in delivered if d["attempt"] == first["attempt"]), None)
    if session is not None and session == cut_sessions.get(first["agent"]):
        return "resumed: the same session finished the transfer after the link came back"
    return f"re-handshake: attempt {first['attempt']} completed in a new session {session}"


@pytest.mark.parametrize(
    ("idle_timeout", "lease_seconds"),
    [
        pytest.param(60.0, 45.0, id="idle-60s"),  # the default idle timeout: sessions survive
        pytest.param(10.0, 15.0, id="idle-10s"),  # sessions die: re-handshake, lease expiry
    ],
)
def test_link_cut_mid_code(
    netns_support: Support,
    netns_pair: NetnsPair,
    make_cluster: Callable[..., Cluster],
    tmp_path: Path,
    idle_timeout: float,
    lease_seconds: float,
) -> None:
    settings = {"idle_timeout": str(idle_timeout), "lease_seconds": str(lease_seconds)}
    cluster = make_cluster(agents=2, server_settings=settings)
    for side in "ab":
        if netns_support.netem:
            netns_pair.netem(side, NETEM)
        else:
            netns_pair.shape(side, RATE)
    shaping = "netem " + " ".join(NETEM) if netns_support.netem else f"tbf {RATE} (no netem)"
    cluster.add_app("bigpi", padded_pi_app(tmp_path / "bigpi.py"))
    inputs = [{"points": 50_000, "seed": 11}, {"points": 50_000, "seed": 12}]
    batch = cluster.submit("bigpi", inputs)
    cluster.start_server()
    cluster.start_agents()

    cluster.wait_for(lambda: leased(cluster.server_events()) == 2, 60, "both leases")
    time.sleep(CUT_AFTER)
    events = cluster.server_events()
    cut_jobs = mid_code(events)
    assert cut_jobs, "every CODE transfer finished before the cut: make the app bigger"
    sessions = {
        e.fields["agent"]: e.fields["session"] for e in events if e.name == "session_established"
    }
    netns_pair.set_link(False)
    cut_at = time.monotonic()
    try:
        time.sleep(CUT_SECONDS)
    finally:
        netns_pair.set_link(True)
    print(
        f"\nlink cut for {CUT_SECONDS:.0f} s with jobs {sorted(cut_jobs)} mid-CODE; "
        f"idle timeout {idle_timeout:.0f} s, lease {lease_seconds:.0f} s; {shaping}"
    )

    code = cluster.wait_batch(batch, BATCH_TIMEOUT)
    recovered = time.monotonic() - cut_at - CUT_SECONDS
    assert code == 0, f"vcomp-server wait exited {code}\n{cluster.diagnostics()}"
    cluster.stop()

    results = cluster.results(batch)
    for r in results:
        assert (r["state"], r["status"]) == ("done", "ok"), r
        assert json.loads(r["output"]) == local_pi(inputs[r["index"]]), r
    outcomes = check_nothing_twice(cluster, results)
    events = cluster.server_events()
    paths = {job: recovery_path(events, job, sessions) for job in sorted(cut_jobs)}
    for job, path in paths.items():
        print(f"  job {job}: {path}")
    closed = [e.fields.get("reason", "") for e in events if e.name == "session_closed"]
    print(
        f"  batch finished {recovered:.1f} s after the link came back; "
        f"result outcomes {dict(outcomes)}; sessions closed: {closed or 'none'}"
    )
    if idle_timeout < CUT_SECONDS:
        assert any("idle timeout" in c for c in closed), "no session timed out during the cut"
        assert not any(p.startswith("resumed") for p in paths.values()), paths

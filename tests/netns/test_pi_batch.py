"""The end-to-end pi batch across two namespaces over a lossy, duplicating, reordering link.

Issue 5, section 2: every job completes with the correct result and nothing is
recorded twice. Real ``vcomp-server serve`` in namespace a, two real
``vcomp-agent join`` (sandboxed jobs) in namespace b, faults from the kernel on
both directions of the veth pair.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.netns.cluster import Cluster, check_nothing_twice
from tests.netns.nslib import (
    EMULATED_DUPLICATE,
    EMULATED_LOSS,
    EMULATED_REORDER,
    NetnsPair,
    Support,
)

pytestmark = pytest.mark.netns

PI_APP = Path(__file__).resolve().parents[2] / "server" / "examples" / "pi.py"
# 15% loss, 5% duplication, reordering and 50 ms jitter, on each egress (so both ways).
NETEM = ["delay", "50ms", "50ms", "loss", "15%", "duplicate", "5%", "reorder", "25%", "50%"]
JOBS = 20
POINTS = 100_000
BATCH_TIMEOUT = 90.0
PI_TOLERANCE = 0.01  # about eight standard errors for 2e6 points


def pi_inputs() -> list[dict[str, Any]]:
    return [{"points": POINTS, "seed": 7000 + i} for i in range(JOBS)]


def local_pi(job_input: dict[str, Any]) -> dict[str, Any]:
    """The example job run here, in this interpreter (as deterministic as the agent's)."""
    spec = importlib.util.spec_from_file_location("netns_pi_example", PI_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out: dict[str, Any] = json.loads(module.handler(json.dumps(job_input).encode(), lambda _: None))
    return out


def run_pi_batch(cluster: Cluster) -> None:
    cluster.add_app("pi", PI_APP)
    inputs = pi_inputs()
    batch = cluster.submit("pi", inputs)
    cluster.start_server()
    cluster.start_agents()
    code = cluster.wait_batch(batch, BATCH_TIMEOUT)
    assert code == 0, f"vcomp-server wait exited {code}\n{cluster.diagnostics()}"
    cluster.stop()  # flush the logs; the store stays readable

    results = cluster.results(batch)
    assert [r["index"] for r in results] == list(range(JOBS))
    inside = points = 0
    for r in results:
        assert (r["state"], r["status"]) == ("done", "ok"), r
        got = json.loads(r["output"])
        assert got == local_pi(inputs[r["index"]]), f"job {r['job_id']}: {got}"
        inside += got["inside"]
        points += got["points"]
    estimate = 4 * inside / points
    assert abs(estimate - math.pi) < PI_TOLERANCE, estimate

    outcomes = check_nothing_twice(cluster, results)
    events = cluster.server_events()
    leases = sum(e.name == "job_leased" for e in events)
    sessions = sum(e.name == "session_established" for e in events)
    print(
        f"\npi ~ {estimate:.5f} from {points:,} points; {JOBS} jobs, {leases} leases, "
        f"{sessions} sessions, result outcomes {dict(outcomes)}"
    )


def test_pi_batch_under_netem(
    netns_support: Support, netns_pair: NetnsPair, make_cluster: Callable[..., Cluster]
) -> None:
    if not netns_support.netem:
        pytest.skip(f"tc netem unavailable: {netns_support.netem_reason}")
    cluster = make_cluster(agents=2)
    for side in "ab":
        netns_pair.netem(side, NETEM)
    run_pi_batch(cluster)
    stats = {side: netns_pair.qdisc_stats(side) for side in "ab"}
    print("netem " + " ".join(NETEM) + " on both egresses:")
    for side, text in stats.items():
        print(f"  {side}: {text.strip()}")
    assert all("dropped 0," not in text for text in stats.values()), "netem dropped nothing"


def test_pi_batch_under_emulated_faults(
    netns_support: Support, netns_pair: NetnsPair, make_cluster: Callable[..., Cluster]
) -> None:
    """The same batch where the kernel has no netem: u32 + mirred + ifb faults, no delay."""
    if not netns_support.emulation:
        pytest.skip(f"u32/mirred/ifb fault emulation unavailable: {netns_support.emulation_reason}")
    cluster = make_cluster(agents=2)
    netns_pair.emulate_faults(slow_rate="1mbit")
    run_pi_batch(cluster)
    counts = {side: netns_pair.emulation_counts(side) for side in "ab"}
    print(
        f"emulated faults (loss {EMULATED_LOSS:.1%}, duplication {EMULATED_DUPLICATE:.1%}, "
        f"{EMULATED_REORDER:.0%} detoured via tbf 1mbit) per egress: {counts}"
    )
    for kind in ("dropped", "duplicated", "detoured"):
        assert sum(c[kind] for c in counts.values()) > 0, f"no packet was {kind}: {counts}"

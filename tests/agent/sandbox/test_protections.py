"""The protections report: the setup lines as the agent reads and completes them."""

from __future__ import annotations

from vcomp.agent.sandbox.outcome import Protection
from vcomp.agent.sandbox.protections import from_setup, missing_required, parse_setup_lines


def test_setup_lines_are_parsed() -> None:
    prots, failure = parse_setup_lines(
        "P seccomp active libseccomp\nP landlock unavailable no kernel support\nP x bogus\n"
    )
    assert [(p.name, p.status, p.reason) for p in prots] == [
        ("seccomp", "active", "libseccomp"),
        ("landlock", "unavailable", "no kernel support"),
    ]
    assert failure is None
    assert parse_setup_lines("F job OSError: nope\n")[1] == "job OSError: nope"


def test_what_the_setup_left_out_counts_as_failed() -> None:
    note = Protection("cgroup", "unavailable", "none here")
    prots, failure = from_setup(
        "P pid_namespace active\nP rlimits active cpu\n", mode=None, cgroup_note=note
    )
    status = {p.name: (p.status, p.reason) for p in prots}
    assert failure is None
    assert status["seccomp"] == ("failed", "not reported by the job's setup")
    assert status["process_tree_kill"] == ("active", "pid-namespace init + subreaper sweep")
    assert status["cgroup"] == ("unavailable", "none here")
    assert "execution_mode" not in status
    assert missing_required(prots, ["rlimits", "process_tree_kill"]) is None
    assert missing_required(prots, ["rlimits", "seccomp"]) == (
        "required protections not active: seccomp"
    )

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from vcomp.agent.cpu_monitor import (
    CpuTimes,
    busy_fraction,
    foreign_fraction,
    parse_cpu_list,
    parse_pid_stat,
    parse_proc_stat,
    pids_cpu_seconds,
    read_allowed_cpus,
    read_machine_times,
    read_pid_stat,
)

PROC_STAT_SAMPLE = """\
cpu  2714 10 1590 50864 261 5 31 12 40 0
cpu0 469 0 553 26705 9 0 6 4 0 0
cpu1 2245 10 1036 24159 251 5 25 8 40 0
intr 123456 0 0
ctxt 987654
btime 1700000000
"""

PID_STAT_SAMPLE = (
    "4242 (python3) R 4200 4242 2926 0 -1 4194304 100 0 0 0 "
    "350 25 7 3 20 0 1 0 27876 3133440 410 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1"
)


def test_parse_proc_stat_sums_busy_and_total() -> None:
    times = parse_proc_stat(PROC_STAT_SAMPLE, 100)
    busy = 2714 + 10 + 1590 + 5 + 31  # user nice system irq softirq; steal and guest excluded
    assert times.busy == pytest.approx(busy / 100)
    assert times.total == pytest.approx((busy + 50864 + 261) / 100)


def test_parse_proc_stat_old_kernel_short_line() -> None:
    times = parse_proc_stat("cpu 10 0 10 80\n", 100)
    assert times == CpuTimes(busy=0.2, total=1.0)


@pytest.mark.parametrize(
    "text",
    ["", "cpu0 1 2 3 4\n", "cpu 1 2 x 4\n", "cpu 1 2\n"],
)
def test_parse_proc_stat_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_proc_stat(text, 100)


def test_parse_pid_stat_fields() -> None:
    stat = parse_pid_stat(PID_STAT_SAMPLE, 100)
    assert (stat.pid, stat.state, stat.ppid, stat.pgrp) == (4242, "R", 4200, 4242)
    assert stat.cpu_seconds == pytest.approx(3.75)  # utime 350 + stime 25 ticks; not cutime


def test_parse_pid_stat_command_with_spaces_and_parens() -> None:
    text = PID_STAT_SAMPLE.replace("(python3)", "(evil) T 1 1 1 (x)")
    stat = parse_pid_stat(text, 100)
    assert (stat.pid, stat.state, stat.ppid) == (4242, "R", 4200)
    assert stat.cpu_seconds == pytest.approx(3.75)


@pytest.mark.parametrize("text", ["", "12 python R 1 2", "12 (a) R 1 2 3", "x (a) " + "1 " * 20])
def test_parse_pid_stat_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pid_stat(text, 100)


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == frozenset({0, 1, 2, 3, 8, 10, 11})
    assert parse_cpu_list("5") == frozenset({5})
    assert parse_cpu_list("") == frozenset()
    for bad in ("3-1", "a", "1-b", "-1"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_busy_and_foreign_fractions() -> None:
    before = CpuTimes(busy=10.0, total=100.0)
    after = CpuTimes(busy=13.0, total=104.0)  # 3 of 4 CPU-seconds busy
    assert busy_fraction(before, after) == pytest.approx(0.75)
    assert foreign_fraction(before, after, own_cpu_seconds=1.0) == pytest.approx(0.5)
    # Sampling skew can make the job look bigger than the machine: clamp, never negative.
    assert foreign_fraction(before, after, own_cpu_seconds=5.0) == 0.0
    assert busy_fraction(after, after) == 0.0
    assert foreign_fraction(after, before, 0.0) == 0.0


def test_live_machine_times_advance() -> None:
    first = read_machine_times()
    time.sleep(0.05)
    second = read_machine_times()
    assert second.total > first.total
    assert 0.0 <= busy_fraction(first, second) <= 1.0


def test_read_pid_stat_tracks_a_busy_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        stat = read_pid_stat(child.pid)
        assert stat is not None and stat.ppid == os.getpid()
        deadline = time.monotonic() + 10
        while pids_cpu_seconds([child.pid]) < 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids_cpu_seconds([child.pid]) >= 0.2
    finally:
        child.kill()
        child.wait()
    assert read_pid_stat(child.pid) is None
    assert pids_cpu_seconds([child.pid]) == 0.0


def test_allowed_cpus_cover_current_affinity() -> None:
    allowed = read_allowed_cpus()
    assert set(os.sched_getaffinity(0)) <= allowed

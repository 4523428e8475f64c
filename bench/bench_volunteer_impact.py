"""Volunteer impact of each execution mode (the paper's §5 question), as a table.

For each mode a job runs (one busy worker per CPU, as a BOINC client would start)
under ``child_setup`` + ``Regulator``, and we measure on the volunteer's side:

(a) a CPU-bound foreground program (one thread; ``--fg-threads N`` runs N copies):
    median time of a fixed unit of work, as a slowdown against no job at all;
(b) a latency probe: sleep 1 ms repeatedly and record the wake-up overshoot (p50/p99);
(c) the job's throughput: CPU-seconds per second it got while (a) ran.

"Idle capacity" = CPUs minus foreground threads, i.e. what the foreground leaves
unused (1 core on a 2-core machine with one foreground thread). Target
(issue 4): background and dedicated slow the foreground by <= 5% while the job
still gets >= 90% of the idle capacity.

Usage: bench_volunteer_impact.py [--quick] [--json PATH] [--fg-threads N] [--rounds R]
                                 [--quiet-wait S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vcomp.agent.cpu_monitor import pids_cpu_seconds, read_allowed_cpus, read_machine_times
from vcomp.agent.modes import ExecutionMode, Regulator, agent_setup, child_setup

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
    volatile unsigned long sink = 0;
    if (argc == 4 && !strcmp(argv[1], "work")) {
        long iters = atol(argv[2]); int reps = atoi(argv[3]);
        for (int r = 0; r < reps; r++) {
            unsigned long x = 88172645463325252UL + r; double t0 = now();
            for (long i = 0; i < iters; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; }
            sink = x; printf("%.6f\n", now() - t0); fflush(stdout);
        }
    } else if (argc == 3 && !strcmp(argv[1], "jitter")) {
        int n = atoi(argv[2]); struct timespec req = {0, 1000000};
        for (int i = 0; i < n; i++) {
            double t0 = now(); nanosleep(&req, NULL); printf("%.1f\n", (now() - t0 - 1e-3) * 1e6);
        }
    } else if (argc == 3 && !strcmp(argv[1], "spin")) {
        for (int i = 1; i < atoi(argv[2]); i++) if (fork() == 0) break;
        unsigned long x = 1; for (;;) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; sink = x; }
    } else { return 2; }
    (void)sink; return 0;
}
"""

PY_HELPER = r"""
import os, sys, time
mode = sys.argv[1]
if mode == "work":
    iters, reps = int(sys.argv[2]), int(sys.argv[3])
    for _ in range(reps):
        t0 = time.perf_counter(); x = 0
        for i in range(iters): x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        print(f"{time.perf_counter() - t0:.6f}", flush=True)
elif mode == "jitter":
    for _ in range(int(sys.argv[2])):
        t0 = time.perf_counter(); time.sleep(0.001)
        print(f"{(time.perf_counter() - t0 - 1e-3) * 1e6:.1f}")
elif mode == "spin":
    for _ in range(int(sys.argv[2]) - 1):
        if os.fork() == 0: break
    while True: pass
"""


@dataclass(frozen=True, slots=True)
class Sample:
    """One measurement of one mode."""

    fg_median_s: float
    jitter_p50_us: float
    jitter_p99_us: float
    job_cores: float
    others_cores: float  # everyone else on the machine during (a): noise, not us
    paused_s: float
    suspensions: int


@dataclass(frozen=True, slots=True)
class Row:
    """A mode's medians over all rounds."""

    mode: str
    samples: int
    fg_median_s: float
    fg_slowdown_pct: float
    jitter_p50_us: float
    jitter_p99_us: float
    job_cores: float
    job_share_of_idle_pct: float
    others_cores: float
    paused_s: float
    suspensions: int
    target: str


class ChildTree:
    """The job's process tree: the root and its descendants (via /proc children lists)."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        found, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
        return found

    def suspend(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.root, signal.SIGSTOP)

    def resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.root, signal.SIGCONT)

    def cpu_seconds(self) -> float:
        return pids_cpu_seconds(self.pids())


class Helper:
    """The foreground programs and the job, native if a C compiler exists."""

    def __init__(self, workdir: Path) -> None:
        self.native = False
        self.argv: list[str] = [sys.executable, "-c", PY_HELPER]
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler:
            src, exe = workdir / "impact.c", workdir / "impact"
            src.write_text(C_SOURCE)
            built = subprocess.run([compiler, "-O2", "-o", str(exe), str(src)], check=False)
            if built.returncode == 0:
                self.native, self.argv = True, [str(exe)]

    async def run(self, *args: str, cpus: frozenset[int]) -> list[float]:
        # The volunteer's programs are not the agent's children in real life: give them
        # every CPU back, whatever the agent did to its own affinity.
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            *args,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        out, _ = await proc.communicate()
        return [float(line) for line in out.split()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def wait_until_quiet(limit: float) -> None:
    """On a shared machine, wait (up to ``limit`` s) until others use < 0.2 core."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before, self0 = read_machine_times(), _self_cpu()
        await asyncio.sleep(0.5)
        after, self1 = read_machine_times(), _self_cpu()
        if (after.busy - before.busy) - (self1 - self0) < 0.1:  # 0.2 core over 0.5 s
            return


async def measure(
    mode: ExecutionMode | None, helper: Helper, cfg: argparse.Namespace, cpus: frozenset[int]
) -> Sample:
    await wait_until_quiet(cfg.quiet_wait)
    agent_affinity = os.sched_getaffinity(0)
    job: subprocess.Popen[bytes] | None = None
    tree: ChildTree | None = None
    regulator: Regulator | None = None
    task: asyncio.Task[None] | None = None
    if mode is not None:
        agent_setup(mode)
        job = subprocess.Popen(
            [*helper.argv, "spin", str(len(cpus))],
            start_new_session=True,
            preexec_fn=lambda: child_setup(mode),
        )
        tree = ChildTree(job.pid)
        regulator = Regulator(mode)
        task = asyncio.create_task(regulator.supervise(tree))
    try:
        await asyncio.sleep(cfg.settle if job is not None else 0.3)
        job0 = tree.cpu_seconds() if tree else 0.0
        machine0, fg0, self0, t0 = (
            read_machine_times(),
            _children_cpu(),
            _self_cpu(),
            time.monotonic(),
        )
        runs = await asyncio.gather(
            *(
                helper.run("work", str(cfg.iters), str(cfg.reps), cpus=cpus)
                for _ in range(cfg.fg_threads)
            )
        )
        reps = [t for run in runs for t in run]
        elapsed = time.monotonic() - t0
        machine1, fg1, self1 = read_machine_times(), _children_cpu(), _self_cpu()
        job_cpu = tree.cpu_seconds() - job0 if tree else 0.0
        jitter = await helper.run("jitter", str(cfg.jitter_samples), cpus=cpus)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if job is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), agent_affinity)
    machine_busy = machine1.busy - machine0.busy
    others = machine_busy - job_cpu - (fg1 - fg0) - (self1 - self0)
    return Sample(
        fg_median_s=statistics.median(reps),
        jitter_p50_us=percentile(jitter, 0.5),
        jitter_p99_us=percentile(jitter, 0.99),
        job_cores=job_cpu / elapsed,
        others_cores=max(0.0, others / elapsed),
        paused_s=regulator.paused_seconds if regulator else 0.0,
        suspensions=regulator.suspensions if regulator else 0,
    )


def summarise(
    label: str, mode: ExecutionMode | None, samples: list[Sample], baseline: float, idle: int
) -> Row:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    fg = med([s.fg_median_s for s in samples])
    slowdown = (fg / baseline - 1.0) * 100.0
    job_cores = med([s.job_cores for s in samples])
    share = job_cores / idle * 100.0 if idle > 0 else 0.0
    target = "-"
    if mode is not None and mode.kind in ("background", "dedicated"):
        # With no idle capacity only the foreground half of the target applies.
        met = slowdown <= 5.0 and (share >= 90.0 or idle <= 0)
        target = "met" if met else "MISSED"
    return Row(
        mode=label,
        samples=len(samples),
        fg_median_s=fg,
        fg_slowdown_pct=slowdown,
        jitter_p50_us=med([s.jitter_p50_us for s in samples]),
        jitter_p99_us=med([s.jitter_p99_us for s in samples]),
        job_cores=job_cores,
        job_share_of_idle_pct=share,
        others_cores=med([s.others_cores for s in samples]),
        paused_s=med([s.paused_s for s in samples]),
        suspensions=round(med([float(s.suspensions) for s in samples])),
        target=target,
    )


async def calibrate(helper: Helper, seconds: float, cpus: frozenset[int]) -> int:
    """Iterations for one unit of foreground work lasting about ``seconds`` on this box."""
    iters = 1_000_000 if helper.native else 50_000
    while True:
        took = min(await helper.run("work", str(iters), "3", cpus=cpus))
        if took >= seconds / 4:
            return max(1, int(iters * seconds / took))
        iters *= 4


async def main_async(cfg: argparse.Namespace) -> list[Row]:
    cpus = read_allowed_cpus()
    n = len(cpus)
    with tempfile.TemporaryDirectory(prefix="vcomp-impact-") as tmp:
        helper = Helper(Path(tmp))
        cfg.iters = await calibrate(helper, cfg.unit, cpus)
        # Background with a threshold above one busy foreground thread: suspend only
        # when the owner wants (almost) every core, let SCHED_IDLE share the rest.
        high = (n - 0.5) / n
        modes: list[tuple[str, ExecutionMode | None]] = [
            ("none", None),
            ("full", ExecutionMode(kind="full")),
            ("throttle 30", ExecutionMode(kind="throttle", cpu_percent=30)),
            ("dedicated", ExecutionMode(kind="dedicated", core=max(cpus))),
            ("background", ExecutionMode(kind="background")),
            (
                f"background@{high:.2f}",
                ExecutionMode(kind="background", busy_threshold=high, resume_threshold=high - 0.1),
            ),
        ]
        if n < 2:
            modes = [m for m in modes if m[1] is None or m[1].kind != "dedicated"]
        # Rounds interleave the modes, so slow drifts in other people's load hit all rows.
        samples: dict[str, list[Sample]] = {label: [] for label, _ in modes}
        for _ in range(cfg.rounds):
            for label, mode in [*modes, modes[0]]:  # baseline at both ends of a round
                samples[label].append(await measure(mode, helper, cfg, cpus))
        cfg.native = helper.native
    baseline = statistics.median(s.fg_median_s for s in samples[modes[0][0]])
    idle = n - cfg.fg_threads
    return [summarise(label, mode, samples[label], baseline, idle) for label, mode in modes]


def print_table(rows: list[Row], cfg: argparse.Namespace, ncpu: int) -> None:
    print(
        f"# volunteer impact: {ncpu} CPUs; job = {ncpu} busy workers; foreground = "
        f"{cfg.fg_threads} x {'C' if cfg.native else 'Python'} thread(s), "
        f"unit ~{cfg.unit}s x {cfg.reps}; "
        f"probe = {cfg.jitter_samples} x 1 ms sleeps; medians of {cfg.rounds} round(s)"
    )
    print(
        f"# idle capacity = {ncpu} CPUs - {cfg.fg_threads} foreground thread(s) = "
        f"{ncpu - cfg.fg_threads} core(s); "
        "'of idle' = job CPU-s per s during (a) / idle capacity; "
        "'others' = cores used by other processes on the machine during (a)"
    )
    header = (
        f"{'mode':<17}{'fg unit':>8}{'slowdown':>9}{'wake p50':>9}{'wake p99':>9}"
        f"{'job cores':>10}{'of idle':>8}{'others':>7}{'paused':>7}{'susp':>5}  target"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.mode:<17}{r.fg_median_s:>7.3f}s{r.fg_slowdown_pct:>8.1f}%"
            f"{r.jitter_p50_us:>7.0f}us{r.jitter_p99_us:>7.0f}us{r.job_cores:>10.2f}"
            f"{r.job_share_of_idle_pct:>7.0f}%{r.others_cores:>7.2f}{r.paused_s:>6.1f}s"
            f"{r.suspensions:>5}  {r.target}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement wait up to S seconds for other load to stop",
    )
    parser.add_argument(
        "--fg-threads", type=int, default=1, help="foreground copies running at once (default 1)"
    )
    parser.add_argument("--rounds", type=int, help="rounds over all modes (default 1 quick, 3)")
    cfg = parser.parse_args()
    # The foreground phase must outlast the background regulator's reaction time
    # (samples_to_suspend x poll_interval = 1 s) or the transient dominates.
    cfg.unit, cfg.reps, cfg.jitter_samples, cfg.settle = (
        (0.25, 10, 800, 1.5) if cfg.quick else (0.3, 20, 3000, 2.0)
    )
    cfg.rounds = cfg.rounds or (1 if cfg.quick else 3)
    rows = asyncio.run(main_async(cfg))
    ncpu = len(read_allowed_cpus())
    print_table(rows, cfg, ncpu)
    if cfg.json:
        Path(cfg.json).write_text(
            json.dumps(
                {
                    "cpus": ncpu,
                    "native": cfg.native,
                    "unit_seconds": cfg.unit,
                    "reps": cfg.reps,
                    "rounds": cfg.rounds,
                    "jitter_samples": cfg.jitter_samples,
                    "foreground_threads": cfg.fg_threads,
                    "idle_capacity_cores": ncpu - cfg.fg_threads,
                    "rows": [asdict(r) for r in rows],
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

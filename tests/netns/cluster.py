"""A real vcomp deployment across a :class:`NetnsPair`, driven through the CLIs.

``vcomp-server serve`` runs in namespace "a" bound to the veth address, and each
``vcomp-agent join`` (a real agent with its sandbox) runs in namespace "b". Homes
are set up exactly as an operator would: ``init``, ``enroll``, ``measure`` +
``allow-measurement``, ``app add``, ``submit``, ``wait``, ``results``.
"""

from __future__ import annotations

import ctypes
import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tests.netns.nslib import A_ADDR, NetnsPair
from vcomp.server.store.sqlite import SqliteStore

BIN = Path(sys.executable).parent
SERVER = str(BIN / "vcomp-server")
AGENT = str(BIN / "vcomp-agent")
PORT = 7461
CLI_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
PR_SET_PDEATHSIG = 1
_EVENT_RE = re.compile(r"event=(\S+)(.*)")
_FIELD_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it if the test process dies first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def cli(*argv: str, timeout: float = CLI_TIMEOUT) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv[:3])} failed ({done.returncode}): {done.stderr}")
    return done.stdout


@dataclass(frozen=True)
class LogEvent:
    name: str
    fields: dict[str, str]


def parse_events(text: str) -> list[LogEvent]:
    """The logfmt ``event=NAME key=value ...`` lines of a vcomp log."""
    out = []
    for line in text.splitlines():
        match = _EVENT_RE.search(line)
        if match:
            fields = {k: v.strip('"') for k, v in _FIELD_RE.findall(match.group(2))}
            out.append(LogEvent(match.group(1), fields))
    return out


class Cluster:
    """One server home and ``agents`` agent homes under ``root``, run across ``pair``."""

    def __init__(
        self,
        pair: NetnsPair,
        root: Path,
        *,
        agents: int = 2,
        server_settings: dict[str, str] | None = None,
    ) -> None:
        self.pair = pair
        self.root = root
        self.server_home = root / "server"
        self.agent_homes = [root / f"agent{i}" for i in range(agents)]
        self.server_settings = {"bind": f'"{A_ADDR}:{PORT}"', **(server_settings or {})}
        self.server: subprocess.Popen[bytes] | None = None
        self.agents: list[subprocess.Popen[bytes]] = []
        self._files: list[TextIO] = []

    @property
    def cfg(self) -> tuple[str, str]:
        return ("--config", str(self.server_home))

    # ---- homes ----------------------------------------------------------------

    def setup(self) -> None:
        cli(SERVER, "init", str(self.server_home))
        config = self.server_home / "server.toml"
        text = config.read_text()
        for key, value in self.server_settings.items():
            # The first match: [server] comes first, and [http] has a bind of its own.
            text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
            assert n == 1, f"server.toml has no {key!r} line"
        config.write_text(text)
        pub = str(self.server_home / "server.pub")
        for i, home in enumerate(self.agent_homes):
            out = cli(
                AGENT, "init", str(home), "--name", f"netns{i}",
                "--server", f"{A_ADDR}:{PORT}", "--server-key", pub,
            )  # fmt: skip
            line = next(x for x in out.splitlines() if x.startswith("vcomp-enrol/"))
            cli(SERVER, "enroll", *self.cfg, line)

    def allow_current_measurement(self) -> None:
        """PCR 17 measures the installed source, so measure right before joining."""
        for text in {cli(AGENT, "measure", "--config", str(h)).strip() for h in self.agent_homes}:
            cli(SERVER, "allow-measurement", *self.cfg, text)

    def add_app(self, name: str, path: Path) -> None:
        cli(SERVER, "app", "add", *self.cfg, "--kind", "python", name, str(path))

    def submit(self, app: str, inputs: Sequence[dict[str, Any]], *options: str) -> int:
        jsonl = self.root / f"inputs-{app}.jsonl"
        jsonl.write_text("".join(json.dumps(x) + "\n" for x in inputs))
        return int(cli(SERVER, "submit", *self.cfg, app, "--inputs", str(jsonl), *options))

    # ---- processes ------------------------------------------------------------

    def _log(self, name: str) -> TextIO:
        f = (self.root / name).open("w")
        self._files.append(f)
        return f

    def start_server(self, timeout: float = 30.0) -> None:
        out = self._log("server.out")
        self.server = subprocess.Popen(
            self.pair.argv("a", [SERVER, "serve", *self.cfg]),
            stdout=out,
            stderr=self._log("server.log"),
            preexec_fn=_die_with_parent,
        )
        self.wait_for(lambda: "listening" in self.read("server.out"), timeout, "server start")

    def start_agents(self) -> None:
        self.allow_current_measurement()
        for i, home in enumerate(self.agent_homes):
            argv = [AGENT, "join", "--config", str(home)]
            self.agents.append(
                subprocess.Popen(
                    self.pair.argv("b", argv),
                    stdout=self._log(f"agent{i}.out"),
                    stderr=self._log(f"agent{i}.log"),
                    preexec_fn=_die_with_parent,
                )
            )

    def stop(self) -> None:
        """SIGTERM agents then the server (our own children), SIGKILL stragglers."""
        for proc in [*self.agents, *([self.server] if self.server else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self._files:
            f.close()
        self._files.clear()

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.server is not None and self.server.poll() is not None:
                raise AssertionError(f"server exited ({self.server.returncode}) during {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    # ---- observing ------------------------------------------------------------

    def read(self, name: str) -> str:
        try:
            return (self.root / name).read_text()
        except FileNotFoundError:
            return ""

    def server_events(self) -> list[LogEvent]:
        return parse_events(self.read("server.log"))

    def agent_events(self, i: int) -> list[LogEvent]:
        return parse_events(self.read(f"agent{i}.log"))

    def wait_batch(self, batch: int, timeout: float) -> int:
        """``vcomp-server wait``'s exit code: 0 all done, 3 some failed, 4 timed out."""
        done = subprocess.run(
            [SERVER, "wait", *self.cfg, "--quiet", "--timeout", str(timeout), str(batch)],
            capture_output=True,
            text=True,
            timeout=timeout + CLI_TIMEOUT,
            check=False,
        )
        return done.returncode

    def results(self, batch: int) -> list[dict[str, Any]]:
        out = cli(SERVER, "results", *self.cfg, str(batch))
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stored_results(self, job_ids: Sequence[int]) -> dict[int, list[tuple[int, bool]]]:
        """(attempt, counted) of every result row the store holds, per job."""
        store = SqliteStore(self.server_home / "jobs.sqlite")
        try:
            return {j: [(r.attempt, r.counted) for r in store.list_results(j)] for j in job_ids}
        finally:
            store.close()

    def diagnostics(self) -> str:
        """Tails of every log, for assertion messages."""
        parts = []
        for name in ["server.log", *(f"agent{i}.log" for i in range(len(self.agent_homes)))]:
            lines = self.read(name).splitlines()
            parts.append(f"--- {name} (last 25 of {len(lines)} lines)\n" + "\n".join(lines[-25:]))
        return "\n".join(parts)


def check_nothing_twice(cluster: Cluster, results: Sequence[dict[str, Any]]) -> Counter[str]:
    """Each job: exactly one counted result, and no (job, attempt) recorded twice.

    Returns how many ``result_recorded`` events of each outcome the server logged
    (a ``duplicate`` outcome is the store refusing a resent result: allowed).
    """
    rows = cluster.stored_results([r["job_id"] for r in results])
    for r in results:
        job, stored = r["job_id"], rows[r["job_id"]]
        attempts = [a for a, _ in stored]
        assert len(attempts) == len(set(attempts)), f"job {job}: attempts {attempts}"
        counted = [a for a, c in stored if c]
        assert counted == [r["attempt"]], f"job {job}: counted {counted}, canonical {r}"
    outcomes: Counter[str] = Counter()
    accepted: Counter[str] = Counter()
    for e in cluster.server_events():
        if e.name == "result_recorded":
            outcomes[e.fields.get("outcome", "?")] += 1
            if e.fields.get("outcome") in ("accepted", "late"):
                accepted[e.fields["job"]] += 1
    twice = {job: n for job, n in accepted.items() if n > 1}
    assert not twice, f"jobs counted more than once by the server: {twice}"
    return outcomes

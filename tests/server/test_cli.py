"""``vcomp-server`` through click's CliRunner, and one flow through the console scripts."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tests.pg import fresh_schema_url
from tests.server.store.support import downgrade_to_v1
from tests.sqlite_lock import HeldLock
from vcomp.agent.cli import main as agent_main
from vcomp.pgcluster import PostgresCluster
from vcomp.protocol import handshake
from vcomp.server.cli import main as server_main
from vcomp.server.config import load_signing_key
from vcomp.server.store import RESULT_OK, ResultSubmission
from vcomp.server.store.sqlite import SqliteStore
from vcomp.units import parse_size

MEASUREMENT = "sha256:17=" + "ab" * 32 + ",18=" + "cd" * 32
BIN = Path(sys.executable).parent


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(server_main, [str(a) for a in args], env=env)


def ok(*args: str | Path) -> Result:
    result = run(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_clean_error(result: Result, message: str) -> None:
    assert result.exit_code != 0
    assert result.stderr.startswith("error: "), result.output
    assert message in result.stderr, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture(scope="module")
def agent_line(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("agent") / "home"
    result = CliRunner().invoke(agent_main, ["init", str(d), "--name", "alice"])
    assert result.exit_code == 0, result.output
    return next(ln for ln in result.stdout.splitlines() if ln.startswith("vcomp-enrol/1 "))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    d = tmp_path / "srv"
    ok("init", d)
    return d


@pytest.fixture
def app_home(home: Path, tmp_path: Path) -> Path:
    program = tmp_path / "echo.py"
    program.write_text("print('hello')\n")
    ok("app", "add", "echo", program, "--kind", "python", "--config", home)
    return home


def submit(home: Path, inputs: Path, *extra: str) -> int:
    result = ok("submit", "echo", "--inputs", inputs, "--config", home, *extra)
    return int(result.stdout.strip())  # the batch id, alone on stdout


def finish(
    home: Path, batch_id: int, agent_id: str, outputs: list[bytes], status: str, error: str = ""
) -> None:
    """Play the server's part: lease every job to the agent and record its result."""
    store = SqliteStore(home / "jobs.sqlite")
    try:
        now = time.time()
        for output in outputs:
            lease = store.lease_next(agent_id, now, 60.0)
            assert lease is not None and lease.batch_id == batch_id
            sub = ResultSubmission(
                lease.job_id,
                lease.attempt,
                agent_id,
                status=status,
                error=error,
                output=output,
                cpu_ms=7,
            )
            assert store.record_results([sub])[0].durable
    finally:
        store.close()


def test_init_prints_the_fingerprint_of_the_key(tmp_path: Path) -> None:
    result = ok("init", tmp_path / "s")
    fingerprint = next(
        ln.split()[1] for ln in result.stdout.splitlines() if ln.startswith("fingerprint:")
    )
    key = load_signing_key(tmp_path / "s" / "server.key")
    assert fingerprint == handshake.key_fingerprint(handshake.raw_public(key)).hex()
    assert (tmp_path / "s" / "server.key").stat().st_mode & 0o777 == 0o600
    assert_clean_error(run("init", tmp_path / "s"), "")  # not empty
    ok("init", tmp_path / "s", "--force")


def test_enroll_a_real_agent_line(home: Path, agent_line: str, tmp_path: Path) -> None:
    agent_id = agent_line.split()[1]
    result = ok("enroll", agent_line, "--config", home)
    assert agent_id in result.stdout
    ok("enroll", *agent_line.split(), "--config", home)  # unquoted works too
    listing = tmp_path / "agents.txt"
    listing.write_text(f"# from the volunteers\n\n{agent_line}\n")
    ok("enroll", f"@{listing}", "--config", home)
    store = SqliteStore(home / "jobs.sqlite")
    agents = store.list_agents()
    store.close()
    assert [(a.agent_id, a.name) for a in agents] == [(agent_id, "alice")]


def test_forged_enrolment_is_rejected(home: Path, agent_line: str) -> None:
    tag, _, name, key = agent_line.split()
    forged = hashlib.sha256(b"mallory").hexdigest()
    assert_clean_error(
        run("enroll", f"{tag} {forged} {name} {key}", "--config", home), "enrolment line"
    )
    assert_clean_error(run("enroll", "hello", "--config", home), "not an enrolment line")


def test_allow_measurement(home: Path) -> None:
    spaced = "  " + MEASUREMENT.replace("ab" * 32, "AB" * 32) + " "  # stored canonical
    ok("allow-measurement", spaced, "--note", "release 0.1", "--config", home)
    listing = ok("allow-measurement", "--list", "--config", home).stdout
    assert MEASUREMENT in listing and "release 0.1" in listing
    assert_clean_error(run("allow-measurement", "sha1:17=00", "--config", home), "measurement")
    assert_clean_error(run("allow-measurement", "sha256:17=zz", "--config", home), "bad")
    assert run("allow-measurement", "--config", home).exit_code == 2  # usage
    ok("allow-measurement", MEASUREMENT, "--remove", "--config", home)
    assert MEASUREMENT not in ok("allow-measurement", "--list", "--config", home).stdout
    assert_clean_error(
        run("allow-measurement", MEASUREMENT, "--remove", "--config", home), "no such"
    )


def test_app_add_and_list(home: Path, tmp_path: Path) -> None:
    program = tmp_path / "job.py"
    program.write_bytes(b"print(1)\n")
    result = ok("app", "add", "job", program, "--kind", "python", "--config", home)
    assert "version 1" in result.stdout
    assert hashlib.sha256(b"print(1)\n").hexdigest() in result.stdout
    ok("app", "add", "job", program, "--kind", "exec", "--config", home)
    listing = ok("app", "list", "--config", home).stdout
    assert "job  v1  python" in listing and "job  v2  exec" in listing
    assert_clean_error(
        run("app", "add", "bad name", program, "--kind", "python", "--config", home), "app name"
    )


def test_app_add_with_hooks(home: Path, tmp_path: Path) -> None:
    program = tmp_path / "echo.py"
    program.write_text("print('hello')\n")
    validator = "vcomp.validators:json_close?rel_tol=1e-6"
    assimilator = "tests.integration.hookfns:record?log=/tmp/x"
    args = ("app", "add", "echo", program, "--kind", "python", "--config", home)
    ok(*args, "--validator", validator, "--assimilator", assimilator)
    listed = ok("app", "list", "--config", home).stdout
    assert f"validator {validator}" in listed and f"assimilator {assimilator}" in listed
    for bad, message in (
        ("json_close", "is not module:function"),
        ("no_such_module_z:fn", "cannot import no_such_module_z"),
        ("vcomp.validators:nope", "has no function nope"),
        ("vcomp.validators:json_close?x", "bad options"),
    ):
        assert_clean_error(run(*args, "--validator", bad), message)
        assert_clean_error(run(*args, "--assimilator", bad), message)
    assert ok("app", "list", "--config", home).stdout == listed  # nothing added


def test_submit_from_jsonl_and_dir(app_home: Path, tmp_path: Path) -> None:
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"n": 1}\n\n  {"n": 2}  \n')
    first = submit(
        app_home,
        jsonl,
        "--memory",
        "64M",
        "--replicas",
        "3",
        "--deadline",
        "60",
        "--disk-bytes",
        "16M",
    )
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name, data in (("b", b"\x00\x01"), ("a", b"first"), (".hidden", b"skip")):
        (inputs / name).write_bytes(data)
    (inputs / "sub").mkdir()
    second = submit(app_home, inputs)
    assert second == first + 1
    store = SqliteStore(app_home / "jobs.sqlite")
    try:
        b1, b2 = store.get_batch(first), store.get_batch(second)
        assert b1.n_jobs == 2 and b1.limits.memory_bytes == 64 << 20
        assert b1.limits.disk_bytes == 16 << 20 and b2.limits.disk_bytes == 64 << 20
        assert (b1.replicas, b1.quorum) == (3, 2)  # a majority by default
        assert b1.deadline is not None and b1.deadline > time.time()
        with store.open_input(store.get_job_by_index(first, 1).job_id) as blob:
            assert blob.read(0, 100) == b'{"n": 2}'
        assert b2.n_jobs == 2 and (b2.replicas, b2.quorum) == (1, 1)
        assert b2.limits.cpu_seconds == 60 and b2.limits.output_bytes == 16 << 20  # [jobs]
        with store.open_input(store.get_job_by_index(second, 0).job_id) as blob:
            assert blob.read(0, 100) == b"first"
    finally:
        store.close()


def test_submit_errors(app_home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"n": 1}\nnot json\n')
    assert_clean_error(run("submit", "echo", "--inputs", bad, "--config", app_home), "bad.jsonl:2")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_clean_error(run("submit", "echo", "--inputs", empty, "--config", app_home), "input")
    good = tmp_path / "good.jsonl"
    good.write_text("1\n")
    assert_clean_error(run("submit", "nope", "--inputs", good, "--config", app_home), "unknown app")
    result = run("submit", "echo", "--inputs", good, "--memory", "lots", "--config", app_home)
    assert result.exit_code == 2 and "not a size" in result.stderr
    store = SqliteStore(app_home / "jobs.sqlite")
    assert store.list_batches() == []  # nothing half-created
    store.close()


def test_parse_size() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2g") == 2 << 30
    assert parse_size("4KiB") == 4096
    assert parse_size("1234") == 1234


def test_status_wait_and_results(app_home: Path, agent_line: str, tmp_path: Path) -> None:
    ok("enroll", agent_line, "--config", app_home)
    agent_id = agent_line.split()[1]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n2\n3\n")
    batch = submit(app_home, jsonl)
    assert run("wait", str(batch), "--timeout", "0", "--config", app_home).exit_code == 4

    big = ("a" + "€" * 300_000).encode()  # > one output chunk, a character split across two
    finish(app_home, batch, agent_id, [b'{"pi": 3.14}', b"\xff\xfe", big], RESULT_OK)
    result = run("wait", str(batch), "--config", app_home)
    assert result.exit_code == 0, result.output
    assert "3 done, 0 failed of 3" in result.stdout

    status = json.loads(ok("status", "--json", "--config", app_home).stdout)
    assert status["jobs"]["done"] == 3 and status["agents"][0]["agent_id"] == agent_id
    assert status["batches"][0]["finished"] is True
    text = ok("status", "--config", app_home).stdout
    assert "alice" in text and f"#{batch}" in text and "3/3" in text

    lines = [
        json.loads(ln) for ln in ok("results", str(batch), "--config", app_home).stdout.splitlines()
    ]
    assert [r["index"] for r in lines] == [0, 1, 2]
    assert lines[0]["output"] == '{"pi": 3.14}' and lines[0]["agent_id"] == agent_id
    assert lines[0]["status"] == "ok" and lines[0]["cpu_ms"] == 7 and lines[0]["attempt"] == 1
    assert base64.b64decode(lines[1]["output_b64"]) == b"\xff\xfe" and "output" not in lines[1]
    assert lines[2]["output"].encode() == big
    assert lines[2]["output_sha256"] == hashlib.sha256(big).hexdigest()
    out = tmp_path / "results.jsonl"
    ok("results", str(batch), "--out", out, "--config", app_home)
    assert [json.loads(ln) for ln in out.read_text().splitlines()] == lines


def test_wait_exits_3_when_a_job_failed(app_home: Path, agent_line: str, tmp_path: Path) -> None:
    ok("enroll", agent_line, "--config", app_home)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n2\n")
    batch = submit(app_home, jsonl, "--max-attempts", "1")
    finish(app_home, batch, agent_line.split()[1], [b"fine", b""], "ok")
    assert run("wait", str(batch), "--quiet", "--config", app_home).exit_code == 0
    batch = submit(app_home, jsonl, "--max-attempts", "1")
    finish(app_home, batch, agent_line.split()[1], [b"fine", b""], "crashed")
    result = run("wait", str(batch), "--quiet", "--config", app_home)
    assert result.exit_code == 3 and "failed" in result.stdout
    lines = ok("results", str(batch), "--config", app_home).stdout.splitlines()
    assert {json.loads(ln)["state"] for ln in lines} == {"failed"}
    assert_clean_error(run("wait", "999", "--config", app_home), "")


def test_results_of_a_success_have_no_error(
    app_home: Path, agent_line: str, tmp_path: Path
) -> None:
    # A real agent describes a success as "ok" (its outcome kind); that is no error.
    ok("enroll", agent_line, "--config", app_home)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n")
    batch = submit(app_home, jsonl)
    finish(app_home, batch, agent_line.split()[1], [b"fine"], RESULT_OK, error="ok")
    (line,) = ok("results", str(batch), "--config", app_home).stdout.splitlines()
    assert json.loads(line)["error"] is None
    assert json.loads(line)["status"] == "ok"


def test_status_lists_failed_jobs_with_their_error(
    app_home: Path, agent_line: str, tmp_path: Path
) -> None:
    ok("enroll", agent_line, "--config", app_home)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n2\n")
    batch = submit(app_home, jsonl, "--max-attempts", "1")
    agent = agent_line.split()[1]
    finish(app_home, batch, agent, [b"", b""], "nonzero_exit", error="ZeroDivisionError: boom")
    text = ok("status", "--config", app_home).stdout
    assert "ZeroDivisionError: boom" in text
    assert f"#{batch} job 0" in text and f"#{batch} job 1" in text
    failed = json.loads(ok("status", "--json", "--config", app_home).stdout)["failed_jobs"]
    assert [(f["batch_id"], f["index"]) for f in failed] == [(batch, 1), (batch, 0)]
    assert all("nonzero_exit: ZeroDivisionError: boom" in f["reason"] for f in failed)


def test_status_shows_hook_errors(home: Path, agent_line: str, tmp_path: Path) -> None:
    ok("enroll", agent_line, "--config", home)
    program = tmp_path / "echo.py"
    program.write_text("print('hello')\n")
    hook = "tests.integration.hookfns:record?log=/nonexistent/x"
    ok("app", "add", "echo", program, "--kind", "python", "--assimilator", hook, "--config", home)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n")
    batch = submit(home, jsonl)
    finish(home, batch, agent_line.split()[1], [b"out"], RESULT_OK)
    with SqliteStore(home / "jobs.sqlite") as store:
        (due,) = store.due_assimilations(time.time(), 10)
        store.assimilation_failed(due.job_id, "assimilator: OSError: disk full", 2e9)
    text = ok("status", "--config", home).stdout
    assert "hook errors" in text and f"#{batch} job 0: assimilator: OSError: disk full" in text
    (failure,) = json.loads(ok("status", "--json", "--config", home).stdout)["hook_failures"]
    assert failure["hook"] == "assimilator" and failure["tries"] == 1


def test_status_shows_the_defaults_submit_takes(home: Path) -> None:
    config = home / "server.toml"
    config.write_text(config.read_text().replace("max_attempts = 3", "max_attempts = 7"))
    text = ok("status", "--config", home).stdout
    assert "submit defaults (server.toml [jobs]):" in text and "max_attempts 7" in text
    defaults = json.loads(ok("status", "--json", "--config", home).stdout)["submit_defaults"]
    assert defaults["max_attempts"] == 7 and defaults["replicas"] == 1
    assert defaults["memory_bytes"] == 512 << 20


def test_more_replicas_than_enrolled_agents_warns_and_status_says_why(
    app_home: Path, agent_line: str, tmp_path: Path
) -> None:
    ok("enroll", agent_line, "--config", app_home)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("1\n")
    result = ok("submit", "echo", "--inputs", jsonl, "--replicas", "2", "--config", app_home)
    assert "warning: 2 replicas of a job go to 2 distinct agents; 1 enrolled" in result.stderr
    batch = int(result.stdout.strip())
    assert "warning" not in ok("submit", "echo", "--inputs", jsonl, "--config", app_home).stderr
    text = ok("status", "--config", app_home).stdout
    assert f"#{batch}: replicas wait: each job needs 2 distinct agents, 1 enrolled" in text


def test_reset_writes_a_request(home: Path, agent_line: str) -> None:
    ok("enroll", agent_line, "--config", home)
    agent_id = agent_line.split()[1]
    seen = 0
    for who in (agent_id, agent_id[:8], "alice"):
        result = ok("reset", who, "--config", home)
        assert agent_id in result.stdout and "within a second" in result.stdout
        store = SqliteStore(home / "jobs.sqlite")
        requests = store.reset_requests_after(seen)
        store.close()
        assert [agent for _, agent in requests] == [agent_id]
        seen = requests[0][0]
    assert_clean_error(run("reset", "bob", "--config", home), "no enrolled agent")


def test_config_errors_are_one_line(home: Path, tmp_path: Path) -> None:
    toml = home / "server.toml"
    original = toml.read_text()
    toml.write_text(original + "surprise = 1\n")
    assert_clean_error(run("status", "--config", home), f"{toml}")
    toml.write_text(original.replace("window = 1024", 'window = "1024"'))
    assert_clean_error(run("status", "--config", home), f"{toml}: [server] window must be")
    toml.write_text(original)
    assert_clean_error(run("status", "--config", tmp_path / "nowhere"), "")
    # The environment variable names the home when --config is absent.
    assert run("status", env={"VCOMP_SERVER_HOME": str(home)}).exit_code == 0


def test_serve_refuses_an_exposed_key(home: Path) -> None:
    os.chmod(home / "server.key", 0o644)
    assert_clean_error(run("serve", "--config", home), "")
    assert "chmod 600" in run("serve", "--config", home).stderr


def test_console_scripts_end_to_end(tmp_path: Path) -> None:
    """init, enroll, allow-measurement, app add, submit and status as real processes."""
    server = BIN / "vcomp-server"
    agent = BIN / "vcomp-agent"
    if not (server.exists() and agent.exists()):
        pytest.skip("console scripts not installed in this environment")
    env = {**os.environ, "VCOMP_SERVER_HOME": str(tmp_path / "srv")}

    def sh(*args: str | Path) -> str:
        proc = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, env=env, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stdout

    sh(server, "init", tmp_path / "srv")
    out = sh(
        agent,
        "init",
        tmp_path / "ag",
        "--server",
        "127.0.0.1:7461",
        "--server-key",
        tmp_path / "srv" / "server.pub",
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("vcomp-enrol/1 "))
    golden = next(ln for ln in out.splitlines() if ln.startswith("sha256:"))
    assert sh(agent, "measure", "--config", tmp_path / "ag").strip() == golden
    sh(server, "enroll", line)
    sh(server, "allow-measurement", golden)
    program = tmp_path / "job.py"
    program.write_text("print(1)\n")
    sh(server, "app", "add", "job", program, "--kind", "python")
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("[1]\n[2]\n")
    batch = sh(server, "submit", "job", "--inputs", jsonl).strip()
    assert batch == "1"
    status = json.loads(sh(server, "status", "--json"))
    assert status["batches"][0]["total"] == 2 and len(status["agents"]) == 1
    proc = subprocess.run(
        [str(server), "status", "--config", tmp_path / "missing"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


def _fingerprint(home: Path) -> str:
    raw = handshake.raw_public(load_signing_key(home / "server.key"))
    return handshake.key_fingerprint(raw).hex()


def test_init_force_keeps_the_key_and_only_new_key_replaces_it(tmp_path: Path) -> None:
    """As real processes without a terminal: --force alone must not cut agents off."""
    home = tmp_path / "srv"

    def init(*extra: str) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "vcomp-server"), "init", str(home), *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=None)

    assert init().returncode == 0
    pinned = _fingerprint(home)
    kept = init("--force")
    assert kept.returncode == 0, kept.stderr
    assert _fingerprint(home) == pinned  # agents pinned to it still trust this server
    assert "kept the organisation key" in kept.stdout
    assert "re-pin" not in kept.stdout
    refused = init("--new-key")  # without --force: the home is not empty
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")
    assert _fingerprint(home) == pinned
    replaced = init("--force", "--new-key")
    assert replaced.returncode == 0, replaced.stderr
    assert _fingerprint(home) != pinned
    assert "every agent must re-pin" in replaced.stdout
    assert _fingerprint(home) in replaced.stdout


def _init_on_a_terminal(home: Path, answer: bytes) -> tuple[int, str]:
    """``vcomp-server init --force --new-key`` with a pty as its terminal; ``answer`` the prompt."""
    master, slave = pty.openpty()
    argv = [str(BIN / "vcomp-server"), "init", str(home), "--force", "--new-key"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    answered = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            seen += data
            if not answered and b"[y/N]" in seen:
                os.write(master, answer + b"\n")
                answered = True
    finally:
        os.close(master)
        code = proc.wait(30)
    return code, seen.decode(errors="replace")


def test_init_new_key_asks_on_a_terminal(tmp_path: Path) -> None:
    home = tmp_path / "srv"
    ok("init", home)
    pinned = _fingerprint(home)
    code, text = _init_on_a_terminal(home, b"n")
    assert "every agent" in text.lower() and "[y/N]" in text
    assert code != 0
    assert _fingerprint(home) == pinned  # declined: nothing changed
    code, text = _init_on_a_terminal(home, b"y")
    assert code == 0, text
    assert _fingerprint(home) != pinned


def test_a_store_at_another_version_stops_every_command_until_migrate(home: Path) -> None:
    downgrade_to_v1(home / "jobs.sqlite")
    for command in (["status"], ["app", "list"], ["reset", "ab" * 8], ["results", "1"]):
        result = run(*command, "--config", home)
        assert_clean_error(result, "vcomp-server migrate")
        assert result.stderr.count("\n") == 1, result.stderr  # one line
        assert "schema v1, older" in result.stderr
    assert "schema v1 -> v" in ok("migrate", "--config", home).stdout
    assert "up to date" in ok("migrate", "--config", home).stdout
    ok("status", "--config", home)


def test_init_store_url_and_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "db" / "jobs.db"
    db.parent.mkdir()
    ok("init", tmp_path / "srv", "--store", f"sqlite://{db}")
    assert db.exists() and not (tmp_path / "srv" / "jobs.sqlite").exists()
    ok("app", "add", "echo", db, "--kind", "exec", "--config", tmp_path / "srv")
    assert "echo" in ok("app", "list", "--config", tmp_path / "srv").stdout
    # $VCOMP_STORE_URL points the same home at another store.
    other = tmp_path / "db" / "other.db"
    env = {"VCOMP_STORE_URL": f"sqlite://{other}"}
    assert_clean_error(run("status", "--config", tmp_path / "srv", env=env), "no job store")
    assert run("migrate", "--config", tmp_path / "srv", env=env).exit_code == 0
    listed = run("app", "list", "--config", tmp_path / "srv", env=env)
    assert listed.exit_code == 0 and "echo" not in listed.stdout
    env = {"VCOMP_STORE_URL": "cassandra://db"}
    assert_clean_error(
        run("status", "--config", tmp_path / "srv", env=env), "unknown store url scheme"
    )
    assert_clean_error(run("init", tmp_path / "x", "--store", "ftp://h/f"), "'ftp'")


def test_serve_stops_with_one_line_on_a_store_at_another_version(tmp_path: Path) -> None:
    server = BIN / "vcomp-server"
    if not server.exists():
        pytest.skip("console scripts not installed in this environment")
    ok("init", tmp_path / "srv")
    downgrade_to_v1(tmp_path / "srv" / "jobs.sqlite")
    proc = subprocess.run(
        [str(server), "serve", "--config", str(tmp_path / "srv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "vcomp-server migrate" in lines[0]


# ------------------------------------------------------- serve: --bind, start-up errors


def _serve(home: Path, *extra: str) -> subprocess.Popen[str]:
    server = BIN / "vcomp-server"
    if not server.exists():
        pytest.skip("console scripts not installed in this environment")
    # Not the configured 127.0.0.1:7462: another test's server may still hold it.
    http = [] if "--http-bind" in extra else ["--http-bind", "127.0.0.1:0"]
    return subprocess.Popen(
        [str(server), "serve", "--config", str(home), *http, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    return proc.stdout.readline() if ready else ""


def _one_error_line(proc: subprocess.Popen[str]) -> str:
    """The process's only stderr line, an ``error: ...``, after a non-zero exit."""
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, (proc.returncode, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_bind_overrides_the_configured_address(home: Path) -> None:
    port = _free_udp_port()
    proc = _serve(home, "--bind", f"127.0.0.1:{port}")
    try:
        line = _first_line(proc)
        assert f"listening on 127.0.0.1:{port} " in line, line
        assert re.search(r" udp gso=(active|unavailable|off) gro=(active|unavailable|off)$", line)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_serve_log_file_appends_the_log_there(home: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text("kept\n")
    proc = _serve(home, "--bind", f"127.0.0.1:{_free_udp_port()}", "--log-file", str(log))
    try:
        assert "listening on" in _first_line(proc)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = log.read_text().splitlines()
    assert lines[0] == "kept" and any("event=server_started" in ln for ln in lines)
    started = next(ln for ln in lines if "event=server_started" in ln)
    assert "udp_gso=" in started and "udp_gro=" in started, started
    assert any("event=server_stopped" in ln for ln in lines)
    assert "event=" not in err  # the log went to the file, not stderr
    line = _one_error_line(_serve(home, "--log-file", str(tmp_path / "no" / "dir.log")))
    assert "--log-file" in line and "No such file or directory" in line


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("7461", "--bind must look like HOST:PORT, got '7461'"),
        ("127.0.0.1:99999", "--bind: port 99999 is out of range"),
        (":7461", "--bind must look like HOST:PORT"),
    ],
)
def test_serve_bind_refuses_a_bad_address(home: Path, bind: str, message: str) -> None:
    result = run("serve", "--config", home, "--bind", bind)
    assert_clean_error(result, message)
    assert result.stderr.count("\n") == 1, result.stderr


def test_serve_stops_with_one_line_on_a_store_it_cannot_open(home: Path) -> None:
    (home / "jobs.sqlite").unlink()
    (home / "jobs.sqlite").mkdir()  # exists, but no database can be opened there
    line = _one_error_line(_serve(home))
    assert "cannot open job store" in line and "unable to open database file" in line, line


def test_serve_stops_with_one_line_on_a_store_another_process_locks(home: Path) -> None:
    """A store that stays locked past the busy timeout at start: StoreUnavailable, one line."""
    toml = home / "server.toml"
    toml.write_text(toml.read_text().replace("[store]\n", "[store]\nbusy_timeout = 0.5\n"))
    with HeldLock(home / "jobs.sqlite"):
        line = _one_error_line(_serve(home))
    assert line == "error: job store unavailable: database is locked", line


def test_a_postgresql_store_that_is_down_is_one_line_and_a_nonzero_exit(
    home: Path, tmp_path: Path
) -> None:
    """Through the console script: a store URL naming a socket where no PostgreSQL runs."""
    env = {**os.environ, "VCOMP_STORE_URL": f"postgresql://vcomp:secret@/vcomp?host={tmp_path}"}
    script = Path(sys.executable).parent / "vcomp-server"
    for command in ("status", "migrate", "serve"):
        done = subprocess.run(
            [script, command, "--config", home], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode != 0, command
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: job store unavailable: cannot connect to PostgreSQL")
        assert "secret" not in done.stderr and str(tmp_path) not in done.stderr


def test_migrate_and_status_on_postgresql(home: Path, pg_cluster: PostgresCluster) -> None:
    env = {"VCOMP_STORE_URL": fresh_schema_url(pg_cluster)}
    migrated = run("migrate", "--config", home, env=env)
    assert migrated.exit_code == 0 and "schema v0 -> v" in migrated.stdout, migrated.output
    assert "search_path" not in migrated.stdout  # the query is not printed
    assert run("status", "--config", home, env=env).exit_code == 0


def test_init_on_a_postgresql_store_that_is_down_says_how_to_finish(tmp_path: Path) -> None:
    url = f"postgresql://vcomp:secret@/vcomp?host={tmp_path}"
    result = run("init", tmp_path / "org", "--store", url)
    assert_clean_error(result, "job store unavailable")
    assert "vcomp-server migrate --config" in result.stderr and "secret" not in result.stderr
    assert (tmp_path / "org" / "server.toml").exists()  # the home stands; migrate finishes it


def test_every_admin_command_works_on_postgresql(
    tmp_path: Path, agent_line: str, pg_cluster: PostgresCluster
) -> None:
    """The commands an operator runs, against a home whose store is PostgreSQL."""
    home = tmp_path / "org"
    assert run("init", home, "--store", fresh_schema_url(pg_cluster)).exit_code == 0

    def pg(*args: str | Path) -> Result:
        result = run(*args, "--config", home)
        assert result.exit_code == 0, (args, result.output, result.exception)
        return result

    agent_id = agent_line.split()[1]
    pg("enroll", agent_line)
    pg("allow-measurement", "sha256:17=" + "1" * 64 + ",18=" + "2" * 64, "--note", "r1")
    assert "r1" in pg("allow-measurement", "--list").stdout
    program = tmp_path / "echo.py"
    program.write_text("print('hello')\n")
    pg("app", "add", "echo", program, "--kind", "python")
    assert "echo" in pg("app", "list").stdout
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"a": 1}\n{"a": 2}\n')
    batch = pg("submit", "echo", "--inputs", inputs).stdout.strip()
    assert json.loads(pg("status", "--json").stdout)["batches"][0]["total"] == 2
    assert run("wait", batch, "--timeout", "0", "--config", home).exit_code == 4  # not done
    rows = [json.loads(ln) for ln in pg("results", batch).stdout.splitlines()]
    assert [(r["index"], r["state"]) for r in rows] == [(0, "queued"), (1, "queued")]
    assert agent_id in pg("reset", "alice").stdout

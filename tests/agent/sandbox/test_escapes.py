"""Every escape and abuse attempt of issue 4, each followed by a normal job.

The jobs report what they tried; the tests check both the job's view and the host's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vcomp.agent.modes import ExecutionMode
from vcomp.agent.sandbox import JobLimits, JobOutcome, OutcomeKind, Sandbox
from vcomp.domain import encode_frame, encode_result

from .conftest import LIMITS, assert_still_works, job, processes_with, run_python

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests set up root-owned files")

SHORT = dataclasses.replace(LIMITS, wall_seconds=3.0)


def attempts(outcome_result: bytes | None) -> dict[str, str]:
    assert outcome_result is not None
    data: dict[str, str] = json.loads(outcome_result)
    return data


TRY = """
def attempt(name, fn):
    try:
        fn()
        results[name] = "succeeded"
    except BaseException as exc:
        results[name] = type(exc).__name__ + ":" + str(getattr(exc, "errno", ""))
"""


@pytest.fixture
def agent_state() -> Iterator[Path]:
    """A fake agent state dir outside every default-hidden path, open to everyone by
    mode bits, so only the sandbox stands between the job and its files.
    """
    root = Path("/var/lib") / f"vcomp-test-{secrets.token_hex(4)}"
    (root / "tpm").mkdir(parents=True)
    os.chmod(root, 0o777)
    os.chmod(root / "tpm", 0o777)
    key = root / "agent_key.pem"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nsecret\n")
    os.close(fd)
    (root / "tpm" / "state.json").write_text('{"seed": "secret"}')
    os.chmod(root / "tpm" / "state.json", 0o644)  # readable by mode bits on purpose
    yield root
    shutil.rmtree(root)


async def test_fork_bomb_is_capped_by_nproc_even_as_root(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(SHORT, max_processes=16)
    outcome = await run_python(
        sandbox,
        job("""
children = 0
try:
    while children < 1000:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        children += 1
except OSError as exc:
    return json.dumps({"children": children, "errno": exc.errno}).encode()
return json.dumps({"children": children}).encode()
"""),
        limits=limits,
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    report = json.loads(outcome.result or b"{}")
    assert report["children"] < 16
    assert report["errno"] == 11  # EAGAIN from RLIMIT_NPROC
    assert processes_with("<vcomp-bootstrap>") == []
    await assert_still_works(sandbox)


async def test_true_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(SHORT, max_processes=32, wall_seconds=2.0)
    outcome = await run_python(
        sandbox,
        job("""
while True:
    try:
        os.fork()
    except OSError:
        pass
"""),
        limits=limits,
    )
    assert outcome.kind in (OutcomeKind.WALL_TIMEOUT, OutcomeKind.CPU_LIMIT), outcome
    assert processes_with("<vcomp-bootstrap>") == []
    await assert_still_works(sandbox)


async def test_memory_bomb(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(SHORT, memory_bytes=256 << 20)
    outcome = await run_python(
        sandbox,
        job("""
hog = []
while True:
    hog.append(bytearray(8 << 20))
"""),
        limits=limits,
    )
    assert outcome.kind is OutcomeKind.MEMORY_LIMIT, outcome
    await assert_still_works(sandbox)


async def test_infinite_loop_hits_cpu_limit(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(LIMITS, cpu_seconds=1, wall_seconds=20)
    outcome = await run_python(sandbox, job("while True:\n    pass"), limits=limits)
    assert outcome.kind is OutcomeKind.CPU_LIMIT, outcome
    assert outcome.cpu_seconds >= 0.9  # clock-tick rounding
    await assert_still_works(sandbox)


async def test_cpu_burn_over_many_processes_hits_tree_cpu_limit(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(LIMITS, cpu_seconds=2, wall_seconds=20)
    outcome = await run_python(
        sandbox,
        job("""
for _ in range(4):
    if os.fork() == 0:
        while True:
            pass
while True:
    time.sleep(1)
"""),
        limits=limits,
    )
    assert outcome.kind is OutcomeKind.CPU_LIMIT, outcome
    assert processes_with("<vcomp-bootstrap>") == []
    await assert_still_works(sandbox)


async def test_sleep_beyond_wall_limit(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(LIMITS, wall_seconds=1.0)
    outcome = await run_python(sandbox, job("time.sleep(60)"), limits=limits)
    assert outcome.kind is OutcomeKind.WALL_TIMEOUT, outcome
    assert outcome.wall_seconds < 10
    await assert_still_works(sandbox)


async def test_silence_beyond_idle_limit(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(LIMITS, idle_seconds=0.5)
    outcome = await run_python(sandbox, job("progress(0.1)\ntime.sleep(60)"), limits=limits)
    assert outcome.kind is OutcomeKind.IDLE_TIMEOUT, outcome
    assert outcome.progress == pytest.approx(0.1)
    await assert_still_works(sandbox)


async def test_writes_outside_the_work_dir_fail(sandbox: Sandbox, agent_state: Path) -> None:
    token = secrets.token_hex(6)
    home = Path(os.path.expanduser("~"))
    targets = {
        "tmp": f"/tmp/vcomp-escape-{token}",
        "home": str(home / f"vcomp-escape-{token}"),
        "state": str(agent_state / f"vcomp-escape-{token}"),
        "tpm": str(agent_state / "tpm" / "state.json"),
        "work_root": str(sandbox.work_root / f"vcomp-escape-{token}"),
    }
    code = job(
        TRY
        + """
results = {}
targets = json.loads(data)
for name, path in targets.items():
    attempt(name, lambda: open(path, "ab").write(b"pwned"))
attempt("own_dir", lambda: open("inside.txt", "wb").write(b"fine"))
return json.dumps(results).encode()
"""
    )
    outcome = await run_python(sandbox, code, json.dumps(targets).encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    results = attempts(outcome.result)
    assert results.pop("own_dir") == "succeeded"
    assert all(r != "succeeded" for r in results.values()), results
    for name, path in targets.items():
        if name != "tpm":
            assert not os.path.exists(path), path
    assert json.loads((agent_state / "tpm" / "state.json").read_text()) == {"seed": "secret"}
    await assert_still_works(sandbox)


async def test_reading_the_agent_key_and_tpm_state_fails(
    sandbox: Sandbox, agent_state: Path
) -> None:
    targets = {
        "key": str(agent_state / "agent_key.pem"),
        "tpm_state": str(agent_state / "tpm" / "state.json"),
        "passwd_shadow": "/etc/shadow",
    }
    code = job(
        TRY
        + """
results = {}
for name, path in json.loads(data).items():
    attempt(name, lambda: open(path, "rb").read())
attempt("list_state", lambda: os.listdir(os.path.dirname(json.loads(data)["key"])))
return json.dumps(results).encode()
"""
    )
    outcome = await run_python(sandbox, code, json.dumps(targets).encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    results = attempts(outcome.result)
    assert all(r != "succeeded" for r in results.values()), results
    await assert_still_works(sandbox)


async def test_hidden_state_dir_is_empty_inside(tmp_path: Path, agent_state: Path) -> None:
    # Without Landlock, so that the mount alone is what keeps the files out of sight.
    sandbox = Sandbox(work_root=tmp_path / "work", hidden_paths=[agent_state], use_landlock=False)
    code = job("""
path = data.decode()
return json.dumps(os.listdir(path) if os.path.exists(path) else "absent").encode()
""")
    outcome = await run_python(sandbox, code, str(agent_state).encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    assert json.loads(outcome.result or b"") in ([], "absent")  # "absent": the minimal root


async def test_network_is_unreachable(sandbox: Sandbox) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        ports = {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1]}
        code = job(
            TRY
            + """
results = {}
ports = json.loads(data)
attempt("tcp", lambda: socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=1))
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b"leak", ("127.0.0.1", ports["udp"]))
attempt("udp", udp)
attempt("ipv6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
attempt("raw", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
return json.dumps(results).encode()
"""
        )
        outcome = await run_python(sandbox, code, json.dumps(ports).encode())
        assert outcome.kind is OutcomeKind.OK, outcome
        results = attempts(outcome.result)
        assert results.pop("unix") == "succeeded"  # local socketpairs stay allowed
        assert all(r != "succeeded" for r in results.values()), results
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recvfrom(64)
    finally:
        tcp.close()
        udp.close()
    await assert_still_works(sandbox)


# --- issue 13: disk, host sockets, host ptys, leaks -----------------------------------


def host_usage(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root`` as the host sees them."""
    size = count = 0
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            count += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return size, count


async def run_with_probe(
    sandbox: Sandbox, code: bytes, data: bytes, limits: JobLimits, probe: Callable[[], object]
) -> tuple[JobOutcome, list[object]]:
    """Run a job that sends PROGRESS once it has done its harm (then lingers a moment);
    ``probe`` measures the host's side at that moment.
    """
    seen: list[object] = []
    outcome = await sandbox.run(
        kind="python",
        code=code,
        input=data,
        limits=limits,
        on_progress=lambda _f: seen.append(probe()) if not seen else None,
    )
    return outcome, seen


FILL = """
target, chunk = json.loads(data)
written, files, err = 0, 0, None
try:
    while written < target:
        with open(f"f{files}", "wb") as f:
            files += 1
            f.write(b"x" * chunk)
        written += chunk
except OSError as exc:
    err = exc.errno
progress(0.5)
time.sleep(1)
return json.dumps({"written": written, "files": files, "errno": err}).encode()
"""


async def test_disk_fill_stops_at_disk_bytes(sandbox: Sandbox, no_leftover_workdirs: None) -> None:
    limits = dataclasses.replace(SHORT, disk_bytes=8 << 20)
    data = json.dumps([64 << 20, 1 << 20]).encode()
    outcome, seen = await run_with_probe(
        sandbox, job(FILL), data, limits, lambda: host_usage(sandbox.work_root)
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    report = json.loads(outcome.result or b"")
    assert seen == [(0, 0)], ("bytes and files the job put on the host's disk", report)
    assert report["errno"] == errno.ENOSPC, report
    assert report["written"] <= limits.disk_bytes, report
    await assert_still_works(sandbox)


async def test_inode_fill_stops_at_nr_inodes(sandbox: Sandbox, no_leftover_workdirs: None) -> None:
    limits = dataclasses.replace(SHORT, disk_bytes=1 << 20)
    data = json.dumps([5000, 0]).encode()  # empty files until the target count
    outcome, seen = await run_with_probe(
        sandbox,
        job(FILL.replace("written < target", "files < target")),
        data,
        limits,
        lambda: host_usage(sandbox.work_root),
    )
    assert outcome.kind is OutcomeKind.OK, outcome
    report = json.loads(outcome.result or b"")
    assert seen == [(0, 0)], "bytes and files the job put on the host's disk"
    assert report["errno"] == errno.ENOSPC, report
    assert report["files"] <= 64, report  # 1 MiB at one inode per 16 KiB
    await assert_still_works(sandbox)


@pytest.fixture
def host_service() -> Iterator[tuple[str, list[object]]]:
    """A host service on a pathname socket anyone may connect to (mode 0777, under
    /var/lib, outside every hidden path); yields its path and the peers it accepted.
    """
    root = Path("/var/lib") / f"vcomp-test-{secrets.token_hex(4)}"
    root.mkdir()
    os.chmod(root, 0o777)
    path = str(root / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(8)
    listener.settimeout(0.1)
    peers: list[object] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                peers.append(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                conn.sendall(b"hello from the host")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, peers
    finally:
        stop.set()
        thread.join()
        listener.close()
        shutil.rmtree(root)


async def test_host_unix_socket_is_unreachable(
    sandbox: Sandbox, host_service: tuple[str, list[object]]
) -> None:
    path, peers = host_service
    code = job(
        TRY
        + """
results = {}
def talk():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    s.connect(data.decode())
    results["reply"] = s.recv(64).decode()
attempt("connect", talk)
return json.dumps(results).encode()
"""
    )
    outcome = await run_python(sandbox, code, path.encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    assert peers == [], "connections the host service accepted from the job"
    assert "reply" not in attempts(outcome.result), outcome.result
    await assert_still_works(sandbox)


def host_ptys() -> int:
    return int(Path("/proc/sys/kernel/pty/nr").read_text())


async def test_host_ptys_cannot_be_taken(sandbox: Sandbox) -> None:
    before = host_ptys()
    code = job("""
fds, err = [], None
try:
    while len(fds) < 40:
        fds.append(os.open("/dev/ptmx", os.O_RDONLY | os.O_NOCTTY))  # as read, Landlock allows it
except OSError as exc:
    err = exc.errno
progress(0.5)
time.sleep(1)
return json.dumps({"opened": len(fds), "errno": err}).encode()
""")
    outcome, seen = await run_with_probe(sandbox, code, b"", SHORT, host_ptys)
    assert outcome.kind is OutcomeKind.OK, outcome
    assert seen == [before], "the host's pty count while the job held its ptys"
    assert json.loads(outcome.result or b"")["opened"] == 0
    await assert_still_works(sandbox)


async def test_no_agent_argv_host_mounts_or_machine_id(sandbox: Sandbox) -> None:
    code = job(
        TRY
        + """
results = {}
attempt("machine_id", lambda: open("/etc/machine-id", "rb").read())
attempt("dbus_machine_id", lambda: open("/var/lib/dbus/machine-id", "rb").read())
attempt("init_environ", lambda: open("/proc/1/environ", "rb").read())
results["boot_id"] = open("/proc/sys/kernel/random/boot_id").read()
results["init_cmdline"] = open("/proc/1/cmdline", "rb").read().decode("utf-8", "replace")
results["mountinfo"] = open("/proc/self/mountinfo").read()
return json.dumps(results).encode()
"""
    )
    outcome = await run_python(sandbox, code)
    assert outcome.kind is OutcomeKind.OK, outcome
    results = attempts(outcome.result)
    agent_argv = Path("/proc/self/cmdline").read_bytes().decode().split("\0")
    cmdline = results.pop("init_cmdline")
    assert [a for a in agent_argv if len(a) > 3 and a in cmdline] == [], cmdline
    assert results.pop("boot_id") == "", "the host's boot id, which identifies it like machine-id"
    mountinfo = results.pop("mountinfo")
    mount_points = {line.split()[4] for line in mountinfo.splitlines()}
    assert str(sandbox.work_root) not in mountinfo
    assert mount_points.isdisjoint({"/home", "/root", "/tmp", "/run", os.path.expanduser("~")})
    assert all(r != "succeeded" for r in results.values()), results
    await assert_still_works(sandbox)


async def test_ptrace_on_the_parent_and_agent_fails(sandbox: Sandbox) -> None:
    code = job("""
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for name, pid in (("parent", os.getppid()), ("agent", int(data)), ("self_child", 1)):
    rc = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
    out[name] = [rc, ctypes.get_errno()]
rc = libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
out["traceme"] = [rc, ctypes.get_errno()]
return json.dumps(out).encode()
""")
    outcome = await run_python(sandbox, code, str(os.getpid()).encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    for name, (rc, err) in json.loads(outcome.result or b"").items():
        assert rc == -1 and err == 1, (name, rc, err)  # EPERM from seccomp
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert "TracerPid:\t0" in status
    await assert_still_works(sandbox)


async def test_signalling_the_agent_fails(sandbox: Sandbox) -> None:
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda s, _f: received.append(s))
        for sig in (signal.SIGUSR1, signal.SIGTERM)
    }
    try:
        code = job(
            TRY
            + """
results = {}
agent = int(data)
attempt("usr1", lambda: os.kill(agent, signal.SIGUSR1))
attempt("term", lambda: os.kill(agent, signal.SIGTERM))
attempt("group", lambda: os.killpg(os.getpgid(0), signal.SIGUSR1) if False else None)
attempt("broadcast", lambda: os.kill(-1, signal.SIGTERM))
return json.dumps(results).encode()
"""
        )
        outcome = await run_python(sandbox, code, str(os.getpid()).encode())
        await asyncio.sleep(0.1)
        assert outcome.kind is OutcomeKind.OK, outcome
        results = attempts(outcome.result)
        assert results["usr1"] != "succeeded" and results["term"] != "succeeded", results
        assert received == []
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    await assert_still_works(sandbox)


DAEMON = """
token = data.decode()
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"x")
        os.execv("/bin/sleep", ["sleep-" + token, "300"])
    os._exit(0)
os.wait()
os.read(r, 1)
time.sleep(0.2)
return b"left a daemon"
"""


@pytest.mark.parametrize("namespaces", [True, False], ids=["pid-namespace", "subreaper-sweep"])
async def test_daemonised_grandchild_does_not_survive(tmp_path: Path, namespaces: bool) -> None:
    python = None
    if not namespaces:
        # Without a mount namespace the job's uid must reach the interpreter by itself;
        # the agent's may sit in root's 0700 home, so take the system one.
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            pytest.skip("no system python3 that uid 65534 can run")
    sandbox = Sandbox(work_root=tmp_path / "work", namespaces=namespaces, python=python)
    token = secrets.token_hex(8)
    outcome = await run_python(sandbox, job(DAEMON), token.encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    assert processes_with(f"sleep-{token}") == []
    await assert_still_works(sandbox)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_flooding_the_logs_ends_the_job(sandbox: Sandbox, stream: str) -> None:
    limits = dataclasses.replace(SHORT, log_bytes=64 << 10)
    code = job(f"""
chunk = b"x" * 65536
while True:
    sys.{stream}.buffer.write(chunk)
""")
    outcome = await run_python(sandbox, code, limits=limits)
    assert outcome.kind is OutcomeKind.OUTPUT_TOO_LARGE, outcome
    assert 0 < len(getattr(outcome, f"{stream}_tail")) <= 64 << 10 + 65536
    await assert_still_works(sandbox)


async def test_result_over_the_output_cap(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(SHORT, output_bytes=1000)
    outcome = await run_python(sandbox, job("return b'x' * 1001"), limits=limits)
    assert outcome.kind is OutcomeKind.OUTPUT_TOO_LARGE, outcome
    await assert_still_works(sandbox)


MALFORMED = {
    "unknown type": (encode_frame(0x01, b"")[:0] + b"\x7f\x00\x00\x00\x01x", "PROTOCOL"),
    "START from the job": (b"\x01\x00\x00\x00\x00", "PROTOCOL"),
    "progress above one": (b"\x03\x00\x00\x00\x04" + (2_000_000).to_bytes(4, "big"), "PROTOCOL"),
    "progress wrong size": (b"\x03\x00\x00\x00\x02ab", "PROTOCOL"),
    "huge declared length": (b"\x02\xff\xff\xff\xff", "OUTPUT"),
    "frame after RESULT": (encode_result(b"a") + encode_result(b"b"), "PROTOCOL"),
    "truncated frame": (b"\x02\x00\x00\x00\x10abc", "PROTOCOL"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_frames(sandbox: Sandbox, name: str) -> None:
    frames, expected = MALFORMED[name]
    code = (
        f"import os, time\nos.write(4, {frames!r})\n"
        + (
            "os._exit(0)\n"
            if name in ("truncated frame", "frame after RESULT")
            else "time.sleep(30)\n"
        )
    ).encode()
    outcome = await run_python(sandbox, code, limits=SHORT)
    kind = (
        OutcomeKind.PROTOCOL_VIOLATION if expected == "PROTOCOL" else OutcomeKind.OUTPUT_TOO_LARGE
    )
    assert outcome.kind is kind, outcome
    assert outcome.wall_seconds < 2.5
    await assert_still_works(sandbox)


SETUID_HELPER = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("%d", (int)geteuid()); return 0; }
"""


async def test_setuid_binary_gives_no_privilege(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; cannot build the set-user-ID helper")
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "euid.c").write_text(SETUID_HELPER)
    helper = tools / "euid"
    subprocess.run([gcc, "-o", str(helper), str(tools / "euid.c")], check=True)
    os.chown(helper, 0, 0)
    os.chmod(helper, 0o4755)
    assert os.stat(helper).st_mode & stat.S_ISUID
    os.chmod(tools, 0o755)
    sandbox = Sandbox(work_root=tmp_path / "work", read_paths=[tools])
    code = job(
        TRY
        + """
results = {}
def run_it(path):
    results[path] = subprocess.run([path], capture_output=True).stdout.decode()
for path in (data.decode(), "/usr/bin/passwd"):
    attempt("exec:" + path, lambda: run_it(path))
results["own_euid"] = str(os.geteuid())
return json.dumps(results).encode()
"""
    )
    outcome = await run_python(sandbox, code, str(helper).encode())
    assert outcome.kind is OutcomeKind.OK, outcome
    results = attempts(outcome.result)
    assert results[str(helper)] == results["own_euid"] != "0", results
    await assert_still_works(sandbox)


async def test_limits_are_per_job_not_shared(sandbox: Sandbox) -> None:
    """A job that nearly exhausts its process budget leaves the next job a full one."""
    limits = dataclasses.replace(SHORT, max_processes=8)
    spawn = job("""
n = 0
for _ in range(5):
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
return str(n).encode()
""")
    for _ in range(2):
        outcome = await run_python(sandbox, spawn, limits=limits)
        assert outcome.kind is OutcomeKind.OK and outcome.result == b"5", outcome


DEEP_TREE = job("""
home = os.environ["HOME"]
os.mkdir("locked")
os.mkdir("locked/inner")
open("locked/inner/f", "wb").close()
os.chmod("locked", 0)  # the agent may not even list it
for _ in range(3000):  # far deeper than PATH_MAX: 6000 characters of "a/"
    os.mkdir("a")
    os.chdir("a")
with open("f", "wb") as f:
    f.write(b"x" * 4096)
os.symlink("/etc", "etc")  # a wipe that follows it would reach the host
return b"deep"
""")


async def test_deep_directory_tree_is_wiped(sandbox: Sandbox) -> None:
    """Issue 13 finding 3: a tree deeper than PATH_MAX (and an unreadable directory)
    must neither break the run nor stay on disk; the sandbox runs the next job."""
    limits = dataclasses.replace(SHORT, wall_seconds=20.0)
    outcome = await run_python(sandbox, DEEP_TREE, limits=limits)
    assert outcome.kind is OutcomeKind.OK and outcome.result == b"deep", outcome
    assert list(sandbox.work_root.iterdir()) == []
    assert Path("/etc/passwd").exists()
    await assert_still_works(sandbox)
    assert list(sandbox.work_root.iterdir()) == []


FLOOD_SECONDS = 3.0
FLOOD = job(f"""
from vcomp.domain import encode_progress
burst = b"".join(encode_progress(i / 8000) for i in range(8000))
end = time.monotonic() + {FLOOD_SECONDS}
while time.monotonic() < end:
    os.write(4, burst)
progress(1.0)
return b"flooded " + data
""")
# The agent's own CPU over a flood, as a share of the flood's wall time.
FLOOD_CPU_SHARE = 0.05


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("mode", ["background", "full"])
async def test_progress_flood_costs_the_agent_little(tmp_path: Path, mode: str) -> None:
    """Issue 13 finding 7: a job that floods PROGRESS frames pays for it, not the agent.

    The oracle is this process's own CPU time (it owns the Sandbox and parses the
    frames); the launcher and the job are children and do not count in RUSAGE_SELF.
    """
    # busy_threshold 1.0: other load on the machine must not suspend the job here.
    kind = ExecutionMode(kind="background", busy_threshold=1.0) if mode == "background" else None
    sandbox = Sandbox(work_root=tmp_path / "work", mode=kind)
    await assert_still_works(sandbox)  # the launcher is prepared and warm
    seen: list[float] = []
    before = own_cpu_seconds()
    outcome = await sandbox.run(
        kind="python",
        code=FLOOD,
        input=b"ok",
        limits=dataclasses.replace(LIMITS, wall_seconds=30.0),
        on_progress=seen.append,
    )
    agent_cpu = own_cpu_seconds() - before
    assert outcome.kind is OutcomeKind.OK and outcome.result == b"flooded ok", outcome
    assert outcome.progress == 1.0
    assert seen and seen[-1] == 1.0
    share = agent_cpu / outcome.wall_seconds
    print(
        f"progress flood ({mode}): agent {agent_cpu:.3f} s CPU over "
        f"{outcome.wall_seconds:.2f} s = {share:.1%}; job {outcome.cpu_seconds:.2f} s CPU;"
        f" {len(seen)} callbacks"
    )
    assert share <= FLOOD_CPU_SHARE, (agent_cpu, outcome.wall_seconds)
    await assert_still_works(sandbox)


_ = JobLimits


# --- issue 13, findings 1 and 2: memory and CPU outside the per-process limits ---------

MEMORY_LIMITS = dataclasses.replace(
    LIMITS, memory_bytes=128 << 20, disk_bytes=16 << 20, wall_seconds=30.0
)
# What the job may hold in all: its memory plus its work directory (a tmpfs).
JOB_BOUND = MEMORY_LIMITS.memory_bytes + MEMORY_LIMITS.disk_bytes
# The agent's own processes and pages share the measured cgroup; a little slack for them.
SLACK = 48 << 20


def _own_memory_cgroup() -> Path | None:
    """This test process's memory cgroup directory (v1 memory, else v2)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            found = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (found / "memory.usage_in_bytes").exists():
                return found
    for line in lines:
        if line.startswith("0::"):
            found = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (found / "memory.current").exists():
                return found
    return None


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class MemoryWatch:
    """Samples, from outside the job, the memory charged to this test's own cgroup (the
    job's cgroup sits below it, and without one the job is charged here directly) and the
    host's Shmem; keeps the highest rise of each over the value at the start.
    """

    def __init__(self) -> None:
        own = _own_memory_cgroup()
        if own is None:
            pytest.skip("no memory cgroup to measure the job from outside")
        v1 = own / "memory.usage_in_bytes"
        self.usage_file = v1 if v1.exists() else own / "memory.current"
        self.rise = self.shmem_rise = 0
        self._stop = False

    def _usage(self) -> int:
        return int(self.usage_file.read_text())

    async def __aenter__(self) -> MemoryWatch:
        base, shmem = self._usage(), _meminfo("Shmem")

        def sample() -> None:
            while not self._stop:
                self.rise = max(self.rise, self._usage() - base)
                self.shmem_rise = max(self.shmem_rise, _meminfo("Shmem") - shmem)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop = True
        self._thread.join()


MEMFD_BOMB = job("""
fds = []
for i in range(40):
    fd = os.memfd_create("m")
    for _ in range(16):
        os.write(fd, b"x" * (1 << 20))
    fds.append(fd)
time.sleep(1)
return json.dumps({"memfds": len(fds)}).encode()
""")


async def test_memfd_bomb_is_bounded_by_the_job_memory(sandbox: Sandbox) -> None:
    async with MemoryWatch() as watch:
        outcome = await run_python(sandbox, MEMFD_BOMB, limits=MEMORY_LIMITS)
    seen = f"cgroup rise {watch.rise >> 20} MiB, host Shmem rise {watch.shmem_rise >> 20} MiB"
    assert watch.rise <= JOB_BOUND + SLACK, seen
    assert outcome.kind is OutcomeKind.MEMORY_LIMIT, (seen, outcome)
    assert outcome.peak_memory_bytes is not None and outcome.peak_memory_bytes <= JOB_BOUND
    await assert_still_works(sandbox)


async def test_children_each_under_the_limit_are_bounded_together(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(MEMORY_LIMITS, memory_bytes=256 << 20)
    bound = limits.memory_bytes + limits.disk_bytes
    code = job("""
r, w = os.pipe()
for _ in range(8):
    if os.fork() == 0:
        hog = bytearray(200 << 20)
        for i in range(0, len(hog), 4096):
            hog[i] = 1
        os.write(w, b"+")
        time.sleep(30)
        os._exit(0)
held = 0
while held < 8:
    held += len(os.read(r, 8))
return json.dumps({"children_holding_200MiB": held}).encode()
""")
    async with MemoryWatch() as watch:
        outcome = await run_python(sandbox, code, limits=limits)
    seen = f"cgroup rise {watch.rise >> 20} MiB"
    assert watch.rise <= bound + SLACK, (seen, outcome.result)
    assert outcome.kind is OutcomeKind.MEMORY_LIMIT, (seen, outcome)
    assert outcome.peak_memory_bytes is not None and outcome.peak_memory_bytes <= bound
    await assert_still_works(sandbox)


SYSV_SHM_BOMB = job("""
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.restype = ctypes.c_int
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
made = 0
for _ in range(40):
    shmid = libc.shmget(0, 16 << 20, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if shmid < 0:
        return json.dumps({"made": made, "errno": ctypes.get_errno()}).encode()
    addr = libc.shmat(shmid, None, 0)
    ctypes.memset(addr, 1, 16 << 20)
    libc.shmdt(ctypes.c_void_p(addr))  # unmapped: RLIMIT_AS no longer sees it
    made += 1
time.sleep(1)
return json.dumps({"made": made}).encode()
""")


async def test_sysv_shm_bomb_is_bounded(sandbox: Sandbox) -> None:
    async with MemoryWatch() as watch:
        outcome = await run_python(sandbox, SYSV_SHM_BOMB, limits=MEMORY_LIMITS)
    seen = f"cgroup rise {watch.rise >> 20} MiB, host Shmem rise {watch.shmem_rise >> 20} MiB"
    assert watch.rise <= JOB_BOUND + SLACK, (seen, outcome.result)
    assert outcome.kind is OutcomeKind.MEMORY_LIMIT, (seen, outcome)
    await assert_still_works(sandbox)


# Each child writes one line to stderr after burning 0.5 s of its own CPU, so the lines
# that reach the captured stderr count the CPU the tree really burned.
AUTO_REAPED_BURN = job("""
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for _ in range(24):
    if os.fork() == 0:
        while time.process_time() < 0.5:
            pass
        os.write(2, b"burned\\n")
        os._exit(0)
    time.sleep(0.2)
return b"done"
""")


async def test_auto_reaped_children_count_against_the_cpu_limit(sandbox: Sandbox) -> None:
    limits = dataclasses.replace(LIMITS, cpu_seconds=3, wall_seconds=60)
    outcome = await run_python(sandbox, AUTO_REAPED_BURN, limits=limits)
    burned = outcome.stderr_tail.count(b"burned") * 0.5
    assert burned <= limits.cpu_seconds + 2.0, (burned, outcome)
    assert outcome.kind is OutcomeKind.CPU_LIMIT, outcome
    await assert_still_works(sandbox)


SHARED_MEMORY_ATTEMPTS = job(
    TRY
    + """
results = {}
libc = ctypes.CDLL(None, use_errno=True)
def shmget():
    if libc.shmget(0, 1 << 20, 0o1000 | 0o600) < 0:
        raise OSError(ctypes.get_errno(), "shmget")
attempt("memfd_create", lambda: os.memfd_create("m"))
attempt("shmget", shmget)
attempt("sigchld_ignore", lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
return json.dumps(results).encode()
"""
)


async def test_without_a_cgroup_shared_memory_and_auto_reaping_are_refused(
    tmp_path: Path,
) -> None:
    sandbox = Sandbox(work_root=tmp_path / "work", use_cgroup=False)
    outcome = await run_python(sandbox, SHARED_MEMORY_ATTEMPTS)
    assert outcome.kind is OutcomeKind.OK, outcome
    results = attempts(outcome.result)
    denied = ("PermissionError:1", "OSError:38")  # EPERM or ENOSYS
    assert results["memfd_create"] in denied, results
    assert results["shmget"] in (*denied, "OSError:28"), results  # or ENOSPC (shmmni 0)
    assert results["sigchld_ignore"] in denied, results
    cgroup = next((p for p in sandbox.protections() if p.name == "cgroup"), None)
    assert cgroup is not None and cgroup.status == "unavailable", cgroup
    assert "only per process" in cgroup.reason, cgroup
    await assert_still_works(sandbox)


def _job_cgroup_dirs() -> list[Path]:
    """Every job cgroup directory below this process's cgroups, over all hierarchies."""
    found: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else ["unified"]:
            mount = Path("/sys/fs/cgroup") / name
            if not mount.is_dir() and name == "unified":
                mount = Path("/sys/fs/cgroup")
            found += (mount / path.lstrip("/")).glob("vcomp-job-*")
    return found


async def test_job_cgroups_are_removed_after_every_job(tmp_path: Path) -> None:
    before = _job_cgroup_dirs()
    sandbox = Sandbox(work_root=tmp_path / "work")
    cgroup = next((p for p in sandbox.protections() if p.name == "cgroup"), None)
    assert cgroup is not None, "the sandbox reports no cgroup"
    if cgroup.status != "active":
        pytest.skip(f"no cgroup on this host: {cgroup.reason}")
    await assert_still_works(sandbox)
    assert len(_job_cgroup_dirs()) > len(before)  # the prepared launcher's: the count sees them
    killed = await run_python(
        sandbox, job("while True:\n    pass"), limits=dataclasses.replace(LIMITS, cpu_seconds=1)
    )
    assert killed.kind is OutcomeKind.CPU_LIMIT, killed
    bombed = await run_python(sandbox, MEMFD_BOMB, limits=MEMORY_LIMITS)
    assert bombed.kind is OutcomeKind.MEMORY_LIMIT, bombed
    cancel = asyncio.Event()
    cancel.set()
    cancelled = await sandbox.run(
        kind="python", code=job("time.sleep(30)"), input=b"", limits=LIMITS, cancel=cancel
    )
    assert cancelled.kind is OutcomeKind.CANCELLED, cancelled
    sandbox.close()  # the prepared launcher's cgroup goes too
    broken = Sandbox(work_root=tmp_path / "broken", python="/nonexistent/python3")
    failed = await run_python(broken, job("return b''"))
    assert failed.kind is OutcomeKind.SETUP_FAILED, failed
    broken.close()
    assert _job_cgroup_dirs() == before


# --- review of issue 13: attacks on the new protections ---------------------------------

THROTTLE_PERCENT = 10


class CpuWatch:
    """Samples, from outside, the CPU the kernel counted for this process's job cgroups
    (cpuacct.usage or cpu.stat), and gives the highest rate over any WINDOW seconds.
    """

    WINDOW = 1.0

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = False

    @staticmethod
    def _usage() -> float:
        total = 0.0
        for path in _job_cgroup_dirs():
            with contextlib.suppress(OSError, ValueError):
                if (path / "cpuacct.usage").exists():
                    total += int((path / "cpuacct.usage").read_text()) / 1e9
                elif (path / "cpu.stat").exists():
                    line = (path / "cpu.stat").read_text().split("\n", 1)[0]
                    total += int(line.split()[1]) / 1e6
        return total

    async def __aenter__(self) -> CpuWatch:
        def sample() -> None:
            while not self._stop:
                self.samples.append((time.monotonic(), self._usage()))
                time.sleep(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._stop = True
        self._thread.join()

    def peak_share(self) -> float:
        peak = 0.0
        for i, (t0, u0) in enumerate(self.samples):
            later = next(((t, u) for t, u in self.samples[i:] if t - t0 >= self.WINDOW), None)
            if later is not None and later[1] >= u0:  # a cgroup that went away reads lower
                peak = max(peak, (later[1] - u0) / (later[0] - t0))
        return peak


# Twenty processes that do nothing but SIGCONT every process of the job's pid namespace:
# the regulator stops the tree one process at a time, with SIGSTOP, and each stopped
# process is continued by a sibling that has not been stopped yet.
SELF_RESUMING = job("""
kids = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                os.kill(-1, signal.SIGCONT)
            except OSError:
                pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
return b"done"
""")


async def test_job_cannot_resume_itself_out_of_throttle(tmp_path: Path) -> None:
    """Throttle mode keeps a job to ``cpu_percent`` of one core by stopping its tree
    with SIGSTOP (JobTree.suspend), and background mode suspends it the same way while
    the volunteer is busy. The job's processes may signal each other, so they undo it.
    Oracle: the CPU the kernel counted for the job's cgroup over the wall time the
    test measured, against the throttle's share (a bound on CPU, not a time).
    """
    mode = ExecutionMode(kind="throttle", cpu_percent=THROTTLE_PERCENT)
    sandbox = Sandbox(work_root=tmp_path / "work", mode=mode)
    cgroup = next((p for p in sandbox.protections() if p.name == "cgroup"), None)
    if cgroup is None or cgroup.status != "active":
        pytest.skip(f"no job cgroup to count the job's CPU from outside: {cgroup}")
    await assert_still_works(sandbox)
    # The escape is a race the job wins about four times in five: three tries.
    peaks = []
    for _ in range(3):
        async with CpuWatch() as watch:
            outcome = await sandbox.run(
                kind="python",
                code=SELF_RESUMING,
                input=b"",
                limits=dataclasses.replace(LIMITS, cpu_seconds=30, wall_seconds=120.0),
            )
        assert outcome.kind is OutcomeKind.OK, outcome
        peaks.append(watch.peak_share())
        print(
            f"\nthrottle {THROTTLE_PERCENT}%: the job burned {outcome.cpu_seconds:.2f} CPU s, "
            f"at most {peaks[-1]:.0%} of a core over any {CpuWatch.WINDOW} s"
        )
        if peaks[-1] > 3 * THROTTLE_PERCENT / 100:
            break
    assert max(peaks) <= 3 * THROTTLE_PERCENT / 100, peaks
    await assert_still_works(sandbox)


# One byte to stdout and one to stderr per wake-up, 15 us apart: each byte arrives on its
# own, so the agent pays one event-loop round per byte. No PROGRESS frame, so the pause
# of finding 7 never starts; the 900,000 bytes stay under log_bytes.
LOG_DRIBBLE_C = r"""
#include <time.h>
#include <unistd.h>
#include <sys/prctl.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}
int main(void) {
    prctl(PR_SET_TIMERSLACK, 1);
    struct timespec gap = {0, 15000};
    double end = now() + 3.0;
    for (long n = 0; now() < end && n < 900000; n++) {
        write(1, "x", 1);
        write(2, "x", 1);
        nanosleep(&gap, 0);
    }
    return 0;
}
"""


async def test_log_dribble_costs_the_agent_little(tmp_path: Path) -> None:
    """Finding 7's bound, by the other pipes: the agent reads stdout and stderr (and a
    frame that never completes) as eagerly as it can, one event-loop round per read.
    Oracle: this process's own CPU (it owns the Sandbox), as a share of the job's wall
    time, in background mode where the job itself only gets idle CPU.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed; cannot build the dribbling job")
    source = tmp_path / "dribble.c"
    source.write_text(LOG_DRIBBLE_C)
    binary = tmp_path / "dribble"
    subprocess.run([gcc, "-O2", "-static", "-o", str(binary), str(source)], check=True)
    mode = ExecutionMode(kind="background", busy_threshold=1.0)
    sandbox = Sandbox(work_root=tmp_path / "work", mode=mode)
    await assert_still_works(sandbox)
    before = own_cpu_seconds()
    outcome = await sandbox.run(
        kind="exec",
        code=binary.read_bytes(),
        input=b"",
        limits=dataclasses.replace(LIMITS, wall_seconds=30.0),
    )
    agent_cpu = own_cpu_seconds() - before
    share = agent_cpu / outcome.wall_seconds
    print(
        f"\nlog dribble: agent {agent_cpu:.2f} s CPU over {outcome.wall_seconds:.2f} s = "
        f"{share:.0%}; job {outcome.cpu_seconds:.2f} s CPU"
    )
    assert outcome.kind is OutcomeKind.PROTOCOL_VIOLATION, outcome  # it never sent a RESULT
    assert share <= FLOOD_CPU_SHARE, (agent_cpu, outcome.wall_seconds)
    await assert_still_works(sandbox)


# Kernel buffers that no address space holds: queued in the kernel on the job's behalf.
KERNEL_BUFFER_BOMBS = {
    "unix_socket_buffers": """
held = 0
socks = []
while True:
    try:
        a, b = socket.socketpair()
    except OSError:
        break
    socks += [a, b]
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
        s.setblocking(False)
        try:
            while True:
                held += s.send(b"x" * 65536)
        except OSError:
            pass
""",
    "pipe_buffers": """
import fcntl
held = 0
pipes = []
while True:
    try:
        r, w = os.pipe()
    except OSError:
        break
    pipes.append((r, w))
    try:
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
    except OSError:
        pass
    os.set_blocking(w, False)
    try:
        while True:
            held += os.write(w, b"x" * 65536)
    except OSError:
        pass
""",
    "sysv_message_queues": """
libc = ctypes.CDLL(None, use_errno=True)
class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 8000)]
msg = Msg(1, b"x" * 8000)
held = 0
for _ in range(32000):
    qid = libc.msgget(0, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    if qid < 0:
        break
    for _ in range(2):
        if libc.msgsnd(qid, ctypes.byref(msg), 8000, 0o4000) < 0:  # IPC_NOWAIT
            break
        held += 8000
""",
}


@pytest.mark.parametrize("bomb", list(KERNEL_BUFFER_BOMBS))
async def test_kernel_buffers_are_charged_to_the_job(sandbox: Sandbox, bomb: str) -> None:
    """Review of finding 1 (held): memory the kernel queues for the job (socket and pipe
    buffers, SysV messages) is outside every RLIMIT_AS; 8 processes fill all they can.
    Oracle: the memory charged to this test's cgroup.
    """
    code = job(
        """
r, w = os.pipe()
for _ in range(8):
    if os.fork() == 0:
        fill()
        os.write(w, b"+")
        time.sleep(30)
        os._exit(0)
done = 0
while done < 8:
    done += len(os.read(r, 8))
return b"held"
""".replace(
            "r, w = os.pipe()",
            "def fill():\n"
            + "\n".join("    " + line for line in KERNEL_BUFFER_BOMBS[bomb].strip().splitlines())
            + "\nr, w = os.pipe()",
        )
    )
    async with MemoryWatch() as watch:
        outcome = await run_python(sandbox, code, limits=MEMORY_LIMITS)
    seen = f"cgroup rise {watch.rise >> 20} MiB"
    assert watch.rise <= JOB_BOUND + SLACK, (seen, outcome.result)
    # Pipes may stop first at the host's per-user pipe budget (pipe-user-pages-soft).
    assert outcome.kind in (OutcomeKind.MEMORY_LIMIT, OutcomeKind.OK), (seen, outcome)
    await assert_still_works(sandbox)


HOST_FACTS = job("""
def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return "error " + str(exc.errno)
return json.dumps({p: read(p) for p in ("/proc/self/cgroup", "/proc/cmdline")}).encode()
""")


async def test_job_cannot_read_the_agents_pid_or_host_cgroup_and_boot_line(
    sandbox: Sandbox,
) -> None:
    """Finding 8's remainder. The job's cgroup is named after the agent's pid and sits
    under the host's own cgroup path, which /proc/self/cgroup shows in full without a
    cgroup namespace; /proc/cmdline is the host's kernel command line (like boot_id,
    which is masked, it identifies the host). Oracle: what the job read.
    """
    outcome = await run_python(sandbox, HOST_FACTS)
    assert outcome.kind is OutcomeKind.OK, outcome
    seen = json.loads(outcome.result or b"")
    own_cgroups = Path("/proc/self/cgroup").read_text()
    host_paths = {line.split(":", 2)[2] for line in own_cgroups.splitlines()} - {"/"}
    leaked = [p for p in host_paths if p in seen["/proc/self/cgroup"]]
    print(f"\njob's /proc/self/cgroup:\n{seen['/proc/self/cgroup']}")
    assert f"vcomp-job-{os.getpid()}-" not in seen["/proc/self/cgroup"], "the agent's pid"
    assert leaked == [], leaked
    assert seen["/proc/cmdline"] != Path("/proc/cmdline").read_text()


async def test_without_a_cgroup_message_queues_are_bounded(tmp_path: Path) -> None:
    """The no-cgroup fallback of finding 1 denies memfds and SysV shared memory and caps
    the IPC namespace's shm limits, but SysV messages are the same kind of memory (held
    by the kernel, in no address space) and a fresh IPC namespace allows msgmni 32000
    queues of msgmnb 16 KiB: 500 MiB per job, whatever memory_bytes says. Oracle: the
    memory charged to this test's cgroup, where the job is charged without its own.
    """
    sandbox = Sandbox(work_root=tmp_path / "work", use_cgroup=False)
    code = job(
        "def fill():\n"
        + KERNEL_BUFFER_BOMBS["sysv_message_queues"].replace("\n", "\n    ")
        + "\nfill()\ntime.sleep(1)\nreturn b'held'"
    )
    async with MemoryWatch() as watch:
        outcome = await run_python(sandbox, code, limits=MEMORY_LIMITS)
    seen = f"cgroup rise {watch.rise >> 20} MiB, outcome {outcome.kind}"
    print("\n" + seen)
    assert watch.rise <= JOB_BOUND + SLACK, seen
    await assert_still_works(sandbox)


# Children that keep forking busy grandchildren and SIGCONT everything they can reach:
# a hold (the volunteer's pause, battery, schedule) must stop them all the same.
HOLD_BREAKER = job("""
kids = []
for _ in range(16):
    try:
        pid = os.fork()
    except OSError:  # the process limit: the children already running will do
        continue
    if pid == 0:
        end = time.monotonic() + 8.0
        while time.monotonic() < end:
            try:
                os.kill(-1, signal.SIGCONT)
                if os.fork() == 0:
                    x = 0
                    for i in range(200000):
                        x += i
                    os._exit(0)
                os.waitpid(-1, os.WNOHANG)
            except OSError:
                pass
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
return b"done"
""")


@pytest.mark.parametrize("use_cgroup", [True, False], ids=["freezer", "sigstop"])
async def test_job_cannot_run_while_held(tmp_path: Path, use_cgroup: bool) -> None:
    """A job that forks and SIGCONTs without pause is held still, by the cgroup freezer
    or, without a cgroup, by SIGSTOP of the whole tree (seccomp denies the job SIGCONT):
    the CPU its tree used over a held interval stays near zero, and it still finishes
    once released."""
    from vcomp.agent.sandbox.hold import Hold, JobControl

    sandbox = Sandbox(
        work_root=tmp_path / "work", mode=ExecutionMode(kind="full"), use_cgroup=use_cgroup
    )
    hold = Hold()
    control = JobControl(hold)
    task = asyncio.ensure_future(
        sandbox.run(
            kind="python",
            code=HOLD_BREAKER,
            input=b"",
            limits=dataclasses.replace(LIMITS, cpu_seconds=60, wall_seconds=60.0),
            control=control,
        )
    )
    deadline = time.monotonic() + 60
    while control.cpu_seconds() < 0.3:
        assert time.monotonic() < deadline and not task.done(), "the job never ran"
        await asyncio.sleep(0.02)
    hold.set("pause", "held by the test")
    await asyncio.sleep(0.5)
    before = control.cpu_seconds()
    await asyncio.sleep(2.0)
    during = control.cpu_seconds() - before
    hold.clear("pause")
    outcome = await task
    print(f"\nheld job ({use_cgroup=}): {during:.3f} CPU s over 2 s held; then {outcome.kind}")
    assert during < 0.1, f"the held job used {during:.3f} CPU-seconds"
    assert outcome.kind is OutcomeKind.OK, outcome
    await assert_still_works(sandbox)
    sandbox.close()


# --- checkpoints (issue 11) -------------------------------------------------------------


async def test_checkpoint_flood_costs_the_agent_one_file_and_few_writes(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """A job writes 256 checkpoints of 1 MiB as fast as it can: the agent's spool ends
    with one file of at most 1 MiB, written a few times, not 256 MiB or 256 fsyncs."""
    from vcomp.agent.checkpoints import JobCheckpoints
    from vcomp.agent.spool import ResultSpool
    from vcomp.agent.tpm import SimulatedTpm

    spool = ResultSpool(tmp_path / "spool", SimulatedTpm.open(tmp_path / "tpm"))
    jc = JobCheckpoints(spool, 1, 1, b"\0" * 32, max_bytes=1 << 20)
    flood = (
        b"from vcomp.guest import checkpoint, run\n"
        b"def handler(data, progress):\n"
        b"    for i in range(256):\n"
        b"        checkpoint(i.to_bytes(4, 'big') * (1 << 18))\n"
        b"    return b'done'\n"
        b"run(handler)\n"
    )
    outcome = await sandbox.run(
        kind="python", code=flood, input=b"", limits=LIMITS, checkpoints=jc.sandbox_side(None)
    )
    await jc.close()
    assert outcome.kind is OutcomeKind.OK, outcome
    assert jc.received == 256
    assert jc.written <= 256 // 8  # one write a second at most
    files = [p for p in spool.directory.iterdir() if p.name.endswith(".checkpoint")]
    assert len(files) == 1 and files[0].stat().st_size <= (1 << 20) + 28
    await assert_still_works(sandbox)


async def test_oversized_checkpoint_is_refused_from_its_header(sandbox: Sandbox) -> None:
    """A CHECKPOINT declaring 4 GiB ends the job (output_too_large); nothing is kept."""
    from vcomp.agent.sandbox import Checkpointing

    kept: list[bytes] = []
    code = job(
        """
        os.write(4, b"\\x05\\xff\\xff\\xff\\xff" + b"x" * 65536)
        time.sleep(30)
        return b""
        """
    )
    outcome = await sandbox.run(
        kind="python",
        code=code,
        input=b"",
        limits=SHORT,
        checkpoints=Checkpointing(on_checkpoint=kept.append, max_bytes=1 << 20),
    )
    assert outcome.kind is OutcomeKind.OUTPUT_TOO_LARGE, outcome
    assert kept == []
    await assert_still_works(sandbox)

"""Two network namespaces joined by a veth pair, with real kernel link faults.

Used by the netns tests (``tests/netns``) and the impaired-link benchmark
(``bench/bench_impaired.py``, through ``bench/netns.py``). Stdlib only.

Side "a" (10.213.0.1/30) hosts the server, side "b" (10.213.0.2/30) the agents.
Every name carries the creating process's pid and a random token, so parallel
runs do not clash, and :func:`sweep_stale` can remove what a killed run left.

Faults come from the kernel, never from a user-space relay:

* :meth:`NetnsPair.netem` - ``tc netem`` (delay, jitter, loss, duplication,
  reordering), when the kernel has ``sch_netem``;
* :meth:`NetnsPair.emulate_faults` - a fallback for kernels without netem built
  from ``u32`` filters, ``mirred`` and an ``ifb`` behind ``tbf``: loss,
  duplication and reordering of packets picked by pseudo-random bytes (no
  fixed delay or jitter is possible this way);
* :meth:`NetnsPair.shape` - a ``tbf`` rate limit;
* :meth:`NetnsPair.set_link` - ``ip link set ... down|up``, a cut.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gzip
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "A_ADDR",
    "B_ADDR",
    "EMULATED_DUPLICATE",
    "EMULATED_LOSS",
    "EMULATED_REORDER",
    "NetnsPair",
    "Support",
    "enter",
    "probe",
    "sweep_stale",
]

A_ADDR = "10.213.0.1"
B_ADDR = "10.213.0.2"
PREFIX_LEN = 30
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 20.0
_NAME_RE = re.compile(r"vcomp-([0-9a-f]+)-[0-9a-f]+-[abm]")

# emulate_faults: offsets are from the IP header (u32 offsets). With a 20-byte IP
# header and an 8-byte UDP header the vcomp header starts at 28: byte 32 holds its
# flags (bit 0 = ENCRYPTED), bytes 42..49 the packet number. Encrypted bodies start
# at 52 and are AES-GCM output, so their bytes are uniformly random; plaintext
# handshake bodies are not, so those packets are picked by packet number instead
# (which changes on every retransmission).
_FLAGS_AT = 32
_PN_LOW_AT = 49
_BODY_AT = 52
EMULATED_LOSS = 5 / 32  # encrypted packets; handshake packets: 1/8
EMULATED_DUPLICATE = 3 / 64  # encrypted packets; handshake packets: 1/32
EMULATED_REORDER = 1 / 4  # detoured through a slower path


@dataclass(frozen=True, slots=True)
class Support:
    """What this machine allows; ``reason``/``netem_reason`` say why not."""

    usable: bool
    reason: str
    netem: bool
    netem_reason: str
    emulation: bool
    emulation_reason: str


class CommandFailed(RuntimeError):
    pass


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    if check and done.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done


def _token() -> str:
    return f"{os.getpid():x}-{secrets.token_hex(2)}"


@functools.cache
def probe() -> Support:
    """Check root, iproute2, namespaces, veth, netem and the emulation's parts, once."""
    if os.geteuid() != 0:
        return Support(False, f"needs root (euid {os.geteuid()})", False, "", False, "")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return Support(
            False, f"{' and '.join(missing)} not found: install iproute2", False, "", False, ""
        )
    sweep_stale()
    name = f"vcomp-{_token()}-a"
    try:
        _run(["ip", "netns", "add", name])
    except (CommandFailed, OSError, subprocess.TimeoutExpired) as exc:
        return Support(False, f"cannot create a network namespace: {exc}", False, "", False, "")
    try:
        ns = ["ip", "-n", name]
        try:
            _run([*ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            _run([*ns, "link", "set", "p0", "up"])
            _run([*ns, "link", "set", "p1", "up"])
        except CommandFailed as exc:
            return Support(False, f"cannot create a veth pair: {exc}", False, "", False, "")
        netem, netem_reason = _probe_netem(name)
        emulation, emulation_reason = _probe_emulation(name)
        return Support(True, "", netem, netem_reason, emulation, emulation_reason)
    finally:
        _run(["ip", "netns", "del", name], check=False)


def _probe_netem(ns: str) -> tuple[bool, str]:
    tc = ["ip", "netns", "exec", ns, "tc"]
    attempt = _run([*tc, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"], check=False)
    if attempt.returncode == 0:
        return True, ""
    why = f"tc netem: {attempt.stderr.strip()!r}{_kernel_hint('CONFIG_NET_SCH_NETEM')}"
    if shutil.which("modprobe") is None:
        return False, f"{why}; modprobe is not installed"
    loaded = _run(["modprobe", "sch_netem"], check=False)
    if loaded.returncode != 0:
        return False, f"{why}; modprobe sch_netem: {loaded.stderr.strip()!r}"
    again = _run([*tc, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"], check=False)
    if again.returncode == 0:
        return True, ""
    return False, f"tc netem after modprobe sch_netem: {again.stderr.strip()!r}"


def _kernel_hint(option: str) -> str:
    """`` (kernel: OPTION is not set)`` when /proc/config.gz says so, else ``""``."""
    try:
        with gzip.open("/proc/config.gz", "rt") as config:
            text = config.read()
    except OSError:
        return ""
    if f"# {option} is not set" in text:
        modules = "" if "CONFIG_MODULES=y" in text else ", and modules are disabled"
        return f" (kernel: {option} is not set{modules})"
    return ""


def _probe_emulation(ns: str) -> tuple[bool, str]:
    ip = ["ip", "-n", ns]
    tc = ["ip", "netns", "exec", ns, "tc"]
    match = ["match", "u8", "0", "1", "at", "52"]
    act = ["action", "mirred", "egress", "redirect", "dev", "f0"]
    tbf = ["rate", "1mbit", "burst", "4kb", "latency", "100ms"]
    steps = [
        [*ip, "link", "add", "f0", "type", "ifb"],
        [*tc, "qdisc", "add", "dev", "f0", "root", "tbf", *tbf],
        [*tc, "qdisc", "add", "dev", "p1", "clsact"],
        [*tc, "filter", "add", "dev", "p1", "egress", "protocol", "ip", "u32", *match, *act],
    ]
    for argv in steps:
        done = _run(argv, check=False)
        if done.returncode != 0:
            return False, f"{' '.join(argv)}: {done.stderr.strip()!r}"
    return True, ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces named by this module whose creating process is gone.

    A namespace that still has processes inside is left alone (and visible).
    """
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in NETNS_DIR.iterdir():
        match = _NAME_RE.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1), 16)):
            continue
        if _run(["ip", "netns", "pids", entry.name], check=False).stdout.strip():
            continue
        _run(["ip", "netns", "del", entry.name], check=False)
        removed.append(entry.name)
    return removed


def enter(ns: str) -> None:
    """Move the calling thread (call it before starting others) into namespace ``ns``."""
    fd = os.open(NETNS_DIR / ns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({ns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetnsPair:
    """Namespaces ``ns["a"]`` and ``ns["b"]`` joined by veths ``dev["a"]``/``dev["b"]``.

    Use as a context manager; :meth:`close` kills what still runs inside them
    (only processes this test run started there) and deletes both namespaces,
    which also destroys every device created in them.
    """

    def __init__(self) -> None:
        token = _token()
        compact = token.replace("-", "")
        self.ns = {"a": f"vcomp-{token}-a", "b": f"vcomp-{token}-b"}
        self.dev = {"a": f"vc{compact}a", "b": f"vc{compact}b"}
        self.addr = {"a": A_ADDR, "b": B_ADDR}
        self._extra = {"a": f"vc{compact}x", "b": f"vc{compact}y"}
        self._created: list[str] = []

    # ---- lifecycle ----------------------------------------------------------

    def __enter__(self) -> NetnsPair:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        for side in "ab":
            _run(["ip", "netns", "add", self.ns[side]])
            self._created.append(self.ns[side])
        peer = ["peer", "name", self.dev["b"], "netns", self.ns["b"]]
        _run(["ip", "-n", self.ns["a"], "link", "add", self.dev["a"], "type", "veth", *peer])
        for side in "ab":
            ip = ["ip", "-n", self.ns[side]]
            _run([*ip, "addr", "add", f"{self.addr[side]}/{PREFIX_LEN}", "dev", self.dev[side]])
            _run([*ip, "link", "set", "lo", "up"])
            _run([*ip, "link", "set", self.dev[side], "up"])

    def close(self) -> None:
        for ns in self._created:
            self.kill_all(ns)
        for ns in self._created:
            _run(["ip", "netns", "del", ns], check=False)
        self._created.clear()

    def kill_all(self, ns: str) -> None:
        """SIGKILL every process still inside ``ns`` (started there by this run)."""
        done = _run(["ip", "netns", "pids", ns], check=False)
        for word in done.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(word), signal.SIGKILL)

    # ---- running things inside ----------------------------------------------

    def argv(self, side: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[side], *argv]

    def run(self, side: str, argv: Sequence[str], *, check: bool = True) -> str:
        return _run(self.argv(side, argv), check=check).stdout

    def tc(self, side: str, *args: str, check: bool = True) -> str:
        return self.run(side, ["tc", *args], check=check)

    # ---- faults ---------------------------------------------------------------

    def netem(self, side: str, spec: Sequence[str]) -> None:
        """``tc qdisc replace dev <veth> root netem <spec>`` on ``side`` (its egress)."""
        self.tc(side, "qdisc", "replace", "dev", self.dev[side], "root", "netem", *spec)

    def shape(self, side: str, rate: str, *, burst: str = "32kb", latency: str = "2s") -> None:
        """Rate-limit ``side``'s egress with ``tbf`` (a long queue: it delays, not drops)."""
        self.tc(
            side, "qdisc", "replace", "dev", self.dev[side], "root", "tbf",
            "rate", rate, "burst", burst, "latency", latency,
        )  # fmt: skip

    def clear(self, side: str) -> None:
        self.tc(side, "qdisc", "del", "dev", self.dev[side], "root", check=False)
        self.tc(side, "qdisc", "del", "dev", self.dev[side], "clsact", check=False)

    def set_link(self, up: bool, sides: str = "ab") -> None:
        for side in sides:
            state = "up" if up else "down"
            _run(["ip", "-n", self.ns[side], "link", "set", self.dev[side], state])

    def qdisc_stats(self, side: str) -> str:
        return self.tc(side, "-s", "qdisc", "show", "dev", self.dev[side], check=False)

    def filter_stats(self, side: str) -> str:
        return self.tc(side, "-s", "filter", "show", "dev", self.dev[side], "egress", check=False)

    def emulate_faults(self, *, slow_rate: str = "40mbit") -> None:
        """Loss, duplication and reordering on both egresses without netem.

        Picks UDP packets by bytes that are random for encrypted vcomp packets
        (or by packet number for handshake packets) and, per packet, either
        drops it (redirect to an ifb that is down), duplicates it (mirror into a
        second veth pair whose ends carry the real ends' MAC addresses, so the
        copy is received like the original) or detours it through an ifb behind
        a ``tbf`` at ``slow_rate`` (it falls behind the packets sent after it
        whenever the link is busy, and is dropped if that queue overflows). Fractions:
        :data:`EMULATED_LOSS` and friends.
        """
        dup = self._extra
        peer = ["peer", "name", dup["b"], "netns", self.ns["b"]]
        _run(["ip", "-n", self.ns["a"], "link", "add", dup["a"], "type", "veth", *peer])
        for side in "ab":
            ip = ["ip", "-n", self.ns[side]]
            shown = json.loads(_run([*ip, "-j", "link", "show", "dev", self.dev[side]]).stdout)
            mac = shown[0]["address"]
            _run([*ip, "link", "set", dup[side], "address", mac])
            _run([*ip, "link", "set", dup[side], "up"])
            # The copies arrive on an interface without an address and with a
            # different route back: accept them (weak host model, no rp_filter).
            for conf in ("all", dup[side]):
                knob = f"/proc/sys/net/ipv4/conf/{conf}/rp_filter"
                self.run(side, ["sh", "-c", f"echo 0 > {knob}"])
            drop, slow = f"{dup[side]}d", f"{dup[side]}s"
            _run([*ip, "link", "add", drop, "type", "ifb"])  # left down: mirred drops
            _run([*ip, "link", "add", slow, "type", "ifb"])
            _run([*ip, "link", "set", slow, "up"])
            self.tc(
                side, "qdisc", "add", "dev", slow, "root", "tbf",
                "rate", slow_rate, "burst", "16kb", "latency", "1s",
            )  # fmt: skip
            self.tc(side, "qdisc", "replace", "dev", self.dev[side], "clsact")
            self._emulation_filters(side, drop=drop, copy=dup[side], slow=slow)

    def _emulation_filters(self, side: str, *, drop: str, copy: str, slow: str) -> None:
        enc, plain = ("1", "1"), ("0", "1")  # (value, mask) of the ENCRYPTED flag
        redirect_drop = ["action", "mirred", "egress", "redirect", "dev", drop]
        mirror = ["action", "mirred", "egress", "mirror", "dev", copy]
        redirect_slow = ["action", "mirred", "egress", "redirect", "dev", slow]
        rules: list[tuple[tuple[str, str], int, str, str, list[str]]] = [
            # (flag, offset, value, mask, action): first match wins, in this order.
            (enc, _BODY_AT, "0x00", "0x07", redirect_drop),  # 1/8
            (enc, _BODY_AT, "0x01", "0x1f", redirect_drop),  # 1/32
            (plain, _PN_LOW_AT, "0x05", "0x07", redirect_drop),  # 1/8
            (enc, _BODY_AT + 1, "0x02", "0x1f", mirror),  # 1/32
            (enc, _BODY_AT + 1, "0x23", "0x3f", mirror),  # 1/64
            (plain, _PN_LOW_AT, "0x11", "0x1f", mirror),  # 1/32
            (enc, _BODY_AT + 2, "0x00", "0x03", redirect_slow),  # 1/4
            (plain, _PN_LOW_AT, "0x02", "0x03", redirect_slow),  # 1/4
        ]
        for pref, (flag, offset, value, mask, action) in enumerate(rules, start=10):
            self.tc(
                side, "filter", "add", "dev", self.dev[side], "egress", "pref", str(pref),
                "protocol", "ip", "u32", "match", "ip", "protocol", "17", "0xff",
                "match", "u8", flag[0], flag[1], "at", str(_FLAGS_AT),
                "match", "u8", value, mask, "at", str(offset), *action,
            )  # fmt: skip

    def emulation_counts(self, side: str) -> dict[str, int]:
        """Packets each emulated fault hit on ``side``'s egress so far."""
        copy = self._extra[side]
        kinds = {f"{copy}d": "dropped", copy: "duplicated", f"{copy}s": "detoured"}
        counts = dict.fromkeys(kinds.values(), 0)
        kind = None
        for line in self.filter_stats(side).splitlines():
            target = re.search(r"mirred \(Egress \w+ to device (\S+)\)", line)
            if target:
                kind = kinds.get(target.group(1))
            sent = re.search(r"Sent \d+ bytes (\d+) pkt", line)
            if sent and kind is not None:
                counts[kind] += int(sent.group(1))
                kind = None
        return counts

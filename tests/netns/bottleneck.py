"""A bottleneck path: namespaces a (server) and b (agents) with a router m between them.

    a [A_ADDR] --veth-- m --veth-- [10.213.0.5] b

In m, policy routing sends every packet that arrives from a or b into a TUN device
held by :mod:`tests.netns.delayline` (the RTT, jitter and random loss); what the
delay line writes back is forwarded on, and leaves m through a ``tbf`` on each
egress (the rate limit and its queue). So a packet from a to b takes: delay line,
then m's queue towards b. Built from what this kernel has (veth, tun, tbf,
policy routing) because ``sch_netem`` is not built in.

Quacks like :class:`~tests.netns.nslib.NetnsPair` where the cluster helpers need it
(``ns``, ``addr``, ``argv``, ``run``, ``kill_all``), so a vcomp deployment runs
across it unchanged. Stdlib only, like nslib, so ``bench/`` can use it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.netns.nslib import A_ADDR, NetnsPair, _run

M_A_ADDR = "10.213.0.2"
B_SIDE_ADDR = "10.213.0.5"
M_B_ADDR = "10.213.0.6"
PREFIX_LEN = 30
ROUTE_TABLE = "100"
DELAYLINE = Path(__file__).with_name("delayline.py")
HOSTS_PREFIX = "10.214.0.0/16"  # source addresses of Bottleneck.many_hosts
MAX_HOSTS = 250 * 250
READY_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class PathSpec:
    """The path: ``rate`` (tc syntax; None: no limit) each way, ``rtt_ms`` round trip,
    a queue of ``queue_bytes`` per direction, ``jitter_ms`` and ``loss`` per one-way pass."""

    rate: str | None = "20mbit"
    rtt_ms: float = 40.0
    queue_bytes: int = 100_000
    jitter_ms: float = 0.0
    loss: float = 0.0
    seed: int = 1


class Bottleneck(NetnsPair):
    """Use as a context manager; :meth:`close` stops the delay line and deletes all three
    namespaces (their devices go with them)."""

    def __init__(self, spec: PathSpec = PathSpec()) -> None:
        super().__init__()
        self.spec = spec
        base = self.ns["a"][: -len("-a")]
        self.ns["m"] = f"{base}-m"
        compact = self.dev["a"][:-1]
        # m's two veth ends and its TUN device; names stay under IFNAMSIZ (15).
        self.dev["ma"], self.dev["mb"], self.dev["tun"] = (
            f"{compact}p",
            f"{compact}q",
            f"{compact}t",
        )
        self.addr = {"a": A_ADDR, "b": B_SIDE_ADDR}
        self._delayline: subprocess.Popen[str] | None = None
        self.delayline_report = ""
        self.offloads = "on"  # GRO/GSO/TSO of the path's veths: see _offloads_off

    def create(self) -> None:
        for side in ("a", "m", "b"):
            _run(["ip", "netns", "add", self.ns[side]])
            self._created.append(self.ns[side])
        m = self.ns["m"]
        for side, m_dev, m_addr in (("a", "ma", M_A_ADDR), ("b", "mb", M_B_ADDR)):
            peer = ["peer", "name", self.dev[m_dev], "netns", m]
            _run(["ip", "-n", self.ns[side], "link", "add", self.dev[side], "type", "veth", *peer])
            ip = ["ip", "-n", self.ns[side]]
            _run([*ip, "addr", "add", f"{self.addr[side]}/{PREFIX_LEN}", "dev", self.dev[side]])
            _run([*ip, "link", "set", "lo", "up"])
            _run([*ip, "link", "set", self.dev[side], "up"])
            _run([*ip, "route", "add", "default", "via", m_addr])
            _run(["ip", "-n", m, "addr", "add", f"{m_addr}/{PREFIX_LEN}", "dev", self.dev[m_dev]])
            _run(["ip", "-n", m, "link", "set", self.dev[m_dev], "up"])
        self._offloads_off()
        self._start_delayline()
        self._route_through_delayline()
        if self.spec.rate is not None:
            for m_dev in ("ma", "mb"):
                self._shape(self.dev[m_dev], self.spec.rate)

    def _offloads_off(self) -> None:
        """GRO, GSO and TSO off on every veth of the path, so each packet crosses the
        delay line and the queues as itself, as on a real link (TSO would hand the path
        64 KB TCP super-packets). Without ethtool they stay on: :attr:`offloads` says so
        (the TUN device segments them anyway: the delay line's ``largest`` shows it)."""
        if shutil.which("ethtool") is None:
            self.offloads = "on (ethtool not installed)"
            return
        for side, dev in (("a", "a"), ("m", "ma"), ("m", "mb"), ("b", "b")):
            off = ["gro", "off", "gso", "off", "tso", "off"]
            self.run(side, ["ethtool", "-K", self.dev[dev], *off])
        self.offloads = "off"

    def _start_delayline(self) -> None:
        spec = self.spec
        argv = [
            sys.executable, str(DELAYLINE), "--dev", self.dev["tun"],
            "--delay-ms", str(spec.rtt_ms / 2), "--jitter-ms", str(spec.jitter_ms / 2),
            "--loss", str(spec.loss), "--seed", str(spec.seed),
        ]  # fmt: skip
        self._delayline = subprocess.Popen(
            self.argv("m", argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self._delayline.stdout is not None
        first = self._delayline.stdout.readline().strip()
        if first != "ready":
            self._delayline.kill()
            _, err = self._delayline.communicate(timeout=READY_TIMEOUT)
            raise RuntimeError(f"delay line did not start: {first!r} {err.strip()}")

    def _route_through_delayline(self) -> None:
        m = self.ns["m"]
        ip = ["ip", "-n", m]
        _run([*ip, "link", "set", self.dev["tun"], "up"])
        _run([*ip, "route", "add", "default", "dev", self.dev["tun"], "table", ROUTE_TABLE])
        for m_dev in ("ma", "mb"):
            _run([*ip, "rule", "add", "iif", self.dev[m_dev], "lookup", ROUTE_TABLE])
        # Packets leave the TUN device towards the veth they are addressed to by the
        # main table; the reverse-path filter would drop them (they "came" from tun).
        for conf in ("all", "default", self.dev["tun"], self.dev["ma"], self.dev["mb"]):
            self.run("m", ["sysctl", "-q", "-w", f"net.ipv4.conf.{conf}.rp_filter=0"])
        self.run("m", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    def _shape(self, dev: str, rate: str) -> None:
        self.tc(
            "m", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
            "burst", "4500", "limit", str(self.spec.queue_bytes),
        )  # fmt: skip

    def many_hosts(self, count: int) -> None:
        """Make namespace b look like ``count`` hosts to the server: each new UDP flow
        (a socket's address pair) from b to a leaves with the next of ``count`` source
        addresses, round robin (nftables SNAT; conntrack maps the replies back), and m
        routes those addresses to b. One process's many agents then pass per-address
        limits as many machines would. Needs ``nft``."""
        if not 0 < count <= MAX_HOSTS:
            raise ValueError(f"count must be 1..{MAX_HOSTS}")
        if shutil.which("nft") is None:
            raise RuntimeError("nft not installed (package nftables): cannot emulate many hosts")
        hosts = ", ".join(f"{i} : {host_address(i)}" for i in range(count))
        snat = f"snat to numgen inc mod {count} map {{ {hosts} }}"
        rules = f"""
            table ip hosts {{
                chain out {{
                    type nat hook postrouting priority srcnat; policy accept;
                    ip daddr {self.addr["a"]} meta l4proto udp {snat}
                }}
            }}
        """
        subprocess.run(
            self.argv("b", ["nft", "-f", "-"]), input=rules, text=True, check=True,
            capture_output=True,
        )  # fmt: skip
        self.run("m", ["ip", "route", "add", HOSTS_PREFIX, "via", B_SIDE_ADDR])

    def close(self) -> None:
        line, self._delayline = self._delayline, None
        if line is not None:
            with contextlib.suppress(ProcessLookupError):
                line.terminate()
            try:
                out, _ = line.communicate(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                line.kill()
                out, _ = line.communicate()
            self.delayline_report = out.strip()
        super().close()

    def delayline_counts(self) -> dict[str, int]:
        """``passed``, ``dropped`` and ``largest`` (bytes) as the delay line reported
        them at :meth:`close`."""
        words = self.delayline_report.split()
        return {k: int(v) for k, v in (w.split("=", 1) for w in words if "=" in w)}

    def queue_drops(self) -> dict[str, int]:
        """Packets each of m's ``tbf`` queues dropped so far (towards a, towards b)."""
        return {side: counts["dropped"] for side, counts in self.queue_counts().items()}

    def queue_counts(self) -> dict[str, dict[str, int]]:
        """What each of m's ``tbf`` queues did so far (towards a, towards b): ``bytes``
        and ``packets`` it sent on, ``dropped`` packets."""
        counts = {}
        for side, m_dev in (("a", "ma"), ("b", "mb")):
            text = self.tc("m", "-s", "qdisc", "show", "dev", self.dev[m_dev])
            counts[side] = tc_queue_counts(text)
        return counts


TCP_COUNTERS = ("TcpOutSegs", "TcpRetransSegs", "TcpExtTCPTimeouts", "TcpExtTCPLossProbes")


def tcp_counters(path: NetnsPair, side: str) -> dict[str, int]:
    """The kernel's TCP counters of one namespace (``nstat``; absolute, history untouched)."""
    out = path.run(side, ["nstat", "-asz", *TCP_COUNTERS])
    words = [line.split() for line in out.splitlines() if not line.startswith("#")]
    return {w[0]: int(w[1]) for w in words if len(w) >= 2}


def host_address(i: int) -> str:
    """The i-th source address of :meth:`Bottleneck.many_hosts` (10.214.0.1, ...)."""
    return f"10.214.{i // 250}.{i % 250 + 1}"


def tc_queue_counts(tc_stats: str) -> dict[str, int]:
    """`` Sent 8771710 bytes 5803 pkt (dropped 151, overlimits ...`` -> the three numbers."""
    for line in tc_stats.splitlines():
        words = line.replace("(", " ").replace(",", " ").split()
        if words[:1] == ["Sent"] and "dropped" in words:
            return {
                "bytes": int(words[1]),
                "packets": int(words[3]),
                "dropped": int(words[words.index("dropped") + 1]),
            }
    return {"bytes": 0, "packets": 0, "dropped": 0}

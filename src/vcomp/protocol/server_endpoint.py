"""The server's front door: stateless cookies, the session table and timers.

One :class:`ServerEndpoint` serves every agent on one UDP socket. Before an
agent proves its address by echoing a cookie, the endpoint keeps nothing and
does no public-key work, and it answers each HELLO (itself padded to at least
1200 bytes) with one smaller datagram, so it cannot be used to amplify.

One enrolled key may hold at most ``max_sessions_per_agent`` verified sessions.
The check runs at HELLO (cheap, on the claimed id) and again just before the
ATTEST is verified, so an agent over its cap costs no public-key work; only
verified sessions count, so no one can use up another agent's allowance by
claiming its id.

A HELLO whose claimed agent id is not enrolled (a dict lookup) gets REJECT
ATTESTATION_FAILED ``unknown_key`` once its cookie is valid, and no session.
Handshakes still waiting for their ATTEST (half-open) are capped on their own, per
source IP address and server-wide (``max_pending_handshakes``), and do not count as
sessions: half-open handshakes never make the server refuse an honest agent "server
full", and never count against the claimed id's per-agent cap.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, deque
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp.errors import DecodeError
from vcomp.protocol import events as ev
from vcomp.protocol import limits
from vcomp.protocol.attestation import MAX_OUTSTANDING_NONCES, NonceBook
from vcomp.protocol.congestion import make_controller
from vcomp.protocol.cookie import CookieJar
from vcomp.protocol.messages import ErrorCode, Hello, Reject, Retry, decode_body, encode_body
from vcomp.protocol.server_session import ServerSession, ServerState
from vcomp.protocol.trust import TrustPolicy
from vcomp.protocol.wire import (
    HEADER_LEN,
    VERSION,
    Flag,
    PacketType,
    check_protection,
    pack_header,
    unpack_header,
)

Address = tuple[str, int]
# REJECT reasons are single tokens (PROTOCOL.md section 6.1): agents act on them by
# exact comparison, so no free text goes with them.
UNSUPPORTED_VERSION = "unsupported_version"
"""REJECT reason (code UNSUPPORTED_VERSION) for a HELLO whose ``versions`` lacks ours."""
SERVER_FULL = "server_full"
"""REJECT reason (code BUSY) when the established sessions are at the server's cap."""
TOO_MANY_SESSIONS = "too_many_sessions"
"""REJECT reason (code BUSY) for an agent at its concurrent-session cap."""
TOO_MANY_HANDSHAKES = "too_many_handshakes"
"""REJECT reason (code BUSY) when the half-open handshake caps are reached."""
UNKNOWN_KEY = "unknown_key"
"""REJECT reason (code ATTESTATION_FAILED) for a HELLO from an agent id not enrolled."""
PENDING_PER_ADDRESS = 16
"""Half-open handshakes one source IP address may have at once."""
CodeSource = Callable[[int, int, int, int], bytes]
"""(job, attempt, offset, length) -> that slice of code || input.

The application reads it from its store; the endpoint asks only for what the
window can take, so a job is never held in memory whole.
"""


class ServerEndpoint:
    def __init__(
        self,
        *,
        signing_key: Ed25519PrivateKey,
        trust: TrustPolicy,
        code_source: CodeSource,
        now: float,
        window: int = 64,
        max_sessions: int = 100_000,
        max_sessions_per_agent: int = 100_000,
        max_pending_handshakes: int = 1024,
        max_pending_per_address: int = PENDING_PER_ADDRESS,
        idle_timeout: float = limits.IDLE_TIMEOUT,
        random_bytes: Callable[[int], bytes] = os.urandom,
        congestion: str = "newreno",
    ) -> None:
        self._signing_key = signing_key
        self._trust = trust
        self._code_source = code_source
        self._window = window
        self._max_sessions = max_sessions
        self._max_per_agent = max_sessions_per_agent
        self._verified: dict[int, bytes] = {}  # session id -> agent id, once its quote verified
        self._per_agent: Counter[bytes] = Counter()
        self._max_pending = max_pending_handshakes
        self._max_pending_per_address = max_pending_per_address
        self._half_open: dict[int, str] = {}  # session id -> source IP, until verified
        self._half_open_per_ip: Counter[str] = Counter()
        self._idle_timeout = idle_timeout
        make_controller(congestion)  # refuse an unknown name at start-up
        self._congestion = congestion
        self._random = random_bytes
        self._cookies = CookieJar(now, random_bytes=random_bytes)
        # One nonce per half-open handshake: bounded by those, not by sessions, so a
        # small server never evicts the nonce of a handshake it still waits for.
        self._nonces = NonceBook(
            max_outstanding=max(MAX_OUTSTANDING_NONCES, max_pending_handshakes)
        )
        self.sessions: dict[int, ServerSession] = {}
        self._pending: dict[tuple[Address, bytes], int] = {}
        self._pending_key: dict[int, tuple[Address, bytes]] = {}
        self._events: deque[ev.Event] = deque()
        self._out: deque[tuple[bytes, Address]] = deque()
        self._dirty: set[int] = set()
        self._timers: list[tuple[float, int]] = []
        self._timer_of: dict[int, float] = {}
        self.counters: Counter[str] = Counter()

    # ---- input ---------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        self.counters["datagrams_in"] += 1
        try:
            header = unpack_header(data)
            check_protection(header)
        except DecodeError:
            self.counters["dropped_malformed"] += 1
            return
        if header.session_id == 0:
            if header.ptype is PacketType.HELLO and not header.flags:
                self._on_hello(data, address, now)
            else:
                self.counters["dropped_unexpected"] += 1
            return
        session = self.sessions.get(header.session_id)
        if session is None:
            self.counters["dropped_unknown_session"] += 1
            return
        if header.flags & Flag.ENCRYPTED:
            if not session.on_encrypted(header, data, address, now):
                # Forged, replayed, or for a closed session: dropped without effect.
                self.counters["dropped_unauthenticated"] += 1
                return
        elif header.ptype is PacketType.ATTEST and address == session.address:
            if session.state is ServerState.CHALLENGED and self._agent_full(session.agent_id):
                session.refuse_handshake(TOO_MANY_SESSIONS, self._cap_detail(), ErrorCode.BUSY)
            elif session.state is ServerState.CHALLENGED and self._server_full():
                session.refuse_handshake(SERVER_FULL, "no room for a session", ErrorCode.BUSY)
            else:
                before = session.public_key_ops
                session.on_attest(data, now)
                self.counters["public_key_ops"] += session.public_key_ops - before
                if session.channel is not None and session.session_id not in self._verified:
                    self._verified[session.session_id] = session.agent_id
                    self._per_agent[session.agent_id] += 1
                    self._end_half_open(session.session_id)
        else:
            self.counters["dropped_unexpected"] += 1
            return
        self._touch(session)

    def _on_hello(self, data: bytes, address: Address, now: float) -> None:
        if len(data) < limits.MIN_HELLO_DATAGRAM:
            self.counters["dropped_short_hello"] += 1
            return
        try:
            hello = decode_body(PacketType.HELLO, data[HEADER_LEN:])
        except DecodeError:
            self.counters["dropped_malformed"] += 1
            return
        assert isinstance(hello, Hello)
        if VERSION not in hello.versions:
            self.counters["rejected_version"] += 1
            self._reply(
                PacketType.REJECT,
                Reject(code=ErrorCode.UNSUPPORTED_VERSION, reason=UNSUPPORTED_VERSION),
                address,
            )
            return
        if not hello.cookie or not self._cookies.check(hello.cookie, address, hello.nonce, now):
            if hello.cookie:
                self.counters["cookie_invalid"] += 1
            self.counters["retry_sent"] += 1
            cookie = self._cookies.issue(address, hello.nonce, now)
            self._reply(PacketType.RETRY, Retry(cookie=cookie), address)
            return
        key = (address, hello.nonce)
        existing = self._pending.get(key)
        if existing is not None and existing in self.sessions:
            self.sessions[existing].resend_challenge()
            self._touch(self.sessions[existing])
            return
        if hello.agent not in self._trust.enrolled:
            # No session, no signature for an id the ATTEST could never verify.
            self.counters["rejected_unknown_agent"] += 1
            self._reply(
                PacketType.REJECT,
                Reject(code=ErrorCode.ATTESTATION_FAILED, reason=UNKNOWN_KEY),
                address,
            )
            return
        if self._agent_full(hello.agent):
            self._reply(
                PacketType.REJECT,
                Reject(code=ErrorCode.BUSY, reason=TOO_MANY_SESSIONS),
                address,
            )
            return
        if self._server_full():
            self.counters["rejected_busy"] += 1
            self._reply(PacketType.REJECT, Reject(code=ErrorCode.BUSY, reason=SERVER_FULL), address)
            return
        ip = address[0]
        if (
            len(self._half_open) >= self._max_pending
            or self._half_open_per_ip[ip] >= self._max_pending_per_address
        ):
            self.counters["rejected_handshakes"] += 1
            self._reply(
                PacketType.REJECT, Reject(code=ErrorCode.BUSY, reason=TOO_MANY_HANDSHAKES), address
            )
            return
        session_id = self._new_session_id()
        session = ServerSession(
            session_id=session_id,
            address=address,
            agent_id=hello.agent,
            hello=data,
            signing_key=self._signing_key,
            trust=self._trust,
            nonces=self._nonces,
            window=self._window,
            now=now,
            random_bytes=self._random,
            events=self._events,
            idle_timeout=self._idle_timeout,
            congestion=self._congestion,
        )
        self.sessions[session_id] = session
        self._half_open[session_id] = ip
        self._half_open_per_ip[ip] += 1
        self._pending[key] = session_id
        self._pending_key[session_id] = key
        self.counters["sessions_created"] += 1
        self._touch(session)

    def _server_full(self) -> bool:
        """Established sessions (half-open handshakes have their own caps) at the cap?"""
        return len(self.sessions) - len(self._half_open) >= self._max_sessions

    def _end_half_open(self, session_id: int) -> None:
        ip = self._half_open.pop(session_id, None)
        if ip is not None:
            self._half_open_per_ip[ip] -= 1
            if not self._half_open_per_ip[ip]:
                del self._half_open_per_ip[ip]

    def _agent_full(self, agent_id: bytes) -> bool:
        if self._per_agent[agent_id] < self._max_per_agent:
            return False
        self.counters["rejected_agent_sessions"] += 1
        return True

    def _cap_detail(self) -> str:
        return f"this agent already has {self._max_per_agent} sessions"

    def _new_session_id(self) -> int:
        while True:
            sid = int.from_bytes(self._random(8), "big")
            if sid and sid not in self.sessions:
                return sid

    def _reply(self, ptype: PacketType, message: Retry | Reject, address: Address) -> None:
        body = encode_body(message)
        self._out.append((pack_header(ptype, Flag(0), 0, 0, len(body)) + body, address))

    # ---- application API -----------------------------------------------------

    def session(self, session_id: int) -> ServerSession | None:
        return self.sessions.get(session_id)

    def touch(self, session_id: int) -> None:
        """Call after feeding a session through its own API (start_job, ...)."""
        session = self.sessions.get(session_id)
        if session is not None:
            self._touch(session)

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    # ---- timers and output ---------------------------------------------------

    def _touch(self, session: ServerSession) -> None:
        self._dirty.add(session.session_id)
        self._schedule(session)

    def _schedule(self, session: ServerSession) -> None:
        t = session.get_timer()
        sid = session.session_id
        if t is None:
            return
        current = self._timer_of.get(sid)
        if current is None or t < current:
            self._timer_of[sid] = t
            heapq.heappush(self._timers, (t, sid))

    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> None:
        due_sessions: list[ServerSession] = []
        while self._timers and self._timers[0][0] <= now:
            t, sid = heapq.heappop(self._timers)
            if self._timer_of.get(sid) != t:
                continue
            del self._timer_of[sid]
            session = self.sessions.get(sid)
            if session is not None:
                due_sessions.append(session)
        # Rescheduling waits for datagrams_to_send: some deadlines (a pending
        # ACK) only move once output has been produced.
        for session in due_sessions:
            due = session.get_timer()
            if due is not None and due <= now:
                session.handle_timer(now)
            self._dirty.add(session.session_id)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out = list(self._out)
        self._out.clear()
        for sid in list(self._dirty):
            session = self.sessions.get(sid)
            if session is None:
                continue
            self._pump(session, now)
            address = session.address
            out.extend((d, address) for d in session.datagrams_to_send(now))
            if session.state is ServerState.CLOSED:
                self._forget(session)
            else:
                self._schedule(session)
        self._dirty.clear()
        return out

    # ---- read at scrape time (/metrics) ----------------------------------------

    def retransmissions(self) -> int:
        """Packets sent again, over every session this endpoint has had."""
        live = sum(
            int(s.channel.stats["retransmissions"])
            for s in self.sessions.values()
            if s.channel is not None
        )
        return self.counters["retransmissions_closed"] + live

    def agents_connected(self) -> int:
        """Distinct agents with at least one attested session open now."""
        return len(self._per_agent)

    def sessions_open(self) -> tuple[int, int]:
        """(attested sessions, handshakes still in progress)."""
        return len(self._verified), len(self._half_open)

    def _pump(self, session: ServerSession, now: float) -> None:
        while (want := session.code_wanted()) is not None:
            job = session.current_job
            assert job is not None
            offset, length = want
            data = self._code_source(job[0], job[1], offset, length)
            if len(data) != length:
                session.close("job code is shorter than announced", ErrorCode.INTERNAL, now)
                return
            session.supply_code(data)

    def _forget(self, session: ServerSession) -> None:
        self.sessions.pop(session.session_id, None)
        self._timer_of.pop(session.session_id, None)
        self.counters["sessions_closed"] += 1
        if session.channel is not None:  # kept, so the total survives the session
            self.counters["retransmissions_closed"] += int(session.channel.stats["retransmissions"])
        self._end_half_open(session.session_id)
        agent = self._verified.pop(session.session_id, None)
        if agent is not None:
            self._per_agent[agent] -= 1
            if not self._per_agent[agent]:
                del self._per_agent[agent]
        key = self._pending_key.pop(session.session_id, None)
        if key is not None:
            self._pending.pop(key, None)

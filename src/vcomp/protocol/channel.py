"""The established session: record protection, anti-replay and reliable streams.

Both sides use one :class:`SecureChannel` once the session key exists. It turns
authenticated datagrams into in-order messages, and queued messages into
encrypted datagrams, with acknowledgements, retransmission, keepalive, idle
expiry and the RESET epoch handled here so the session machines stay small.

Everything that must arrive (stream items, RESET, the committed notices) is
retransmitted by one mechanism, :class:`~vcomp.protocol.reliability.ReliableSender`:
RESET and the notices are control frames whose delivery callbacks live here.

The data path works on trains: a stream item is encoded once, when it is queued
(its body is what the sender keeps and retransmits), and every flush seals the
packets it may send in one :meth:`~vcomp.protocol.record.RecordKey.seal_train`
call, each header completed from a per-type template. CODE is queued straight
from its fields (:meth:`SecureChannel.send_code`): no ``Code`` per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, TypeVar, cast

from vcomp.errors import (
    AuthenticationFailed,
    DecodeError,
    KeyExhausted,
    LimitExceeded,
    ReplayDetected,
    TransferFailed,
)
from vcomp.protocol import limits
from vcomp.protocol.congestion import make_controller
from vcomp.protocol.fastpath import encode_code
from vcomp.protocol.messages import (
    Ack,
    Checkpoint,
    Code,
    End,
    Error,
    Message,
    Ping,
    Pong,
    Ready,
    Reset,
    Result,
    Start,
    decode_body,
    encode_body,
    with_sequence,
)
from vcomp.protocol.record import PACKET_NUMBER_MAX, Direction, RecordKey
from vcomp.protocol.reliability import (
    GIVE_UP_AFTER,
    MAX_PROBE_TIMEOUTS,
    ReliableReceiver,
    ReliableSender,
)
from vcomp.protocol.replay import ReplayWindow
from vcomp.protocol.rtt import session_timer
from vcomp.protocol.wire import (
    HEADER_LEN,
    Flag,
    Header,
    PacketType,
    header_prefix,
    pack_header_tail,
)

TAG_LEN = 16

M = TypeVar("M", bound=Message)

# Types whose seq/epoch are always ints: the per-packet paths skip the generic checks.
_STREAM_TYPES: frozenset[type[Message]] = frozenset({Ready, Start, Code, End, Result, Checkpoint})
_SEQUENCED_TYPES: frozenset[type[Message]] = _STREAM_TYPES | {Error}
_with_sequence: Any = with_sequence  # typed per call site below
_ENCRYPTED = Flag.ENCRYPTED
_CODE = PacketType.CODE

Outgoing = tuple[PacketType, bytes]
"""A stream item as the sender keeps it: its packet type and its encoded body."""


def clip_text(text: str, max_bytes: int) -> str:
    """Shorten ``text`` so its UTF-8 form fits ``max_bytes`` (bounds are in bytes)."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    return raw[:max_bytes].decode("utf-8", "ignore")


def _ack_every(window: int) -> int:
    """Ack every packet at window 1 (stop-and-wait), fewer as the window grows.

    Out-of-order arrivals are still acked at once, so loss detection keeps
    its speed; the sender only needs a few ACKs per window to keep it open.
    """
    return 1 if window == 1 else max(2, min(8, window // 8))


def _stamp(message: M, seq: int, epoch: int) -> M:
    """A copy of a reliable message with its stream position filled in."""
    if type(message) in _SEQUENCED_TYPES:
        # Same result as replace() (which re-validates every field) for a fraction.
        fast: M = _with_sequence(message, seq, epoch)
        return fast
    stamped: M = cast(Any, replace)(message, seq=seq, epoch=epoch)
    return stamped


class SecureChannel:
    """One direction pair of an established session (see PROTOCOL.md)."""

    def __init__(
        self,
        *,
        session_id: int,
        key: bytes,
        send: Direction,
        first_packet_number: int,
        window: int,
        now: float,
        idle_timeout: float = limits.IDLE_TIMEOUT,
        keepalive: float = limits.KEEPALIVE_INTERVAL,
        max_retries: int = MAX_PROBE_TIMEOUTS,
        congestion: str = "newreno",
        give_up_after: float = GIVE_UP_AFTER,
    ) -> None:
        self.session_id = session_id
        self._key = RecordKey(key, send=send)
        # Every packet number this key may seal fits the header's u64: the per-packet
        # path packs it without a range check.
        if not 0 <= first_packet_number <= PACKET_NUMBER_MAX - self._key.packet_limit:
            raise LimitExceeded(f"first packet number {first_packet_number} is out of range")
        self._replay = ReplayWindow()
        self._next_pn = first_packet_number
        self._window = window
        self._max_retries = max_retries
        self._give_up_after = give_up_after
        self._congestion = congestion
        make_controller(congestion)  # an unknown name fails here, not at the first RESET
        self._idle_timeout = idle_timeout
        # At least three PINGs per idle period, whatever the idle timeout is.
        self._keepalive = min(keepalive, idle_timeout / 3)
        self._last_received = now
        self._last_sent = now
        self._outbox: list[bytes] = []  # handed out whole by datagrams_to_send
        # Header templates: each packet only adds its packet number and body length.
        self._prefixes = {t: header_prefix(t, _ENCRYPTED, session_id) for t in PacketType}
        self.epoch = 0
        self._pending_reset: Reset | None = None
        self._commits: dict[tuple[int, int], None] = {}  # announced, not yet acknowledged
        self._ping_token = 0
        self._ping_outstanding = False
        self.close_reason: str | None = None
        self.close_code = 0
        self._new_streams()

    def __repr__(self) -> str:
        return f"SecureChannel(session_id={self.session_id:#x}, epoch={self.epoch})"

    def _new_streams(self) -> None:
        # A RESET keeps what we learnt about the path (RTT and congestion window).
        old: ReliableSender[Outgoing] | None = getattr(self, "_sender", None)
        if old is not None:
            rtt, cc = old.rtt, old.cc
        else:
            rtt, cc = session_timer(), make_controller(self._congestion)
        self._sender: ReliableSender[Outgoing] = ReliableSender(
            window=self._window,
            rtt=rtt,
            max_retries=self._max_retries,
            congestion=cc,
            # The probe timeout stops doubling at about a second: the retry count alone
            # would end a session within seconds; give up no sooner than this.
            give_up_after=self._give_up_after,
        )
        if old is not None:
            self._sender.adopt_frames(old)  # committed notices outlive the epoch
        old_receiver: ReliableReceiver[Message] | None = getattr(self, "_receiver", None)
        self._receiver: ReliableReceiver[Message] = ReliableReceiver(
            ack_every=_ack_every(self._window)
        )
        if old_receiver is not None:
            self._receiver.adopt_acks(old_receiver)  # e.g. the ACK owed for the RESET
        self._send_seq = 0

    # ---- sending -------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        return self._send_seq

    @property
    def queue_space(self) -> int:
        return self._sender.queue_space

    @property
    def send_idle(self) -> bool:
        """Nothing queued or unacknowledged in our reliable stream."""
        return self._sender.idle and self._pending_reset is None

    @property
    def in_flight(self) -> int:
        return self._sender.in_flight

    @property
    def send_allowance(self) -> int:
        """Packets the sender may have in flight now: min(flow-control window, cwnd)."""
        sender = self._sender
        cc = sender.cc
        return min(self._window, -(-cc.cwnd // cc.max_datagram))

    @property
    def closed(self) -> bool:
        return self.close_reason is not None

    @property
    def unacknowledged_commits(self) -> int:
        """Committed entries announced to the peer and not yet acknowledged by it."""
        return len(self._commits)

    @property
    def forgeries(self) -> int:
        """Datagrams that failed authentication under this session's key."""
        return self._key.forgeries

    @property
    def queued(self) -> int:
        """Messages queued but not yet sent once."""
        return self._sender.queued

    def send_reliable(self, message: Message) -> int:
        """Queue a message whose ``seq``/``epoch`` this channel fills in.

        It is encoded now: a message too large for a datagram raises here, and
        nothing is queued.
        """
        seq = self._send_seq
        return self._push(message.ptype, encode_body(_stamp(message, seq, self.epoch)), seq)

    def send_code(self, job: int, attempt: int, offset: int, data: bytes) -> int:
        """Queue ``Code(job=job, attempt=attempt, offset=offset, data=data)`` in the
        stream, encoded from the fields (the per-chunk path: no message object)."""
        seq = self._send_seq
        return self._push(_CODE, encode_code(seq, self.epoch, job, attempt, offset, data), seq)

    def _push(self, ptype: PacketType, body: bytes, seq: int) -> int:
        pushed = self._sender.push((ptype, body))
        assert pushed == seq
        self._send_seq = seq + 1
        return seq

    def send_unreliable(self, message: Message, now: float) -> None:
        self._emit(message, now)

    def start_reset(self, reason: str, now: float) -> int:
        """Begin a new epoch: our stream restarts and RESET is sent until acked."""
        self.epoch += 1
        self._new_streams()
        reset = Reset(epoch=self.epoch, reason=clip_text(reason, limits.MAX_TEXT))
        self._pending_reset = reset
        self._sender.send_frame(reset, self._on_reset_delivery)
        self._send_frames(now)
        return self.epoch

    def _on_reset_delivery(self, reset: Reset, delivered: bool) -> None:
        if reset is not self._pending_reset:
            return  # superseded by a newer RESET
        if delivered:
            self._pending_reset = None
        else:
            self._sender.send_frame(reset, self._on_reset_delivery)

    def accept_reset(self, epoch: int) -> bool:
        """Peer side of RESET: adopt ``epoch`` once. False if it is not newer."""
        if epoch <= self.epoch:
            return False
        self.epoch = epoch
        self._new_streams()
        return True

    def _send_frames(self, now: float) -> None:
        """Send the queued control frames now, each in a datagram of its own."""
        sender = self._sender
        while (frame := sender.next_frame()) is not None:
            payload = frame.payload
            if isinstance(payload, Reset):
                pn = self._emit(payload, now)
            else:
                pn = self._send_ack(now, payload)
            sender.on_frame_sent(frame, pn, now)

    def _emit(self, message: Message, now: float) -> int:
        """Seal one message outside the stream (ACK, PING, PONG, RESET, a notice) now."""
        pn = self._next_pn
        self._next_pn = pn + 1
        body = encode_body(message)
        header = self._prefixes[message.ptype] + pack_header_tail(pn, len(body) + TAG_LEN)
        self._outbox.append(header + self._key.seal(header, pn, body))
        self._last_sent = now
        return pn

    def _send_stream(self, now: float) -> None:
        """Send every stream packet the sender allows now, sealed as one train."""
        sender = self._sender
        next_to_send, on_sent = sender.next_to_send, sender.on_sent
        prefixes = self._prefixes
        pn = first = self._next_pn
        train: list[tuple[bytes, int, bytes]] = []
        while (nxt := next_to_send(now)) is not None:
            seq, (ptype, body) = nxt
            length = len(body) + TAG_LEN
            header = prefixes[ptype] + pack_header_tail(pn, length)
            on_sent(seq, pn, now, HEADER_LEN + length)
            train.append((header, pn, body))
            pn += 1
        if pn == first:
            return
        self._next_pn = pn
        self._outbox += self._key.seal_train(train)
        self._last_sent = now

    def datagrams_to_send(self, now: float) -> list[bytes]:
        if self.close_reason is not None:
            # A closing notice may still be queued; nothing else leaves.
            out = self._outbox
            self._outbox = []
            return out
        if self._receiver.should_ack_now(now):
            self._send_ack(now)
        if self._sender.frame_queue:
            try:
                self._send_frames(now)
            except KeyExhausted:
                self._close("session key usage limit reached", 30)
                return []
        try:
            self._send_stream(now)
        except KeyExhausted:
            self._close("session key usage limit reached", 30)
            return []
        out = self._outbox
        self._outbox = []
        return out

    def _send_ack(self, now: float, committed: tuple[tuple[int, int], ...] = ()) -> int:
        ranges, delay = self._receiver.build_ack(now)
        if not ranges and not committed:
            return -1
        if not ranges:
            # An ACK must name at least one range; repeat the newest packet we saw.
            ranges = [(max(self._replay.highest, 0), max(self._replay.highest, 0))]
        return self._emit(
            Ack(
                ranges=tuple(ranges),
                delay_us=min(int(delay * 1e6), 0xFFFFFFFF),
                committed=committed,
            ),
            now,
        )

    def send_committed(self, entries: list[tuple[int, int]], now: float) -> None:
        """The final ACK: tell the agent these results are durable.

        An ACK carrying ``committed`` is ack-eliciting; each group of entries is a
        control frame, sent again in a new ACK until one that carried it is
        acknowledged, so a lost datagram cannot leave a stored result spooled on
        the agent.
        """
        fresh = [entry for entry in dict.fromkeys(entries) if entry not in self._commits]
        for entry in fresh:
            self._commits[entry] = None
        for i in range(0, len(fresh), limits.MAX_COMMITTED):
            group = tuple(fresh[i : i + limits.MAX_COMMITTED])
            self._sender.send_frame(group, self._on_commit_delivery)
        self._send_frames(now)

    def _on_commit_delivery(self, group: tuple[tuple[int, int], ...], delivered: bool) -> None:
        commits = self._commits
        if delivered:
            for entry in group:
                commits.pop(entry, None)
            return
        # Lost: send again what no other copy has delivered meanwhile.
        still = tuple(entry for entry in group if entry in commits)
        if still:
            self._sender.send_frame(still, self._on_commit_delivery)

    # ---- receiving -----------------------------------------------------------

    def receive(self, header: Header, datagram: bytes, now: float) -> list[Message] | None:
        """Authenticate one datagram; return messages for the session machine.

        Forged, replayed and stale packets are dropped silently: None means the
        datagram did not authenticate (so it must not move the peer's address).
        """
        if self.close_reason is not None:
            return None
        pn = header.packet_number
        try:
            self._replay.check(pn)
            plaintext = self._key.open(datagram[:HEADER_LEN], pn, datagram[HEADER_LEN:])
        except (ReplayDetected, AuthenticationFailed):
            return None
        except KeyExhausted:
            self._close("too many forged packets", 30)
            return None
        self._replay.update(pn)
        self._last_received = now
        self._ping_outstanding = False
        return self._accept(header.ptype, pn, plaintext, now)

    def receive_train(
        self, packets: Sequence[tuple[Header, bytes]], now: float
    ) -> list[Message] | None:
        """:meth:`receive` for a train of datagrams from one peer (a coalesced read).

        Opened in one :meth:`~vcomp.protocol.record.RecordKey.open_train` call; each
        datagram is judged alone, so a forged or replayed one is dropped and the
        rest still count. None if none of them authenticated.
        """
        if self.close_reason is not None:
            return None
        replay, check = self._replay, self._replay.check
        fresh: list[tuple[bytes, int]] = []
        kinds: list[PacketType] = []
        for header, datagram in packets:
            try:
                check(header.packet_number)  # no decryption for a replay
            except ReplayDetected:
                continue
            fresh.append((datagram, header.packet_number))
            kinds.append(header.ptype)
        try:
            plaintexts = self._key.open_train(fresh)
        except KeyExhausted:
            self._close("too many forged packets", 30)
            return None
        out: list[Message] = []
        authenticated = False
        for (_, pn), ptype, plaintext in zip(fresh, kinds, plaintexts, strict=True):
            if plaintext is None:
                continue
            try:
                check(pn)  # the same packet twice in one train
            except ReplayDetected:
                continue
            replay.update(pn)
            authenticated = True
            out += self._accept(ptype, pn, plaintext, now)
            if self.closed:
                break  # an undecodable packet ended the session
        if not authenticated:
            return None
        self._last_received = now
        self._ping_outstanding = False
        return out

    def _accept(self, ptype: PacketType, pn: int, plaintext: bytes, now: float) -> list[Message]:
        """An authenticated packet's messages for the session machine."""
        try:
            message = decode_body(ptype, plaintext)
        except DecodeError as exc:
            self._close(f"peer sent an undecodable {ptype.name}: {exc}", 1)
            return []
        return self._dispatch(pn, message, now)

    def _dispatch(self, pn: int, message: Message, now: float) -> list[Message]:
        seq: Any
        epoch: Any
        if type(message) in _STREAM_TYPES:
            # The per-data-packet path: these always carry int seq and epoch.
            stream: Any = message
            seq, epoch = stream.seq, stream.epoch
        else:
            handled = self._dispatch_other(pn, message, now)
            if handled is not None:
                return handled
            seq = getattr(message, "seq", None)
            epoch = getattr(message, "epoch", None)
            if seq is None or epoch is None:
                self._close(f"{type(message).__name__} must travel in the reliable stream", 1)
                return []
        if epoch != self.epoch:
            # A future epoch must not be acked (the peer would think it delivered).
            if epoch < self.epoch:
                self._receiver.on_packet(pn, None, None, now, ack_eliciting=False)
            return []
        self._receiver.on_packet(pn, seq, message, now)
        return self._receiver.pop()

    def _dispatch_other(self, pn: int, message: Message, now: float) -> list[Message] | None:
        """ACK, PING, PONG and RESET; None for anything that claims the stream."""
        if isinstance(message, Ack):
            self._on_ack(message, now)
            # Commit notices must be acknowledged (the sender repeats them until then).
            eliciting = bool(message.committed)
            self._receiver.on_packet(pn, None, None, now, ack_eliciting=eliciting)
            return [message] if eliciting else []
        if isinstance(message, Ping):
            self._receiver.on_packet(pn, None, None, now, ack_eliciting=False)
            self._emit(Pong(token=message.token), now)
            return []
        if isinstance(message, Pong):
            self._receiver.on_packet(pn, None, None, now, ack_eliciting=False)
            return []
        if isinstance(message, Reset):
            self._receiver.on_packet(pn, None, None, now, ack_eliciting=True)
            return [message]
        if isinstance(message, Error) and message.job is None:
            # A session ERROR is sent once and never retransmitted: act on it now,
            # even if earlier stream messages are still missing.
            self._receiver.on_packet(pn, None, None, now, ack_eliciting=False)
            return [message]
        return None

    def _on_ack(self, ack: Ack, now: float) -> None:
        # The ranges were validated when decoded; on_ack only reads them.
        self._sender.on_ack(ack.ranges, ack.delay_us / 1e6, now)

    # ---- timers --------------------------------------------------------------

    def timer(self) -> float | None:
        if self.close_reason is not None:
            return None
        # The earliest of the deadlines below (asked after every flush: no list, no min()).
        last_received = self._last_received
        deadline = last_received + self._idle_timeout
        if not self._ping_outstanding:
            last_sent = self._last_sent
            keepalive_at = (last_sent if last_sent > last_received else last_received) + (
                self._keepalive
            )
            if keepalive_at < deadline:
                deadline = keepalive_at
        t = self._sender.timer()
        if t is not None and t < deadline:
            deadline = t
        t = self._receiver.ack_deadline()
        if t is not None and t < deadline:
            deadline = t
        return deadline

    def handle_timer(self, now: float) -> None:
        if self.close_reason is not None:
            return
        if now >= self._last_received + self._idle_timeout:
            self._close("idle timeout: no authenticated packet from the peer", 31)
            return
        t = self._sender.timer()
        if t is not None and now >= t:
            try:
                self._sender.on_timeout(now)
            except TransferFailed as exc:
                self._close(str(exc), 40)
                return
        if (
            now >= max(self._last_received, self._last_sent) + self._keepalive
            and not self._ping_outstanding
        ):
            self._ping_token += 1
            self._ping_outstanding = True
            self._emit(Ping(token=self._ping_token), now)

    def _close(self, reason: str, code: int) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self.close_code = code

    def close(
        self, reason: str, code: int, notice: Message | None = None, now: float = 0.0
    ) -> None:
        """End the session; ``notice`` (an ERROR) is sent once, best effort."""
        if self.close_reason is not None:
            return
        if notice is not None:
            with contextlib.suppress(KeyExhausted):
                self._emit(_stamp(notice, self._send_seq, self.epoch), now)
        self._close(reason, code)

    @property
    def stats(self) -> dict[str, float]:
        return dict(self._sender.stats)

"""The agent's side of one session, as a sans-I/O state machine.

Drive it with :meth:`AgentSession.receive_datagram`, :meth:`handle_timer` and
:meth:`datagrams_to_send`; read what happened with :meth:`next_event`. The
application supplies a ``quote`` callable (the simulated TPM) and feeds results
back with :meth:`submit_result`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
from collections import deque
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.asymmetric import rsa

from vcomp.errors import (
    AuthenticationFailed,
    CryptoError,
    DecodeError,
    SessionClosed,
)
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol import limits
from vcomp.protocol.capacity import UNLIMITED, JobCapacity
from vcomp.protocol.channel import SecureChannel, clip_text
from vcomp.protocol.messages import (
    Ack,
    Attest,
    Challenge,
    Checkpoint,
    Code,
    End,
    Error,
    ErrorCode,
    Hello,
    Key,
    Ready,
    Reject,
    Reset,
    Result,
    Retry,
    Start,
    decode_body,
    encode_body,
)
from vcomp.protocol.record import Direction
from vcomp.protocol.rtt import handshake_timer
from vcomp.protocol.states import AGENT, AgentEvent, AgentState
from vcomp.protocol.wire import (
    HEADER_LEN,
    VERSION,
    Flag,
    PacketType,
    check_protection,
    pack_header,
    unpack_header,
)

QuoteFn = Callable[[bytes, Sequence[int]], tuple[bytes, bytes, list[bytes]]]
"""(extra_data, pcrs) -> (TPMS_ATTEST, TPMT_SIGNATURE, PCR values)."""

MAX_RETRIES_PER_HANDSHAKE = 3
COMMITTED_MEMORY = 4096
MIN_IDLE, MAX_IDLE = 10.0, 600.0  # sane bounds on the server's idle timeout
_HEADROOM = 64  # stream queue places kept free of result and checkpoint chunks


__all__ = ["AgentSession", "AgentState", "QuoteFn"]

# States in which the channel exists and carries jobs.
_ESTABLISHED = frozenset({AgentState.READY, AgentState.RECEIVING, AgentState.RUNNING})
_HANDSHAKE = frozenset({AgentState.HELLO_SENT, AgentState.COOKIE_SENT, AgentState.ATTEST_SENT})


class _Inbound:
    """A job being received: bounded buffer sized from START."""

    def __init__(self, start: Start) -> None:
        self.start = start
        self.expected = start.transfer_size
        self.buffer = bytearray(self.expected)
        self.received = 0
        # Hashed as chunks arrive, so END costs no pass over a large job.
        self.code_hash = hashlib.sha256()
        self.input_hash = hashlib.sha256()
        self.resume_hash = hashlib.sha256()
        self._parts = (
            (start.code_size, self.code_hash),
            (start.code_size + start.input_size, self.input_hash),
            (self.expected, self.resume_hash),
        )

    def append(self, data: bytes) -> None:
        offset, end = self.received, self.received + len(data)
        self.buffer[offset:end] = data
        view, at = memoryview(data), offset
        for part_end, hasher in self._parts:
            if at < part_end and at < end:
                upto = min(part_end, end)
                hasher.update(view[at - offset : upto - offset])
                at = upto
        self.received = end

    def parts(self) -> tuple[bytes, bytes, bytes | None]:
        """Code, input and (if START announced one) the resume state."""
        start = self.start
        code_end = start.code_size
        input_end = code_end + start.input_size
        view = memoryview(self.buffer)
        try:
            code, data = bytes(view[:code_end]), bytes(view[code_end:input_end])
            resume = bytes(view[input_end:]) if start.resume_size is not None else None
        finally:
            view.release()
        return code, data, resume


class _Outgoing:
    """A result or checkpoint handed to the stream chunk by chunk as the path takes
    them, so one of any size never overruns the stream's queue (ahead of the path by
    about two windows, like the server's CODE)."""

    __slots__ = ("attempt", "data", "fin", "job", "kind", "offset")

    def __init__(self, kind: type[Result | Checkpoint], data: bytes, fin: Result | Checkpoint):
        self.kind, self.data, self.fin = kind, data, fin
        self.job, self.attempt = fin.job, fin.attempt
        self.offset = 0

    def next_message(self) -> Result | Checkpoint | None:
        """The next chunk, then the fin, then None."""
        total, offset = len(self.data), self.offset
        if offset > total:
            return None
        if offset == total:
            self.offset += 1
            return self.fin
        data = self.data[offset : offset + limits.DEFAULT_CHUNK]
        self.offset += len(data)
        return self.kind(
            job=self.job, attempt=self.attempt, offset=offset, total=total, data=data, fin=False
        )


class AgentSession:
    def __init__(
        self,
        *,
        agent_id: bytes,
        pinned_server: bytes,
        quote: QuoteFn,
        now: float,
        capacity: JobCapacity = UNLIMITED,
        ephemeral: tuple[rsa.RSAPrivateKey, bytes] | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
    ) -> None:
        self.agent_id = agent_id
        self._pinned = pinned_server
        self._quote = quote
        self._capacity = capacity
        self._ephemeral = ephemeral
        self._random = random_bytes
        self.state = AgentState.START
        self.session_id = 0
        self._nonce = random_bytes(32)
        self._cookie = b""
        self._retries_seen = 0
        self._next_pn = 0
        self._out: deque[bytes] = deque()
        self._events: deque[ev.Event] = deque()
        self._retry_at: float | None = None
        self._tries = 0
        self._sent_at = now  # when the current handshake datagram first went
        # One timer for the whole handshake: its RTT sample and jitter carry over.
        self._handshake_timer = handshake_timer(rng)
        self._last_handshake: bytes = b""
        self._hello_dgram = b""
        self._challenge_dgram = b""
        self._attest_dgram = b""
        # Set in ATTEST_SENT -> READY; kept after CLOSED so a closing notice still leaves.
        self.channel: SecureChannel | None = None
        self._inbound: _Inbound | None = None  # the job being received, in RECEIVING
        self._running: tuple[int, int] | None = None  # (job, attempt), in RUNNING
        self._checkpoint_bytes = 0  # what the running job's START offered to take
        self._results: deque[_Outgoing] = deque()  # in order, one after another
        self._checkpoint_out: _Outgoing | None = None  # after the results, one at a time
        self._committed_seen: dict[tuple[int, int], None] = {}
        self._started = now

    # ---- application API -----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is AgentState.CLOSED

    def _move(self, event: AgentEvent) -> None:
        self.state = AGENT.next(self.state, event)

    def _established(self) -> SecureChannel:
        """The channel, or SessionClosed if the session is not established (or over)."""
        ch = self.channel
        if self.state not in _ESTABLISHED or ch is None:
            raise SessionClosed(f"no established session (state {self.state.value})")
        return ch

    def connect(self, now: float) -> None:
        self._move(AgentEvent.CONNECT)
        self._started = now
        self._send_hello(now)

    def next_event(self) -> ev.Event | None:
        return self._events.popleft() if self._events else None

    def submit_result(
        self,
        *,
        job: int,
        attempt: int,
        status: str,
        output: bytes,
        detail: str = "",
        cpu_ms: int = 0,
        wall_ms: int = 0,
    ) -> None:
        """Queue a result (a fresh one or a spooled one after reconnect)."""
        try:
            self._established()
        except SessionClosed:
            raise SessionClosed("no established session to send the result on") from None
        total = len(output)
        # The summary travels alone so it always fits one datagram.
        summary = Result(
            job=job,
            attempt=attempt,
            offset=total,
            total=total,
            data=b"",
            fin=True,
            sha256=hashlib.sha256(output).digest(),
            status=clip_text(status, limits.MAX_STATUS),
            detail=clip_text(detail, limits.MAX_TEXT),
            cpu_ms=min(max(cpu_ms, 0), 0xFFFFFFFF),
            wall_ms=min(max(wall_ms, 0), 0xFFFFFFFF),
        )
        self._results.append(_Outgoing(Result, output, summary))
        out = self._checkpoint_out
        if out is not None and (out.job, out.attempt) == (job, attempt):
            self._checkpoint_out = None  # the job is over: its state no longer matters
        self._pump()
        self._job_done(job, attempt)

    def _job_done(self, job: int, attempt: int) -> None:
        if self.state is AgentState.RUNNING and self._running == (job, attempt):
            self._move(AgentEvent.JOB_DONE)
            self._running = None

    def submit_checkpoint(self, *, job: int, attempt: int, state: bytes) -> bool:
        """Upload the running job's latest checkpoint, if its START asked for them and
        it fits the bound; False (nothing sent) otherwise."""
        ch = self.channel
        if ch is None or self.state is AgentState.CLOSED or self._running != (job, attempt):
            return False
        if len(state) > self._checkpoint_bytes:
            return False
        if self._checkpoint_out is not None or self._results:
            return False  # one at a time, and never ahead of a result
        fin = Checkpoint(
            job=job,
            attempt=attempt,
            offset=len(state),
            total=len(state),
            data=b"",
            fin=True,
            sha256=hashlib.sha256(state).digest(),
        )
        self._checkpoint_out = _Outgoing(Checkpoint, state, fin)
        self._pump()
        return True

    def _pump(self) -> None:
        """Move result and checkpoint chunks into the stream as far as the path takes."""
        ch = self.channel
        if ch is None or self.state is AgentState.CLOSED:
            return
        # Headroom: READY, ERRORs and refusals go straight to the stream.
        while ch.queue_space > _HEADROOM and ch.queued < max(2 * ch.send_allowance, 8):
            out = self._results[0] if self._results else self._checkpoint_out
            if out is None:
                return
            message = out.next_message()
            if message is None:
                if out is self._checkpoint_out:
                    self._checkpoint_out = None
                else:
                    self._results.popleft()
                continue
            ch.send_reliable(message)

    def abandon_job(self, *, job: int, attempt: int, reason: str) -> None:
        """Hand a job back unfinished (shutdown): the server requeues it at once."""
        if self._send_job_error(ErrorCode.JOB_ABANDONED, job, attempt, reason):
            self._job_done(job, attempt)

    def report_lost_job(self, *, job: int, attempt: int, reason: str) -> None:
        """Report a job that an earlier session held and lost (that session ended, and
        the job was stopped with it), so the server can requeue it now."""
        self._send_job_error(ErrorCode.JOB_LOST, job, attempt, reason)

    def _send_job_error(self, code: ErrorCode, job: int, attempt: int, reason: str) -> bool:
        if self.state not in _ESTABLISHED or self.channel is None:
            return False
        ch = self.channel
        message = clip_text(reason, limits.MAX_TEXT)
        ch.send_reliable(Error(code=code, message=message, job=job, attempt=attempt))
        return True

    def port_unreachable(self, now: float) -> None:
        """The kernel reports the server's port closed (an ICMP port unreachable).

        During the handshake this ends the attempt at once, so the agent moves on to
        its next server instead of retrying for ``HANDSHAKE_GIVE_UP``. An established
        session ignores it: ICMP is not authenticated, and a stray one must not cost a
        running job; the idle timeout decides there.
        """
        if self.state not in _HANDSHAKE:
            return
        self._events.append(
            ev.Rejected(ErrorCode.TRANSFER_FAILED, "server unreachable: its port is closed")
        )
        self._finish(
            "handshake failed: the server's port is closed",
            ErrorCode.TRANSFER_FAILED,
            AgentEvent.REJECT,
        )

    def close(self, reason: str, now: float) -> None:
        """Leave politely: the server learns at once instead of at idle expiry."""
        if self.channel is not None:
            notice = Error(
                seq=0,
                epoch=0,
                code=ErrorCode.AGENT_SHUTDOWN,
                message=clip_text(reason, limits.MAX_TEXT),
            )
            self.channel.close(reason, ErrorCode.AGENT_SHUTDOWN, notice, now)
        self._finish(reason, ErrorCode.AGENT_SHUTDOWN)

    # ---- handshake -----------------------------------------------------------

    def _plain(self, ptype: PacketType, body: bytes, session_id: int) -> bytes:
        pn = self._next_pn
        self._next_pn += 1
        return pack_header(ptype, Flag(0), session_id, pn, len(body)) + body

    def _send_hello(self, now: float) -> None:
        hello = Hello(
            versions=(VERSION,), agent=self.agent_id, nonce=self._nonce, cookie=self._cookie
        )
        body = encode_body(hello)
        # Pad so the whole datagram reaches the anti-amplification minimum.
        short = limits.MIN_HELLO_DATAGRAM - (HEADER_LEN + len(body))
        if short > 0:
            hello = Hello(
                versions=(VERSION,),
                agent=self.agent_id,
                nonce=self._nonce,
                cookie=self._cookie,
                pad=bytes(short + 8),
            )
            body = encode_body(hello)
        dgram = self._plain(PacketType.HELLO, body, 0)
        self._hello_dgram = dgram
        self._send_handshake(dgram, now, fresh=True)

    def _send_handshake(self, dgram: bytes, now: float, *, fresh: bool) -> None:
        if fresh:
            self._tries = 0
            self._sent_at = now
        else:
            self._handshake_timer.on_timeout()
        self._tries += 1
        self._last_handshake = dgram
        self._out.append(dgram)
        # The same probe timeout, backoff cap and jitter as the channel's
        # (rtt.RttEstimator.pto), from the RTT measured so far if there is a sample.
        self._retry_at = now + self._handshake_timer.pto

    def _answered(self, now: float) -> None:
        """The server answered the current handshake datagram. Sent once, it gives an
        RTT sample (sent again, the answer may be to any copy: no sample, as Karn's
        rule says); either way the path works, so the backoff ends."""
        timer = self._handshake_timer
        if self._tries == 1:
            timer.on_sample(now - self._sent_at)
        timer.clear_backoff()

    def _on_retry(self, body: bytes, now: float) -> None:
        # A second RETRY is legitimate (the cookie expired or our address
        # changed), but a bounded number of them, so a forger cannot loop us.
        if not AGENT.allows(self.state, AgentEvent.RETRY):
            return
        if self._retries_seen >= MAX_RETRIES_PER_HANDSHAKE:
            return
        retry = decode_body(PacketType.RETRY, body)
        assert isinstance(retry, Retry)
        self._move(AgentEvent.RETRY)
        self._retries_seen += 1
        self._answered(now)
        self._cookie = retry.cookie
        self._send_hello(now)

    def _on_challenge(self, dgram: bytes, session_id: int, body: bytes, now: float) -> None:
        # Unauthenticated: an out-of-order one is dropped, not answered.
        if not AGENT.allows(self.state, AgentEvent.CHALLENGE):
            return
        challenge = decode_body(PacketType.CHALLENGE, body)
        assert isinstance(challenge, Challenge)
        if self._ephemeral is None:
            self._ephemeral = hs.generate_ephemeral()
        _, spki = self._ephemeral
        extra = hashlib.sha256(challenge.nonce + spki).digest()
        quote, signature, pcr_values = self._quote(extra, challenge.pcrs)
        attest = Attest(
            ephemeral=spki, quote=quote, signature=signature, pcr_values=tuple(pcr_values)
        )
        self.session_id = session_id
        self._challenge_dgram = dgram
        self._attest_dgram = self._plain(PacketType.ATTEST, encode_body(attest), session_id)
        self._move(AgentEvent.CHALLENGE)
        self._answered(now)
        self._send_handshake(self._attest_dgram, now, fresh=True)

    def _on_key(self, body: bytes, now: float) -> None:
        if not AGENT.allows(self.state, AgentEvent.KEY) or self._ephemeral is None:
            return
        key = decode_body(PacketType.KEY, body)
        assert isinstance(key, Key)
        message = hs.transcript(
            hello=self._hello_dgram,
            challenge=self._challenge_dgram,
            attest=self._attest_dgram,
            session_id=self.session_id,
            wrapped=key.wrapped,
            server_key=key.server_key,
            window=key.window,
            idle_timeout_ms=key.idle_timeout_ms,
        )
        try:
            hs.verify_server(
                pinned_fingerprint=self._pinned,
                server_key=key.server_key,
                signature=key.signature,
                message=message,
            )
            session_key = hs.unwrap_session_key(self._ephemeral[0], key.wrapped)
        except (AuthenticationFailed, CryptoError) as exc:
            offered = b"" if hs.key_fingerprint(key.server_key) == self._pinned else key.server_key
            self._events.append(ev.Rejected(ErrorCode.SERVER_KEY_MISMATCH, str(exc), offered))
            self._finish(str(exc), ErrorCode.SERVER_KEY_MISMATCH, AgentEvent.REJECT)
            return
        self._ephemeral = None
        self._retry_at = None
        self.channel = SecureChannel(
            session_id=self.session_id,
            key=session_key,
            send=Direction.AGENT_TO_SERVER,
            first_packet_number=self._next_pn,
            window=key.window,
            now=now,
            idle_timeout=min(max(key.idle_timeout_ms / 1000, MIN_IDLE), MAX_IDLE),
        )
        self.channel.send_reliable(Ready.declaring(self._capacity))
        self._move(AgentEvent.KEY)
        self._events.append(ev.Connected(self.session_id))

    def _on_reject(self, body: bytes) -> None:
        if not AGENT.allows(self.state, AgentEvent.REJECT):
            return
        reject = decode_body(PacketType.REJECT, body)
        assert isinstance(reject, Reject)
        # REJECT is unauthenticated: it only ends this attempt, it proves nothing.
        self._events.append(ev.Rejected(reject.code, reject.reason))
        self._finish(f"rejected by server: {reject.reason}", reject.code, AgentEvent.REJECT)

    # ---- datagrams -----------------------------------------------------------

    def receive_datagram(self, data: bytes, now: float) -> None:
        if self.state is AgentState.CLOSED:
            return
        try:
            header = unpack_header(data)
            check_protection(header)
        except DecodeError:
            return
        try:
            if header.flags & Flag.ENCRYPTED:
                ch = self.channel
                if self.state not in _ESTABLISHED or ch is None:
                    return
                if header.session_id != self.session_id:
                    return
                for message in ch.receive(header, data, now) or ():
                    if self.closed:
                        break  # an ERROR earlier in this batch ended the session
                    self._on_message(message, now)
                self._check_channel()
                return
            body = data[HEADER_LEN:]
            ptype = header.ptype
            if ptype is PacketType.RETRY and header.session_id == 0:
                self._on_retry(body, now)
            elif ptype is PacketType.CHALLENGE:
                self._on_challenge(data, header.session_id, body, now)
            elif ptype is PacketType.KEY and header.session_id == self.session_id:
                self._on_key(body, now)
            elif ptype is PacketType.REJECT:
                self._on_reject(body)
        except DecodeError:
            return  # unauthenticated garbage: drop

    def _on_message(self, message: object, now: float) -> None:
        ch = self.channel
        assert ch is not None
        if isinstance(message, Start):
            self._on_start(message)
        elif isinstance(message, Code):
            self._on_code(message)
        elif isinstance(message, End):
            self._on_end(message)
        elif isinstance(message, Reset):
            if ch.accept_reset(message.epoch):
                self._abort_inbound("reset by server")
                # The old epoch's stream is gone; spooled results are resent after READY.
                self._results.clear()
                self._checkpoint_out = None
                if self._running is not None:
                    job, attempt = self._running
                    self._running = None
                    self._events.append(ev.JobAborted(job, attempt, "reset by server"))
                ch.send_reliable(Ready.declaring(self._capacity))
                self._move(AgentEvent.RESET)
                self._events.append(ev.ResetReceived(message.epoch))
        elif isinstance(message, Ack):
            for entry in message.committed:
                # Notices are repeated until acknowledged: report each once.
                if entry in self._committed_seen:
                    continue
                self._committed_seen[entry] = None
                if len(self._committed_seen) > COMMITTED_MEMORY:
                    del self._committed_seen[next(iter(self._committed_seen))]
                self._events.append(ev.ResultCommitted(*entry))
        elif isinstance(message, Error):
            if message.job is not None and message.attempt is not None:
                # The server gave up on a result we sent: drop it from the spool.
                self._events.append(
                    ev.ResultRefused(message.job, message.attempt, message.code, message.message)
                )
            else:
                self._finish(f"server error {message.code}: {message.message}", message.code)
        else:
            ch.close(f"server sent {type(message).__name__}, which only agents send", 1)

    def _on_start(self, start: Start) -> None:
        if not AGENT.allows(self.state, AgentEvent.START):
            self._refuse(
                start.job,
                start.attempt,
                ErrorCode.BUSY,
                f"agent is busy with a job (state {self.state.value})",
            )
            return
        total = start.transfer_size
        if total > self._capacity.job_bytes:
            self._refuse(
                start.job,
                start.attempt,
                ErrorCode.JOB_TOO_LARGE,
                f"job is {total} bytes, this agent accepts at most {self._capacity.job_bytes}",
            )
            return
        self._inbound = _Inbound(start)
        self._move(AgentEvent.START)

    def _on_code(self, code: Code) -> None:
        inb = self._inbound
        if not AGENT.allows(self.state, AgentEvent.CODE) or inb is None:
            return  # a late chunk of a job refused mid-transfer
        if (code.job, code.attempt) != (inb.start.job, inb.start.attempt):
            return
        if code.offset != inb.received:
            self._refuse_inbound(ErrorCode.SIZE_MISMATCH, "CODE chunks are not contiguous")
            return
        if code.offset + len(code.data) > inb.expected:
            self._refuse_inbound(ErrorCode.SIZE_MISMATCH, "CODE beyond the size in START")
            return
        inb.append(code.data)

    def _on_end(self, end: End) -> None:
        inb = self._inbound
        if not AGENT.allows(self.state, AgentEvent.END) or inb is None:
            return  # the END of a job refused mid-transfer
        if (end.job, end.attempt) != (inb.start.job, inb.start.attempt):
            return
        start = inb.start
        if end.total != inb.expected or inb.received != inb.expected:
            self._refuse_inbound(
                ErrorCode.SIZE_MISMATCH,
                f"START said {inb.expected} bytes, END said {end.total}, got {inb.received}",
            )
            return
        if not hmac.compare_digest(inb.code_hash.digest(), start.code_sha256):
            self._refuse_inbound(ErrorCode.HASH_MISMATCH, "code SHA-256 differs from START")
            return
        if not hmac.compare_digest(inb.input_hash.digest(), start.input_sha256):
            self._refuse_inbound(ErrorCode.HASH_MISMATCH, "input SHA-256 differs from START")
            return
        if start.resume_sha256 is not None and not hmac.compare_digest(
            inb.resume_hash.digest(), start.resume_sha256
        ):
            self._refuse_inbound(ErrorCode.HASH_MISMATCH, "resume SHA-256 differs from START")
            return
        code, data, resume = inb.parts()
        self._inbound = None
        self._move(AgentEvent.END)
        self._running = (start.job, start.attempt)
        desc = ev.JobDescription(
            job=start.job,
            attempt=start.attempt,
            kind=start.kind,
            code_size=start.code_size,
            code_sha256=start.code_sha256,
            input_size=start.input_size,
            input_sha256=start.input_sha256,
            cpu_seconds=start.cpu_seconds,
            memory_bytes=start.memory_bytes,
            wall_seconds=start.wall_seconds,
            output_bytes=start.output_bytes,
            disk_bytes=start.disk_bytes,
            checkpoint_bytes=start.checkpoint_bytes or 0,
            resume_attempt=start.resume_attempt or 0,
            resume_size=start.resume_size or 0,
            resume_sha256=start.resume_sha256 or b"",
        )
        self._checkpoint_bytes = desc.checkpoint_bytes
        self._events.append(ev.JobReceived(desc, code, data, resume))

    def _refuse(self, job: int, attempt: int, code: ErrorCode, message: str) -> None:
        assert self.channel is not None
        self.channel.send_reliable(
            Error(code=code, message=clip_text(message, limits.MAX_TEXT), job=job, attempt=attempt)
        )

    def _refuse_inbound(self, code: ErrorCode, message: str) -> None:
        inb = self._inbound
        assert inb is not None
        self._refuse(inb.start.job, inb.start.attempt, code, message)
        self._abort_inbound(message)
        self._move(AgentEvent.REFUSE_INBOUND)

    def _abort_inbound(self, reason: str) -> None:
        if self._inbound is not None:
            start = self._inbound.start
            self._inbound = None
            self._events.append(ev.JobAborted(start.job, start.attempt, reason))

    # ---- timers and output ---------------------------------------------------

    def get_timer(self) -> float | None:
        if self.state in _ESTABLISHED and self.channel is not None:
            return self.channel.timer()
        if self.state in _HANDSHAKE:
            return self._retry_at
        return None

    def handle_timer(self, now: float) -> None:
        if self.state in _ESTABLISHED and self.channel is not None:
            self.channel.handle_timer(now)
            self._check_channel()
            return
        if self.state not in _HANDSHAKE:
            return
        if self._retry_at is not None and now >= self._retry_at:
            if now - self._started >= limits.HANDSHAKE_GIVE_UP:
                self._events.append(ev.Rejected(ErrorCode.TRANSFER_FAILED, "server unreachable"))
                self._finish(
                    "handshake timed out: server unreachable",
                    ErrorCode.TRANSFER_FAILED,
                    AgentEvent.REJECT,
                )
                return
            self._send_handshake(self._last_handshake, now, fresh=False)
            assert self._retry_at is not None
            self._events.append(ev.HandshakeRetry(self._tries, self._retry_at - now))

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        if self.channel is not None:
            self._pump()
            out.extend(self.channel.datagrams_to_send(now))
            self._check_channel()
        return out

    def _check_channel(self) -> None:
        ch = self.channel
        if ch is not None and ch.close_reason is not None and self.state is not AgentState.CLOSED:
            self._finish(ch.close_reason, ch.close_code)

    def _finish(self, reason: str, code: int, event: AgentEvent = AgentEvent.CLOSE) -> None:
        if self.state is AgentState.CLOSED:
            return
        self._abort_inbound(reason)
        if self.channel is not None:
            self.channel.close(reason, code)
        self._running = None
        self._ephemeral = None
        self._move(event)
        self._retry_at = None
        self._events.append(ev.SessionClosed(self.session_id, reason, int(code)))

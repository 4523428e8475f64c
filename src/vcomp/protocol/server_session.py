"""The server's side of one session, from the validated HELLO onwards.

Created by :class:`vcomp.protocol.server_endpoint.ServerEndpoint` only after the
agent echoed a valid cookie. It challenges the agent, checks the quote against
the in-memory :class:`TrustPolicy`, shares the key, then moves jobs out and
results in. Code is pulled from the application chunk by chunk
(:meth:`code_wanted` / :meth:`supply_code`), so the server never holds a whole
job in memory.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vcomp.errors import AttestationError, CryptoError, DecodeError, IllegalTransition
from vcomp.protocol import events as ev
from vcomp.protocol import handshake as hs
from vcomp.protocol import limits
from vcomp.protocol.attestation import NonceBook
from vcomp.protocol.capacity import UNLIMITED, JobCapacity
from vcomp.protocol.channel import SecureChannel, clip_text
from vcomp.protocol.messages import (
    Ack,
    Attest,
    Challenge,
    Checkpoint,
    End,
    Error,
    ErrorCode,
    Key,
    Message,
    Ready,
    Reject,
    Result,
    Start,
    decode_body,
    encode_body,
)
from vcomp.protocol.record import Direction
from vcomp.protocol.states import SERVER, ServerEvent, ServerState
from vcomp.protocol.trust import TrustPolicy
from vcomp.protocol.wire import HEADER_LEN, Flag, Header, PacketType, pack_header

REQUESTED_PCRS = (17, 18)
MALFORMED_ATTEST = "malformed_attest"
"""REJECT reason (code ATTESTATION_FAILED): the ATTEST body does not decode."""
BAD_EPHEMERAL_KEY = "bad_ephemeral_key"
"""REJECT reason (code ATTESTATION_FAILED): ATTEST.ephemeral is not an RSA-2048 SPKI."""


__all__ = ["REQUESTED_PCRS", "ServerSession", "ServerState"]


class _Outbound:
    def __init__(self, desc: ev.JobDescription) -> None:
        self.desc = desc
        self.total = desc.transfer_size
        self.offset = 0
        self.end_sent = False
        self.delivered = False


class _Upload:
    def __init__(self, total: int, key: tuple[int, int] = (0, 0)) -> None:
        self.total = total
        self.key = key
        self.next_offset = 0
        self.hasher = hashlib.sha256()


def _resume_fields(desc: ev.JobDescription) -> dict[str, Any]:
    if not desc.resume_sha256:  # a state may be empty; its digest never is
        return {}
    return {
        "resume_attempt": desc.resume_attempt,
        "resume_size": desc.resume_size,
        "resume_sha256": desc.resume_sha256,
    }


class ServerSession:
    def __init__(
        self,
        *,
        session_id: int,
        address: tuple[str, int],
        agent_id: bytes,
        hello: bytes,
        signing_key: Ed25519PrivateKey,
        trust: TrustPolicy,
        nonces: NonceBook,
        window: int,
        now: float,
        random_bytes: Callable[[int], bytes],
        events: deque[ev.Event],
        idle_timeout: float = limits.IDLE_TIMEOUT,
        congestion: str = "newreno",
    ) -> None:
        self.session_id = session_id
        self.address = address
        self.agent_id = agent_id
        # What the agent's READY declared; the scheduler leases only jobs within it.
        self.capacity: JobCapacity = UNLIMITED
        self._hello = hello
        self._signing_key = signing_key
        self._trust = trust
        self._nonces = nonces
        self._window = window
        self._random = random_bytes
        self._events = events
        self._idle_timeout = idle_timeout
        self._congestion = congestion
        self.state = ServerState.CHALLENGED
        self._next_pn = 0
        self._out: deque[bytes] = deque()
        self._nonce = nonces.issue(now, random_bytes)
        challenge = Challenge(nonce=self._nonce, pcrs=REQUESTED_PCRS)
        self._challenge = self._plain(PacketType.CHALLENGE, encode_body(challenge))
        self._attest: bytes | None = None
        self._key_dgram: bytes | None = None
        self._created = now
        self.channel: SecureChannel | None = None  # set on CHALLENGED -> KEYED
        self._job: _Outbound | None = None  # the leased job, in SENDING_JOB/RUNNING/COMMITTING
        self._uploads: dict[tuple[int, int], _Upload] = {}
        self._checkpoint: _Upload | None = None  # the one being uploaded, of the current job
        self.public_key_ops = 0
        self.close_reason: str | None = None
        self._out.append(self._challenge)

    def __repr__(self) -> str:
        return f"ServerSession({self.session_id:#x}, {self.state.value})"

    @property
    def closed(self) -> bool:
        return self.state is ServerState.CLOSED

    def _move(self, event: ServerEvent) -> None:
        self.state = SERVER.next(self.state, event)

    def _plain(self, ptype: PacketType, body: bytes) -> bytes:
        pn = self._next_pn
        self._next_pn += 1
        return pack_header(ptype, Flag(0), self.session_id, pn, len(body)) + body

    # ---- handshake -----------------------------------------------------------

    def resend_challenge(self) -> None:
        if self.state is ServerState.CHALLENGED:
            self._out.append(self._challenge)

    def on_attest(self, datagram: bytes, now: float) -> None:
        if not SERVER.allows(self.state, ServerEvent.ATTEST_OK):
            # A retransmitted ATTEST: repeat the same KEY, never a second key.
            if self._key_dgram is not None and datagram == self._attest:
                self._out.append(self._key_dgram)
            return
        try:
            attest = decode_body(PacketType.ATTEST, datagram[HEADER_LEN:])
        except DecodeError as exc:
            self._reject(MALFORMED_ATTEST, str(exc))
            return
        assert isinstance(attest, Attest)
        self.public_key_ops += 1
        try:
            self._trust.verify(
                agent_id=self.agent_id,
                quote=attest.quote,
                signature=attest.signature,
                pcr_values=attest.pcr_values,
                server_nonce=self._nonce,
                ephemeral_spki_der=attest.ephemeral,
                nonce_book=self._nonces,
                now=now,
                requested_pcrs=REQUESTED_PCRS,
                selection_from_allowlist=True,  # a real TPM's agent quotes PCR 23
            )
            session_key = self._random(hs.SESSION_KEY_LEN)
            wrapped = hs.wrap_session_key(attest.ephemeral, session_key)
        except AttestationError as exc:
            self._reject(exc.reason, exc.detail)
            return
        except CryptoError as exc:
            self._reject(BAD_EPHEMERAL_KEY, str(exc))
            return
        self._attest = datagram
        server_key = hs.raw_public(self._signing_key)
        idle_ms = int(self._idle_timeout * 1000)
        message = hs.transcript(
            hello=self._hello,
            challenge=self._challenge,
            attest=datagram,
            session_id=self.session_id,
            wrapped=wrapped,
            server_key=server_key,
            window=self._window,
            idle_timeout_ms=idle_ms,
        )
        key = Key(
            wrapped=wrapped,
            server_key=server_key,
            signature=hs.sign_transcript(self._signing_key, message),
            window=self._window,
            idle_timeout_ms=idle_ms,
        )
        self._key_dgram = self._plain(PacketType.KEY, encode_body(key))
        self._out.append(self._key_dgram)
        self.channel = SecureChannel(
            session_id=self.session_id,
            key=session_key,
            send=Direction.SERVER_TO_AGENT,
            first_packet_number=self._next_pn,
            window=self._window,
            now=now,
            idle_timeout=self._idle_timeout,
            congestion=self._congestion,
        )
        self._move(ServerEvent.ATTEST_OK)

    def refuse_handshake(self, reason: str, detail: str, code: ErrorCode) -> None:
        """REJECT a handshake that is still waiting for its ATTEST, without checking it."""
        if SERVER.allows(self.state, ServerEvent.REJECT):
            self._reject(reason, detail, code)

    def _reject(
        self, reason: str, detail: str, code: ErrorCode = ErrorCode.ATTESTATION_FAILED
    ) -> None:
        body = encode_body(Reject(code=code, reason=clip_text(reason, limits.MAX_TEXT)))
        self._out.append(self._plain(PacketType.REJECT, body))
        self._events.append(ev.HandshakeRejected(self.agent_id, self.address, reason, detail))
        what = "attestation failed" if code is ErrorCode.ATTESTATION_FAILED else "refused"
        self._close(f"{what}: {reason}", code, emit=False, event=ServerEvent.REJECT)

    # ---- established ---------------------------------------------------------

    def on_encrypted(
        self, header: Header, datagram: bytes, address: tuple[str, int], now: float
    ) -> bool:
        ch = self.channel
        if self.state is ServerState.CLOSED or ch is None:  # no channel: CHALLENGED
            return False
        messages = ch.receive(header, datagram, now)
        if messages is None:
            return False
        if address != self.address:
            self.address = address  # NAT rebinding, proven by the AEAD tag
        for message in messages:
            if self.closed:
                break  # an earlier message in this batch ended the session
            self._on_message(message, now)
        self.poll()
        return True

    def _on_message(self, message: Message, now: float) -> None:
        ch = self.channel
        assert ch is not None
        if isinstance(message, Ready):
            before = self.state
            try:
                self._move(ServerEvent.READY)
            except IllegalTransition as exc:
                self._violation(str(exc), now)
                return
            self.capacity = message.capacity
            if before is ServerState.KEYED:
                self._events.append(
                    ev.SessionEstablished(self.session_id, self.agent_id, self.address)
                )
                # The handshake is over: its datagrams are no longer needed.
                self._hello = self._challenge = b""
                self._attest = self._key_dgram = None
            elif before is ServerState.RESETTING:
                self._events.append(ev.ResetDone(self.session_id, message.epoch))
            if before is not self.state:
                self._job = None
                self._events.append(ev.AgentIdle(self.session_id))
        elif isinstance(message, Result):
            self._on_result(message, now)
        elif isinstance(message, Checkpoint):
            self._on_checkpoint(message, now)
        elif isinstance(message, Error):
            self._on_error(message)
        elif isinstance(message, Ack):
            pass  # agents never commit anything
        else:
            self._violation(f"agent sent {type(message).__name__}, which only servers send", now)

    def _on_result(self, r: Result, now: float) -> None:
        key = (r.job, r.attempt)
        up = self._uploads.get(key)
        if up is None:
            # An honest agent queues each result's chunks back to back, so one
            # upload is open at a time and each starts at offset 0.
            if r.offset != 0 or self._uploads:
                self._violation("RESULT chunks out of order or interleaved", now)
                return
            up = self._uploads[key] = _Upload(r.total)
        if r.total != up.total or r.offset != up.next_offset or r.offset + len(r.data) > r.total:
            self._violation("RESULT chunk does not continue its result", now)
            return
        up.hasher.update(r.data)
        up.next_offset += len(r.data)
        if r.data:
            self._events.append(
                ev.ResultChunk(self.session_id, r.job, r.attempt, r.offset, r.total, r.data)
            )
        if not r.fin:
            return
        del self._uploads[key]
        assert r.sha256 is not None
        if up.next_offset != up.total or not hmac.compare_digest(up.hasher.digest(), r.sha256):
            message = "result size or SHA-256 does not match its chunks"
            self._events.append(ev.ResultUnverified(self.session_id, r.job, r.attempt, message))
            # Tell the agent, so it drops a spooled result that can never verify.
            if self.channel is not None:
                self.channel.send_reliable(
                    Error(
                        code=ErrorCode.HASH_MISMATCH, message=message, job=r.job, attempt=r.attempt
                    )
                )
            return
        if self._job is not None and (self._job.desc.job, self._job.desc.attempt) == key:
            self._move(ServerEvent.RESULT)
        self._events.append(
            ev.ResultComplete(
                session_id=self.session_id,
                agent_id=self.agent_id,
                job=r.job,
                attempt=r.attempt,
                total=up.total,
                sha256=r.sha256,
                status=r.status or "",
                detail=r.detail or "",
                cpu_ms=r.cpu_ms or 0,
                wall_ms=r.wall_ms or 0,
            )
        )

    def _on_checkpoint(self, c: Checkpoint, now: float) -> None:
        job = self._job
        key = (c.job, c.attempt)
        if job is None or (job.desc.job, job.desc.attempt) != key:
            return  # the job was reset, refused or committed meanwhile: moot
        offered = job.desc.checkpoint_bytes
        if not offered or c.total > offered:
            what = "not offered" if not offered else f"offered {offered} bytes"
            self._violation(f"CHECKPOINT of {c.total} bytes; START {what}", now)
            return
        up = self._checkpoint
        if c.offset == 0 and (up is None or up.next_offset > 0 or up.key != key):
            # A new checkpoint; one the agent stopped part-way (its job ended) is dropped.
            up = self._checkpoint = _Upload(c.total, key)
        elif up is None or up.key != key:
            self._violation("CHECKPOINT chunks out of order", now)
            return
        if c.total != up.total or c.offset != up.next_offset:
            self._violation("CHECKPOINT chunk does not continue its checkpoint", now)
            return
        up.hasher.update(c.data)
        up.next_offset += len(c.data)
        if c.data:
            self._events.append(
                ev.CheckpointChunk(self.session_id, c.job, c.attempt, c.offset, c.total, c.data)
            )
        if not c.fin:
            return
        self._checkpoint = None
        assert c.sha256 is not None
        if not hmac.compare_digest(up.hasher.digest(), c.sha256):
            self._violation("CHECKPOINT SHA-256 does not match its chunks", now)
            return
        self._events.append(
            ev.CheckpointComplete(self.session_id, self.agent_id, c.job, c.attempt, c.total)
        )

    def _on_error(self, e: Error) -> None:
        if e.job is not None and e.attempt is not None:
            current = self._job is not None and (self._job.desc.job, self._job.desc.attempt) == (
                e.job,
                e.attempt,
            )
            self._events.append(ev.JobRefused(self.session_id, e.job, e.attempt, e.code, e.message))
            if current:
                self._settle_job()
            return
        self._close(f"agent closed the session: {e.message}", e.code)

    def _violation(self, reason: str, now: float) -> None:
        notice = Error(
            seq=0,
            epoch=0,
            code=ErrorCode.PROTOCOL_VIOLATION,
            message=clip_text(reason, limits.MAX_TEXT),
        )
        if self.channel is not None:
            self.channel.close(reason, ErrorCode.PROTOCOL_VIOLATION, notice, now)
        self._close(reason, ErrorCode.PROTOCOL_VIOLATION)

    # ---- application API -----------------------------------------------------

    def _settle_job(self) -> None:
        """The leased job is done with here (committed or refused): the agent is free."""
        self._move(ServerEvent.JOB_SETTLED)
        self._job = None
        self._events.append(ev.AgentIdle(self.session_id))

    def start_job(self, desc: ev.JobDescription) -> None:
        """Lease ``desc`` to this agent; IllegalTransition unless the session is idle."""
        self._move(ServerEvent.START_JOB)
        assert self.channel is not None  # IDLE implies the channel
        self._job = _Outbound(desc)
        self.channel.send_reliable(
            Start(
                seq=0,
                epoch=0,
                job=desc.job,
                attempt=desc.attempt,
                kind=desc.kind,
                code_size=desc.code_size,
                code_sha256=desc.code_sha256,
                input_size=desc.input_size,
                input_sha256=desc.input_sha256,
                cpu_seconds=desc.cpu_seconds,
                memory_bytes=desc.memory_bytes,
                wall_seconds=desc.wall_seconds,
                output_bytes=desc.output_bytes,
                disk_bytes=desc.disk_bytes,
                checkpoint_bytes=desc.checkpoint_bytes or None,
                **_resume_fields(desc),
            )
        )
        self.poll()

    def code_wanted(self) -> tuple[int, int] | None:
        """(offset, length) of the next chunk of code||input to supply, if any."""
        job, ch = self._job, self.channel
        if job is None or ch is None or self.state is not ServerState.SENDING_JOB:
            return None
        if job.offset >= job.total:
            return None
        # Keep only about what the path takes per round trip queued beyond what is in
        # flight: the congestion window, not the (much larger) flow-control window.
        if ch.queue_space <= 0 or ch.queued >= max(2 * ch.send_allowance, 8):
            return None
        return job.offset, min(limits.DEFAULT_CHUNK, job.total - job.offset)

    def supply_code(self, data: bytes) -> None:
        job, ch = self._job, self.channel
        assert job is not None and ch is not None
        if not data or job.offset + len(data) > job.total:
            raise ValueError("supplied chunk does not fit the job")
        d = job.desc
        ch.send_code(d.job, d.attempt, job.offset, data)
        job.offset += len(data)
        self.poll()

    def confirm_committed(self, entries: list[tuple[int, int]], now: float) -> None:
        """The final ACK for durable results; frees the agent for the next job."""
        if self.channel is None or self.state is ServerState.CLOSED:
            return
        self.channel.send_committed(entries, now)
        if (
            self._job is not None
            and (self._job.desc.job, self._job.desc.attempt) in entries
            # Not while still sending: a commit then is of a result from another session.
            and self.state in (ServerState.COMMITTING, ServerState.RUNNING)
        ):
            self._settle_job()

    def refuse_result(self, job: int, attempt: int, code: int, message: str) -> None:
        """The store will never accept this result: the agent must drop it."""
        if self.channel is None or self.state is ServerState.CLOSED:
            return
        self.channel.send_reliable(
            Error(code=code, message=clip_text(message, limits.MAX_TEXT), job=job, attempt=attempt)
        )
        if self._job is not None and (self._job.desc.job, self._job.desc.attempt) == (job, attempt):
            self._settle_job()

    def reset(self, reason: str, now: float) -> None:
        if not SERVER.allows(self.state, ServerEvent.RESET) or self.channel is None:
            return
        self.channel.start_reset(reason, now)
        self._uploads.clear()
        self._checkpoint = None
        self._job = None
        self._move(ServerEvent.RESET)

    def close(self, reason: str, code: int, now: float) -> None:
        if self.channel is not None:
            notice = Error(seq=0, epoch=0, code=code, message=clip_text(reason, limits.MAX_TEXT))
            self.channel.close(reason, code, notice, now)
        self._close(reason, code)

    @property
    def current_job(self) -> tuple[int, int] | None:
        return None if self._job is None else (self._job.desc.job, self._job.desc.attempt)

    # ---- progress, timers, output --------------------------------------------

    def poll(self) -> None:
        """Advance job-transfer bookkeeping after any input."""
        job, ch = self._job, self.channel
        if job is None or ch is None:
            return
        if self.state is ServerState.SENDING_JOB:
            if job.offset >= job.total and not job.end_sent:
                d = job.desc
                ch.send_reliable(End(seq=0, epoch=0, job=d.job, attempt=d.attempt, total=job.total))
                job.end_sent = True
            if job.end_sent and ch.send_idle and not job.delivered:
                job.delivered = True
                self._move(ServerEvent.DELIVERED)
                self._events.append(
                    ev.JobDelivered(self.session_id, job.desc.job, job.desc.attempt)
                )

    def get_timer(self) -> float | None:
        if self.state is ServerState.CLOSED:
            return None
        if self.state is ServerState.CHALLENGED:
            return self._created + limits.HANDSHAKE_GIVE_UP
        assert self.channel is not None
        return self.channel.timer()

    def handle_timer(self, now: float) -> None:
        if self.state is ServerState.CLOSED:
            return
        if self.state is ServerState.CHALLENGED:
            if now >= self._created + limits.HANDSHAKE_GIVE_UP:
                self._close("handshake not completed in time", ErrorCode.IDLE_TIMEOUT)
            return
        assert self.channel is not None
        self.channel.handle_timer(now)
        self._check_channel()
        self.poll()

    def datagrams_to_send(self, now: float) -> list[bytes]:
        out = list(self._out)
        self._out.clear()
        if self.channel is not None:
            out.extend(self.channel.datagrams_to_send(now))
            self._check_channel()
            self.poll()
        return out

    def _check_channel(self) -> None:
        ch = self.channel
        if ch is not None and ch.close_reason is not None and self.state is not ServerState.CLOSED:
            self._close(ch.close_reason, ch.close_code)

    def _close(
        self, reason: str, code: int, *, emit: bool = True, event: ServerEvent = ServerEvent.CLOSE
    ) -> None:
        if self.state is ServerState.CLOSED:
            return
        self._move(event)
        self.close_reason = reason
        self._uploads.clear()
        self._checkpoint = None
        if self.channel is not None:
            self.channel.close(reason, code)
        if emit:
            self._events.append(ev.SessionClosed(self.session_id, reason, int(code)))

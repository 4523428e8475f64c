"""The two session state machines as explicit transition tables (h11's ``_state.py`` shape).

Each session keeps its state in one attribute and moves it only through
:meth:`Machine.next`, which looks the (state, event) pair up in the table and
raises :class:`~vcomp.errors.IllegalTransition` for a pair the table lacks. The
session decides what an illegal event costs the peer (a BUSY refusal, a dropped
late chunk, a protocol violation); the table decides only what is legal.

A pair that maps a state to itself is legal and changes nothing (a READY that only
updates the declared capacity; a CODE chunk while receiving).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Generic, TypeVar

from vcomp.errors import IllegalTransition


class AgentState(Enum):
    START = "start"
    HELLO_SENT = "hello_sent"
    COOKIE_SENT = "cookie_sent"
    ATTEST_SENT = "attest_sent"
    READY = "ready"
    RECEIVING = "receiving"
    RUNNING = "running"
    CLOSED = "closed"


class AgentEvent(Enum):
    CONNECT = "connect"  # the application starts the handshake
    RETRY = "retry"  # the server asked for a cookie
    CHALLENGE = "challenge"
    KEY = "key"  # the server's signed KEY verified: the channel exists
    REJECT = "reject"  # handshake refused (REJECT, bad KEY, port unreachable, timeout)
    START = "start"  # START of a job
    CODE = "code"  # a CODE chunk of the job being received
    END = "end"  # END checked: the job runs
    REFUSE_INBOUND = "refuse_inbound"  # the job being received was refused (size, hash)
    JOB_DONE = "job_done"  # the running job's result was submitted, or it was abandoned
    RESET = "reset"  # the server started a new epoch
    CLOSE = "close"


class ServerState(Enum):
    CHALLENGED = "challenged"
    KEYED = "keyed"
    IDLE = "idle"
    SENDING_JOB = "sending_job"
    RUNNING = "running"
    COMMITTING = "committing"
    RESETTING = "resetting"
    CLOSED = "closed"


class ServerEvent(Enum):
    ATTEST_OK = "attest_ok"  # the quote verified: KEY sent, channel exists
    REJECT = "reject"  # handshake refused
    READY = "ready"  # the agent declared itself ready (after KEY or RESET; or a capacity update)
    START_JOB = "start_job"  # the application leases a job to this agent
    DELIVERED = "delivered"  # every CODE chunk and END acknowledged
    RESULT = "result"  # the current job's verified result arrived
    JOB_SETTLED = "job_settled"  # committed, refused by the agent, or refused by the store
    RESET = "reset"
    CLOSE = "close"


S = TypeVar("S", bound=Enum)
E = TypeVar("E", bound=Enum)


class Machine(Generic[S, E]):
    """One transition table and the error for pairs outside it."""

    def __init__(self, name: str, table: Mapping[tuple[S, E], S]) -> None:
        self.name = name
        self.table = dict(table)

    def next(self, state: S, event: E) -> S:
        """The state ``event`` leads to from ``state``; IllegalTransition if none."""
        try:
            return self.table[state, event]
        except KeyError:
            raise IllegalTransition(
                f"{self.name}: {event.name} is not allowed in state {state.name}"
            ) from None

    def allows(self, state: S, event: E) -> bool:
        return (state, event) in self.table


_A, _AE = AgentState, AgentEvent
_HANDSHAKE = (_A.HELLO_SENT, _A.COOKIE_SENT, _A.ATTEST_SENT)
_ESTABLISHED = (_A.READY, _A.RECEIVING, _A.RUNNING)

AGENT: Machine[AgentState, AgentEvent] = Machine(
    "agent session",
    {
        (_A.START, _AE.CONNECT): _A.HELLO_SENT,
        (_A.HELLO_SENT, _AE.RETRY): _A.COOKIE_SENT,
        (_A.COOKIE_SENT, _AE.RETRY): _A.COOKIE_SENT,
        (_A.COOKIE_SENT, _AE.CHALLENGE): _A.ATTEST_SENT,
        (_A.ATTEST_SENT, _AE.KEY): _A.READY,
        **{(s, _AE.REJECT): _A.CLOSED for s in _HANDSHAKE},
        (_A.READY, _AE.START): _A.RECEIVING,
        (_A.RECEIVING, _AE.CODE): _A.RECEIVING,
        (_A.RECEIVING, _AE.END): _A.RUNNING,
        (_A.RECEIVING, _AE.REFUSE_INBOUND): _A.READY,
        (_A.RUNNING, _AE.JOB_DONE): _A.READY,
        **{(s, _AE.RESET): _A.READY for s in _ESTABLISHED},
        **{(s, _AE.CLOSE): _A.CLOSED for s in (_A.START, *_HANDSHAKE, *_ESTABLISHED)},
    },
)

_S, _SE = ServerState, ServerEvent
_LEASED = (_S.SENDING_JOB, _S.RUNNING, _S.COMMITTING)

SERVER: Machine[ServerState, ServerEvent] = Machine(
    "server session",
    {
        (_S.CHALLENGED, _SE.ATTEST_OK): _S.KEYED,
        (_S.CHALLENGED, _SE.REJECT): _S.CLOSED,
        (_S.KEYED, _SE.READY): _S.IDLE,
        (_S.RESETTING, _SE.READY): _S.IDLE,
        # Anywhere else READY only updates the declared capacity.
        **{(s, _SE.READY): s for s in (_S.IDLE, *_LEASED)},
        (_S.IDLE, _SE.START_JOB): _S.SENDING_JOB,
        (_S.SENDING_JOB, _SE.DELIVERED): _S.RUNNING,
        # A result may arrive before every chunk was acknowledged (the ACK was lost).
        **{(s, _SE.RESULT): _S.COMMITTING for s in _LEASED},
        **{(s, _SE.JOB_SETTLED): _S.IDLE for s in _LEASED},
        **{(s, _SE.RESET): _S.RESETTING for s in (_S.KEYED, _S.IDLE, *_LEASED, _S.RESETTING)},
        **{(s, _SE.CLOSE): _S.CLOSED for s in _S if s is not _S.CLOSED},
    },
)

"""The job store: what the scheduler and the CLI may ask of any backend, and its rules.

Layout
    ``records`` (frozen dataclasses of plain values), ``interface`` (the :class:`Store`
    and :class:`BlobReader` protocols), ``rules`` (the policy below as pure functions
    over records), ``checks`` (argument checks), ``url`` (:func:`open_store`: a store
    from its URL), ``sql`` (the repositories and their SQL, shared by every backend:
    :class:`~.sql.store.SqlStore` over a database, a dialect and a blob store) and one
    subpackage per backend (``sqlite``, the embedded default; ``postgres``, for several
    servers over one database). Only this package names a backend; everyone else opens
    a store with :func:`open_store` and uses :class:`Store`. Every failure is a
    :class:`~vcomp.errors.StoreError` (:class:`~vcomp.errors.StoreUnavailable` when the
    database cannot be reached: retry later).

Vocabulary
    *app*: versioned job code. *batch*: one submission, many inputs. *job*: one input
    of a batch (the logical job). *attempt*: one lease of a job to one agent; attempts
    are numbered 1, 2, ... per job across all replicas, so ``(job_id, attempt)`` names a
    lease, its result, and the idempotency key of that result.

Replication (BOINC's redundant computing)
    A job wants ``quorum`` results that agree under a :data:`ResultComparator`. It starts
    with ``replicas`` replica slots. Distinct-host rule: an agent never gets a lease on a
    job while it holds another live lease or an ok result for it. An agent whose attempt
    failed may try again, but no agent alone may use up a job's budget: it gets at most
    ``max(1, max_attempts - 1)`` charged attempts (errored, expired, released) of one
    job, after which the job waits for another agent or its batch deadline. The
    attempt budget, shared by all replicas of the job, is ``replicas * max_attempts``:
    failed attempts (error status, expired or released lease) and the extra replicas
    issued after a disagreement all draw on it. When the budget can no longer produce a
    quorum the job fails with a recorded reason.

Refusals and fit
    A lease goes only to an agent whose declared :class:`JobCapacity` holds the batch's
    limits and app kind. An agent that refuses its live lease (its job does not fit
    after all, its sandbox failed, it hands the job back) costs the job nothing: the
    attempt ends ``refused`` (never offered to that agent again) or ``abandoned``
    (offered again later), neither draws on the budget, and each counts towards the
    agent's refusals per :data:`REFUSAL_WINDOW`; at the request's ``refusal_cap`` the
    agent gets no lease until older refusals leave the window.

Results and stale attempts
    A result is idempotent on ``(job_id, attempt)``: the first one recorded wins, a resend
    is reported ``duplicate`` and changes nothing. A result for the live lease is
    ``accepted``. A result whose lease expired or was released is ``late`` (and counts)
    only if the job still waits for an unleased replica and the agent holds no other
    live lease or result for the job; otherwise it is kept as ``evidence`` (stored with
    its origin, never counted, never changes the job). Renewing or releasing an attempt
    that is no longer the live lease is a no-op that reports so. Every outcome except
    ``rejected`` is durable, so the server may ACK it and the agent may drop its copy.
"""

from __future__ import annotations

from vcomp.errors import StoreError
from vcomp.server.store.interface import BlobReader, CodeSource, Store
from vcomp.server.store.records import (
    DEFAULT_DISK_BYTES,
    DEFAULT_TRANSFER_SECONDS,
    REFUSAL_WINDOW,
    RESULT_OK,
    AgentClock,
    AgentRecord,
    App,
    AppKind,
    AssimilationDue,
    AttemptRecord,
    AttemptState,
    Batch,
    BatchStatus,
    CandidateResult,
    ComparatorFor,
    ExpiredLease,
    FailedJob,
    HookFailure,
    Job,
    JobLimits,
    JobState,
    Lease,
    LeaseRequest,
    Measurement,
    OutcomeKind,
    PairVerdict,
    RecordOutcome,
    ResultComparator,
    ResultRecord,
    ResultSubmission,
    StoredCheckpoint,
    StoredResult,
    StoreStatus,
    UploadHandle,
    ValidationDue,
)
from vcomp.server.store.rules import Verdict, group_results, is_disagreement, judge, sha256_equal
from vcomp.server.store.url import open_store

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_TRANSFER_SECONDS",
    "REFUSAL_WINDOW",
    "RESULT_OK",
    "AgentClock",
    "AgentRecord",
    "App",
    "AppKind",
    "AssimilationDue",
    "AttemptRecord",
    "AttemptState",
    "Batch",
    "BatchStatus",
    "BlobReader",
    "CandidateResult",
    "CodeSource",
    "ComparatorFor",
    "ExpiredLease",
    "FailedJob",
    "HookFailure",
    "Job",
    "JobLimits",
    "JobState",
    "Lease",
    "LeaseRequest",
    "Measurement",
    "OutcomeKind",
    "PairVerdict",
    "RecordOutcome",
    "ResultComparator",
    "ResultRecord",
    "ResultSubmission",
    "Store",
    "StoreError",
    "StoreStatus",
    "StoredCheckpoint",
    "StoredResult",
    "UploadHandle",
    "ValidationDue",
    "Verdict",
    "group_results",
    "is_disagreement",
    "judge",
    "open_store",
    "sha256_equal",
]

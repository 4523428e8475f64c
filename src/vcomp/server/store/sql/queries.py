"""The SQL every backend shares: the SELECTs, the lease pick template, and row mapping.

Nothing here touches a connection except through the cursor or row it is handed.
"""

from __future__ import annotations

from typing import Any

from vcomp.server.store.records import (
    AgentRecord,
    App,
    AppKind,
    AttemptRecord,
    AttemptState,
    Job,
    JobState,
    StoredResult,
)

READ_AHEAD = 256 << 10  # BlobReader read-ahead: a window of CODE chunks per read
RESULTS_PAGE = 256  # iter_results page size

PICK_WINDOW = 4  # the first window of the queue a lease pick looks at (then 16, 64...): each
# row of a window goes through the whole join, so a small one makes the usual pick cheap

# The first queued job after :after (in the queue, or in a window of it: see
# QUEUED_WINDOW) that fits the agent's capacity (START's numbers: whole seconds) and
# that it neither holds, has done, nor refused.
# The per-agent cap is rules.agent_attempt_cap (max(1, max_attempts - 1)) over
# rules.CHARGED_STATES; the store contract suite pins the two together.
LEASE_PICK_TEMPLATE = """
SELECT j.id, j.batch_id, j.idx, j.pending, j.attempts, bl.size, bl.sha256
FROM {queue}
JOIN batches AS b ON b.id = j.batch_id
JOIN apps AS ap ON ap.id = b.app_id
JOIN blobs AS code ON code.id = ap.blob_id
JOIN blobs AS bl ON bl.id = j.input_blob
WHERE j.state = 'queued'
  AND j.id > :after
  AND {batch_fits}
  AND code.size + bl.size <= :job_bytes
  AND NOT EXISTS (
    SELECT 1 FROM attempts AS a
    WHERE a.job_id = j.id AND a.agent_id = :agent
      AND a.state IN ('leased', 'succeeded', 'refused'))
  AND (SELECT COUNT(*) FROM attempts AS a
       WHERE a.job_id = j.id AND a.agent_id = :agent
         AND {state_in_charged})
      < {agent_cap}
ORDER BY j.id
LIMIT 1{lock}
"""


# The whole queue, walked in id order (a backend whose planner does so by itself).
WHOLE_QUEUE = "jobs AS j"
# A window of the queue: its next ``{size}`` queued jobs of batches that fit the agent
# (a constant size, so that a prepared statement's generic plan is as bounded as a
# planned one). The fitting batches are one array computed first, so the window walks
# jobs_queued in id order and stops after ``{size}`` of them, however many queued jobs
# of other batches it passes; the pick below still checks every condition.
# (PostgreSQL's words: only the backends that pick in windows use it.)
QUEUED_WINDOW = """(SELECT id FROM jobs
  WHERE state = 'queued' AND id > :after
    AND batch_id = ANY(ARRAY(
      SELECT b.id FROM batches AS b JOIN apps AS ap ON ap.id = b.app_id
      WHERE {batch_fits}))
  ORDER BY id LIMIT {size}) AS w"""
WINDOW_END_TEMPLATE = "SELECT MAX(w.id), COUNT(*) FROM {window}"
# What a batch decides of the fit (its limits, deadline and app kind).
BATCH_FITS = """(b.deadline IS NULL OR b.deadline > :now)
  AND b.memory_bytes <= :memory_bytes
  AND {whole_cpu} <= :cpu_seconds
  AND {whole_wall} <= :wall_seconds
  AND b.output_bytes <= :output_bytes
  AND b.disk_bytes <= :disk_bytes
  AND {kind_in_kinds}"""


def lease_pick(
    *, in_list: str, whole: str, greatest: str, lock: str = "", window: int | None = None
) -> str:
    """The lease pick in a backend's words. ``in_list`` tests ``{column}`` against a list
    parameter ``:{name}``; ``whole`` truncates ``{value}`` to an integer; ``greatest``
    is the larger of ``{a}`` and ``{b}``; ``lock`` ends the query (row locks); ``window``
    looks only at that many queued jobs (None: the whole queue)."""
    batch_fits = _batch_fits(in_list=in_list, whole=whole)
    if window is None:
        queue = WHOLE_QUEUE
    else:
        queue = QUEUED_WINDOW.format(batch_fits=batch_fits, size=int(window))
        queue += "\nJOIN jobs AS j ON j.id = w.id"
    return LEASE_PICK_TEMPLATE.format(
        queue=queue,
        batch_fits=batch_fits,
        state_in_charged=in_list.format(column="a.state", name="charged_states"),
        agent_cap=greatest.format(a="1", b="b.max_attempts - 1"),
        lock=lock,
    )


def lease_window_end(*, in_list: str, whole: str, window: int) -> str:
    """Where the lease pick's window of ``window`` jobs after ``:after`` ends, and how many
    jobs it holds (same parameters as the pick): the next window starts after it."""
    batch_fits = _batch_fits(in_list=in_list, whole=whole)
    window_sql = QUEUED_WINDOW.format(batch_fits=batch_fits, size=int(window))
    return WINDOW_END_TEMPLATE.format(window=window_sql)


def _batch_fits(*, in_list: str, whole: str) -> str:
    return BATCH_FITS.format(
        whole_cpu=whole.format(value="b.cpu_seconds"),
        whole_wall=whole.format(value="b.wall_seconds"),
        kind_in_kinds=in_list.format(column="ap.kind", name="kinds"),
    )


REFUSALS_SINCE = (
    "SELECT COUNT(*) FROM attempts WHERE agent_id = ? AND ended_at > ? "
    "AND state IN ('refused', 'abandoned')"
)
APP_SELECT = (
    "SELECT a.id, a.name, a.version, a.kind, b.size, b.sha256, a.created_at, "
    "a.validator, a.assimilator, a.retired_at "
    "FROM apps AS a JOIN blobs AS b ON b.id = a.blob_id"
)
JOB_SELECT = (
    "SELECT j.id, j.batch_id, j.idx, j.state, bl.size, bl.sha256, j.attempts, j.pending, "
    "j.leased, j.disagreements, j.canonical_attempt, j.reason, j.finished_at "
    "FROM jobs AS j JOIN blobs AS bl ON bl.id = j.input_blob"
)
RESULT_SELECT = (
    "SELECT job_id, attempt, agent_id, status, error, output_size, output_sha256, cpu_ms, "
    "wall_ms, received_at, counted FROM results"
)
ATTEMPT_SELECT = (
    "SELECT job_id, attempt, agent_id, state, leased_at, deadline, ended_at, reason FROM attempts"
)
#: One attempt with its job's state, batch and waiting replica slots.
ATTEMPT_WITH_JOB = (
    "SELECT a.job_id, a.attempt, a.agent_id, a.state, a.leased_at, a.deadline, a.ended_at, "
    "a.reason, j.state, j.batch_id, j.pending FROM attempts AS a JOIN jobs AS j "
    "ON j.id = a.job_id WHERE a.job_id = ? AND a.attempt = ?"
)
#: ATTEMPT_WITH_JOB and the digest of a result already recorded for it (or NULL), for
#: every attempt of the jobs in a list (``{job_in_jobs}``: the dialect's in_list test).
ATTEMPTS_WITH_JOB_AND_RESULT = (
    "SELECT a.job_id, a.attempt, a.agent_id, a.state, a.leased_at, a.deadline, a.ended_at, "
    "a.reason, j.state, j.batch_id, j.pending, r.output_sha256 FROM attempts AS a "
    "JOIN jobs AS j ON j.id = a.job_id "
    "LEFT JOIN results AS r ON r.job_id = a.job_id AND r.attempt = a.attempt "
    "WHERE {job_in_jobs}"
)
AGENT_SELECT = (
    "SELECT id, name, ak_public_pem, enrolled_at, last_seen, address, revoked_at FROM agents"
)


# ---------------------------------------------------------------------- row mapping


def app_from_row(row: Any) -> App:
    return App(
        app_id=int(row[0]),
        name=str(row[1]),
        version=int(row[2]),
        kind=AppKind(row[3]),
        size=int(row[4]),
        sha256=bytes(row[5]),
        created_at=float(row[6]),
        validator=row[7],
        assimilator=row[8],
        retired_at=None if row[9] is None else float(row[9]),
    )


def job_from_row(row: Any) -> Job:
    return Job(
        job_id=int(row[0]),
        batch_id=int(row[1]),
        index=int(row[2]),
        state=JobState(row[3]),
        input_size=int(row[4]),
        input_sha256=bytes(row[5]),
        attempts=int(row[6]),
        pending=int(row[7]),
        leased=int(row[8]),
        disagreements=int(row[9]),
        canonical_attempt=None if row[10] is None else int(row[10]),
        reason=None if row[11] is None else str(row[11]),
        finished_at=None if row[12] is None else float(row[12]),
    )


def result_from_row(row: Any) -> StoredResult:
    return StoredResult(
        job_id=int(row[0]),
        attempt=int(row[1]),
        agent_id=str(row[2]),
        status=str(row[3]),
        error=str(row[4]),
        output_size=int(row[5]),
        output_sha256=bytes(row[6]),
        cpu_ms=int(row[7]),
        wall_ms=int(row[8]),
        received_at=float(row[9]),
        counted=bool(row[10]),
    )


def attempt_from_row(row: Any) -> AttemptRecord:
    return AttemptRecord(
        job_id=int(row[0]),
        attempt=int(row[1]),
        agent_id=str(row[2]),
        state=AttemptState(row[3]),
        leased_at=float(row[4]),
        deadline=float(row[5]),
        ended_at=None if row[6] is None else float(row[6]),
        reason=None if row[7] is None else str(row[7]),
    )


def agent_from_row(row: Any) -> AgentRecord:
    return AgentRecord(
        agent_id=str(row[0]),
        name=str(row[1]),
        ak_public_pem=str(row[2]),
        enrolled_at=float(row[3]),
        last_seen=None if row[4] is None else float(row[4]),
        address=None if row[5] is None else str(row[5]),
        revoked_at=None if row[6] is None else float(row[6]),
    )

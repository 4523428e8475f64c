"""Submit work to a vcomp server and collect it, from Python, over the HTTP API.

::

    from vcomp.client import Client

    async with Client.connect("http://127.0.0.1:7462", token=TOKEN) as client:
        batch = await client.map("pi", [{"points": 10**6, "seed": i} for i in range(100)])
        async for job in batch.as_completed():   # index, state, output, error
            ...
        outputs = await batch.gather()            # raises JobFailed on a failed job

:func:`connect_sync` gives the same methods without ``await`` (for scripts and
notebooks). Errors are :mod:`vcomp.errors` types: :class:`ApiError` (with the
server's error code; :class:`AuthError` and :class:`NotFound` are kinds of it),
:class:`ApiUnreachable` and :class:`JobFailed`.
"""

from vcomp.client.client import Batch, Client, Job, Retry
from vcomp.client.records import Agent, App, Attempt, BatchStatus, JobError, JobInfo, JobResult
from vcomp.client.sync import SyncBatch, SyncClient, SyncJob, connect_sync
from vcomp.errors import ApiError, ApiUnreachable, AuthError, JobFailed, NotFound

__all__ = [
    "Agent",
    "ApiError",
    "ApiUnreachable",
    "App",
    "Attempt",
    "AuthError",
    "Batch",
    "BatchStatus",
    "Client",
    "Job",
    "JobError",
    "JobFailed",
    "JobInfo",
    "JobResult",
    "NotFound",
    "Retry",
    "SyncBatch",
    "SyncClient",
    "SyncJob",
    "connect_sync",
]

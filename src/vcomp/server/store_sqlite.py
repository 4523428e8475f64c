"""The embedded job store: SQLite in WAL mode behind the :class:`~vcomp.server.store.Store` API.

Thread rules
    ``SqliteStore`` may be shared by threads: each thread transparently gets its own
    connection (thread-local), and no connection is ever used by two threads. Write
    transactions start with ``BEGIN IMMEDIATE`` so writers queue on SQLite's lock (with
    a busy timeout) instead of failing when a read transaction tries to upgrade. WAL
    lets readers (e.g. the event loop streaming CODE chunks) run while one writer (the
    :class:`~vcomp.server.commit.GroupCommitter` thread) commits. A blob reader keeps
    its blob handle open on the thread that first read from it (reopening walks a big
    blob's overflow chain from the start), which pins a read snapshot until the reader
    is closed; it reopens on another thread if used there. ``close()`` closes every
    connection; call it once no thread uses the store any more.

Durability
    In WAL mode ``synchronous=NORMAL`` appends a commit to the WAL without fsync and syncs
    only at checkpoints. That survives a crash of this process (the bytes are in the OS
    page cache) but a power cut or kernel crash may drop the latest commits. An
    acknowledged result lets the agent delete its spooled copy, so a dropped commit would
    be a lost result: results, leases and everything the CLI writes commit with
    ``synchronous=FULL``, which fsyncs the WAL at every commit. Group commit (commit.py)
    shares that fsync among many results. Writes whose loss is harmless (staged upload
    chunks, lease renewals, last-seen times, TPM clock snapshots, taking reset requests)
    use NORMAL; the next FULL commit syncs the WAL file and with it everything written
    before, since the WAL is one append-only file.
"""

from __future__ import annotations

from vcomp.server.sqlite_agents import AgentsMixin
from vcomp.server.sqlite_apps import AppsMixin
from vcomp.server.sqlite_base import SqliteBase
from vcomp.server.sqlite_leases import LeasesMixin
from vcomp.server.sqlite_results import ResultsMixin
from vcomp.server.sqlite_uploads import UploadsMixin
from vcomp.server.store import Store
from vcomp.server.store_sqlite_schema import INLINE_OUTPUT_MAX, MAX_BLOB_BYTES, SCHEMA_VERSION

__all__ = ["INLINE_OUTPUT_MAX", "MAX_BLOB_BYTES", "SCHEMA_VERSION", "SqliteStore"]


class SqliteStore(ResultsMixin, UploadsMixin, LeasesMixin, AgentsMixin, AppsMixin, SqliteBase):
    """The SQLite job store. See the module docstring for thread and durability rules.

    The parts live in sibling modules, one concern each, as mixins over
    :class:`~vcomp.server.sqlite_base.SqliteBase` (connections and transactions):
    ``sqlite_apps`` (apps, batches, jobs, inputs), ``sqlite_agents`` (agents, clocks,
    allowlist, reset requests, status), ``sqlite_leases`` (leasing and the replication
    verdict), ``sqlite_uploads`` (staged results) and ``sqlite_results`` (recording and
    reading results). Each mixin inherits the ones whose helpers it calls.
    """


def _conforms(store: SqliteStore) -> Store:
    """Never called: makes mypy prove that SqliteStore implements the Store protocol."""
    return store

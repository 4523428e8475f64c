"""Operator hooks: a validator and an assimilator per app, named ``module:function``.

They are the organisation's own code and run in the server process, never on the event
loop thread:

* A **validator** replaces byte equality for its app's replicas. It is called as
  ``fn([output_a, output_b], **options)`` for each pair of ok results of a job and
  returns the canonical output (one of the two) or :data:`vcomp.validators.DISAGREE`.
  The store settles such a job only once every pair has a verdict; until then the job
  waits (``validate_due``) and :class:`Validation` asks the hook on its thread pool and
  hands the verdicts back (``Store.record_verdicts``). One that raises, or cannot be
  imported, counts as a disagreement; the job records ``validator: ...`` as its hook
  error (``status`` lists it), keeps its results, and gets further replicas while its
  attempt budget lasts (then fails with that reason).
* An **assimilator** is called as ``fn(job, output, **options)`` once per done job,
  after the commit, with the canonical output (:class:`Assimilation`), on a pool of its
  own.

A hook that hangs holds one thread of its pool: leases and results go on, and so do the
other hooks' calls while the pool has threads left.

``options`` come from the spec: ``module:function?rel_tol=1e-6&key=text`` passes
``rel_tol=1e-6`` (int, float, else text) on every call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qsl

from vcomp import logfmt
from vcomp.errors import HookError, StoreUnavailable, VcompError
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import AssimilationDue, JobState, PairVerdict, Store, ValidationDue
from vcomp.validators import DISAGREE

log = logging.getLogger("vcomp.server.hooks")

MAX_SPEC = 300
_SPEC = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)(?:\?(.*))?")
#: Longest hook error kept with a job (the rest is cut).
MAX_HOOK_ERROR = 500
#: Assimilator retries wait BACKOFF_BASE * 2**tries seconds, at most BACKOFF_MAX.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0


@dataclass(frozen=True, slots=True)
class HookSpec:
    module: str
    function: str
    options: tuple[tuple[str, int | float | str], ...]

    @property
    def kwargs(self) -> dict[str, int | float | str]:
        return dict(self.options)


@dataclass(frozen=True, slots=True)
class HookJob:
    """What an assimilator is told about the job besides its output."""

    app: str
    version: int
    batch_id: int
    job_id: int
    index: int


def _option(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def parse_spec(text: str) -> HookSpec:
    """``module:function[?key=value&...]``, or a HookError saying what is wrong."""
    match = _SPEC.fullmatch(text) if len(text) <= MAX_SPEC else None
    if match is None:
        raise HookError(
            f"hook {text[:MAX_SPEC]!r} is not module:function[?key=value&...] "
            f"(at most {MAX_SPEC} characters)"
        )
    module, function, query = match.groups()
    try:
        pairs = parse_qsl(query or "", keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise HookError(f"hook {text!r}: bad options: {exc}") from None
    for key, _ in pairs:
        if not key.isidentifier():
            raise HookError(f"hook {text!r}: option name {key!r} is not an identifier")
    return HookSpec(module, function, tuple((k, _option(v)) for k, v in pairs))


_loaded: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
_load_lock = threading.Lock()


def load(text: str) -> tuple[Callable[..., Any], dict[str, Any]]:
    """The hook's function and its options (cached once imported; a failed import is
    tried again next time, so fixing the module needs no restart)."""
    with _load_lock:
        found = _loaded.get(text)
        if found is not None:
            return found
        spec = parse_spec(text)
        try:
            module = importlib.import_module(spec.module)
        except Exception as exc:  # ImportError, or whatever the module raised on import
            raise HookError(
                f"hook {text!r}: cannot import {spec.module}: {type(exc).__name__}: {exc}"
            ) from None
        fn = getattr(module, spec.function, None)
        if not callable(fn):
            raise HookError(f"hook {text!r}: {spec.module} has no function {spec.function}")
        found = _loaded[text] = (fn, spec.kwargs)
        return found


def hook_error(hook: str, exc: BaseException) -> str:
    """The text kept with a job (``status`` shows it), cut to MAX_HOOK_ERROR."""
    what = str(exc) if isinstance(exc, HookError) else f"{type(exc).__name__}: {exc}"
    return f"{hook}: {what}"[:MAX_HOOK_ERROR]


# ---------------------------------------------------------------------- validators


def validate_pair(text: str, a: bytes, b: bytes) -> bool:
    """Do outputs ``a`` and ``b`` agree, by the validator ``text``? HookError if it
    failed (raised, or answered neither one of the outputs nor DISAGREE)."""
    try:
        fn, kwargs = load(text)
        verdict = fn([a, b], **kwargs)
    except Exception as exc:
        raise HookError(hook_error("validator", exc)) from None
    if verdict is DISAGREE:
        return False
    if not isinstance(verdict, bytes) or verdict not in (a, b):
        raise HookError(f"validator: {text} returned neither one of the outputs nor DISAGREE")
    return True


def judge_pairs(store: Store, due: ValidationDue) -> list[PairVerdict]:
    """Run on a pool thread: the validator's verdict on each unjudged pair."""
    assert due.app.validator is not None
    outputs: dict[int, bytes] = {}
    for attempt in sorted({n for pair in due.pairs for n in pair}):
        with store.open_output(due.job_id, attempt) as blob:
            outputs[attempt] = blob.read(0, blob.size)
    verdicts = []
    for a, b in due.pairs:
        try:
            agree = validate_pair(due.app.validator, outputs[a], outputs[b])
        except HookError as exc:
            logfmt.event(
                log, "validator_error", logging.ERROR, job=due.job_id, hook=due.app.validator
            )
            verdicts.append(PairVerdict(a, b, False, str(exc)))
        else:
            verdicts.append(PairVerdict(a, b, agree))
    return verdicts


# ---------------------------------------------------------------------- assimilators


def retry_delay(tries: int) -> float:
    """Seconds before calling a failed assimilator again (``tries`` failures so far)."""
    return float(min(BACKOFF_MAX, BACKOFF_BASE * 2.0 ** min(tries, 30)))


def call_assimilator(store: Store, due: AssimilationDue) -> None:
    """Run on a pool thread: read the canonical output and hand it to the hook."""
    assert due.app.assimilator is not None
    with store.open_output(due.job_id, due.canonical_attempt) as blob:
        output = blob.read(0, blob.size)
    job = HookJob(due.app.name, due.app.version, due.batch_id, due.job_id, due.index)
    fn, kwargs = load(due.app.assimilator)
    fn(job, output, **kwargs)


# ---------------------------------------------------------------------- runners

Item = TypeVar("Item", ValidationDue, AssimilationDue)


class _HookRunner(Generic[Item]):
    """Polls the store for due work and runs each item's hook on a pool of its own.

    The store keeps what is due, so work due before a restart is done after it. A poll
    takes items up to the free threads; ``_running`` keeps an item from being handed out
    twice while its call runs.
    """

    name = "hook"

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        spawn: Callable[[Coroutine[Any, Any, object]], None],
        *,
        threads: int = 2,
        poll_seconds: float = 0.5,
    ) -> None:
        self._store = store
        self._committer = committer
        self._spawn = spawn
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"vcomp-{self.name}")
        self._poll = poll_seconds
        self._running: set[Hashable] = set()
        self._calls: set[concurrent.futures.Future[Any]] = set()  # on pool threads now
        self.calls = 0
        self.failures = 0

    def _fetch(self, now: float, limit: int) -> list[Item]:
        raise NotImplementedError

    async def _handle(self, item: Item) -> None:
        raise NotImplementedError

    async def run_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreUnavailable as exc:
                self._committer.health.lost(exc)  # logged once; the server's probe finds it back
                await self._committer.health.wait_back()
            except VcompError as exc:
                logfmt.event(log, f"{self.name}_poll_failed", logging.ERROR, error=str(exc))
            except Exception as exc:  # a bug: log it and keep polling, the work stays due
                logfmt.event(log, "internal_error", logging.ERROR, work=self.name, error=repr(exc))
            await asyncio.sleep(self._poll)

    async def poll(self) -> None:
        free = self._threads - len(self._running)
        if free <= 0:
            return
        # A read, on a free pool thread: the store's writer thread is for commits.
        items: list[Item] = await self._in_pool(self._fetch, time.time(), free + len(self._running))
        for item in items:
            if item.job_id in self._running or len(self._running) >= self._threads:
                continue
            self._running.add(item.job_id)
            self._spawn(self._one(item))

    async def _one(self, item: Item) -> None:
        try:
            self.calls += 1
            await self._handle(item)
        finally:
            self._running.discard(item.job_id)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        call = self._pool.submit(fn, *args)
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        return await asyncio.wrap_future(call)

    async def close(self, grace: float = 10.0) -> None:
        """Stop taking work and give calls already running ``grace`` seconds to return.

        They read the store, which closes next; one still running after that (a hook
        that hangs) gets a StoreError from the closed store, and its work stays due.
        """
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = [call for call in list(self._calls) if not call.done()]
        if running:
            await asyncio.to_thread(concurrent.futures.wait, running, grace)


class Validation(_HookRunner[ValidationDue]):
    """Asks validator apps' validators about unjudged pairs of replicas."""

    name = "validation"

    def __init__(
        self,
        store: Store,
        committer: GroupCommitter,
        spawn: Callable[[Coroutine[Any, Any, object]], None],
        *,
        requeued: Callable[[], None],
        threads: int = 2,
        poll_seconds: float = 0.5,
    ) -> None:
        super().__init__(store, committer, spawn, threads=threads, poll_seconds=poll_seconds)
        self._requeued = requeued  # a verdict put a job back in the queue (wants a replica)

    def _fetch(self, now: float, limit: int) -> list[ValidationDue]:
        return self._store.due_validations(now, limit)

    async def _handle(self, item: ValidationDue) -> None:
        verdicts: list[PairVerdict] = await self._in_pool(judge_pairs, self._store, item)
        self.failures += sum(v.error is not None for v in verdicts)
        state = await self._committer.run_retrying(
            self._store.record_verdicts, item.job_id, verdicts, time.time()
        )
        if state is JobState.QUEUED:
            self._requeued()


class Assimilation(_HookRunner[AssimilationDue]):
    """Calls each done job's assimilator (at least once); one that raises is retried
    with backoff, its error kept with the job."""

    name = "assimilation"

    def _fetch(self, now: float, limit: int) -> list[AssimilationDue]:
        return self._store.due_assimilations(now, limit)

    async def _handle(self, item: AssimilationDue) -> None:
        try:
            await self._in_pool(call_assimilator, self._store, item)
        except Exception as exc:
            self.failures += 1
            retry_at = time.time() + retry_delay(item.tries)
            logfmt.event(
                log,
                "assimilator_error",
                logging.ERROR,
                job=item.job_id,
                hook=item.app.assimilator,
                tries=item.tries + 1,
                error_type=type(exc).__name__,
            )
            text = hook_error("assimilator", exc)
            await self._committer.run_retrying(
                self._store.assimilation_failed, item.job_id, text, retry_at
            )
        else:
            await self._committer.run_retrying(self._store.assimilated, item.job_id, time.time())

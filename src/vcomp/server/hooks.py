"""Operator hooks: a validator and an assimilator per app, named ``module:function``.

They are the organisation's own code and run in the server process, never on the event
loop thread:

* A **validator** replaces byte equality for its app's replicas. It is called as
  ``fn([output_a, output_b], **options)`` and returns the canonical output (one of the
  outputs it was given) or :data:`vcomp.validators.DISAGREE`. It runs where results are
  compared, on the store's writer thread, inside the result's transaction: it must be
  quick (a slow validator delays commits; put slow work in the assimilator). One that
  raises, or cannot be imported, counts as a disagreement; the job records
  ``validator: ...`` as its hook error (``status`` lists it), keeps its results, and
  gets further replicas while its attempt budget lasts (then fails with that reason).
* An **assimilator** is called as ``fn(job, output, **options)`` once per done job,
  after the commit, with the canonical output (:class:`Assimilation` below). It runs in
  a thread pool, so a slow one holds a pool thread, never dispatch.

``options`` come from the spec: ``module:function?rel_tol=1e-6&key=text`` passes
``rel_tol=1e-6`` (int, float, else text) on every call.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from vcomp import logfmt
from vcomp.errors import HookError, StoreUnavailable, VcompError
from vcomp.server.commit import GroupCommitter
from vcomp.server.store import (
    App,
    AssimilationDue,
    CandidateResult,
    ResultComparator,
    Store,
    sha256_equal,
)
from vcomp.validators import DISAGREE

log = logging.getLogger("vcomp.server.hooks")

MAX_SPEC = 300
_SPEC = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)(?:\?(.*))?$")
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
    match = _SPEC.match(text) if len(text) <= MAX_SPEC else None
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


def validator_comparator(text: str) -> ResultComparator:
    """A comparator that asks the validator ``text`` whether two results agree."""

    def compare(a: CandidateResult, b: CandidateResult) -> bool:
        outputs = [a.read(), b.read()]
        try:
            fn, kwargs = load(text)
            verdict = fn(outputs, **kwargs)
        except Exception as exc:
            logfmt.event(
                log,
                "validator_error",
                logging.ERROR,
                job=a.job_id,
                hook=text,
                error_type=type(exc).__name__,
            )
            raise HookError(hook_error("validator", exc)) from None
        if verdict is DISAGREE:
            return False
        if not isinstance(verdict, bytes) or verdict not in outputs:
            raise HookError(f"validator: {text} returned neither one of the outputs nor DISAGREE")
        return True

    return compare


def comparator_for(app: App) -> ResultComparator:
    """The app's validator as a comparator, or byte equality when it has none."""
    if app.validator is None:
        return sha256_equal
    return validator_comparator(app.validator)


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


class Assimilation:
    """Calls each done job's assimilator (at least once) on a thread pool.

    The store keeps which jobs are due, so a job done before a restart is assimilated
    after it. A poll takes due jobs up to the free pool threads; ``_running`` keeps a
    job from being handed out twice while its call runs. A job whose hook raises is
    retried with backoff; a hook that blocks holds its thread only.
    """

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
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="vcomp-hook")
        self._poll = poll_seconds
        self._running: set[int] = set()
        self.calls = 0
        self.failures = 0

    async def run_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except StoreUnavailable:
                await self._committer.health.wait_back()
            except VcompError as exc:
                logfmt.event(log, "assimilation_poll_failed", logging.ERROR, error=str(exc))
            except Exception as exc:  # a bug: log it and keep polling, jobs stay due
                logfmt.event(
                    log, "internal_error", logging.ERROR, work="assimilation", error=repr(exc)
                )
            await asyncio.sleep(self._poll)

    async def poll(self) -> None:
        free = self._threads - len(self._running)
        if free <= 0:
            return
        due = await self._committer.run(
            self._store.due_assimilations, time.time(), free + len(self._running)
        )
        for item in due:
            if item.job_id in self._running or len(self._running) >= self._threads:
                continue
            self._running.add(item.job_id)
            self._spawn(self._one(item))

    async def _one(self, due: AssimilationDue) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.calls += 1
            try:
                await loop.run_in_executor(self._pool, call_assimilator, self._store, due)
            except Exception as exc:
                self.failures += 1
                retry_at = time.time() + retry_delay(due.tries)
                logfmt.event(
                    log,
                    "assimilator_error",
                    logging.ERROR,
                    job=due.job_id,
                    hook=due.app.assimilator,
                    tries=due.tries + 1,
                    error_type=type(exc).__name__,
                )
                text = hook_error("assimilator", exc)
                await self._committer.run_retrying(
                    self._store.assimilation_failed, due.job_id, text, retry_at
                )
            else:
                await self._committer.run_retrying(self._store.assimilated, due.job_id, time.time())
        finally:
            self._running.discard(due.job_id)

    def close(self) -> None:
        """Stop taking work; a hook still running keeps its thread until it returns."""
        self._pool.shutdown(wait=False, cancel_futures=True)

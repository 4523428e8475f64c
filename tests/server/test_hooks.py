"""The hook runner's parts: specs, loading, validators as comparators, backoff, and
closing while a call runs."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from vcomp.errors import HookError
from vcomp.server.commit import GroupCommitter
from vcomp.server.hooks import (
    BACKOFF_MAX,
    Assimilation,
    hook_error,
    load,
    parse_spec,
    retry_delay,
    validate_pair,
)
from vcomp.server.store.sqlite import SqliteStore

HOOKS = "tests.integration.hookfns"


def test_parse_spec_with_options() -> None:
    spec = parse_spec("pkg.mod:fn?rel_tol=1e-6&n=3&name=a%20b&empty=")
    assert (spec.module, spec.function) == ("pkg.mod", "fn")
    assert spec.kwargs == {"rel_tol": 1e-6, "n": 3, "name": "a b", "empty": ""}
    assert parse_spec("m:f").kwargs == {}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mod",
        "mod:",
        ":fn",
        "mod:fn:x",
        "1mod:fn",
        "mod:f-n",
        "mod:fn?=1",
        "mod:fn?a-b=1",
        "mod:fn?x",
        "m:" + "f" * 400,
        "os;rm:fn",
        "mod:fn\n",
        "mod:fn?a=1\n",
    ],
)
def test_parse_spec_refuses_malformed_specs(text: str) -> None:
    with pytest.raises(HookError, match="hook"):
        parse_spec(text)


def test_load_names_what_is_missing() -> None:
    fn, kwargs = load(f"{HOOKS}:record?log=/x")
    assert fn.__name__ == "record" and kwargs == {"log": "/x"}
    with pytest.raises(HookError, match="cannot import no_such_module_q"):
        load("no_such_module_q:fn")
    with pytest.raises(HookError, match="has no function nope"):
        load(f"{HOOKS}:nope")
    with pytest.raises(HookError, match="has no function HOOKS"):
        load("tests.server.test_hooks:HOOKS")  # not callable


def test_validate_pair() -> None:
    close = "vcomp.validators:json_close?rel_tol=1e-3"
    assert validate_pair(close, b'{"x": 1.0}', b'{"x": 1.0001}')
    assert not validate_pair(close, b'{"x": 1.0}', b'{"x": 2.0}')
    with pytest.raises(HookError, match="validator: RuntimeError: validator bug"):
        validate_pair(f"{HOOKS}:broken_validator", b"a", b"a")
    with pytest.raises(HookError, match="neither one of the outputs"):
        validate_pair(f"{HOOKS}:not_an_output", b"a", b"a")
    with pytest.raises(HookError, match=r"validator: hook .*cannot import"):
        validate_pair("no_such_module_v:fn", b"a", b"a")


def test_hook_error_text_is_bounded() -> None:
    assert hook_error("assimilator", ValueError("x" * 10_000)).startswith(
        "assimilator: ValueError: xx"
    )
    assert len(hook_error("assimilator", ValueError("x" * 10_000))) == 500


def test_retry_delay_doubles_up_to_a_bound() -> None:
    assert [retry_delay(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert retry_delay(10**9) == BACKOFF_MAX


async def test_close_waits_for_a_call_running_on_the_pool(tmp_path: Path) -> None:
    """The store closes right after the runners: a read still running on a pool thread
    must be done by then."""
    store = SqliteStore(tmp_path / "store.db")
    committer = GroupCommitter(store)
    runner = Assimilation(store, committer, lambda work: work.close())
    started, release, returned = threading.Event(), threading.Event(), threading.Event()

    def read() -> None:
        started.set()
        release.wait(10)
        returned.set()

    call = asyncio.ensure_future(runner._in_pool(read))
    assert await asyncio.to_thread(started.wait, 10)
    call.cancel()  # as the server's stop cancels the task that awaits it
    threading.Timer(0.3, release.set).start()
    await runner.close()
    assert returned.is_set()
    await committer.close()
    store.close()

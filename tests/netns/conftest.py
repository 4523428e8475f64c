"""Fixtures for the real-network tests: namespaces, a veth pair, a vcomp deployment.

Every test here is marked ``netns`` and skips with the reason printed (``-ra``)
when the machine cannot run it: not root, no iproute2, no namespaces, and for
the netem tests a kernel without ``sch_netem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns.bottleneck import Bottleneck, PathSpec
from tests.netns.cluster import Cluster
from tests.netns.nslib import NetnsPair, Support, probe


@pytest.fixture(scope="session")
def netns_support() -> Support:
    support = probe()
    if not support.usable:
        pytest.skip(f"network namespaces unavailable: {support.reason}")
    return support


@pytest.fixture
def netns_pair(netns_support: Support) -> Iterator[NetnsPair]:
    """Two fresh namespaces joined by a veth pair; deleted afterwards, even on failure."""
    with NetnsPair() as pair:
        yield pair


@pytest.fixture
def make_bottleneck(netns_support: Support) -> Iterator[Callable[..., Bottleneck]]:
    """``make_bottleneck(rate=..., rtt_ms=..., loss=...)``: a :class:`Bottleneck` path,
    deleted afterwards, even on failure."""
    made: list[Bottleneck] = []

    def make(**spec: Any) -> Bottleneck:
        path = Bottleneck(PathSpec(**spec))
        made.append(path)
        path.__enter__()
        return path

    try:
        yield make
    finally:
        for path in made:
            path.close()


@pytest.fixture
def make_cluster(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(agents=2, server_settings={...})``: homes under tmp_path, stopped after."""
    made: list[Cluster] = []

    def make(**options: Any) -> Cluster:
        c = Cluster(netns_pair, tmp_path / f"c{len(made)}", **options)
        made.append(c)
        c.root.mkdir()
        c.setup()
        return c

    try:
        yield make
    finally:
        for c in made:
            c.stop()

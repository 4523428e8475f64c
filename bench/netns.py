"""Network namespaces for the benchmarks: the helper the netns tests use, not a copy.

The implementation lives in ``tests/netns/nslib.py`` and ``bottleneck.py`` (stdlib
only); this module re-exports it for ``bench/`` scripts, which run with the repository root on
``sys.path`` (see ``bench/bench_impaired.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # imported from a script in bench/: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.netns.bottleneck import Bottleneck, PathSpec, tcp_counters
from tests.netns.nslib import A_ADDR, B_ADDR, NetnsPair, Support, enter, probe, sweep_stale

__all__ = [
    "A_ADDR",
    "B_ADDR",
    "Bottleneck",
    "NetnsPair",
    "PathSpec",
    "Support",
    "enter",
    "probe",
    "sweep_stale",
    "tcp_counters",
]

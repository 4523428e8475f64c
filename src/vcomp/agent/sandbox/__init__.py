"""The protected domain: one job as an isolated, limited, killable process tree.

The paper runs jobs in a VMM-protected domain; vcomp approximates it in user space
with namespaces, rlimits, seccomp, Landlock and a wall clock that kills the tree.
"""

from __future__ import annotations

from vcomp.agent.sandbox.outcome import EXIT_CODES, JobOutcome, OutcomeKind, Protection
from vcomp.agent.sandbox.pipes import Checkpointing
from vcomp.agent.sandbox.policy import JobLimits
from vcomp.agent.sandbox.protections import REQUIRED_PROTECTIONS
from vcomp.agent.sandbox.runner import JobKind, Sandbox
from vcomp.agent.sandbox.tree import JobTree

__all__ = [
    "EXIT_CODES",
    "REQUIRED_PROTECTIONS",
    "Checkpointing",
    "JobKind",
    "JobLimits",
    "JobOutcome",
    "JobTree",
    "OutcomeKind",
    "Protection",
    "Sandbox",
]

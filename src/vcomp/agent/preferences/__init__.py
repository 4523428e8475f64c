"""The volunteer's preferences: when and how much this machine gives.

Each rule is a small pure decision (a schedule, a battery hysteresis, a memory budget,
a token bucket) fed with explicit inputs, so it is tested without clocks or hardware.
:mod:`.controller` reads the machine and turns the decisions into one :class:`Hold`
that the sandbox obeys by stopping the job tree (never killing it).
"""

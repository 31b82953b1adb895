"""Increases and rates of cumulative counters, with one rule for counter resets.

A counter below its previous reading was reset (GPU reset, driver reload, interface or
class re-created, agent restart): what it accrued since is its new value. An increase is
therefore never negative and never a wrap-around, wherever it is taken: the agent's fleet
summary, its QoS class rates and fabricctl's rates under ``telemetry --watch``.
"""

from __future__ import annotations

from typing import TypeVar

Number = TypeVar("Number", int, float)


def increase(now: Number, before: Number | None) -> Number:
    """How much the counter rose from `before` to `now`; 0 with no previous reading."""
    if before is None:
        return 0
    return now - before if now >= before else now


def rate(now: Number, before: Number | None, elapsed_s: float | None) -> float | None:
    """The counter's increase per second over `elapsed_s`; None with no previous reading
    or no positive elapsed time, where a rate means nothing."""
    if before is None or elapsed_s is None or elapsed_s <= 0:
        return None
    return increase(now, before) / elapsed_s

"""agent/common/rates.py: counter increases and rates, one rule for resets."""

from __future__ import annotations

import pytest

from agent.common import rates


@pytest.mark.parametrize(
    ("now", "before", "expected"),
    [
        (150, 100, 50),
        (100, 100, 0),
        # Below its previous reading: reset, and what it shows accrued since.
        (30, 100, 30),
        (0, 2**64 - 1, 0),
        # No previous reading: nothing is known to have accrued.
        (500, None, 0),
        (2.5, 1.0, 1.5),
    ],
)
def test_increase(now: float, before: float | None, expected: float) -> None:
    assert rates.increase(now, before) == expected


def test_an_increase_is_never_negative_nor_wrapped() -> None:
    before = 2**64 - 10

    increase = rates.increase(7, before)

    assert increase == 7


@pytest.mark.parametrize(
    ("now", "before", "elapsed_s", "expected"),
    [
        (3000, 1000, 2.0, 1000.0),
        (500, 1000, 0.5, 1000.0),  # reset: 500 since it
        (1000, 1000, 1.0, 0.0),
        (1000, None, 1.0, None),
        (2000, 1000, None, None),
        (2000, 1000, 0.0, None),
        (2000, 1000, -1.0, None),
    ],
)
def test_rate(
    now: int, before: int | None, elapsed_s: float | None, expected: float | None
) -> None:
    assert rates.rate(now, before, elapsed_s) == expected

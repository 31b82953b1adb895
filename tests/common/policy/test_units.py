"""Rate parsing: bit units with decimal prefixes, percentages, integers of bits/s."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agent.common.policy.units import format_bps, parse_bps, parse_rate


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("100Gbit", 100 * 10**9),
        ("1Tbit", 10**12),
        ("500Mbit", 500 * 10**6),
        ("64kbit", 64_000),
        ("7bit", 7),
        ("1.5Gbit", 1_500_000_000),
        ("2500", 2500),
        (2500, 2500),
    ],
)
def test_absolute_rates(text: object, bps: int) -> None:
    assert parse_bps(text) == bps
    assert parse_rate(text).resolve(1) == bps


@pytest.mark.parametrize(
    ("text", "bandwidth", "bps"),
    [("60%", 100 * 10**9, 60 * 10**9), ("12.5%", 10**9, 125_000_000), ("100%", 7, 7)],
)
def test_percentages_resolve_against_bandwidth(text: str, bandwidth: int, bps: int) -> None:
    rate = parse_rate(text)

    assert rate.is_percent
    assert rate.percent == Decimal(text.rstrip("%"))
    assert rate.resolve(bandwidth) == bps


def test_percentage_rounds_down_to_whole_bits() -> None:
    assert parse_rate("33.3%").resolve(10) == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100gbit", "units are case-sensitive: write Gbit"),
        ("100GBIT", "units are case-sensitive: write Gbit"),
        ("100Gbps", "units are bit, kbit, Mbit, Gbit, Tbit"),
        ("100 Gbit", "is not a rate"),
        ("fast", "is not a rate"),
        ("0Gbit", "must be more than 0"),
        (0, "must be more than 0"),
        (-5, "must be more than 0"),
        ("0.5bit", "not a whole number of bits per second"),
        ("0%", "more than 0% and at most 100%"),
        ("101%", "more than 0% and at most 100%"),
        (True, "is not a rate"),
        (1.5, "is not a rate"),
        (None, "is not a rate"),
    ],
)
def test_invalid_rates(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(value)


def test_percentage_refused_where_absolute_required() -> None:
    with pytest.raises(ValueError, match="must be an absolute rate, not a percentage"):
        parse_bps("50%")


@pytest.mark.parametrize(
    ("bps", "text"),
    [(101 * 10**9, "101Gbit"), (1_500_000_000, "1500Mbit"), (7, "7bit"), (10**12, "1Tbit")],
)
def test_format_bps(bps: int, text: str) -> None:
    assert format_bps(bps) == text

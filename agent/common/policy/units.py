"""Rates as policies write them: `100Gbit`, `500Mbit`, `2500` (bits per second), `60%`.

Bit units only, with decimal SI prefixes, spelled exactly `bit kbit Mbit Gbit Tbit`
(tc's own spellings differ in case and accept bytes, which is how `100mbps` ends up
meaning 800 Mbit/s; a policy should not be ambiguous). Everything resolves to integer
bits per second.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext

from agent.common.policy.limits import MAX_RATE_BPS

BIT_UNITS: dict[str, int] = {
    "bit": 1,
    "kbit": 10**3,
    "Mbit": 10**6,
    "Gbit": 10**9,
    "Tbit": 10**12,
}

_ABSOLUTE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|Mbit|Gbit|Tbit)?$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_ANY_UNIT = re.compile(r"^\d+(?:\.\d+)?([A-Za-z/]+)$")
_EXPONENTS = {unit: len(str(factor)) - 1 for unit, factor in BIT_UNITS.items()}
_HINT = "use e.g. 100Gbit, 500Mbit, 60% or plain bits per second"


@dataclass(frozen=True)
class Rate:
    """A rate as written: absolute (`bps`) or a share of the policy's bandwidth (`percent`)."""

    text: str
    bps: int | None = None
    percent: Decimal | None = None

    @property
    def is_percent(self) -> bool:
        return self.percent is not None

    def resolve(self, bandwidth_bps: int) -> int:
        """Bits per second; a percentage is taken of `bandwidth_bps`, rounded down."""
        if self.bps is not None:
            return self.bps
        assert self.percent is not None
        share = Decimal(bandwidth_bps) * self.percent / 100
        return int(share.to_integral_value(rounding=ROUND_FLOOR))

    def __str__(self) -> str:
        return self.text


def parse_bps(value: object) -> int:
    """`100Gbit`, `1.5Mbit`, `2500` or the integer 2500 -> bits per second (> 0)."""
    rate = parse_rate(value, allow_percent=False)
    assert rate.bps is not None
    return rate.bps


def parse_rate(value: object, *, allow_percent: bool = True) -> Rate:
    """Parse an absolute rate or, when allowed, a percentage (0 < p <= 100)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{value!r} is not a rate ({_HINT})")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"rate must be more than 0, got {value}")
        if value > MAX_RATE_BPS:
            # str() of an integer is refused beyond 4300 digits: its size in bits then.
            shown = _shown(str(value)) if value < 10**24 else f"a {value.bit_length()}-bit number"
            raise ValueError(f"{shown} is above the maximum rate {_MAX_SHOWN}")
        return Rate(text=str(value), bps=value)
    percent = _PERCENT.match(value)
    if percent:
        if not allow_percent:
            raise ValueError(f"{value!r}: must be an absolute rate, not a percentage")
        share = Decimal(percent.group(1))
        if not 0 < share <= 100:
            raise ValueError(f"{value!r}: a percentage must be more than 0% and at most 100%")
        return Rate(text=value, percent=share)
    absolute = _ABSOLUTE.match(value)
    if absolute is None:
        raise ValueError(f"{value!r} is not a rate ({_HINT}){_case_hint(value)}")
    number, unit = absolute.group(1), absolute.group(2) or "bit"
    # Exact, whatever its length: a long number is compared, not rounded.
    with localcontext() as exact:
        exact.prec = len(number) + 16
        bps = Decimal(number).scaleb(_EXPONENTS[unit])
    if bps > MAX_RATE_BPS:
        raise ValueError(f"{_shown(value)} is above the maximum rate {_MAX_SHOWN}")
    if bps != bps.to_integral_value():
        raise ValueError(f"{value!r} is not a whole number of bits per second")
    if bps <= 0:
        raise ValueError(f"rate must be more than 0, got {value!r}")
    return Rate(text=value, bps=int(bps))


def _shown(text: str) -> str:
    """A rate as a message shows it: a long one shortened, its length said."""
    if len(text) <= 24:
        return repr(text)
    return f"{text[:12]!r}... ({len(text)} characters)"


def format_bps(bps: int) -> str:
    """Bits per second in the largest unit that keeps it exact: 101Gbit, 1500Mbit, 7bit."""
    for unit, factor in reversed(BIT_UNITS.items()):
        if bps % factor == 0 and bps >= factor:
            return f"{bps // factor}{unit}"
    return f"{bps}bit"


def _case_hint(value: str) -> str:
    unit = _ANY_UNIT.match(value)
    if unit is None:
        return ""
    for known in BIT_UNITS:
        if unit.group(1).lower() == known.lower():
            return f"; units are case-sensitive: write {known}"
    return "; units are bit, kbit, Mbit, Gbit, Tbit"


@dataclass(frozen=True, order=True)
class PortRange:
    """Inclusive range of TCP/UDP ports; a single port is `PortRange(p, p)`."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last <= 0xFFFF:
            raise ValueError(f"port range {self.first}-{self.last} is not within 0-65535")

    @classmethod
    def single(cls, port: int) -> PortRange:
        return cls(port, port)

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


_MAX_SHOWN = format_bps(MAX_RATE_BPS)

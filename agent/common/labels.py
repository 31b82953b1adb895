"""Node labels and the selectors over them, as Kubernetes spells them: one grammar for
the labels an agent reports (`--labels`), the selectors fabricctl sends (`--selector`)
and what the aggregator accepts from both, so a selector can match every label a node
may carry and nothing a node cannot.

A key is an optional DNS-subdomain prefix and `/`, then a name of up to 63 letters,
digits, `-`, `_` and `.` that starts and ends with a letter or digit. A value is empty or
such a name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}")
_VALUE = re.compile(rf"({_NAME})?")


def check_label(key: object, value: object) -> None:
    """Raise ValueError unless `key`=`value` is a label."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ValueError(f"label key {key!r}: want [prefix/]name of letters, digits, -_.")
    if not isinstance(value, str):
        raise ValueError(f"label {key}: value must be a string")
    if not _VALUE.fullmatch(value):
        raise ValueError(f"label {key}={value!r}: want up to 63 letters, digits, -_.")


def check_labels(what: str, labels: Mapping[str, str]) -> None:
    """Raise ValueError, naming `what` (whose labels), unless every pair is a label."""
    for key, value in labels.items():
        try:
            check_label(key, value)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None


def label_pair(text: str) -> tuple[str, str]:
    """'key=value' -> (key, value), blanks around each dropped and the pair checked; the
    value is everything after the first '='."""
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep:
        raise ValueError(f"{text.strip()!r}: want key=value")
    check_label(key, value)
    return key, value


def check_label_types(what: str, labels: Mapping[str, str]) -> None:
    """Raise ValueError unless `labels` maps non-empty strings to strings: what a store
    holds may predate the grammar, and must still load."""
    for key, value in labels.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ValueError(f"{what}: label {key!r}={value!r}: keys and values must be strings")

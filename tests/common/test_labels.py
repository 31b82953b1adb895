"""Labels and selectors: one grammar for what agents report, fabricctl selects and the
aggregator accepts."""

from __future__ import annotations

import pytest

from agent.common.labels import check_label, check_labels, label_pair


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pool", "training"),
        ("topology.example.com/rack", "r7"),
        ("a", ""),
        ("gpu_model.v2", "H200-SXM"),
        ("k" * 63, "v" * 63),
    ],
)
def test_labels(key: str, value: str) -> None:
    check_label(key, value)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("", "x", "label key ''"),
        ("-x", "1", "label key '-x'"),
        ("x-", "1", "label key"),
        ("k" * 64, "1", "label key"),
        ("Upper.example/x", "1", "label key"),
        ("pool", "a b", "up to 63 letters"),
        ("pool", "b=c", "up to 63 letters"),
        ("pool", "v" * 64, "up to 63 letters"),
        ("pool", 1, "value must be a string"),
        (1, "x", "label key 1"),
    ],
)
def test_refused_labels(key: object, value: object, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        check_label(key, value)


def test_check_labels_names_whose() -> None:
    check_labels("register", {"pool": "training", "rack": "r1"})
    with pytest.raises(ValueError, match=r"^register: label pool='a b'"):
        check_labels("register", {"pool": "a b"})


def test_label_pair() -> None:
    assert label_pair(" pool = training ") == ("pool", "training")
    assert label_pair("empty=") == ("empty", "")
    with pytest.raises(ValueError, match="'pool': want key=value"):
        label_pair("pool")
    with pytest.raises(ValueError, match="up to 63 letters"):
        label_pair("a=b=c")

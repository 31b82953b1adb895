"""One bad policy file, one policy naming a missing interface or someone else's
interface, or a file caught mid-write, costs only itself: every other policy is still
enforced, edited and repaired, and the problem is logged once, not on every pass. Fake
kernel: the claims are about the reconciler's logic."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.node.qos.api_objects import ENFORCED, FAILED
from agent.node.qos.kernel import RemoveTree
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import load_state
from tests.node.qos import DEVICE, SPARE, fake_settings
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_reconciler import write


def states(reconciler: Reconciler) -> dict[str, tuple[str, str]]:
    return {v.name: (v.state, v.message) for v in reconciler.policies()}


def rates(kernel: FakeKernel, device: str) -> set[int]:
    tree = kernel.tree(device)
    assert tree is not None, f"no tree on {device}"
    return {c.rate_bps for c in tree.classes}


def _yaml_syntax_error(text: str) -> str:
    return text.replace("classes:", "classes: [", 1)


def _unknown_field(text: str) -> str:
    return text.replace("direction: egress", "direction: egress\n  burstiness: high")


def _schema_violation(text: str) -> str:
    return text.replace("rate: 500Mbit", "rate: 2Gbit")  # above the 1Gbit bandwidth


def _missing_interface(text: str) -> str:
    return text.replace(f"interface: {DEVICE}", "interface: fab9")


def _nested_20000_deep(text: str) -> str:
    return text.replace(
        "direction: egress", "direction: egress\n  extra: " + "[" * 20_000 + "]" * 20_000
    )


def _rate_of_100_digits(text: str) -> str:
    return text.replace("bandwidth: 1Gbit", "bandwidth: 1" + "0" * 99 + "bit")


def _ports_300_by_300(text: str) -> str:
    ports = ", ".join(f'"{1000 + i}"' for i in range(300))
    return text.replace('{dstPorts: ["2049"]}', f"{{srcPorts: [{ports}], dstPorts: [{ports}]}}")


BREAKAGES: dict[str, Callable[[str], str]] = {
    "yaml-syntax-error": _yaml_syntax_error,
    "unknown-field": _unknown_field,
    "schema-violation": _schema_violation,
    "missing-interface": _missing_interface,
    # The three that once wedged every pass: a RecursionError, a rate pyroute2 could not
    # pack, and more u32 filters than a qdisc has priorities.
    "nested-20000-deep": _nested_20000_deep,
    "rate-of-100-digits": _rate_of_100_digits,
    "ports-300-by-300": _ports_300_by_300,
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_one_broken_file_stops_neither_the_edits_nor_the_repairs_of_the_others(
    reconciler: Reconciler,
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    breakage: Callable[[str], str],
) -> None:
    node = write(dirs[0], DEVICE)
    write(dirs[0], SPARE, name="other")
    reconciler.reconcile()
    enforced = kernel.tree(DEVICE)

    node.write_text(breakage(node.read_text()))
    write(dirs[0], SPARE, name="other", rate="400Mbit")
    kernel.apply(RemoveTree(SPARE))  # and someone deleted its root qdisc
    result = reconciler.reconcile()

    assert result.result == "invalid"
    assert 400_000_000 in rates(kernel, SPARE)
    assert kernel.tree(DEVICE) == enforced  # the last good version stays
    listed = states(reconciler)
    assert listed["other"] == (ENFORCED, "")
    assert listed["node"][0] == FAILED and str(node) in listed["node"][1]
    assert set(load_state(dirs[1]).policies) == {"node", "other"}
    assert reconciler.policy_counts[("file", FAILED)] == 1


def test_a_new_file_that_cannot_be_parsed_is_reported_by_file_and_harms_no_other(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    junk = dirs[0] / "junk.yaml"
    junk.write_text("apiVersion: [unclosed\n")

    write(dirs[0], DEVICE, rate="400Mbit")
    reconciler.reconcile()

    assert 400_000_000 in rates(kernel, DEVICE)
    listed = {v.name: v for v in reconciler.policies()}
    assert listed["node"].state == ENFORCED
    assert listed["junk.yaml"].state == FAILED
    assert listed["junk.yaml"].file == str(junk)
    assert "not valid YAML" in listed["junk.yaml"].message
    assert reconciler.policy_counts[("file", FAILED)] == 1


def test_a_new_policy_on_a_missing_interface_is_not_enforced_and_freezes_no_other(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    write(dirs[0], "fab9", name="late")
    write(dirs[0], DEVICE, rate="400Mbit")
    reconciler.reconcile()

    assert 400_000_000 in rates(kernel, DEVICE)
    listed = states(reconciler)
    assert listed["late"][0] == FAILED and "unknown interface 'fab9'" in listed["late"][1]
    assert "late" not in load_state(dirs[1]).policies


def test_a_conflicting_file_costs_only_the_later_policy(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE, name="node")
    reconciler.reconcile()

    write(dirs[0], DEVICE, name="rival")  # rival.yaml: the same interface and direction
    write(dirs[0], SPARE, name="spare")
    write(dirs[0], DEVICE, name="node", rate="400Mbit")
    reconciler.reconcile()

    assert 400_000_000 in rates(kernel, DEVICE)
    assert kernel.tree(SPARE) is not None
    listed = states(reconciler)
    assert listed["node"] == (ENFORCED, "")
    assert listed["spare"] == (ENFORCED, "")
    assert listed["rival"][0] == FAILED and "already owned by policy 'node'" in listed["rival"][1]


def test_a_later_file_reusing_a_policy_name_costs_only_itself(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE, name="node")
    reconciler.reconcile()
    enforced = kernel.tree(DEVICE)

    copy = dirs[0] / "node-copy.yaml"  # the same name, on another interface
    copy.write_text(write(dirs[0], SPARE, name="spare").read_text().replace("spare", "node"))
    result = reconciler.reconcile()

    assert kernel.tree(DEVICE) == enforced
    assert kernel.tree(SPARE) is not None  # spare.yaml is enforced
    views = [(v.name, v.file, v.state) for v in reconciler.policies()]
    assert ("node", str(dirs[0] / "node.yaml"), ENFORCED) in views
    assert ("node", str(copy), FAILED) in views
    assert any("policy name 'node' is also used" in str(v) for v in result.violations)


def test_a_file_whose_policy_was_enforced_keeps_it_when_it_turns_bad_and_after_a_restart(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    node = write(dirs[0], DEVICE)
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    first.reconcile()
    first.close()
    enforced = kernel.tree(DEVICE)
    node.write_text("spec: [")

    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = restarted.reconcile()
        kernel.apply(RemoveTree(DEVICE))
        repaired = restarted.reconcile()
    finally:
        restarted.close()

    assert result.changes == ()
    assert repaired.drift == {DEVICE: 1}
    assert kernel.tree(DEVICE) == enforced
    assert states(restarted)["node"][0] == FAILED


# --- a file caught mid-write ------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_file_truncated_mid_write_is_not_enforced_until_it_settles(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    node = write(dirs[0], DEVICE)
    whole = node.read_text() + "---\n" + write(dirs[0], SPARE, name="other").read_text()
    (dirs[0] / "other.yaml").unlink()
    node.write_text(whole)
    clock = Clock(node.stat().st_mtime + 5.0)
    settings = replace(fake_settings(dirs, cgroups), file_settle_s=1.0)
    reconciler = Reconciler(settings, kernel, clock=clock)
    try:
        reconciler.reconcile()
        enforced = {DEVICE: kernel.tree(DEVICE), SPARE: kernel.tree(SPARE)}
        # The writer got as far as the end of the first document: a valid, shorter file.
        node.write_text(whole[: whole.index("---")])
        os.utime(node, (clock.now, clock.now))

        caught = reconciler.reconcile()
        clock.now += 0.5
        still = reconciler.reconcile()
        # The writer finishes, with an edit.
        node.write_text(whole.replace("rate: 500Mbit", "rate: 400Mbit", 1))
        os.utime(node, (clock.now, clock.now))
        unsettled = reconciler.reconcile()
        clock.now += 1.5
        settled = reconciler.reconcile()
    finally:
        reconciler.close()

    assert caught.changes == () and still.changes == () and unsettled.changes == ()
    assert caught.result == "success" and caught.violations == ()
    assert kernel.tree(SPARE) == enforced[SPARE]
    assert settled.changes == ('node: ~ class fa:10 "collectives" rate 500Mbit -> 400Mbit',)
    assert states(reconciler)["other"] == (ENFORCED, "")


def test_editor_and_config_manager_temporaries_are_never_read(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    (dirs[0] / ".node.yaml.swp").write_text("\x00\x01 not yaml [")
    (dirs[0] / ".node.yaml").write_text("spec: [")
    (dirs[0] / "node.yaml.tmp").write_text("spec: [")

    result = reconciler.reconcile()

    assert result.result == "success" and result.violations == ()
    assert [v.name for v in reconciler.policies()] == ["node"]


# --- logging ----------------------------------------------------------------------------


def test_repeated_problems_are_logged_when_they_change_not_on_every_pass(
    reconciler: Reconciler,
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent.node.qos")
    write(dirs[0], DEVICE)
    junk = dirs[0] / "junk.yaml"
    junk.write_text("spec: [")
    kernel.fail_requests(lambda change: 1)  # EPERM for every tree change

    for _ in range(4):
        reconciler.reconcile()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    kernel.fail_requests(None)
    junk.unlink()
    caplog.clear()
    for _ in range(3):
        reconciler.reconcile()
    after = [r.getMessage() for r in caplog.records]

    assert len(errors) == 2, errors
    assert sum("junk.yaml" in e for e in errors) == 1
    assert sum("QoS policy node" in e and "errno 1" in e for e in errors) == 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert sum("the problem is gone" in m for m in after) == 2, after

"""The qos collector: per-class counters of the reconciler's trees, and its counters."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.node.collectors.base import CollectorContext, SharedResources, Tick
from agent.node.collectors.qos import (
    RECONCILER_KEY,
    QosClassSample,
    QosCollector,
    QosOptions,
    QosReconcileSample,
)
from agent.node.errors import CollectorError
from agent.node.qos.reconciler import QosSettings, Reconciler
from agent.node.qos.state import AppliedPolicy, QosState, save_state
from tests.conftest import VethPair, VethTraffic
from tests.exposition import exposed, series

POLICY = """\
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: stats}}
spec:
  interface: {device}
  direction: egress
  bandwidth: 1Gbit
  defaultClass: rest
  classes:
    - name: udp-test
      priority: 0
      rate: 500Mbit
      match:
        - {{dstPorts: ["{port}"], protocol: udp}}
    - {{name: rest, priority: 7, rate: 100Mbit}}
"""


def tick(seq: int) -> Tick:
    return Tick(seq, time.monotonic(), time.time())


def test_class_counters_follow_traffic(
    shaped_pair: VethPair, veth_traffic: VethTraffic, tmp_path: Path
) -> None:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir()
    (policy_dir / "stats.yaml").write_text(
        POLICY.format(device=shaped_pair.device, port=VethTraffic.port)
    )
    shared = SharedResources()
    reconciler = shared.get(
        RECONCILER_KEY,
        lambda: Reconciler(
            QosSettings(policy_dir, tmp_path / "state", netns=shaped_pair.netns, file_settle_s=0)
        ),
        Reconciler.close,
    )
    reconciler.reconcile()
    collector = QosCollector(CollectorContext(QosOptions(tmp_path / "state"), shared))
    try:
        first = collector.collect(tick(1))
        veth_traffic.send(200, payload_bytes=1000)
        second = collector.collect(tick(2))
    finally:
        shared.close()

    classes = {s.class_name: s for s in second if isinstance(s, QosClassSample)}
    before = {s.class_name: s for s in first if isinstance(s, QosClassSample)}
    assert set(classes) == {"udp-test", "rest"}
    sent = classes["udp-test"].sent_bytes - before["udp-test"].sent_bytes
    assert 200 * 1000 <= sent <= 200 * 1100  # payload plus UDP/IP/Ethernet headers
    assert classes["udp-test"].sent_packets - before["udp-test"].sent_packets == 200
    assert classes["udp-test"].rate_bps is not None and classes["udp-test"].rate_bps > 0
    assert before["udp-test"].rate_bps is None
    (status,) = [s for s in second if isinstance(s, QosReconcileSample)]
    assert status.results == {"success": 1}

    scraped = exposed(collector.metrics(second))
    labels = {"device": shaped_pair.device, "policy": "stats", "class": "udp-test"}
    assert (
        scraped[series("fabric_qos_class_sent_bytes_total", **labels)]
        == classes["udp-test"].sent_bytes
    )
    assert series("fabric_qos_class_dropped_packets_total", **labels) in scraped
    assert series("fabric_qos_class_backlog_bytes", **labels) in scraped
    assert scraped[series("fabric_qos_reconcile_total", result="success")] == 1


def test_without_a_reconciler_the_state_file_names_the_classes(tmp_path: Path) -> None:
    save_state(
        tmp_path,
        QosState({"gone": AppliedPolicy("gone", "f.yaml", "fabnosuch9", "egress", "fabnosuch9",
                                        {"a": 0x10})}),
    )  # fmt: skip
    collector = QosCollector(CollectorContext(QosOptions(tmp_path), SharedResources()))

    with pytest.raises(CollectorError, match="fabnosuch9: no such device"):
        collector.collect(tick(1))


def test_no_policies_no_samples(tmp_path: Path) -> None:
    collector = QosCollector(CollectorContext(QosOptions(tmp_path), SharedResources()))

    assert collector.collect(tick(1)) == ()

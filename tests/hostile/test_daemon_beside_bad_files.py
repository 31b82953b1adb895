"""The running agent, in a throwaway namespace, beside the three files that once wedged
every pass (a value 20,000 levels deep, a rate of 100 digits, 300 x 300 ports): its good
policy is still repaired within an interval and shapes a real flow, `fabricctl policy
list` says which files failed and why, the metric counts them and each problem is
logged once."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.conftest import iperf3_intervals
from tests.ctl.conftest import run_fabricctl
from tests.node.qos.test_daemon import INTERVAL_S, Daemon, wait_until
from tests.node.qos.test_daemon import daemon as daemon  # the agent in a namespace

BAD = """\
apiVersion: fabric.qos/v1alpha1
kind: QosPolicy
metadata: {{name: {name}}}
spec:
  interface: {device}
  direction: ingress
  bandwidth: {bandwidth}
  defaultClass: rest
  classes:
    - name: many
      priority: 1
      rate: 1Mbit
      match:
        - {{srcPorts: [{ports}], dstPorts: [{ports}]}}
    - {{name: rest, priority: 7, rate: 1Mbit}}
"""


def bad_files(directory: Path, device: str) -> dict[str, Path]:
    three = [f'"{1000 + i}"' for i in range(3)]
    many = ", ".join(f'"{1000 + i}"' for i in range(300))
    texts = {
        "deep": BAD.format(name="deep", device=device, bandwidth="1Gbit", ports=", ".join(three))
        .replace("ingress", "ingress\n  extra: " + "[" * 20_000 + "]" * 20_000),
        "digits": BAD.format(
            name="digits", device=device, bandwidth="1" + "0" * 99 + "bit", ports=", ".join(three)
        ),
        "ports": BAD.format(name="ports", device=device, bandwidth="1Gbit", ports=many),
    }  # fmt: skip
    paths = {}
    for name, text in texts.items():
        paths[name] = directory / f"{name}.yaml"
        paths[name].write_text(text)
    return paths


def test_three_files_that_once_wedged_every_pass_cost_only_themselves(daemon: Daemon) -> None:
    daemon.write()
    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "first apply")
    paths = bad_files(daemon.policy_dir, daemon.pair.device)
    failed = 'fabric_qos_policies{source="file",state="failed"}'
    wait_until(lambda: daemon.metric(failed) == 3.0, 30, "the three files refused")

    # Someone deletes the good policy's root qdisc: the next pass puts it back.
    subprocess.run(["ip", "netns", "exec", daemon.pair.netns, "tc", "qdisc", "del", "dev",
                    daemon.pair.device, "root"], check=True)  # fmt: skip
    took = wait_until(lambda: daemon.tree() == daemon.desired(), 10, "root qdisc restored")
    rates = iperf3_intervals(daemon.pair, 3)
    time.sleep(2 * INTERVAL_S)  # more passes, to see the problems are logged only once
    listed = run_fabricctl(
        "--agent", f"unix://{daemon.logs / 'agent.sock'}", "policy", "list", "-o", "json"
    )

    assert took <= INTERVAL_S + 1.0
    assert len(rates) == 3 and max(rates) < 210, rates  # the 200 Mbit/s ceiling holds
    assert listed.returncode == 0, listed.stderr
    states = {
        p["name"]: (p["state"], p.get("message", "")) for p in json.loads(listed.stdout)["policies"]
    }
    assert states["daemon"][0] == "POLICY_STATE_ENFORCED"
    assert {name: state for name, (state, _) in states.items() if name != "daemon"} == {
        "deep.yaml": "POLICY_STATE_FAILED",
        "digits.yaml": "POLICY_STATE_FAILED",
        "ports.yaml": "POLICY_STATE_FAILED",
    }
    assert "nested deeper than 32 levels" in states["deep.yaml"][1]
    assert "above the maximum rate 10Tbit" in states["digits.yaml"][1]
    assert "a class may have at most 256" in states["ports.yaml"][1]
    log = daemon.log()
    assert "Traceback" not in log
    for path in paths.values():
        assert log.count(f"QoS policy file {path}") + log.count(f"{path}:") >= 1, log
    assert len([line for line in log.splitlines() if "digits.yaml" in line]) == 1, log

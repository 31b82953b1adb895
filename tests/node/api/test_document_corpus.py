"""One corpus of policy documents, each taken the two ways a document reaches the agent:
as a policy file (`fabric-agent policy validate`) and through the API (`fabricctl policy
apply --dry-run` against an agent). Each must be accepted by both or refused by both, with
the same lines naming the file, the field and the reason."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.ctl.main import main as fabricctl
from agent.node.cli.main import main as fabric_agent
from tests.node.api.qos_node import Node
from tests.node.qos import SPARE, api_policy_document

Edit = Callable[[dict[str, Any]], object]


def spec(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["spec"]
    return result


def bulk(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["spec"]["classes"][0]
    return result


def match(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = bulk(doc)["match"][0]
    return result


# (name, edit of the base document, accepted?)
CORPUS: list[tuple[str, Edit, bool]] = [
    ("as written", lambda d: None, True),
    ("fwmark as an integer", lambda d: match(d).update(fwmark=9), True),
    ("fwmark as decimal text", lambda d: match(d).update(fwmark="9"), True),
    ("fwmark with a mask", lambda d: match(d).update(fwmark="0x10/0xff"), True),
    ("fwmark outside its mask", lambda d: match(d).update(fwmark="0x11/0x10"), False),
    ("fwmark too big", lambda d: match(d).update(fwmark=2**32), False),
    ("rate in bits as an integer", lambda d: bulk(d).update(rate=300_000_000), True),
    ("rate in bits as text", lambda d: bulk(d).update(rate="300000000"), True),
    ("rate as a share", lambda d: bulk(d).update(rate="30%", ceil="50%"), True),
    ("rate above the bandwidth", lambda d: bulk(d).update(rate="2Gbit"), False),
    ("rate in an unknown unit", lambda d: bulk(d).update(rate="3Gbps"), False),
    ("ports as integers", lambda d: match(d).update(dstPorts=[5201, 5202]), True),
    ("a port range", lambda d: match(d).update(srcPorts=["29500-29599"]), True),
    ("a port out of range", lambda d: match(d).update(dstPorts=["70000"]), False),
    ("a reversed port range", lambda d: match(d).update(dstPorts=["9-3"]), False),
    ("dscp as text", lambda d: match(d).update(dscp="26"), False),
    ("dscp out of range", lambda d: bulk(d).update(dscp=64), False),
    ("priority as a float", lambda d: bulk(d).update(priority=1.0), False),
    ("priority as text", lambda d: bulk(d).update(priority="1"), False),
    ("takeOver as text", lambda d: spec(d).update(takeOver="yes"), False),
    ("takeOver", lambda d: spec(d).update(takeOver=True), True),
    ("an unknown field", lambda d: spec(d).update(bogus=1), False),
    ("an unknown match key", lambda d: match(d).update(port=80), False),
    ("no metadata", lambda d: d.pop("metadata"), False),
    ("no kind", lambda d: d.pop("kind"), False),
    ("another kind", lambda d: d.update(kind="Deployment"), False),
    ("another apiVersion", lambda d: d.update(apiVersion="fabric.qos/v2"), False),
    ("no classes", lambda d: spec(d).update(classes=[]), False),
    ("a class name with capitals", lambda d: bulk(d).update(name="Bulk_1"), False),
    ("a CIDR with host bits", lambda d: match(d).update(srcCidr="10.0.0.1/8"), False),
    ("a CIDR", lambda d: match(d).update(srcCidr="10.0.0.0/8"), True),
    (
        "IPv4 and IPv6 together",
        lambda d: match(d).update(srcCidr="10.0.0.0/8", dstCidr="fd00::/8"),
        False,
    ),
    ("icmp with ports", lambda d: match(d).update(protocol="icmp"), False),
    ("an absolute cgroup", lambda d: match(d).update(cgroup="/system.slice/x"), False),
    ("a cgroup going up", lambda d: match(d).update(cgroup="a/../b"), False),
    ("a cgroup nft cannot quote", lambda d: match(d).update(cgroup='job"1'), False),
    ("a cgroup name too long", lambda d: match(d).update(cgroup="job-" + "x" * 300), False),
    ("a cgroup", lambda d: match(d).update(cgroup="system.slice/job_7"), True),
    ("an interface nft cannot quote", lambda d: spec(d).update(interface='fab"1'), False),
    ("an empty match entry", lambda d: bulk(d).update(match=[{}]), False),
    ("ingress", lambda d: spec(d).update(direction="ingress"), True),
    ("another direction", lambda d: spec(d).update(direction="sideways"), False),
    ("no default class", lambda d: spec(d).update(defaultClass="gold"), False),
    ("a bandwidth of nothing", lambda d: spec(d).update(bandwidth=0), False),
    ("a spec that is a list", lambda d: d.update(spec=["interface"]), False),
    ("a name too long", lambda d: d["metadata"].update(name="a" * 64), False),
    ("a mapping-less document", lambda d: d.clear(), False),
]


def document(edit: Edit) -> dict[str, Any]:
    doc = copy.deepcopy(api_policy_document(SPARE, name="corpus"))
    edit(doc)
    return doc


def verdict(code: int, stderr: str) -> tuple[int, list[str]]:
    """The exit code and the violation lines, in order."""
    lines = [line.removeprefix("fabricctl: ") for line in stderr.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize(("name", "edit", "accepted"), CORPUS, ids=[c[0] for c in CORPUS])
def test_a_document_means_the_same_as_a_file_and_through_the_api(
    node: Node,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    edit: Edit,
    accepted: bool,
) -> None:
    path = tmp_path / "corpus.yaml"
    path.write_text(yaml.safe_dump(document(edit)))
    # The agent checks this host too: the one cgroup a valid document names is there.
    (tmp_path / "cgroup" / "system.slice" / "job_7").mkdir(parents=True)

    as_file = verdict(fabric_agent(["policy", "validate", "--offline", str(path)]),
                      capsys.readouterr().err)  # fmt: skip
    through_api = verdict(
        fabricctl(["--agent", node.target, "policy", "apply", "--dry-run", "-f", str(path)]),
        capsys.readouterr().err,
    )

    assert as_file == through_api
    assert as_file[0] == (0 if accepted else 2), as_file
    if not accepted:
        assert all(line.startswith(f"{path}: ") for line in as_file[1]), as_file

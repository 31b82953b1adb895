"""The policy model: every rule reports its exact field path; loading; cross-policy and
host checks; effective values; the published schema and the shipped examples."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.common.errors import FabricError
from agent.common.policy.model import (
    EffectiveClass,
    LoadedPolicy,
    ParseCache,
    PolicyError,
    PolicyViolation,
    QosPolicy,
    check_host,
    check_ownership,
    detect_cgroup2_root,
    load_policies,
    load_policy_file,
    load_policy_files,
    render_schema,
)
from tests import ROOT

POLICIES = ROOT / "policies"
FIXTURES = ROOT / "tests" / "fixtures" / "policies"


def base() -> dict[str, Any]:
    return {
        "apiVersion": "fabric.qos/v1alpha1",
        "kind": "QosPolicy",
        "metadata": {"name": "node"},
        "spec": {
            "interface": "eth0",
            "direction": "egress",
            "bandwidth": "100Gbit",
            "defaultClass": "best-effort",
            "classes": [
                {
                    "name": "collectives",
                    "priority": 0,
                    "rate": "60Gbit",
                    "ceil": "100Gbit",
                    "dscp": 26,
                    "match": [
                        {"dstPorts": ["29500-29599"]},
                        {"cgroup": "system.slice/slurmstepd.scope/job_4242"},
                    ],
                },
                {"name": "best-effort", "priority": 7, "rate": "1Gbit"},
            ],
        },
    }


def problems(document: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        load_policies(yaml.safe_dump(document), "p.yaml")
    except PolicyError as exc:
        return [(v.path, v.reason) for v in exc.violations]
    return []


def edited(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(base())
    change(document)
    return document


def spec(document: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = document["spec"]
    return result


def cls(document: dict[str, Any], index: int) -> dict[str, Any]:
    result: dict[str, Any] = spec(document)["classes"][index]
    return result


def test_base_policy_is_valid() -> None:
    assert problems(base()) == []


# Each rule: how to break the base policy, the exact path, and words of the reason.
RULES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "ceil over bandwidth",
        lambda d: cls(d, 1).update(ceil="120Gbit"),
        "spec.classes[1].ceil",
        "120Gbit exceeds bandwidth 100Gbit",
    ),
    (
        "rate over ceil",
        lambda d: cls(d, 0).update(ceil="50Gbit"),
        "spec.classes[0].rate",
        "60Gbit exceeds ceil 50Gbit",
    ),
    (
        "rate over bandwidth",
        lambda d: cls(d, 1).update(rate="200Gbit"),
        "spec.classes[1].rate",
        "200Gbit exceeds bandwidth 100Gbit",
    ),
    (
        "rates add up over bandwidth",
        lambda d: cls(d, 1).update(rate="50%"),
        "spec.classes",
        "class rates add up to 110Gbit, more than bandwidth 100Gbit",
    ),
    (
        "duplicate class name",
        lambda d: cls(d, 0).update(name="best-effort"),
        "spec.classes[1].name",
        "duplicate class name 'best-effort' (also classes[0])",
    ),
    (
        "defaultClass missing",
        lambda d: spec(d).update(defaultClass="bulk"),
        "spec.defaultClass",
        "no class named 'bulk'",
    ),
    (
        "class name not a DNS label",
        lambda d: cls(d, 1).update(name="Best_Effort"),
        "spec.classes[1].name",
        "is not a DNS label",
    ),
    (
        "class name too long",
        lambda d: cls(d, 1).update(name="a" * 64),
        "spec.classes[1].name",
        "at most 63 characters",
    ),
    (
        "metadata.name not a DNS label",
        lambda d: d["metadata"].update(name="-node"),
        "metadata.name",
        "is not a DNS label",
    ),
    (
        "too many classes",
        lambda d: spec(d).update(
            classes=[{"name": f"c{i}", "priority": 7, "rate": "1Gbit"} for i in range(65)]
        ),
        "spec.classes",
        "at most 64 items",
    ),
    (
        "no classes",
        lambda d: spec(d).update(classes=[]),
        "spec.classes",
        "at least 1 item",
    ),
    (
        "port range reversed",
        lambda d: cls(d, 0)["match"][0].update(dstPorts=["29599-29500"]),
        "spec.classes[0].match[0].dstPorts[0]",
        "range start 29599 is after its end 29500",
    ),
    (
        "port out of range",
        lambda d: cls(d, 0)["match"][0].update(dstPorts=["80", "0"]),
        "spec.classes[0].match[0].dstPorts[1]",
        "port 0 is outside 1..65535",
    ),
    (
        "port too high",
        lambda d: cls(d, 0)["match"][0].update(srcPorts=[65536]),
        "spec.classes[0].match[0].srcPorts[0]",
        "port 65536 is outside 1..65535",
    ),
    (
        "port not a port",
        lambda d: cls(d, 0)["match"][0].update(dstPorts=["http"]),
        "spec.classes[0].match[0].dstPorts[0]",
        "is not a port or port range",
    ),
    (
        "empty match entry",
        lambda d: cls(d, 0)["match"].append({}),
        "spec.classes[0].match[2]",
        "empty match entry",
    ),
    (
        "bad CIDR",
        lambda d: cls(d, 0)["match"][0].update(dstCidr="10.0.0.0/33"),
        "spec.classes[0].match[0].dstCidr",
        "is not a CIDR",
    ),
    (
        "CIDR with host bits",
        lambda d: cls(d, 0)["match"][0].update(srcCidr="10.1.2.3/16"),
        "spec.classes[0].match[0].srcCidr",
        "has host bits set (did you mean 10.1.0.0/16?)",
    ),
    (
        "protocol unknown",
        lambda d: cls(d, 0)["match"][0].update(protocol="sctp"),
        "spec.classes[0].match[0].protocol",
        "'tcp', 'udp' or 'icmp'",
    ),
    (
        "ports with icmp",
        lambda d: cls(d, 0)["match"][0].update(protocol="icmp"),
        "spec.classes[0].match[0].dstPorts",
        "ports never match protocol icmp",
    ),
    (
        "match dscp out of range",
        lambda d: cls(d, 0)["match"][0].update(dscp=64),
        "spec.classes[0].match[0].dscp",
        "less than or equal to 63",
    ),
    (
        "class dscp out of range",
        lambda d: cls(d, 1).update(dscp=-1),
        "spec.classes[1].dscp",
        "greater than or equal to 0",
    ),
    (
        "cgroup absolute",
        lambda d: cls(d, 0)["match"][1].update(cgroup="/system.slice"),
        "spec.classes[0].match[1].cgroup",
        "no leading /",
    ),
    (
        "cgroup escapes",
        lambda d: cls(d, 0)["match"][1].update(cgroup="system.slice/../../etc"),
        "spec.classes[0].match[1].cgroup",
        "'..' is not allowed",
    ),
    (
        "fwmark malformed",
        lambda d: cls(d, 0)["match"][0].update(fwmark="0x10"),
        "spec.classes[0].match[0].fwmark",
        "is not a mark",
    ),
    (
        "fwmark value outside mask",
        lambda d: cls(d, 0)["match"][0].update(fwmark="0x11/0x10"),
        "spec.classes[0].match[0].fwmark",
        "bits outside the mask",
    ),
    (
        "priority out of range",
        lambda d: cls(d, 1).update(priority=8),
        "spec.classes[1].priority",
        "less than or equal to 7",
    ),
    (
        "rate malformed",
        lambda d: cls(d, 1).update(rate="1gbit"),
        "spec.classes[1].rate",
        "units are case-sensitive: write Gbit",
    ),
    (
        "bandwidth as a percentage",
        lambda d: spec(d).update(bandwidth="100%"),
        "spec.bandwidth",
        "must be an absolute rate",
    ),
    (
        "percentage below one bit",
        lambda d: cls(d, 1).update(rate="0.0000000001%"),
        "spec.classes[1].rate",
        "less than 1bit",
    ),
    (
        "direction unknown",
        lambda d: spec(d).update(direction="both"),
        "spec.direction",
        "'egress' or 'ingress', got 'both'",
    ),
    (
        "interface name invalid",
        lambda d: spec(d).update(interface="a-very-long-interface0"),
        "spec.interface",
        "is not an interface name",
    ),
    (
        "unknown field",
        lambda d: cls(d, 1).update(burst="1Mbit"),
        "spec.classes[1].burst",
        "unknown field",
    ),
    (
        "snake_case key is not the YAML name",
        lambda d: spec(d).update(take_over=True),
        "spec.take_over",
        "unknown field",
    ),
    (
        "missing field",
        lambda d: spec(d).pop("bandwidth"),
        "spec.bandwidth",
        "required field is missing",
    ),
    (
        "takeOver not a bool",
        lambda d: spec(d).update(takeOver="yes please"),
        "spec.takeOver",
        "valid boolean",
    ),
    (
        "wrong apiVersion",
        lambda d: d.update(apiVersion="fabric.qos/v1"),
        "apiVersion",
        "'fabric.qos/v1alpha1'",
    ),
]


@pytest.mark.parametrize(
    ("change", "path", "reason"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_rule_reports_exact_path(
    change: Callable[[dict[str, Any]], None], path: str, reason: str
) -> None:
    found = problems(edited(change))

    assert [p for p, _ in found] == [path], found
    assert reason in found[0][1]


def test_every_problem_is_reported() -> None:
    def change(d: dict[str, Any]) -> None:
        cls(d, 1).update(ceil="120Gbit", dscp=99)
        d["metadata"]["name"] = "Node"

    assert [p for p, _ in problems(edited(change))] == [
        "metadata.name",
        "spec.classes[1].dscp",
    ]


def test_violations_are_structured_and_name_the_file() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(FIXTURES / "bad-ceil.yaml")

    error = caught.value
    assert isinstance(error, FabricError)
    file = str(FIXTURES / "bad-ceil.yaml")
    assert error.violations == (
        PolicyViolation(file, "spec.classes[1].ceil", "120Gbit exceeds bandwidth 100Gbit"),
    )
    assert str(error) == f"{file}: spec.classes[1].ceil: 120Gbit exceeds bandwidth 100Gbit"


def test_malformed_yaml_names_line_and_column() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(FIXTURES / "malformed.yaml")

    (violation,) = caught.value.violations
    assert (violation.line, violation.column) == (9, 19)
    assert violation.reason.startswith("not valid YAML")
    assert str(violation).startswith(
        f"{FIXTURES / 'malformed.yaml'}:9:19: not valid YAML: mapping values"
    )


def test_unreadable_and_empty_files() -> None:
    with pytest.raises(PolicyError, match="cannot read: No such file"):
        load_policy_file(FIXTURES / "absent.yaml")
    with pytest.raises(PolicyError, match="holds no policy"):
        load_policies("---\n# nothing\n", "empty.yaml")
    with pytest.raises(PolicyError, match="a policy must be a mapping, got list"):
        load_policies("- 1\n", "list.yaml")


def test_multi_document_file() -> None:
    loaded = load_policy_file(FIXTURES / "multi.yaml")

    assert [(p.document, p.policy.metadata.name) for p in loaded] == [
        (1, "node-egress"),
        (2, "node-ingress"),
    ]
    assert check_ownership(loaded) == []


def test_multi_document_violation_names_the_document() -> None:
    text = yaml.safe_dump(base()) + "---\n" + yaml.safe_dump(edited(lambda d: d.pop("kind")))

    with pytest.raises(PolicyError) as caught:
        load_policies(text, "two.yaml")

    assert caught.value.violations == (
        PolicyViolation("two.yaml", "kind", "required field is missing", document=2),
    )
    assert str(caught.value) == "two.yaml (document 2): kind: required field is missing"


def test_cross_policy_ownership_names_both_files() -> None:
    loaded = [
        *load_policy_file(FIXTURES / "owner-a.yaml"),
        *load_policy_file(FIXTURES / "owner-b.yaml"),
    ]

    violations = check_ownership(loaded)

    a, b = str(FIXTURES / "owner-a.yaml"), str(FIXTURES / "owner-b.yaml")
    assert violations == [
        PolicyViolation(
            b, "spec.interface", f"eth1 egress is already owned by policy 'owner-a' in {a}"
        ),
    ]


def test_cross_policy_duplicate_name() -> None:
    first = load_policies(yaml.safe_dump(base()), "a.yaml")
    second = load_policies(
        yaml.safe_dump(edited(lambda d: spec(d).update(direction="ingress"))), "b.yaml"
    )

    assert check_ownership([*first, *second]) == [
        PolicyViolation("b.yaml", "metadata.name", "policy name 'node' is also used in a.yaml")
    ]


def test_host_checks_with_fake_probes(tmp_path: Path) -> None:
    (tmp_path / "system.slice" / "slurmstepd.scope" / "job_4242").mkdir(parents=True)
    document = edited(lambda d: cls(d, 1).update(match=[{"cgroup": "kubepods.slice"}]))
    loaded = load_policies(yaml.safe_dump(document), "p.yaml")

    def interfaces(name: str) -> bool:
        return name in {"lo", "eth1"}

    violations = check_host(loaded, interface_exists=interfaces, cgroup_root=tmp_path)

    assert [(v.path, v.reason) for v in violations] == [
        ("spec.interface", "unknown interface 'eth0' on this host"),
        ("spec.classes[1].match[0].cgroup", f"cgroup not found: {tmp_path / 'kubepods.slice'}"),
    ]


def test_host_checks_pass_when_everything_exists(tmp_path: Path) -> None:
    (tmp_path / "system.slice" / "slurmstepd.scope" / "job_4242").mkdir(parents=True)
    loaded = load_policies(yaml.safe_dump(base()), "p.yaml")

    assert check_host(loaded, interface_exists=lambda _: True, cgroup_root=tmp_path) == []


def test_host_checks_without_cgroup2() -> None:
    loaded = load_policies(yaml.safe_dump(base()), "p.yaml")

    (violation,) = check_host(loaded, interface_exists=lambda _: True, cgroup_root=None)

    assert violation.path == "spec.classes[0].match[1].cgroup"
    assert "cgroup v2 is not mounted" in violation.reason


def test_detect_cgroup2_root(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "25 31 0:23 / /sys rw,nosuid - sysfs sysfs rw\n"
        "34 25 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n"
        "35 34 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    unified = tmp_path / "unified"
    unified.write_text("30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n")
    none = tmp_path / "none"
    none.write_text("25 31 0:23 / /sys rw,nosuid - sysfs sysfs rw\n")
    escaped = tmp_path / "escaped"
    escaped.write_text("30 25 0:26 / /mnt/my\\040cgroup rw - cgroup2 none rw\n")

    assert detect_cgroup2_root(hybrid) == Path("/sys/fs/cgroup/unified")
    assert detect_cgroup2_root(unified) == Path("/sys/fs/cgroup")
    assert detect_cgroup2_root(none) is None
    assert detect_cgroup2_root(escaped) == Path("/mnt/my cgroup")
    assert detect_cgroup2_root(tmp_path / "absent") is None


def test_effective_classes_apply_defaults() -> None:
    def change(d: dict[str, Any]) -> None:
        spec(d)["classes"].append({"name": "bulk", "priority": 5, "rate": "12.5%", "ceil": "50%"})

    policy = load_policies(yaml.safe_dump(edited(change)), "p.yaml")[0].policy

    effective = policy.effective_classes()

    assert [(c.name, c.rate_bps, c.ceil_bps, c.dscp, c.is_default) for c in effective] == [
        ("collectives", 60 * 10**9, 100 * 10**9, 26, False),
        ("best-effort", 10**9, 100 * 10**9, None, True),
        ("bulk", 12_500_000_000, 50 * 10**9, None, False),
    ]
    assert isinstance(effective[0], EffectiveClass)
    assert effective[0].match[0].dst_ports is not None
    assert str(effective[0].match[0].dst_ports[0]) == "29500-29599"


def test_model_is_frozen_and_takes_python_names() -> None:
    document = base()
    document["api_version"] = document.pop("apiVersion")
    document["spec"]["default_class"] = document["spec"].pop("defaultClass")
    document["spec"]["take_over"] = True

    policy = QosPolicy.model_validate(document)

    assert policy.spec.take_over is True
    assert policy.spec.bandwidth_bps == 100 * 10**9
    with pytest.raises(ValueError, match="frozen"):
        policy.spec.take_over = False


@pytest.mark.parametrize("name", ["training-node.yaml", "inference-node.yaml"])
def test_examples_are_valid(name: str) -> None:
    loaded = load_policy_file(POLICIES / name)

    assert [p.policy.metadata.name for p in loaded] == [name.removesuffix(".yaml")]
    assert check_ownership(loaded) == []


def test_training_example_classes() -> None:
    (loaded,) = load_policy_file(POLICIES / "training-node.yaml")

    effective = {c.name: c for c in loaded.policy.effective_classes()}
    assert list(effective) == ["collectives", "checkpoint", "data-loading", "best-effort"]
    assert [effective[n].dscp for n in ("collectives", "checkpoint", "data-loading")] == [
        26,
        10,
        18,
    ]


def test_schema_is_fresh() -> None:
    committed = (POLICIES / "schema.json").read_text()

    assert committed == render_schema(), (
        "policies/schema.json is stale; regenerate it with "
        "`python -m agent.common.policy.model --write-schema policies/schema.json`"
    )


def test_schema_describes_yaml_names() -> None:
    schema = json.loads(render_schema())

    assert schema["$id"] and schema["title"] == "QosPolicy"
    assert schema["additionalProperties"] is False
    assert set(schema["$defs"]["PolicySpec"]["properties"]) == {
        "interface",
        "direction",
        "bandwidth",
        "defaultClass",
        "takeOver",
        "classes",
    }


def test_loaded_policy_violation_helper() -> None:
    loaded = LoadedPolicy("f.yaml", 3, QosPolicy.model_validate(base()))

    assert str(loaded.violation("spec.interface", "why")) == (
        "f.yaml (document 3): spec.interface: why"
    )


def test_parse_cache_reuses_unchanged_files_and_sees_every_edit(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text((FIXTURES / "owner-a.yaml").read_text())
    cache: ParseCache = {}

    first, _ = load_policy_files([path], cache)
    again, _ = load_policy_files([path], cache)
    path.write_text(path.read_text().replace("eth1", "eth7"))
    edited, _ = load_policy_files([path], cache)
    path.write_text("spec: [\n")
    broken, violations = load_policy_files([path], cache)
    gone, _ = load_policy_files([], cache)

    assert again[0] is first[0]  # the same parse, not a new one
    assert edited[0].policy.spec.interface == "eth7"
    assert broken == [] and "not valid YAML" in str(violations[0])
    assert gone == [] and cache == {}

"""Policy documents beyond what a node should take: too deep, too large, rates past what
the kernel carries, match entries that expand to more u32 filters than a node should
hold, interface names longer in bytes than in characters, and directory entries that
cannot be read. Each is refused at validation with the file, field and limit named,
through `policy validate`, the files the daemon reads and the API; nothing is lost of
what is enforced."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from agent.common.policy.documents import encode_document
from agent.common.policy.limits import MAX_DOCUMENT_BYTES, ifname_bytes
from agent.common.policy.model import (
    PolicyError,
    QosPolicy,
    load_policies,
    load_policy_files,
    parse_document,
)
from agent.node.qos.api_objects import ENFORCED, RefusedError
from agent.node.qos.desired import CATCH_ALL_PREFS, build_tree, policy_device
from agent.node.qos.ifb import ensure_ingress_redirect, read_ingress_redirect
from agent.node.qos.reconciler import Reconciler
from agent.proto.fabric.v1 import qos_service_pb2 as pb
from tests import ROOT
from tests.conftest import VethPair
from tests.node.api.conftest import node as node  # the in-process agent's QoS API
from tests.node.api.qos_node import Node
from tests.node.api.test_qos_service import details
from tests.node.qos import DEVICE, api_policy_document, assignment_document, netlink_put
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_ifb import ingress_pair as ingress_pair  # real IFB, ingress, mirred
from tests.node.qos.test_reconciler import write

BASE = (ROOT / "policies" / "training-node.yaml").read_text()


def validate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "policy", "validate", "--offline", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def refusal(document: dict[str, Any]) -> dict[str, str]:
    """The violations `document` is refused with, by field path."""
    with pytest.raises(PolicyError) as refused:
        parse_document(document, "doc.yaml")
    return {v.path: v.reason for v in refused.value.violations}


def two_class(**classes: Any) -> dict[str, Any]:
    """A two-class policy on DEVICE; `classes` keys replace the first class's fields."""
    document = api_policy_document(DEVICE)
    document["spec"]["classes"][0].update(classes)
    return document


# --- nesting and numbers ---------------------------------------------------------------


def test_a_20000_deep_yaml_value_is_refused_by_validate_naming_file_line_and_field(
    tmp_path: Path,
) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text(BASE + "  annotations: " + "[" * 20_000 + "]" * 20_000 + "\n")

    result = validate(deep)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    line = len(BASE.splitlines()) + 1
    assert result.stderr == (
        f"{deep}:{line}:46: spec.annotations[0][0][0][0][0][0]...: nested deeper than 32 levels\n"
    )


def test_a_deeply_nested_document_from_any_source_is_refused_before_it_is_validated() -> None:
    # What a stored API object or a JSON request would hold: no YAML parser in between.
    document = two_class()
    deep: list[Any] = []
    document["metadata"]["labels"] = deep
    for _ in range(20_000):
        deep.append([])
        deep = deep[0]

    assert refusal(document) == {
        "metadata.labels[0][0][0][0][0][0]...": "nested deeper than 32 levels"
    }


def test_an_integer_too_long_for_python_is_refused_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "long.yaml"
    path.write_text(BASE.replace("bandwidth: 100Gbit", "bandwidth: " + "9" * 5000))

    result = validate(path)

    assert result.returncode == 2
    assert result.stderr == f"{path}:13:14: spec.bandwidth: a number of 5000 digits; at most 32\n"


def test_a_yaml_alias_bomb_is_refused_by_its_expanded_size() -> None:
    # 1,000 ports, aliased by 100 match entries, aliased by 64 classes: 6.4 million
    # ports once expanded, in 8 KiB of YAML.
    ports = ", ".join(str(p) for p in range(1, 1001))
    entries = ", ".join(["{dstPorts: *ports}"] * 100)
    classes = "\n".join(
        f"    - {{name: c{i}, priority: 1, rate: 1Mbit, match: *entries}}" for i in range(64)
    )
    text = (
        "apiVersion: fabric.qos/v1alpha1\nkind: QosPolicy\nmetadata: {name: bomb}\n"
        f"x-ports: &ports [{ports}]\nx-entries: &entries [{entries}]\n"
        "spec:\n  interface: eth0\n  direction: egress\n  bandwidth: 10Gbit\n"
        f"  defaultClass: c0\n  classes:\n{classes}\n"
    )

    with pytest.raises(PolicyError) as refused:
        load_policies(text, "bomb.yaml")

    assert [str(v) for v in refused.value.violations] == [
        "bomb.yaml:5:393: holds more than 20000 values (a YAML alias counts as what it stands for)"
    ]


def test_a_megabyte_of_values_is_refused_where_the_limit_is_passed_not_after_parsing_it() -> None:
    head = "apiVersion: fabric.qos/v1alpha1\nkind: QosPolicy\nmetadata: {name: x, labels: ["
    count = (MAX_DOCUMENT_BYTES - len(head) - 4) // 2
    text = head + ",".join(["1"] * count) + "]}\n"

    with pytest.raises(PolicyError) as refused:
        load_policies(text, "values.yaml")

    (violation,) = refused.value.violations
    assert violation.reason.startswith("holds more than 20000 values")
    # Where the 20,001st value is: about 40,000 characters into a million.
    assert violation.line == 3
    assert violation.column is not None and violation.column < 50_000


# --- rates -----------------------------------------------------------------------------


def test_a_bandwidth_of_a_hundred_digits_is_refused_at_validation_naming_field_and_limit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(BASE.replace("bandwidth: 100Gbit", "bandwidth: 1" + "0" * 99 + "bit"))

    result = validate(path)

    assert result.returncode == 2
    assert result.stderr == (
        f"{path}: spec.bandwidth: '100000000000'... (103 characters) is above the maximum "
        "rate 10Tbit\n"
    )


def test_rates_beyond_10_tbit_are_refused_in_every_rate_field_and_10_tbit_builds() -> None:
    over = two_class(ceil="10000000000001")
    over["spec"]["bandwidth"] = "10.5Tbit"
    over["spec"]["classes"][1]["rate"] = 10**13 + 8
    at_limit = two_class(rate="50%", ceil="10Tbit")
    at_limit["spec"]["bandwidth"] = 10**13

    assert refusal(over) == {
        "spec.bandwidth": "'10.5Tbit' is above the maximum rate 10Tbit",
        "spec.classes[0].ceil": "'10000000000001' is above the maximum rate 10Tbit",
        "spec.classes[1].rate": "'10000000000008' is above the maximum rate 10Tbit",
    }
    policy = parse_document(at_limit, "doc.yaml")
    assert isinstance(policy, QosPolicy)
    rates = {c.name: (c.rate_bps, c.ceil_bps) for c in build_tree(policy).tree.classes}
    assert rates == {
        "job-net": (10**13, 10**13),
        "bulk": (5 * 10**12, 10**13),
        "rest": (
            10**8,
            10**13,
        ),
    }


def test_percentages_of_a_bandwidth_beyond_the_kernels_fields_are_refused_at_the_bandwidth(
    tmp_path: Path,
) -> None:
    # Every class is a share: resolved against 1e99 bit/s they would not fit either.
    path = tmp_path / "shares.yaml"
    path.write_text(
        "apiVersion: fabric.qos/v1alpha1\nkind: QosPolicy\nmetadata: {name: shares}\n"
        "spec:\n  interface: eth0\n  direction: egress\n"
        f"  bandwidth: 1{'0' * 99}bit\n  defaultClass: rest\n  classes:\n"
        "    - {name: bulk, priority: 1, rate: 60%, ceil: 100%}\n"
        "    - {name: rest, priority: 7, rate: 40%}\n"
    )

    loaded, violations = load_policy_files([path])

    assert loaded == []
    assert [(v.path, v.reason) for v in violations] == [
        (
            "spec.bandwidth",
            "'100000000000'... (103 characters) is above the maximum rate 10Tbit",
        )
    ]


# --- u32 expansion ---------------------------------------------------------------------


def test_300_source_by_300_destination_ports_are_refused_with_the_count_and_the_limit() -> None:
    document = two_class(
        match=[{"srcPorts": list(range(1000, 1300)), "dstPorts": list(range(2000, 2300))}]
    )

    assert refusal(document) == {
        "spec.classes[0].match": "expands to 180000 u32 filters; a class may have at most 256",
        "spec.classes": "the match entries expand to 180000 u32 filters; a policy may have "
        "at most 1024",
    }


def test_a_550_byte_file_expanding_to_10240_u32_filters_is_refused_by_validate(
    tmp_path: Path,
) -> None:
    path = tmp_path / "small.yaml"
    five, four = ", ".join(['"1-65535"'] * 5), ", ".join(['"1-65535"'] * 4)
    path.write_text(
        "apiVersion: fabric.qos/v1alpha1\nkind: QosPolicy\nmetadata: {name: small}\n"
        "spec:\n  interface: eth0\n  direction: egress\n  bandwidth: 10Gbit\n"
        "  defaultClass: rest\n  classes:\n"
        f"    - name: bulk\n      priority: 1\n      rate: 1Gbit\n      match:\n"
        f"        - srcPorts: [{five}]\n          dstPorts: [{four}]\n"
        "    - {name: rest, priority: 7, rate: 1Gbit}\n"
    )
    assert path.stat().st_size <= 550

    result = validate(path)

    assert result.returncode == 2
    # Two families x 5 ranges x 4 ranges, each range 16 aligned blocks (1, 2-3, 4-7, ...).
    assert result.stderr == (
        f"{path}: spec.classes[0].match: expands to 10240 u32 filters; a class may have at "
        "most 256\n"
        f"{path}: spec.classes: the match entries expand to 10240 u32 filters; a policy may "
        "have at most 1024\n"
    )


def test_classes_within_their_limit_are_refused_when_the_policy_exceeds_its_own() -> None:
    document = api_policy_document(DEVICE)
    # 2 families x 128 ports: 256 filters a class, the most a class may have.
    document["spec"]["classes"] = [
        {
            "name": f"c{i}",
            "priority": 1,
            "rate": "1Mbit",
            "match": [{"dstPorts": list(range(1000 * (i + 1), 1000 * (i + 1) + 128))}],
        }
        for i in range(5)
    ]
    document["spec"]["defaultClass"] = "c0"
    within = {**document, "spec": {**document["spec"], "classes": document["spec"]["classes"][:4]}}

    assert refusal(document) == {
        "spec.classes": "the match entries expand to 1280 u32 filters; a policy may have "
        "at most 1024"
    }
    policy = parse_document(within, "doc.yaml")
    assert isinstance(policy, QosPolicy)
    assert len(build_tree(policy).tree.filters) == 1024 + len(CATCH_ALL_PREFS)  # and the catch-alls


def test_an_assignment_expanding_past_a_class_limit_is_refused_at_validation() -> None:
    document = assignment_document("job-1", "job/a", "node", "collectives")
    document["spec"]["match"] = [{"dstPorts": [str(2000 + p) for p in range(300)]}]

    assert refusal(document) == {
        "spec.match": "expands to 600 u32 filters; a class may have at most 256"
    }


def test_an_assignment_that_would_take_its_class_past_the_limit_is_refused_and_changes_nothing(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    enforced = kernel.read_tree(DEVICE)
    # "29500-29599" is 3 aligned blocks in 2 families: 6 filters; 126 ports more: 258.
    document = assignment_document("job-1", "job/a", "node", "collectives")
    document["spec"]["match"] = [{"dstPorts": [str(2000 + p) for p in range(126)]}]
    model = parse_document(document, "request")

    with pytest.raises(RefusedError) as refused:
        reconciler.apply_object(model, ttl_s=600)

    assert str(refused.value) == (
        "spec.match: its match entries would take class 'collectives' of policy 'node' "
        "to 258 u32 filters; at most 256"
    )
    assert kernel.read_tree(DEVICE) == enforced
    assert [(v.name, v.state) for v in reconciler.policies()] == [("node", ENFORCED)]


# --- sizes -----------------------------------------------------------------------------


def test_a_file_over_1_mib_is_refused_naming_its_size_and_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "large.yaml"
    path.write_text(BASE + "#" * (MAX_DOCUMENT_BYTES - len(BASE)) + "\n")

    result = validate(path)

    assert result.returncode == 2
    assert result.stderr == f"{path}: document of 1048577 bytes; at most 1 MiB\n"


def test_a_file_of_64_gib_is_refused_without_being_read(tmp_path: Path) -> None:
    path = tmp_path / "sparse.yaml"
    with path.open("wb") as handle:
        handle.truncate(64 << 30)  # sparse: takes no disk, but reading it would

    loaded, violations = load_policy_files([path])

    assert loaded == []
    assert [str(v) for v in violations] == [f"{path}: document of 65536 MiB; at most 1 MiB"]


def test_a_request_document_over_1_mib_is_invalid_argument_and_changes_nothing(
    node: Node,
) -> None:
    before = node.kernel()
    cgroups = [{"cgroup": f"job/{i:04d}/" + "x" * 4000} for i in range(300)]
    doc = api_policy_document(node.spare)
    doc["spec"]["classes"][0]["match"] = cgroups
    request = pb.ApplyPolicyRequest(object=encode_document(doc), validate_only=True)

    with pytest.raises(grpc.RpcError) as error:
        node.stub.ApplyPolicy(request)

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = _field_violations(error.value)
    assert violations == {
        "object": f"document of {request.object.ByteSize()} bytes encoded; at most 1 MiB"
    }
    assert node.kernel() == before
    assert node.api_objects() == []


def _field_violations(exc: grpc.RpcError) -> dict[str, str]:
    found = details(exc, error_details_pb2.BadRequest).field_violations
    return {v.field: v.description for v in found}


# --- interface names -------------------------------------------------------------------


def test_an_interface_name_over_15_bytes_of_utf8_is_refused_though_under_15_characters() -> None:
    name = "é" * 9

    assert refusal(two_class() | {"spec": {**two_class()["spec"], "interface": name}}) == {
        "spec.interface": f"{name!r} is 18 bytes in UTF-8; the kernel allows at most 15"
    }


@pytest.mark.parametrize("interface", ["é" * 6, "eth0.üüüü", "абвгдеё", "€€€€€"])
def test_the_ifb_device_of_an_accepted_multibyte_interface_fits_the_kernels_15_bytes(
    interface: str,
) -> None:
    document = api_policy_document(interface, direction="ingress")

    policy = parse_document(document, "doc.yaml")

    assert isinstance(policy, QosPolicy)
    device = policy_device(policy)
    assert device.startswith("ifb-")
    assert ifname_bytes(device) <= 15
    assert build_tree(policy, device=device).tree.device == device


# --- the policy directory --------------------------------------------------------------


@pytest.fixture
def looped(dirs: tuple[Path, Path]) -> Path:
    """The policy directory with a symlink loop and a FIFO beside a good policy."""
    policy_dir = dirs[0]
    write(policy_dir, DEVICE)
    (policy_dir / "loop.yaml").symlink_to("loop.yaml")
    os.mkfifo(policy_dir / "pipe.yml")
    return policy_dir


def test_validate_of_a_directory_reports_a_symlink_loop_and_a_fifo(looped: Path) -> None:
    result = validate(looped)

    assert result.returncode == 2
    assert result.stdout == f"{looped}/node.yaml: ok (3 classes on {DEVICE} egress)\n"
    assert result.stderr == (
        f"{looped}/loop.yaml: cannot read: Too many levels of symbolic links\n"
        f"{looped}/pipe.yml: cannot read: not a regular file\n"
    )


def test_a_symlink_loop_in_the_policy_directory_is_logged_once_and_keeps_what_is_enforced(
    reconciler: Reconciler,
    kernel: FakeKernel,
    dirs: tuple[Path, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    enforced = kernel.read_tree(DEVICE)
    (dirs[0] / "loop.yaml").symlink_to("loop.yaml")

    with caplog.at_level(logging.ERROR):
        first = reconciler.reconcile()
        second = reconciler.reconcile()

    assert first.result == second.result == "invalid"
    logged = [r.getMessage() for r in caplog.records if "loop.yaml" in r.getMessage()]
    assert logged == [
        f"QoS policy file {dirs[0]}/loop.yaml: not taken: "
        "cannot read: Too many levels of symbolic links"
    ]
    assert kernel.read_tree(DEVICE) == enforced


def test_an_ingress_policy_on_a_multibyte_interface_gets_its_ifb_on_the_real_kernel(
    ingress_pair: VethPair,
) -> None:
    ns, name = ingress_pair.netns, "é" * 6  # 12 bytes: "ifb-" + it would be 16
    device = ingress_pair.device
    for args in ([device, "down"], [device, "name", name], [name, "up"]):
        subprocess.run(["ip", "-n", ns, "link", "set", "dev", *args], check=True)
    policy = parse_document(api_policy_document(name, direction="ingress"), "doc.yaml")
    assert isinstance(policy, QosPolicy)

    ifb = ensure_ingress_redirect(name, netns=ns)
    netlink_put(build_tree(policy, device=ifb).tree, ns)

    assert ifb == policy_device(policy)
    assert read_ingress_redirect(name, netns=ns).complete
    shown = subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show", "dev", ifb], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr

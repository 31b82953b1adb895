"""fabric.v1.QosService over a real gRPC server on a unix socket, with the reconciler and
the qos collector on the fake kernel: error codes and their details, leases, listing and
status, and property-based fuzzing of policy input that must never crash the agent or
touch the kernel when it is rejected."""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.policy.documents import encode_document
from agent.proto.fabric.v1 import qos_service_pb2 as pb
from tests.node.api.qos_node import Node
from tests.node.qos import DEVICE
from tests.node.qos import api_policy_document as document

INTERVAL_S = 0.2


def apply_request(doc: dict[str, Any], **fields: Any) -> pb.ApplyPolicyRequest:
    return pb.ApplyPolicyRequest(object=encode_document(doc), **fields)


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def details(exc: grpc.RpcError, kind: type[Any]) -> Any:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    for packed in status.details:
        detail = kind()
        if packed.Unpack(detail):
            return detail
    raise AssertionError(f"no {kind.__name__} in {status.details}")


def test_bad_policy_is_invalid_argument_with_field_paths_and_changes_nothing(
    node: Node,
) -> None:
    before = node.kernel()
    bad = document(node.spare, bandwidth="1Gbit", defaultClass="missing")
    bad["spec"]["classes"][0]["rate"] = "2Gbit"

    with pytest.raises(grpc.RpcError) as error:
        node.stub.ApplyPolicy(apply_request(bad, lease_ttl=seconds(60)))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = details(error.value, error_details_pb2.BadRequest).field_violations
    fields = {v.field: v.description for v in violations}
    assert fields["spec.classes[0].rate"] == "2Gbit exceeds bandwidth 1Gbit"
    assert fields["spec.defaultClass"] == "no class named 'missing'"
    assert node.kernel() == before
    assert node.api_objects() == []


def test_empty_object_and_bad_lease_are_invalid_argument(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as empty:
        node.stub.ApplyPolicy(pb.ApplyPolicyRequest())
    with pytest.raises(grpc.RpcError) as lease:
        node.stub.ApplyPolicy(apply_request(document(node.spare), lease_ttl=seconds(0.5)))

    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(empty.value, error_details_pb2.BadRequest).field_violations[0].field == "object"
    assert lease.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(lease.value, error_details_pb2.BadRequest).field_violations[0].field == (
        "lease_ttl"
    )


def test_file_owned_name_is_failed_precondition(node: Node) -> None:
    before = node.kernel()

    with pytest.raises(grpc.RpcError) as error:
        node.stub.ApplyPolicy(apply_request(document(node.spare, name="node")))
    with pytest.raises(grpc.RpcError) as deleting:
        node.stub.DeletePolicy(pb.DeletePolicyRequest(name="node"))

    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    violation = details(error.value, error_details_pb2.PreconditionFailure).violations[0]
    assert violation.type == "SOURCE" and "belongs to policy file" in violation.description
    assert deleting.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert node.kernel() == before


def test_a_policy_file_that_cannot_be_parsed_is_listed_failed_by_file(node: Node) -> None:
    junk = node.state_dir.parent / "policies" / "junk.yaml"
    junk.write_text("spec: [\n")

    node.stub.ApplyPolicy(apply_request(document(node.spare)))  # a pass, at once
    listed = {p.name: p for p in node.stub.ListPolicies(pb.ListPoliciesRequest()).policies}

    assert listed["node"].state == pb.POLICY_STATE_ENFORCED
    assert listed["job-net"].state == pb.POLICY_STATE_ENFORCED
    assert listed["junk.yaml"].state == pb.POLICY_STATE_FAILED
    assert listed["junk.yaml"].file == str(junk)
    assert "not valid YAML" in listed["junk.yaml"].message


def test_apply_list_status_renew_delete(node: Node) -> None:
    applied = node.stub.ApplyPolicy(apply_request(document(node.spare), lease_ttl=seconds(600)))
    assert applied.policy.state == pb.POLICY_STATE_ENFORCED
    assert applied.policy.source == pb.POLICY_SOURCE_API
    assert applied.policy.lease_ttl.seconds == 600
    assert any("+ qdisc fa:" in change for change in applied.changes)

    listed = node.stub.ListPolicies(pb.ListPoliciesRequest())
    assert [(p.name, p.source) for p in listed.policies] == [
        ("node", pb.POLICY_SOURCE_FILE),
        ("job-net", pb.POLICY_SOURCE_API),
    ]
    assert listed.policies[0].file.endswith("node.yaml")
    assert listed.policies[1].object.policy.spec.classes[0].rate == "300Mbit"
    first = node.stub.ListPolicies(pb.ListPoliciesRequest(page_size=1))
    second = node.stub.ListPolicies(
        pb.ListPoliciesRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [p.name for p in [*first.policies, *second.policies]] == ["node", "job-net"]
    assert second.next_page_token == ""

    # Counters come from the agent's samples: the second tick after the apply has a rate.
    bulk_minor = node.fake.tree(node.spare).classes[1].minor  # type: ignore[union-attr]
    node.fake.count(node.spare, bulk_minor, bytes_=10**6, packets=700)
    deadline = time.monotonic() + 10
    while True:
        status = node.stub.GetPolicyStatus(pb.GetPolicyStatusRequest(name="job-net"))
        by_class = {c.name: c for c in status.classes}
        if all(c.HasField("throughput_bps") for c in status.classes) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.1)
    assert set(by_class) == {"bulk", "rest"}
    assert by_class["bulk"].rate_bps == 300_000_000 and by_class["bulk"].ceil_bps == 10**9
    assert by_class["bulk"].device == node.spare and by_class["bulk"].minor >= 0x10
    assert by_class["bulk"].HasField("throughput_bps")
    assert by_class["bulk"].sent_bytes == 10**6

    renewed = node.stub.RenewLease(pb.RenewLeaseRequest(name="job-net", lease_ttl=seconds(900)))
    assert renewed.policy.lease_ttl.seconds == 900
    assert renewed.policy.lease_expire_time.seconds > applied.policy.lease_expire_time.seconds

    planned = node.stub.DeletePolicy(pb.DeletePolicyRequest(name="job-net", validate_only=True))
    assert planned.changes and node.api_objects() == ["job-net"]
    deleted = node.stub.DeletePolicy(pb.DeletePolicyRequest(name="job-net"))
    assert any("removed from" in change for change in deleted.changes)
    with pytest.raises(grpc.RpcError) as again:
        node.stub.DeletePolicy(pb.DeletePolicyRequest(name="job-net"))
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as renew_gone:
        node.stub.RenewLease(pb.RenewLeaseRequest(name="job-net"))
    assert renew_gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_plan_policy_and_validate_only_change_nothing(node: Node) -> None:
    before = node.kernel()
    doc = document(node.spare)

    planned = node.stub.PlanPolicy(pb.PlanPolicyRequest(object=encode_document(doc)))
    validated = node.stub.ApplyPolicy(apply_request(doc, validate_only=True))

    assert list(planned.changes) == list(validated.changes)
    assert any("+ qdisc fa:" in change for change in planned.changes)
    assert node.kernel() == before


def test_too_short_a_deadline_applies_nothing(node: Node) -> None:
    with pytest.raises(grpc.RpcError) as error:
        node.stub.ApplyPolicy(apply_request(document(node.spare)), timeout=0.1)

    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert node.api_objects() == []


def test_assignment_roundtrip_from_yaml(node: Node) -> None:
    doc = yaml.safe_load(
        """
        apiVersion: fabric.qos/v1alpha1
        kind: QosAssignment
        metadata: {name: slurm-job-42}
        spec:
          policy: node
          className: storage
          match: [{cgroup: system.slice/slurmstepd.scope/job_42}]
        """
    )
    applied = node.stub.ApplyPolicy(apply_request(doc, lease_ttl=seconds(3600)))

    # No such cgroup here: accepted, pending until it appears.
    assert applied.policy.state == pb.POLICY_STATE_PENDING
    assert "waiting for cgroup" in applied.policy.message
    status = node.stub.GetPolicyStatus(pb.GetPolicyStatusRequest(name="slurm-job-42"))
    assert [c.name for c in status.classes] == ["storage"]


# --- fuzzing -----------------------------------------------------------------------------

_text = st.text(max_size=12)
_rates = st.one_of(
    st.sampled_from(["100Mbit", "1Gbit", "50%", "0", "-1", "1.5Gbit", "10Tbit", "abc", ""]),
    # Either side of the 10 Tbit ceiling, and far past what the kernel's fields carry.
    st.sampled_from(["10000000000000", "10000000000008bit", "10.000001Tbit", "1" + "0" * 99]),
    _text,
)
_ports = st.one_of(
    st.lists(st.one_of(st.sampled_from(["80", "1-65535", "0", "70000", "9-3"]), _text), max_size=3),
    # Around the 256 u32 filters a class may have (two families, one filter a port).
    st.integers(126, 130).map(lambda n: [str(1000 + i) for i in range(n)]),
)
_match = st.fixed_dictionaries(
    {},
    optional={
        "srcCidr": st.one_of(st.sampled_from(["10.0.0.0/8", "::/0", "10.0.0.1/33"]), _text),
        "dstPorts": _ports,
        "protocol": st.sampled_from(["tcp", "udp", "icmp", "sctp", ""]),
        "dscp": st.integers(-5, 70),
        "cgroup": st.one_of(st.sampled_from(["a/b", "/abs", "../up", "x"]), _text),
        "fwmark": st.one_of(st.sampled_from(["0x1/0xff", "0x100/0xff", "5"]), _text),
    },
)
_class = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["bulk", "rest", "Bad_Name"]), _text)},
    optional={
        "priority": st.integers(-2, 9),
        "rate": _rates,
        "ceil": _rates,
        "dscp": st.integers(-1, 64),
        "match": st.lists(_match, max_size=2),
    },
)


def _fuzz_document(device: str, spare: str) -> st.SearchStrategy[dict[str, Any]]:
    spec = st.fixed_dictionaries(
        {},
        optional={
            "interface": st.one_of(st.sampled_from([device, spare, "nosuch0", ""]), _text),
            "direction": st.sampled_from(["egress", "ingress", "sideways", ""]),
            "bandwidth": _rates,
            "defaultClass": st.sampled_from(["bulk", "rest", "none", ""]),
            "takeOver": st.booleans(),
            "classes": st.lists(_class, max_size=4),
        },
    )
    return st.fixed_dictionaries(
        {
            "apiVersion": st.sampled_from(["fabric.qos/v1alpha1", "v2", ""]),
            "kind": st.just("QosPolicy"),
            "metadata": st.fixed_dictionaries({"name": st.sampled_from(["fz", "node", "Bad"])}),
            "spec": spec,
        }
    )


def test_fuzzed_policies_never_crash_the_agent_nor_change_the_kernel_on_rejection(
    node: Node,
) -> None:
    baseline = node.kernel()
    outcomes: dict[str, int] = {}

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(doc=_fuzz_document(DEVICE, node.spare), ttl=st.sampled_from([None, 60.0]))
    def one(doc: dict[str, Any], ttl: float | None) -> None:
        request = apply_request(doc)
        if ttl is not None:
            request.lease_ttl.CopyFrom(seconds(ttl))
        try:
            node.stub.ApplyPolicy(request, timeout=30)
        except grpc.RpcError as exc:
            code = exc.code()
            outcomes[code.name] = outcomes.get(code.name, 0) + 1
            assert code in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            }, f"{code}: {exc.details()}"
            assert node.kernel() == baseline, f"kernel changed on {code.name}"
            return
        outcomes["OK"] = outcomes.get("OK", 0) + 1
        node.stub.DeletePolicy(pb.DeletePolicyRequest(name=doc["metadata"]["name"]))
        assert node.kernel() == baseline

    one()

    # Still serving, nothing left behind.
    listed = node.stub.ListPolicies(pb.ListPoliciesRequest()).policies
    assert [(p.name, p.state) for p in listed] == [("node", pb.POLICY_STATE_ENFORCED)]
    assert node.alive()
    assert node.api_objects() == []
    assert outcomes.get("INVALID_ARGUMENT", 0) > 0


def test_leased_policy_disappears_with_its_classes_after_its_ttl(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="agent.node.qos.reconciler")
    before = node.kernel()
    node.stub.ApplyPolicy(apply_request(document(node.spare), lease_ttl=seconds(1)))
    assert node.kernel() != before
    applied_at = time.monotonic()

    # The agent's reconcile interval is 5 s: the lease itself must wake it.
    while node.kernel() != before and time.monotonic() - applied_at < 4:
        time.sleep(0.1)

    assert node.kernel() == before
    assert [p.name for p in node.stub.ListPolicies(pb.ListPoliciesRequest()).policies] == ["node"]
    assert node.api_objects() == []
    assert (
        "lease of API QosPolicy job-net ran out (TTL 1s, not renewed): removing it" in caplog.text
    )


def test_a_hundred_problems_fit_in_the_trailers(node: Node) -> None:
    doc = document(node.spare)
    doc["spec"]["classes"] = [
        {"name": f"c{i}", "priority": 9, "rate": "x" * 40, "ceil": "y" * 40} for i in range(64)
    ]

    with pytest.raises(grpc.RpcError) as error:
        node.stub.ApplyPolicy(apply_request(doc))

    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = details(error.value, error_details_pb2.BadRequest).field_violations
    assert violations[0].field == "spec.classes[0].priority"
    assert violations[-1].field == "" and violations[-1].description.endswith(
        "more problems not shown"
    )
    assert len(error.value.details()) <= 1024

"""Policy documents near every limit, generated: just under is accepted and builds a tree,
just over is refused with the limit named, and nothing else is ever raised; through the
files the daemon reads and through the agent's API. And the count validation makes of a
policy's u32 filters is what the node builds, filter for filter."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.common.policy.documents import encode_document
from agent.common.policy.limits import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    MAX_RATE_BPS,
    MAX_U32_FILTERS_PER_CLASS,
    format_bytes,
)
from agent.common.policy.model import load_policy_files
from agent.node.qos.desired import build_tree
from agent.proto.fabric.v1 import qos_service_pb2 as pb
from tests.node.api.conftest import node as node  # the in-process agent's QoS API
from tests.node.api.qos_node import Node
from tests.node.api.test_qos_service import details
from tests.node.qos import DEVICE, api_policy_document

RATE_REFUSED = "is above the maximum rate 10Tbit"
CLASS_REFUSED = f"a class may have at most {MAX_U32_FILTERS_PER_CLASS}"
DEPTH_REFUSED = f"nested deeper than {MAX_DEPTH} levels"
SIZE_REFUSED = "at most 1 MiB"


@dataclass(frozen=True)
class Case:
    """A document near one limit, and whether it is over it (then `refused` is in a
    violation's reason)."""

    what: str
    document: dict[str, Any]
    over: bool
    refused: str


def _rate_case(delta: int, unit: str, field: str) -> Case:
    rate = MAX_RATE_BPS + 8 * delta
    text = {"bit": f"{rate}bit", "plain": str(rate), "int": rate}[unit]
    document = api_policy_document(DEVICE, bandwidth=MAX_RATE_BPS)
    classes = document["spec"]["classes"]
    if field == "bandwidth":
        document["spec"]["bandwidth"] = text
        classes[0]["rate"] = "50%"
    else:
        classes[0][field] = text
        if field == "rate":  # the class alone: no room beside a rate of 10 Tbit
            del classes[1]
            document["spec"]["defaultClass"] = classes[0]["name"]
    return Case(f"{field} {text}", document, rate > MAX_RATE_BPS, RATE_REFUSED)


def _port_case(count: int, first: int) -> Case:
    # No CIDR: both families, one filter a single port.
    document = api_policy_document(DEVICE)
    document["spec"]["classes"][0]["match"] = [{"dstPorts": [str(first + i) for i in range(count)]}]
    return Case(f"{count} ports", document, 2 * count > MAX_U32_FILTERS_PER_CLASS, CLASS_REFUSED)


def _depth_case(levels: int) -> Case:
    document = api_policy_document(DEVICE)
    nested: Any = "leaf"
    for _ in range(levels):
        nested = [nested]
    # metadata (2) > labels (3) > levels of lists > the leaf.
    document["metadata"]["labels"] = nested
    over = 3 + levels > MAX_DEPTH
    return Case(f"{levels} nested lists", document, over, DEPTH_REFUSED)


def _size_case(delta: int) -> tuple[str, bool]:
    """A policy file of MAX_DOCUMENT_BYTES + delta bytes."""
    text = json.dumps(api_policy_document(DEVICE)) + "\n"
    padding = MAX_DOCUMENT_BYTES + delta - len(text) - 1
    return text + "#" * padding + "\n", delta > 0


_cases = st.one_of(
    st.builds(
        _rate_case,
        st.integers(-2, 2),
        st.sampled_from(["bit", "plain", "int"]),
        st.sampled_from(["bandwidth", "rate", "ceil"]),
    ),
    st.builds(_port_case, st.integers(MAX_U32_FILTERS_PER_CLASS // 2 - 3, 131), st.just(1000)),
    st.builds(_depth_case, st.integers(MAX_DEPTH - 6, MAX_DEPTH + 3)),
)
_fuzz = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _reasons(violations: Any) -> list[str]:
    return [getattr(v, "reason", None) or getattr(v, "description", "") for v in violations]


def test_documents_near_each_limit_in_files_are_accepted_under_it_and_refused_over_it(
    tmp_path: Path,
) -> None:
    seen: set[tuple[str, bool]] = set()

    @_fuzz
    @given(case=_cases)
    def one(case: Case) -> None:
        path = tmp_path / "near.yaml"
        path.write_text(json.dumps(case.document))  # JSON is YAML

        loaded, violations = load_policy_files([path])

        kind = case.refused
        seen.add((kind, case.over))
        reasons = _reasons(violations)
        if case.over:
            assert loaded == [], case.what
            assert any(kind in reason for reason in reasons), (case.what, reasons)
        elif kind == DEPTH_REFUSED:
            # Within the depth limit, labels are still not a field.
            assert reasons == ["unknown field"], (case.what, reasons)
        else:
            assert reasons == [], (case.what, reasons)
            assert build_tree(loaded[0].policy).tree.classes

    one()

    assert {over for _, over in seen} == {True, False}


def test_files_either_side_of_1_mib_are_accepted_or_refused_by_their_size(
    tmp_path: Path,
) -> None:
    for delta in (-1, 0, 1, 4096):
        text, over = _size_case(delta)
        path = tmp_path / "sized.yaml"
        path.write_text(text)
        assert path.stat().st_size == MAX_DOCUMENT_BYTES + delta

        loaded, violations = load_policy_files([path])

        if over:
            assert [v.reason for v in violations] == [
                f"document of {format_bytes(MAX_DOCUMENT_BYTES + delta)}; at most 1 MiB"
            ]
        else:
            assert violations == []
            assert [p.policy.metadata.name for p in loaded] == ["job-net"]


def test_documents_near_each_limit_through_the_api_are_accepted_or_invalid_argument(
    node: Node,
) -> None:
    before = node.kernel()
    seen: set[tuple[str, bool]] = set()

    @_fuzz
    @given(case=_cases.filter(lambda c: c.refused != DEPTH_REFUSED))
    def one(case: Case) -> None:
        # A message has no room for nesting: depth is the files' and the documents' own.
        document = copy.deepcopy(case.document)
        document["spec"]["interface"] = node.spare
        request = pb.ApplyPolicyRequest(object=encode_document(document), validate_only=True)
        seen.add((case.refused, case.over))
        if not case.over:
            response = node.stub.ApplyPolicy(request, timeout=30)
            assert any("+ qdisc fa:" in change for change in response.changes), case.what
            return
        with pytest.raises(grpc.RpcError) as error:
            node.stub.ApplyPolicy(request, timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case.what
        found = details(error.value, error_details_pb2.BadRequest).field_violations
        assert any(case.refused in v.description for v in found), (case.what, found)

    one()

    assert {over for _, over in seen} == {True, False}
    assert node.kernel() == before
    assert node.api_objects() == []
    assert node.alive()


def test_a_request_either_side_of_1_mib_is_validated_or_refused_by_its_size(
    node: Node,
) -> None:
    for delta in (-64, 64):
        _request_of_size(node, delta)


def _request_of_size(node: Node, delta: int) -> None:
    document = api_policy_document(node.spare)
    obj = encode_document(document)
    # Padding in the cgroup paths of match entries (at most 4095 characters, a component
    # at most 255).
    entries = document["spec"]["classes"][0]["match"]
    full = "/".join("x" * 200 for _ in range(19))  # 3999 characters
    # Most of the way without encoding (an entry adds its path and a few bytes of
    # framing), then entry by entry to the size wanted.
    entries.extend(
        {"cgroup": full} for _ in range((MAX_DOCUMENT_BYTES + delta - 8000) // (len(full) + 8))
    )
    obj = encode_document(document)
    while obj.ByteSize() < MAX_DOCUMENT_BYTES + delta:
        room = max(1, min(4000, MAX_DOCUMENT_BYTES + delta - obj.ByteSize() - 16))
        path = "/".join("x" * 200 for _ in range(room // 201)) or "x" * room
        entries.append({"cgroup": path})
        obj = encode_document(document)
    request = pb.ApplyPolicyRequest(object=obj, validate_only=True)

    try:
        node.stub.ApplyPolicy(request, timeout=30)
        code, found = grpc.StatusCode.OK, []
    except grpc.RpcError as error:
        code, found = error.code(), []
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            found = list(details(error, error_details_pb2.BadRequest).field_violations)
    sized = [v.description for v in found if SIZE_REFUSED in v.description]

    if obj.ByteSize() > MAX_DOCUMENT_BYTES:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert sized == [f"document of {obj.ByteSize()} bytes encoded; at most 1 MiB"]
    else:
        assert obj.ByteSize() > MAX_DOCUMENT_BYTES - 100
        # Within the size: checked on (the cgroups do not exist on this node).
        assert sized == []
        assert code != grpc.StatusCode.INTERNAL

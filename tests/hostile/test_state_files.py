"""Hostile state files and state directories: whatever is on disk, the agent starts and
enforces; whatever cannot be written, nothing in the kernel goes unrecorded; a refused
API object is gone from memory and disk; what of the agent's the kernel holds and no
policy claims is removed at start."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from agent.common.policy.documents import encode_document
from agent.node.qos.api_objects import API_FILE, ApiEntry
from agent.node.qos.htb import Change
from agent.node.qos.kernel import (
    AgentObjects,
    LoadNftTable,
    RemoveRedirect,
    RemoveTree,
    ifb_name,
)
from agent.node.qos.netlink_kernel import NetlinkKernel
from agent.node.qos.reconciler import Reconciler
from agent.node.qos.state import MAX_STATE_BYTES, STATE_FILE, StateSaveError, load_state
from agent.proto.fabric.v1 import qos_service_pb2 as qos_pb
from tests.conftest import VethPair
from tests.node.api.qos_node import qos_node
from tests.node.qos import DEVICE, SPARE, api_policy, api_policy_document, fake_settings, make
from tests.node.qos.fake_kernel import FakeKernel
from tests.node.qos.test_daemon import INTERVAL_S, SHAPED, Daemon, daemon, wait_until
from tests.node.qos.test_reconciler import write

__all__ = ["daemon"]  # the running agent, for the process-level test

GOOD_POLICY = {
    "name": "node",
    "file": "/etc/fabric-agent/policies/node.yaml",
    "interface": DEVICE,
    "direction": "egress",
    "device": DEVICE,
    "minors": {"collectives": 16, "storage": 17, "rest": 18},
}


def state_with(**changes: object) -> str:
    """A version 1 qos-state.json whose one policy record has `changes`."""
    return json.dumps({"version": 1, "policies": [{**GOOD_POLICY, **changes}], "nft_body": ""})


def oversized(path: Path) -> None:
    """A file one byte over the limit (sparse: the agent must not read it to know)."""
    path.write_text('{"version": 1, "policies": []}')
    os.truncate(path, MAX_STATE_BYTES + 1)


# Each writes a bad file (or a directory) at the path it is given.
CORRUPT: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_text(""),
    "truncated": lambda p: p.write_text(state_with()[:40]),
    "binary": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "a JSON list": lambda p: p.write_text("[1, 2, 3]"),
    "another version": lambda p: p.write_text('{"version": 99, "policies": []}'),
    "a minor beyond 16 bits": lambda p: p.write_text(state_with(minors={"rest": 0x10000})),
    "the minor HTB reserves": lambda p: p.write_text(state_with(minors={"rest": 0xFFFF})),
    "a negative minor": lambda p: p.write_text(state_with(minors={"rest": -1})),
    "a NaN minor": lambda p: p.write_text(state_with().replace("18", "NaN")),
    "a name that is a number": lambda p: p.write_text(state_with(name=123)),
    "an unknown direction": lambda p: p.write_text(state_with(direction="sideways")),
    "over the size limit": oversized,
    "a directory": lambda p: p.mkdir(),
}


def set_aside(state_dir: Path, name: str) -> list[Path]:
    return sorted(state_dir.glob(f"{name}.corrupt-*"))


@pytest.mark.parametrize("variant", sorted(CORRUPT))
def test_an_unusable_qos_state_file_is_set_aside_and_the_kernel_rebuilt(
    variant: str, kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    first.reconcile()
    first.close()
    enforced = kernel.tree(DEVICE)
    state_file = dirs[1] / STATE_FILE
    state_file.unlink()
    CORRUPT[variant](state_file)

    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = restarted.reconcile()
    finally:
        restarted.close()

    assert result.result == "success", result
    assert kernel.tree(DEVICE) == enforced
    assert len(set_aside(dirs[1], STATE_FILE)) == 1
    assert restarted.quarantine.counts == {STATE_FILE: 1}
    # Rebuilt from the kernel and the policy files, and saved again.
    assert load_state(dirs[1]).policies["node"].minors == GOOD_POLICY["minors"]


def api_file_with(*entries: dict[str, object]) -> str:
    return json.dumps({"version": 1, "objects": list(entries)})


def api_entry(name: str, device: str = SPARE, **changes: object) -> dict[str, object]:
    """An api-policies.json entry of api_policy(device, name), with `changes`."""
    entry = ApiEntry(name, "QosPolicy", {}, 1.0).to_json()
    entry["document"] = api_policy(device, name).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    return {**entry, **changes}


CORRUPT_API: dict[str, Callable[[Path], None]] = {
    "empty": lambda p: p.write_text(""),
    "truncated": lambda p: p.write_text(api_file_with(api_entry("job-net"))[:50]),
    "a JSON list": lambda p: p.write_text("[]"),
    "another version": lambda p: p.write_text('{"version": 2, "objects": []}'),
    "objects not a list": lambda p: p.write_text('{"version": 1, "objects": {"a": 1}}'),
    "over the size limit": oversized,
    "a directory": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("variant", sorted(CORRUPT_API))
def test_an_unusable_api_policy_file_is_set_aside_and_the_files_still_enforced(
    variant: str, kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    dirs[1].mkdir()
    CORRUPT_API[variant](dirs[1] / API_FILE)

    reconciler = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = reconciler.reconcile()
    finally:
        reconciler.close()

    assert result.result == "success", result
    assert kernel.tree(DEVICE) is not None
    assert len(set_aside(dirs[1], API_FILE)) == 1
    assert reconciler.quarantine.counts == {API_FILE: 1}


@pytest.mark.parametrize(
    "bad",
    [
        {"expires_at": float("nan")},
        {"expires_at": -5.0},
        {"lease_ttl_s": 1e300},
        {"name": 42},
        {"applied_at": "yesterday"},
        {"origin": "someone"},
    ],
    ids=["NaN expiry", "negative expiry", "TTL out of range", "name a number", "text time",
         "unknown origin"],
)  # fmt: skip
def test_an_api_entry_out_of_range_is_dropped_the_others_enforced_and_the_file_set_aside(
    bad: dict[str, object], kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    kernel.add_interface("fab2")
    dirs[1].mkdir()
    good = api_entry("good-job", "fab2")
    (dirs[1] / API_FILE).write_text(api_file_with(good, {**api_entry("bad-job"), **bad}))

    reconciler = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = reconciler.reconcile()
        names = [entry.name for entry in reconciler.api.entries()]
    finally:
        reconciler.close()

    assert result.result == "success", result
    assert names == ["good-job"]
    assert kernel.tree("fab2") is not None and kernel.tree(SPARE) is None
    assert len(set_aside(dirs[1], API_FILE)) == 1
    saved = json.loads((dirs[1] / API_FILE).read_text())
    assert [o["name"] for o in saved["objects"]] == ["good-job"]


def test_the_agent_process_starts_and_enforces_over_corrupt_state_files(daemon: Daemon) -> None:
    daemon.write()
    daemon.state_dir.mkdir()
    (daemon.state_dir / STATE_FILE).write_text('{"version": 1, "policies": [')
    (daemon.state_dir / API_FILE).write_bytes(b"\x00\xff" * 100)

    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "the policy enforced")
    series = 'fabric_agent_state_files_quarantined_total{file="%s"}'
    wait_until(lambda: daemon.metric(series % STATE_FILE) == 1.0, 30, "counted")

    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()
    assert daemon.metric(series % API_FILE) == 1.0
    assert len(set_aside(daemon.state_dir, STATE_FILE)) == 1
    assert len(set_aside(daemon.state_dir, API_FILE)) == 1
    assert "Traceback" not in daemon.log(), daemon.log()
    assert "set aside as qos-state.json.corrupt-" in daemon.log()


# --- state directories that cannot be written ---


def needs_mount() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a read-only or tiny file system")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` as a read-only bind mount of itself (root ignores file modes)."""
    needs_mount()
    _run("mount", "--bind", str(directory), str(directory))
    try:
        _run("mount", "-o", "remount,bind,ro", str(directory))
        yield
    finally:
        _run("umount", str(directory))


@contextmanager
def full(directory: Path) -> Iterator[None]:
    """A tmpfs of a few pages at `directory`, its files copied in, then filled up."""
    needs_mount()
    saved = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    _run("mount", "-t", "tmpfs", "-o", "size=64k", "fabric-test-full", str(directory))
    try:
        for name, data in saved.items():
            (directory / name).write_bytes(data)
        fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield
    finally:
        _run("umount", str(directory))


UNWRITABLE = {"read-only": (read_only, errno.EROFS), "full": (full, errno.ENOSPC)}


@pytest.mark.parametrize("how", sorted(UNWRITABLE))
def test_an_api_apply_that_cannot_be_saved_is_undone_in_the_kernel_and_says_why(
    how: str, reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()
    before = kernel.dump()
    unwritable, code = UNWRITABLE[how]

    with unwritable(dirs[1]), pytest.raises(StateSaveError) as refused:
        reconciler.apply_object(api_policy(SPARE))

    assert refused.value.errno == code
    assert str(dirs[1]) in str(refused.value)
    assert kernel.dump() == before
    assert kernel.tree(SPARE) is None
    assert reconciler.api.get("job-net") is None
    assert not (dirs[1] / API_FILE).exists()


def test_the_file_policies_stay_enforced_while_the_state_cannot_be_saved(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    write(dirs[0], DEVICE)
    reconciler.reconcile()

    with read_only(dirs[1]):
        write(dirs[0], DEVICE, rate="600Mbit")
        edited = reconciler.reconcile()
        again = reconciler.reconcile()
    recovered = reconciler.reconcile()

    assert edited.result == "success" and edited.changes
    assert again.result == "success"
    assert reconciler.save_failures[STATE_FILE] == 2
    assert recovered.changes == ()
    # Saved once the directory could take it again: a restart finds the edited tree.
    tree = kernel.tree(DEVICE)
    assert tree is not None
    minors = load_state(dirs[1]).policies["node"].minors
    assert minors == GOOD_POLICY["minors"]


def test_a_file_where_the_state_directory_should_be_neither_stops_nor_stalls_enforcement(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    dirs[1].write_text("not a directory")

    reconciler = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = reconciler.reconcile()
        with pytest.raises(StateSaveError) as refused:
            reconciler.apply_object(api_policy(SPARE))
    finally:
        reconciler.close()

    assert result.result == "success"
    assert kernel.tree(DEVICE) is not None and kernel.tree(SPARE) is None
    assert reconciler.save_failures[STATE_FILE] >= 1
    assert refused.value.errno == errno.ENOTDIR
    assert dirs[1].read_text() == "not a directory"


def test_a_delete_or_renewal_that_cannot_be_saved_changes_nothing(
    reconciler: Reconciler, kernel: FakeKernel, dirs: tuple[Path, Path]
) -> None:
    reconciler.apply_object(api_policy(SPARE), ttl_s=60)
    expires = reconciler.api.get("job-net")
    before = kernel.dump()

    with read_only(dirs[1]):
        with pytest.raises(StateSaveError):
            reconciler.delete_object("job-net")
        with pytest.raises(StateSaveError):
            reconciler.renew_lease("job-net", 3600)

    assert reconciler.api.get("job-net") == expires
    assert kernel.dump() == before


# --- a refused API object is not kept ---


def explode(change: Change) -> int | None:
    raise RuntimeError(f"netlink socket gone during {change}")


def test_an_api_object_refused_by_an_exception_from_the_kernel_is_gone_from_memory_and_disk(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    write(dirs[0], DEVICE)
    kernel.add_interface("fab2")
    reconciler = Reconciler(fake_settings(dirs, cgroups), kernel)
    reconciler.apply_object(api_policy(SPARE, "leased"), ttl_s=1)

    kernel.fail_requests(explode)
    with pytest.raises(RuntimeError):
        reconciler.apply_object(api_policy("fab2", "refused"))
    kernel.fail_requests(None)
    # The lease running out saves the API objects: the refused one is not among them.
    wait_until(lambda: bool(reconciler.reconcile()) and reconciler.api.get("leased") is None,
               10, "the lease ran out")  # fmt: skip
    after = reconciler.reconcile()
    reconciler.close()
    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    restarted.close()

    assert reconciler.api.get("refused") is None
    assert after.result == "success" and after.errors == (), after
    assert kernel.tree("fab2") is None and kernel.tree(DEVICE) is not None
    assert json.loads((dirs[1] / API_FILE).read_text())["objects"] == []
    assert restarted.api.entries() == []


# --- kernel objects nobody recorded ---


def test_the_agents_kernel_objects_no_policy_claims_are_removed_at_start_the_claimed_adopted(
    kernel: FakeKernel, dirs: tuple[Path, Path], cgroups: Path
) -> None:
    kernel.add_interface("fab2")
    write(dirs[0], DEVICE)
    first = Reconciler(fake_settings(dirs, cgroups), kernel)
    first.reconcile()
    first.apply_object(api_policy(SPARE, "ingress-job", direction="ingress"))
    first.apply_object(api_policy("fab2", "egress-job"))
    first.close()
    enforced = kernel.tree(DEVICE)
    assert kernel.agent_objects().ifbs == {ifb_name(SPARE)}
    # The record of that run is lost: the kernel still holds all three.
    for name in (STATE_FILE, API_FILE):
        (dirs[1] / name).unlink()
    steps = len(kernel.steps)

    restarted = Reconciler(fake_settings(dirs, cgroups), kernel)
    try:
        result = restarted.reconcile()
        again = restarted.reconcile()
    finally:
        restarted.close()

    assert result.result == "success" and again.changes == ()
    assert kernel.tree(DEVICE) == enforced
    assert kernel.agent_objects() == AgentObjects(frozenset({DEVICE}), frozenset(), frozenset())
    # The claimed tree was adopted as it was (the table, unrecorded, is loaded again).
    made = kernel.steps[steps:]
    assert [s for s in made if not isinstance(s, LoadNftTable)] == [
        RemoveRedirect(SPARE),
        RemoveTree("fab2"),
    ]


def test_on_the_real_kernel_an_unclaimed_ingress_redirect_ifb_and_tree_are_removed_at_start(
    veth_pair: VethPair, tmp_path: Path
) -> None:
    dirs = (tmp_path / "policies", tmp_path / "state")
    dirs[0].mkdir()
    first = make(veth_pair, dirs)
    try:
        first.apply_object(api_policy(veth_pair.device, "ingress-job", direction="ingress"))
    finally:
        first.close()
    kernel = NetlinkKernel(veth_pair.netns)
    try:
        left = kernel.agent_objects()
        for name in (STATE_FILE, API_FILE):
            (dirs[1] / name).unlink()

        restarted = make(veth_pair, dirs)
        try:
            result = restarted.reconcile()
        finally:
            restarted.close()
        after = kernel.agent_objects()
    finally:
        kernel.close()

    ifb = ifb_name(veth_pair.device)
    assert left == AgentObjects(frozenset({ifb}), frozenset({veth_pair.device}), frozenset({ifb}))
    assert result.result == "success"
    assert after == AgentObjects()


def test_apply_policy_over_grpc_on_a_read_only_state_dir_is_unavailable_naming_file_and_errno(
    tmp_path: Path,
) -> None:
    with qos_node(tmp_path) as node:
        before = node.kernel()
        request = qos_pb.ApplyPolicyRequest(object=encode_document(api_policy_document(node.spare)))

        with read_only(node.state_dir), pytest.raises(grpc.RpcError) as refused:
            node.stub.ApplyPolicy(request, timeout=30)
        listed = node.stub.ListPolicies(qos_pb.ListPoliciesRequest(), timeout=30)

        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        details = refused.value.details() or ""
        assert f"cannot save {node.state_dir}/qos-state.json: EROFS" in details, details
        assert "the change was undone" in details
        assert node.kernel() == before
        assert [p.name for p in listed.policies] == ["node"]
        assert node.api_objects() == []


def test_the_agent_process_keeps_enforcing_edits_while_its_state_dir_is_read_only(
    daemon: Daemon,
) -> None:
    daemon.write()
    daemon.start()
    wait_until(lambda: daemon.tree() == daemon.desired(), 30, "first apply")
    series = f'fabric_agent_state_save_failures_total{{file="{STATE_FILE}"}}'

    with read_only(daemon.state_dir):
        daemon.write(SHAPED.replace("100Mbit", "150Mbit"))
        wait_until(lambda: daemon.tree() == daemon.desired(), 30, "the edit enforced")
        wait_until(lambda: (daemon.metric(series) or 0) >= 1, 30, "the failed save counted")
        time.sleep(2 * INTERVAL_S)
    wait_until(lambda: "saved again" in daemon.log(), 30, "saved once writable")

    assert daemon.process is not None and daemon.process.poll() is None
    # Logged when saving started failing and when it stopped, not every pass.
    assert daemon.log().count("Read-only file system; enforcing on") == 1, daemon.log()
    minors = load_state(daemon.state_dir).policies["daemon"].minors
    assert set(minors) == {"shaped", "rest"}

"""`fabric-agent policy validate`: messages and exit codes a person sees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import ROOT

FIXTURES = "tests/fixtures/policies"


def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "policy", "validate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_examples_valid_offline() -> None:
    for name in ("training-node", "inference-node"):
        result = validate("--offline", f"policies/{name}.yaml")

        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    training = validate("--offline", "policies/training-node.yaml")
    assert training.stdout == "policies/training-node.yaml: ok (4 classes on eth0 egress)\n"


def test_multi_document_file_ok() -> None:
    result = validate("--offline", f"{FIXTURES}/multi.yaml")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{FIXTURES}/multi.yaml (document 1): ok (1 class on eth0 egress)",
        f"{FIXTURES}/multi.yaml (document 2): ok (2 classes on eth0 ingress)",
    ]


def test_violation_exits_2_and_names_file_field_reason() -> None:
    result = validate("--offline", f"{FIXTURES}/bad-ceil.yaml", "policies/training-node.yaml")

    assert result.returncode == 2
    assert result.stderr == (
        f"{FIXTURES}/bad-ceil.yaml: spec.classes[1].ceil: 120Gbit exceeds bandwidth 100Gbit\n"
    )
    # The valid file is still reported.
    assert result.stdout == "policies/training-node.yaml: ok (4 classes on eth0 egress)\n"


def test_malformed_yaml_has_line_and_column() -> None:
    result = validate("--offline", f"{FIXTURES}/malformed.yaml")

    assert result.returncode == 2
    assert result.stderr.startswith(
        f"{FIXTURES}/malformed.yaml:9:19: not valid YAML: mapping values are not allowed here"
    )


def test_two_policies_owning_one_interface() -> None:
    result = validate("--offline", f"{FIXTURES}/owner-a.yaml", f"{FIXTURES}/owner-b.yaml")

    assert result.returncode == 2
    assert result.stderr == (
        f"{FIXTURES}/owner-b.yaml: spec.interface: eth1 egress is already owned by policy "
        f"'owner-a' in {FIXTURES}/owner-a.yaml\n"
    )
    assert result.stdout == f"{FIXTURES}/owner-a.yaml: ok (1 class on eth1 egress)\n"


def test_host_checks_use_cgroup_root(tmp_path: Path) -> None:
    policy = tmp_path / "host.yaml"
    policy.write_text(
        (ROOT / "policies" / "training-node.yaml")
        .read_text()
        .replace("interface: eth0", "interface: lo")
    )
    (tmp_path / "cg" / "system.slice" / "slurmstepd.scope" / "job_4242").mkdir(parents=True)

    result = validate("--cgroup-root", str(tmp_path / "cg"), str(policy))

    assert result.returncode == 2
    assert result.stderr == (
        f"{policy}: spec.classes[2].match[0].cgroup: cgroup not found: "
        f"{tmp_path / 'cg' / 'system.slice' / 'data-loader.service'}\n"
    )

    (tmp_path / "cg" / "system.slice" / "data-loader.service").mkdir()
    result = validate("--cgroup-root", str(tmp_path / "cg"), str(policy))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{policy}: ok (4 classes on lo egress)\n"


def test_unknown_interface_on_host(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text((ROOT / FIXTURES / "owner-a.yaml").read_text().replace("eth1", "nosuchif0"))

    result = validate(str(policy))

    assert result.returncode == 2
    assert result.stderr == (
        f"{policy}: spec.interface: unknown interface 'nosuchif0' on this host\n"
    )


def test_missing_file_and_usage() -> None:
    missing = validate("--offline", f"{FIXTURES}/absent.yaml")
    usage = validate()

    assert missing.returncode == 2
    assert missing.stderr.startswith(f"{FIXTURES}/absent.yaml: cannot read: No such file")
    assert usage.returncode == 2
    assert "FILE" in usage.stderr

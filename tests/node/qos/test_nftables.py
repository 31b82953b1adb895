"""libnftables in-process, inside throwaway network namespaces."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.node.qos.nftables import Nftables, NftError
from tests.conftest import VethPair

TABLE_BODY = """
chain output {
  type filter hook output priority mangle; policy accept;
  meta l4proto tcp tcp dport 29500-29599 meta priority set fa:10 ip dscp set 26
}
"""


@pytest.fixture
def nft(veth_pair: VethPair) -> Iterator[Nftables]:
    context = Nftables(netns=veth_pair.netns)
    try:
        yield context
    finally:
        context.close()


def nft_cli(netns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "nft", *args], capture_output=True, text=True, check=True
    ).stdout


def rules(listing: dict[str, object]) -> list[dict[str, object]]:
    items = listing["nftables"]
    assert isinstance(items, list)
    return [item["rule"] for item in items if "rule" in item]


def test_replace_table_loads_it_in_the_namespace_only(nft: Nftables, veth_pair: VethPair) -> None:
    nft.replace_table("inet", "fabric_agent", TABLE_BODY)

    listing = nft.list_table("inet", "fabric_agent")

    assert listing is not None
    assert len(rules(listing)) == 1
    assert "priority set fa:10" in nft_cli(veth_pair.netns, "list", "table", "inet", "fabric_agent")
    host = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert "fabric_agent" not in host


def test_replace_is_whole_and_atomic(nft: Nftables, veth_pair: VethPair) -> None:
    nft.replace_table("inet", "fabric_agent", TABLE_BODY)
    before = nft_cli(veth_pair.netns, "list", "ruleset")

    with pytest.raises(NftError, match=r"syntax error|Could not process rule"):
        nft.replace_table("inet", "fabric_agent", TABLE_BODY + "chain broken { nonsense }")

    assert nft_cli(veth_pair.netns, "list", "ruleset") == before
    smaller = TABLE_BODY.replace(" ip dscp set 26", "")
    nft.replace_table("inet", "fabric_agent", smaller)
    listing = nft.list_table("inet", "fabric_agent")
    assert listing is not None and len(rules(listing)) == 1
    assert "dscp" not in nft_cli(veth_pair.netns, "list", "table", "inet", "fabric_agent")


def test_absent_table_and_delete(nft: Nftables) -> None:
    assert nft.list_table("inet", "fabric_agent") is None
    assert nft.delete_table("inet", "fabric_agent") is False

    nft.replace_table("inet", "fabric_agent", TABLE_BODY)

    assert nft.delete_table("inet", "fabric_agent") is True
    assert nft.list_table("inet", "fabric_agent") is None


def cgroup2_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" - ")
        if len(fields) == 2 and fields[1].startswith("cgroup2 "):
            return Path(line.split()[4])
    return None


def test_cgroup_match_loads_for_an_existing_cgroup_only(nft: Nftables) -> None:
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 mount")
    name = f"fabric-test-{secrets.token_hex(3)}"
    rule = (
        "chain output {{\n  type filter hook output priority mangle;\n"
        '  socket cgroupv2 level 1 "{}" meta priority set fa:11\n}}'
    )
    (root / name).mkdir()
    try:
        nft.replace_table("inet", "fabric_agent", rule.format(nft_path(root, name)))
        assert "fa:11" in json.dumps(nft.list_table("inet", "fabric_agent"))
        nft.delete_table("inet", "fabric_agent")
    finally:
        (root / name).rmdir()

    # nftables resolves the path when the rule is loaded: a missing cgroup is refused.
    with pytest.raises(NftError, match="cgroupv2 path fails"):
        nft.replace_table("inet", "fabric_agent", rule.format(nft_path(root, name)))


def nft_path(root: Path, name: str) -> str:
    """nft looks cgroup paths up under /sys/fs/cgroup; on a hybrid host the cgroup2 root
    is below it (/sys/fs/cgroup/unified), and the level still counts from that root."""
    return str((root / name).relative_to("/sys/fs/cgroup"))

"""One set of exit codes for fabric-agent, fabric-aggregator and fabricctl."""

from __future__ import annotations

from agent.common.exits import ExitCode


def test_codes_and_their_names() -> None:
    assert [int(code) for code in ExitCode] == [0, 1, 2, 3]
    assert ExitCode.CHANGES is ExitCode.FAILURE is ExitCode.NOT_SERVING
    assert (ExitCode.OK, ExitCode.INVALID, ExitCode.UNREACHABLE) == (0, 2, 3)

"""The agent process: no fork once its threads run, and nothing left behind by a SIGKILL
during its capability probe."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from pathlib import Path

from tests.node.qos.test_daemon import Daemon, daemon, wait_until

__all__ = ["daemon"]

RUN_NETNS = Path("/run/netns")
PROBE = re.compile(r"fabcap-(\d+)-[0-9a-f]{6}")
STARTED = "fabric-agent "  # the line that says the API and metrics are up
PROBED = "traffic control: kernel has"


def children(pid: int) -> set[int]:
    """The processes `pid` forked that are running now (every thread's)."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
    except OSError:
        pass  # the process or one of its threads just ended
    return found


def probe_namespaces(pids: set[int]) -> set[str]:
    """The fabcap- namespaces under /run/netns of the agents `pids` (other agents on
    this host probe too)."""
    try:
        names = [entry.name for entry in RUN_NETNS.iterdir()]
    except OSError:
        return set()
    return {n for n in names if (m := PROBE.fullmatch(n)) and int(m.group(1)) in pids}


class Watch:
    """Polls, until stopped, what `pids` fork and the probe namespaces they name."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.forked: set[int] = set()
        self.named: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in list(self.pids):
                self.forked |= children(pid)
            self.named |= probe_namespaces(self.pids)
            time.sleep(0.0005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def test_the_agent_probes_before_serving_and_never_forks_once_serving(daemon: Daemon) -> None:
    daemon.write()
    process = daemon.start()
    watch = Watch()
    watch.pids.add(process.pid)
    try:
        wait_until(lambda: STARTED in daemon.log(), 30, "the API up")
        wait_until(lambda: daemon.tree() == daemon.desired(), 30, "the policy enforced")
        time.sleep(1.0)  # a few passes and samples more
    finally:
        watch.stop()
        daemon.stop()
    log = daemon.log()
    lines = log.splitlines()
    probed = next(i for i, line in enumerate(lines) if PROBED in line)
    started = next(i for i, line in enumerate(lines) if STARTED in line and "API at" in line)

    assert probed < started, log
    assert watch.forked == set(), log
    assert "fork_posix" not in log  # gRPC's note of a fork while its threads run
    assert watch.named == set()
    # Only the agent itself heard the SIGTERM that stopped it.
    assert log.count("received SIGTERM, stopping") == 1, log


def test_a_sigkill_at_any_point_of_start_up_leaves_no_probe_namespace(daemon: Daemon) -> None:
    daemon.write()
    rng = random.Random(20261203)
    watch = Watch()
    try:
        for _ in range(24):
            process = daemon.start()
            watch.pids.add(process.pid)
            # Python's start-up, the imports, the probe and the first pass span ~0.3-1.5s.
            time.sleep(rng.uniform(0.2, 1.2))
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        process = daemon.start()
        watch.pids.add(process.pid)
        wait_until(lambda: daemon.tree() == daemon.desired(), 30, "a normal start enforcing")
        daemon.stop()
    finally:
        watch.stop()
        daemon.stop(signal.SIGKILL)

    assert probe_namespaces(watch.pids) == set()
    # Stronger: the probe never names a namespace, so a kill cannot leave one.
    assert watch.named == set()

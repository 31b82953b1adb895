"""The exit codes of all three programs, one set so that scripts read them alike.

0  ok: a daemon stopped cleanly, a command did what it was asked; `plan`/`diff` found
   no changes; `health` found the service SERVING.
1  the daemons (fabric-agent run, fabric-aggregator run): a runtime failure (a port in
   use, the store unreachable at start); `plan`/`diff` (fabric-agent policy, fabricctl):
   applying would change something; fabricctl `health`: answered, but not SERVING.
2  bad input (configuration, flags, files), or a refused call (fabricctl: an invalid
   document, a failed precondition, not allowed, a node that failed a fleet policy).
3  fabricctl: the agent or aggregator is unreachable or did not answer in time.

Code 1 has one value under three names because each program gives it one meaning; a
script tells "changes" from "error" the `kubectl diff` way, 1 against more than 1.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What `main` returns; an int, so `sys.exit(main())` and `== 2` work unchanged."""

    OK = 0
    # The daemons: a runtime failure.
    FAILURE = 1
    # plan/diff: the policies would change something.
    CHANGES = 1
    # health: the service answered but is not SERVING.
    NOT_SERVING = 1
    # Bad input (configuration, flags, files) or a refused call.
    INVALID = 2
    # The peer did not answer (UNAVAILABLE, DEADLINE_EXCEEDED).
    UNREACHABLE = 3

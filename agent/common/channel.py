"""The keepalive contract between the agent's gRPC listeners and their clients.

Both sides import their half from here, so the rule that binds them stays in one place:
a server answers pings that come more often than its minimum ping interval with GOAWAY
(``too_many_pings``), so the server's minimum must never exceed the clients' keepalive
time. Clients (fabricctl, the aggregator) use `CLIENT_KEEPALIVE_OPTIONS`.
"""

from __future__ import annotations

from typing import Final

# --- the client's half ---

# A client pings an idle connection every 30 s, so a dead agent (or a NAT that dropped
# the flow) is noticed within about 40 s instead of the 2 h gRPC default.
CLIENT_KEEPALIVE_TIME_MS: Final = 30_000
CLIENT_KEEPALIVE_TIMEOUT_MS: Final = 10_000
# Snapshots of large nodes stay far below this (the agent's send limit is the same).
CLIENT_MAX_RECEIVE_BYTES: Final = 16 * 1024 * 1024

CLIENT_KEEPALIVE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
    # fabricctl holds idle connections between calls and watch streams can be quiet.
    ("grpc.keepalive_permit_without_calls", 1),
    # 0: keep pinging however long the connection carries no data.
    ("grpc.http2.max_pings_without_data", 0),
)

# --- the server's half ---

# Pings closer together than this are strikes: 20 s leaves margin under the clients'
# 30 s for timer jitter. It must not exceed CLIENT_KEEPALIVE_TIME_MS.
SERVER_MIN_PING_INTERVAL_MS: Final = 20_000
# The server pings its clients too: a WatchSnapshots stream holds a worker thread and
# one of the hub's limited stream slots, and a client whose host died would hold them
# until TCP gives up (hours). keepalive time + timeout bound that to 80 s.
SERVER_KEEPALIVE_TIME_MS: Final = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS: Final = 20_000

SERVER_KEEPALIVE_OPTIONS: Final[tuple[tuple[str, int], ...]] = (
    ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
    # On a server this also decides whether client pings on a connection with no call
    # are accepted at all (without it they are strikes, whatever their interval).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

assert SERVER_MIN_PING_INTERVAL_MS <= CLIENT_KEEPALIVE_TIME_MS, "clients would get GOAWAY"

"""Running totals per server and listener, for /status (HAProxy's stats columns).

Plain integers on plain objects, bumped once per connection event by the metrics sink (never
per chunk: bytes arrive with the once-a-second flush of open connections and once more at
close). With workers, each worker copies its totals into its column of the shared table at
every sync and the primary sums the columns (proc/shared.py).

The state clock (`up 2h 3m`, total downtime) follows the server's displayed health state: it
is kept by whichever process shows the server, from its health listener.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .health import ServerHealth

# An active check's result as one integer (it travels through the shared table): an HTTP
# status, CHECK_TCP_OK for a TCP connect, or one of the negative failures below.
CHECK_TCP_OK: Final = 1
CHECK_FAILURES: Final = {"refused": -1, "timeout": -2, "reset": -3, "tls": -4, "local": -5,
                         "not an HTTP response": -6}
CHECK_OTHER: Final = -7  # probe error (a line too long, ...)
_CHECK_TEXT: Final = {-1: "tcp refused", -2: "tcp timeout", -3: "tcp reset", -4: "tls failed",
                      -5: "local error", -6: "http bad response", -7: "probe error"}


def check_code(detail: str) -> int:
    """The code of a probe's detail (`connected`, `HTTP 200`, `refused`, ...)."""
    if detail == "connected":
        return CHECK_TCP_OK
    if detail.startswith("HTTP ") and detail[5:].isdigit():
        return int(detail[5:])
    return CHECK_FAILURES.get(detail, CHECK_OTHER)


def check_text(code: int, micros: int) -> str:
    """`http 200 in 3 ms`, `tcp ok in 1 ms`, `tcp refused`: what the page shows."""
    if code <= 0:
        return _CHECK_TEXT.get(code, "probe error")
    result = "tcp ok" if code == CHECK_TCP_OK else f"http {code}"
    ms = micros / 1000
    return f"{result} in {ms:.0f} ms" if ms >= 1 else f"{result} in {max(ms, 0.1):.1f} ms"


class ServerStats:
    """One server's totals in this process, and its last active check."""

    __slots__ = ("bytes_in", "bytes_out", "check_code", "check_us", "connect_count",
                 "connect_errors", "connect_us", "connections", "retries")

    def __init__(self) -> None:
        self.connections = 0  # clients paired with it (HAProxy stot)
        self.bytes_in = 0  # client to server
        self.bytes_out = 0  # server to client
        self.connect_errors = 0  # failed connects, of clients (econ)
        self.retries = 0  # failed connects retried on another server (wretr)
        self.connect_us = 0  # time spent in new connects (pooled ones take none)...
        self.connect_count = 0  # ... and how many, for the average
        self.check_code = 0  # the last active check (0: none yet)
        self.check_us = 0

    def totals(self) -> tuple[int, ...]:
        """In the order of proc/shared.py SERVER_COUNTERS."""
        return (self.connections, self.bytes_in, self.bytes_out, self.connect_errors,
                self.retries, self.connect_us, self.connect_count)

    def note_check(self, detail: str, seconds: float) -> None:
        self.check_code = check_code(detail)
        self.check_us = int(seconds * 1_000_000)


class ListenerStats:
    """One listener's totals in this process: new connections, TLS errors, rejections."""

    __slots__ = ("connections", "rejected", "tls_handshake_errors")

    def __init__(self) -> None:
        self.connections = 0
        self.tls_handshake_errors = 0
        self.rejected: dict[str, int] = {}

    def totals(self, reasons: tuple[str, ...]) -> tuple[int, ...]:
        """In the order of proc/shared.py LISTENER_COUNTERS (`reasons`: its last ones)."""
        return (self.connections, self.tls_handshake_errors,
                *(self.rejected.get(reason, 0) for reason in reasons))


class StateClock:
    """How long a server has been in its displayed state, and its total downtime (HAProxy
    `lastchg`, `downtime`), fed by its health listener."""

    __slots__ = ("down_total", "since", "state")

    def __init__(self, health: ServerHealth) -> None:
        self.state = health.display_state
        self.since = time.monotonic()
        self.down_total = 0.0
        health.listeners.append(self.changed)

    def changed(self, health: ServerHealth) -> None:
        state = health.display_state
        if state != self.state:
            now = time.monotonic()
            if self.state == "down":
                self.down_total += now - self.since
            self.state, self.since = state, now

    def downtime(self, now: float) -> float:
        return self.down_total + (now - self.since if self.state == "down" else 0.0)

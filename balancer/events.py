"""What the data path reports to metrics and the access log, once per connection event.

It lives apart from `proxy.py` so that the observers depend on this small interface, not on
the hot-path module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .proxy import ClientConnection
    from .upstream import Server


class ConnectionEvents:
    """What the data path reports, once per event of a connection (never per chunk).

    Metrics and the access log subclass this; the base does nothing, so a bare balancer pays
    one no-op call per event.
    """

    def connected(self, conn: ClientConnection, connect_seconds: float, pooled: bool) -> None:
        """`conn` is now paired with an upstream connection to `conn.server`."""

    def connect_failed(self, conn: ClientConnection, server: Server, reason: str) -> None:
        """A connect to `server` failed (`refused`, `timeout` or `reset`)."""

    def retried(self, conn: ClientConnection) -> None:
        """Another server is being tried after a failed connect."""

    def closed(self, conn: ClientConnection) -> None:
        """`conn` ended; its counters and `outcome` are final."""


class FanOutEvents(ConnectionEvents):
    """Passes every event to several sinks, in order."""

    def __init__(self, sinks: list[ConnectionEvents]) -> None:
        self.sinks = sinks

    def connected(self, conn: ClientConnection, connect_seconds: float, pooled: bool) -> None:
        for sink in self.sinks:
            sink.connected(conn, connect_seconds, pooled)

    def connect_failed(self, conn: ClientConnection, server: Server, reason: str) -> None:
        for sink in self.sinks:
            sink.connect_failed(conn, server, reason)

    def retried(self, conn: ClientConnection) -> None:
        for sink in self.sinks:
            sink.retried(conn)

    def closed(self, conn: ClientConnection) -> None:
        for sink in self.sinks:
            sink.closed(conn)

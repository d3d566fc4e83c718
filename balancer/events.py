"""What the data path reports to metrics and the access log, once per connection event.

It lives apart from `proxy.py` so that the observers depend on this small interface, not on
the hot-path module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .health import FailureReason
    from .proxy import ClientConnection
    from .upstream import Server

# How a client connection ended, as the access log writes it. `no_server` is also the
# reason the metrics count a client no server could take.
Outcome = Literal[
    "ok",  # still open, or both sides finished normally
    "no_server",  # no server could take it (none usable, or every try failed)
    "local_error",  # closed for lack of local resources (descriptors, ports) or a bug of ours
    "idle_timeout",  # nothing moved for `timeouts.idle`
    "client_abort",  # the client's connection was lost
    "upstream_reset",  # the server's connection was lost with an error
    "upstream_closed",  # the server closed its connection
    "shutdown",  # closed by a stop or after a reload, past the drain deadline
    "denied",  # refused by the listener's allow/deny lists (limits.py), before any pick
    "client_conns",  # refused: the client already had per_client.max_conns open
    "client_rate",  # refused: the client opened connections faster than per_client.rate
]


class ConnectionEvents:
    """What the data path reports, once per event of a connection (never per chunk).

    Metrics and the access log subclass this; the base does nothing, so a bare balancer pays
    one no-op call per event.
    """

    def connected(self, conn: ClientConnection, connect_seconds: float, pooled: bool) -> None:
        """`conn` is now paired with an upstream connection to `conn.server`."""

    def connect_failed(self, conn: ClientConnection, server: Server,
                       reason: FailureReason) -> None:
        """A connect to `server` failed."""

    def retried(self, conn: ClientConnection) -> None:
        """Another server is being tried after a failed connect."""

    def closed(self, conn: ClientConnection) -> None:
        """`conn` ended; its counters and `outcome` are final."""

    def tls_handshake(self, listener: str, seconds: float) -> None:
        """A client completed its TLS handshake on a terminating listener."""

    def tls_handshake_failed(self, listener: str) -> None:
        """A client's TLS handshake failed (bad bytes, version, cipher, timeout, gone)."""

    def sni_rejected(self, listener: str, reason: str) -> None:
        """An SNI listener closed a client: `not_tls`, `timeout` or `no_route`."""


EVENTS = ("connected", "connect_failed", "retried", "closed", "tls_handshake",
          "tls_handshake_failed", "sni_rejected")


class FanOutEvents(ConnectionEvents):
    """Passes every event to several sinks, in order (change them with `add`/`remove`).

    With one sink (the metrics, in most deployments) its methods are bound onto this
    object, so an event is one call, not two: the connection path reports twice per
    connection."""

    def __init__(self, sinks: list[ConnectionEvents]) -> None:
        self.sinks: list[ConnectionEvents] = []
        for sink in sinks:
            self.add(sink)

    def add(self, sink: ConnectionEvents) -> None:
        self.sinks.append(sink)
        self._rebind()

    def remove(self, sink: ConnectionEvents) -> None:
        self.sinks.remove(sink)
        self._rebind()

    def _rebind(self) -> None:
        for name in EVENTS:
            if len(self.sinks) == 1:
                setattr(self, name, getattr(self.sinks[0], name))
            else:
                self.__dict__.pop(name, None)  # the loops below

    def connected(self, conn: ClientConnection, connect_seconds: float, pooled: bool) -> None:
        for sink in self.sinks:
            sink.connected(conn, connect_seconds, pooled)

    def connect_failed(self, conn: ClientConnection, server: Server,
                       reason: FailureReason) -> None:
        for sink in self.sinks:
            sink.connect_failed(conn, server, reason)

    def retried(self, conn: ClientConnection) -> None:
        for sink in self.sinks:
            sink.retried(conn)

    def closed(self, conn: ClientConnection) -> None:
        for sink in self.sinks:
            sink.closed(conn)

    def tls_handshake(self, listener: str, seconds: float) -> None:
        for sink in self.sinks:
            sink.tls_handshake(listener, seconds)

    def tls_handshake_failed(self, listener: str) -> None:
        for sink in self.sinks:
            sink.tls_handshake_failed(listener)

    def sni_rejected(self, listener: str, reason: str) -> None:
        for sink in self.sinks:
            sink.sni_rejected(listener, reason)

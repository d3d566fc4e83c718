"""TLS termination at a listener: the accept stage, then the usual byte pump.

`TlsHandshake` is the accept stage of a TLS listener: its `transport()` is the protocol each
accepted socket gets, a `TlsTransport` (tlsstream.py) that runs the handshake. Once it is done
the handshake is counted and timed and a `TlsClientConnection` takes over, so the byte pump in
proxy.py is the same for plain and TLS clients, half-close included: a client's close_notify
is passed on to the server as a FIN while the answer keeps flowing, and a server's FIN becomes
a close_notify while the client may still send. A failed handshake closes that connection
only: it is counted, and logged at debug level without a traceback.
"""

from __future__ import annotations

import logging
import ssl
from functools import partial
from typing import TYPE_CHECKING

from .limits import GatedConnection
from .proxy import ClientConnection, Route
from .tlsstream import HandshakeDone, TlsTransport

if TYPE_CHECKING:
    from .events import ConnectionEvents
    from .limits import Gate
    from .tls import ServerCertificates

log = logging.getLogger("balancer.tls")


def handshake_failure(exc: BaseException | None) -> str:
    """A short reason for the debug log; the metric counts them all alike."""
    if isinstance(exc, TimeoutError | ConnectionAbortedError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    return type(exc).__name__ if exc is not None else "closed"


class TlsClientConnection(ClientConnection):
    """A client whose TLS is terminated here: the same pump, plus what its handshake chose
    (for the access log)."""

    __slots__ = ("alpn", "sni")

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.sni: str | None = None
        self.alpn: str | None = None


class GatedTlsConnection(GatedConnection):
    """A client of a TLS listener with accept-time rules (limits.py): admitted on its TCP
    connection, PROXY header included (as HAProxy's `tcp-request connection` rules and
    `accept-proxy` come before its TLS), then its handshake, then the pump."""

    __slots__ = ("alpn", "sni")

    def __init__(self, route: Route, gate: Gate) -> None:
        GatedConnection.__init__(self, route, gate)
        self.sni: str | None = None
        self.alpn: str | None = None

    def start(self) -> None:
        """Admitted: the handshake first (TlsHandshake starts the pump once it is done)."""
        tls = self.gate.tls
        assert tls is not None  # the listener sets it with this class
        tls.wrap(self)


class TlsHandshake:
    """The accept stage of one TLS listener: a handshake per accepted socket, then the pump.

    `pending` holds the handshakes in progress, so a listener that goes away can end them.
    """

    __slots__ = ("certificates", "events", "pending", "route")

    def __init__(self, route: Route, certificates: ServerCertificates,
                 pending: set[TlsTransport], events: ConnectionEvents) -> None:
        self.route = route
        self.certificates = certificates
        self.pending = pending
        self.events = events

    def transport(self) -> TlsTransport:
        """The protocol for one accepted socket (the listener's protocol factory)."""
        return self._handshake(self._done)

    def wrap(self, conn: GatedTlsConnection) -> None:
        """An admitted client of a gated listener: its handshake on the socket it came on."""
        raw = conn.transport
        tls = self._handshake(partial(self._gated_done, conn))
        raw.set_protocol(tls)
        tls.connection_made(raw)

    def _handshake(self, done: HandshakeDone) -> TlsTransport:
        tls = TlsTransport(self.route.loop, self.certificates.default, server_side=True,
                           timeout=self.certificates.config.handshake_timeout, done=done)
        self.pending.add(tls)
        return tls

    def _done(self, tls: TlsTransport, exc: BaseException | None) -> None:
        if self._counted(tls, exc):
            conn = TlsClientConnection(self.route)
            self._chosen(conn, tls)
            tls.set_protocol(conn)
            conn.connection_made(tls)

    def _gated_done(self, conn: GatedTlsConnection, tls: TlsTransport,
                    exc: BaseException | None) -> None:
        if not self._counted(tls, exc):
            conn.never_started()
            return
        self._chosen(conn, tls)
        conn.transport = tls
        tls.set_protocol(conn)
        ClientConnection.start(conn)

    def _counted(self, tls: TlsTransport, exc: BaseException | None) -> bool:
        """Count and time the handshake; True if it succeeded."""
        self.pending.discard(tls)
        route = self.route
        if exc is not None:
            self.events.tls_handshake_failed(route.listener_name)
            log.debug("TLS handshake on %s failed: %s", route.listener_name,
                      handshake_failure(exc))
            return False
        self.events.tls_handshake(route.listener_name, route.loop.time() - tls.started)
        return True

    def _chosen(self, conn: TlsClientConnection | GatedTlsConnection,
                tls: TlsTransport) -> None:
        """What the handshake chose, for the access log."""
        sslobj = tls.sslobj
        conn.sni = self.certificates.asked.pop(sslobj, None)
        conn.alpn = sslobj.selected_alpn_protocol()

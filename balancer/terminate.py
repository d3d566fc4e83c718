"""TLS termination at a listener: the accept stage, then the usual byte pump.

`TlsHandshake` is the accept stage of a TLS listener. It runs `loop.start_tls()` (uvloop and
asyncio each have their own implementation, both on the stdlib's `ssl.SSLObject`), counts and
times the handshake, then hands the decrypted transport to a `TlsClientConnection`, so the
byte pump in proxy.py is the same for plain and TLS clients. A failed handshake closes that
connection only: it is counted, and logged at debug level without a traceback.

What the loops' TLS transports cannot do is half-close: they have no `write_eof()`, and a
received close_notify makes them finish the TLS shutdown at once. So a client's close_notify
is its EOF (passed on to the server as a FIN, and the connection ends once what is buffered
has been written), a server's FIN ends a terminated client connection with a close_notify,
and a client's FIN is not passed on to a TLS server (its answer would be refused).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .proxy import ClientConnection, Route

if TYPE_CHECKING:
    from .events import ConnectionEvents
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
    """A client whose transport is TLS (terminated here): the same pump, but the TLS
    transport cannot half-close (see the module docstring)."""

    __slots__ = ("alpn", "sni")

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.sni: str | None = None
        self.alpn: str | None = None

    def eof_received(self) -> bool:
        ClientConnection.eof_received(self)
        return False  # the TLS transport ignores True (and warns): it shuts down anyway

    def _pass_upstream_eof(self) -> None:
        # No write_eof() over TLS: finish with a close_notify once the buffer is written.
        if not self.closed:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed and self.client_eof and exc is None:
            self.close()  # the end of a close_notify the client sent: not an abort
            return
        ClientConnection.connection_lost(self, exc)


class TlsHandshake(asyncio.Protocol):
    """The accept stage of a TLS listener: handshake, then hand over to the byte pump.

    `loop.start_tls()` is driven by hand, its first step inside `connection_made`, as the
    connect in proxy.py is: a Task would first run one loop pass later, and uvloop starts
    reading a new socket right after `connection_made` (a pause there is ignored), so the
    ClientHello would reach this protocol instead of the TLS layer. Bytes the TLS layer
    decrypts between the end of the handshake and the hand-over are kept and passed on.
    """

    __slots__ = ("certificates", "early", "eof", "events", "lost", "pending", "raw", "route",
                 "started", "starting", "waiting")

    def __init__(self, route: Route, certificates: ServerCertificates,
                 pending: set[TlsHandshake], events: ConnectionEvents) -> None:
        self.route = route
        self.certificates = certificates
        self.pending = pending
        self.events = events
        self.raw: asyncio.Transport | None = None
        self.started = 0.0
        self.starting: Coroutine[Any, Any, asyncio.Transport | None] | None = None
        self.waiting: asyncio.Future[Any] | None = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw: asyncio.Transport = transport  # type: ignore[assignment]
        self.raw = raw
        self.pending.add(self)
        loop = self.route.loop
        self.started = loop.time()
        self.starting = loop.start_tls(
            raw, self, self.certificates.default, server_side=True,
            ssl_handshake_timeout=self.certificates.config.handshake_timeout)
        self._step(None)

    def _step(self, waited: asyncio.Future[Any] | None) -> None:
        """Advance start_tls one step, as a Task would."""
        if waited is not self.waiting:
            return
        starting = self.starting
        assert starting is not None
        try:
            waiting = starting.send(None)
        except StopIteration as done:
            self._end()
            if done.value is None or self.lost:  # the client left as the handshake ended
                self._failed(None)
            else:
                self._hand_over(done.value)
        except (OSError, TimeoutError, EOFError) as exc:  # ssl.SSLError is an OSError
            self._end()
            self._failed(exc)
        else:
            self.waiting = waiting
            waiting.add_done_callback(self._step)

    def _end(self) -> None:
        self.starting = self.waiting = None
        self.pending.discard(self)

    def _failed(self, exc: BaseException | None) -> None:
        assert self.raw is not None
        self.raw.abort()
        self.events.tls_handshake_failed(self.route.listener_name)
        log.debug("TLS handshake on %s failed: %s", self.route.listener_name,
                  handshake_failure(exc))

    def _hand_over(self, tls: asyncio.Transport) -> None:
        route = self.route
        self.events.tls_handshake(route.listener_name, route.loop.time() - self.started)
        conn = TlsClientConnection(route)
        sslobj = tls.get_extra_info("ssl_object")
        if sslobj is not None:
            conn.sni = self.certificates.asked.pop(sslobj, None)
            conn.alpn = sslobj.selected_alpn_protocol()
        tls.set_protocol(conn)
        conn.connection_made(tls)
        for data in self.early:
            if conn.closed:
                return
            conn.data_received(data)
        if self.eof and not conn.closed:
            conn.eof_received()

    def abort(self) -> None:
        """The listener is going away: end a handshake still in progress."""
        starting = self.starting
        if starting is not None:
            if self.waiting is not None:
                self.waiting.remove_done_callback(self._step)
            self._end()
            starting.close()
        if self.raw is not None:
            self.raw.abort()

    # Between the end of the handshake and the hand-over (see the class docstring).
    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

"""SNI passthrough: route a TLS connection by the server name in its ClientHello, unread.

`SniPreread` is the accept stage of a listener with `sni:`. It collects bytes until the whole
ClientHello is in (clienthello.py reads it; at most `MAX_HELLO` bytes and `PREREAD_TIMEOUT`
seconds), picks the upstream with `SniRouter`, then hands the transport to a plain
`ClientConnection` of that upstream's route and gives it the bytes read so far, unchanged:
the connection is then exactly a plain proxied one. Anything that is not a TLS handshake is
closed and counted, and never reaches a server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .clienthello import MAX_HELLO, NotTls, parse
from .proxy import ClientConnection, Route

if TYPE_CHECKING:
    from .events import ConnectionEvents

log = logging.getLogger("balancer.sni")

PREREAD_TIMEOUT = 5.0  # seconds a client has to send its whole ClientHello
FALLBACK = "(fallback)"  # the rule name counted for connections the fallback upstream takes


class SniRouter:
    """Server name -> upstream name: exact names first, then the longest matching wildcard
    (`*.example.com` matches any name ending in `.example.com`, as nginx's `server_name`),
    then the fallback upstream, if any."""

    def __init__(self, rules: Mapping[str, str], fallback: str | None) -> None:
        self.exact = {name: up for name, up in rules.items() if not name.startswith("*.")}
        # Longest suffix first, so the most specific wildcard wins.
        self.wildcards = sorted(((name[1:], name, up) for name, up in rules.items()
                                 if name.startswith("*.")), key=lambda rule: -len(rule[0]))
        self.fallback = fallback
        # Connections routed by each rule (the fallback as FALLBACK), for /status.
        self.matched: dict[str, int] = dict.fromkeys([*rules, FALLBACK], 0)
        self.rules = dict(rules)

    def pick(self, name: str | None) -> tuple[str, str] | None:
        """(rule matched, upstream name), or None when the connection must be closed."""
        if name is not None:
            upstream = self.exact.get(name)
            if upstream is not None:
                return name, upstream
            for suffix, rule, upstream in self.wildcards:
                if name.endswith(suffix):
                    return rule, upstream
        if self.fallback is not None:
            return FALLBACK, self.fallback
        return None


class SniClientConnection(ClientConnection):
    """A plain proxied connection that remembers the name it was routed by."""

    __slots__ = ("sni",)

    def __init__(self, route: Route) -> None:
        super().__init__(route)
        self.sni: str | None = None


class SniListenerState:
    """What the accept stage of one SNI listener needs; a reload swaps `router` and routes."""

    def __init__(self, router: SniRouter, routes: dict[str, Route],
                 events: ConnectionEvents, listener_name: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.router = router
        self.routes = routes
        self.events = events
        self.listener_name = listener_name
        self.loop = loop
        self.pending: set[SniPreread] = set()
        self.rejected: dict[str, int] = dict.fromkeys(("not_tls", "timeout", "no_route"), 0)


class SniPreread(asyncio.Protocol):
    """Read the ClientHello, pick the upstream, hand over (see the module docstring)."""

    __slots__ = ("buffer", "state", "timer", "transport")

    def __init__(self, state: SniListenerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.pending.add(self)
        self.timer = self.state.loop.call_later(PREREAD_TIMEOUT, self._reject, "timeout")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            hello = parse(bytes(self.buffer[:MAX_HELLO]))
        except NotTls as exc:
            log.debug("%s: not a TLS ClientHello: %s", self.state.listener_name, exc)
            self._reject("not_tls")
            return
        if hello is not None:
            self._route(hello.server_name)

    def eof_received(self) -> bool:
        self._reject("not_tls")  # gone before a whole hello: nothing to route
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()

    def _forget(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.state.pending.discard(self)

    def _reject(self, reason: str) -> None:
        self._forget()
        if self.transport is not None:
            self.state.rejected[reason] += 1
            self.state.events.sni_rejected(self.state.listener_name, reason)
            self.transport.abort()
            self.transport = None

    def abort(self) -> None:
        """The listener is going away: drop a client still sending its hello."""
        self._forget()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None

    def _route(self, name: str | None) -> None:
        state = self.state
        picked = state.router.pick(name)
        if picked is None:
            log.debug("%s: no upstream for server name %r", state.listener_name, name)
            self._reject("no_route")
            return
        rule, upstream = picked
        self._forget()
        state.router.matched[rule] = state.router.matched.get(rule, 0) + 1
        transport = self.transport
        assert transport is not None
        self.transport = None
        conn = SniClientConnection(state.routes[upstream])
        conn.sni = name
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if not conn.closed:
            conn.data_received(bytes(self.buffer))  # all of it, unchanged

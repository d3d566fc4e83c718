"""Who may connect through a listener, and how much of it they may take.

A listener with `accept_proxy`, `max_conns`, `per_client`, `allow` or `deny` gets a `Gate`;
one without any of them keeps the plain `ClientConnection` and pays for none of this. Every
check runs before a server is picked, so a rejected connection costs no upstream connect:

- `allow` / `deny`: CIDR lists, deny first, on the client address (the PROXY one with
  `accept_proxy`: behind a cloud load balancer, the socket's peer is always the balancer).
- `per_client.max_conns` and `per_client.rate` (a token bucket holding one second's worth):
  a table of at most `MAX_CLIENTS` addresses, least recently seen evicted, O(1) per accept.
- `max_conns`: past it the listener stops accepting, so clients wait in the kernel backlog,
  and resumes as soon as one closes (HAProxy's maxconn). A connection already accepted past
  it (several accept sockets can be ready in one loop pass) is closed, reason `max_conns`.

With `workers: N` every worker has its own gate: the limits hold per worker (see README).
Rejections are counted by reason and logged at most once per reason per second.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Literal

from .config import ListenerConfig, Network
from .proxy import ClientConnection, Route
from .proxyproto import Addresses, HeaderReader
from .ratelog import Throttle

if TYPE_CHECKING:
    from .terminate import TlsHandshake

log = logging.getLogger("balancer.limits")

# Refusals of an accepted connection, which the access log also shows as its outcome.
AdmitReason = Literal["denied", "client_conns", "client_rate"]
REASONS = ("max_conns", "client_conns", "client_rate", "denied", "bad_proxy_header")
MAX_CLIENTS = 100_000
LOG_INTERVAL = 1.0  # seconds between two log lines for one rejection reason


def uses_gate(config: ListenerConfig) -> bool:
    return config.accept_proxy or config.limited


class Rejections:
    """Connections refused at the door: counted per (listener, reason), logged sparingly."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counts: dict[tuple[str, str], int] = {}
        self._logged: dict[str, float] = {}
        self.on_reject: Callable[[str, str], None] | None = None  # the metrics counter

    def count(self, listener: str, reason: str, client: str, detail: str) -> None:
        key = (listener, reason)
        total = self.counts[key] = self.counts.get(key, 0) + 1
        if self.on_reject is not None:
            self.on_reject(listener, reason)
        now = self.clock()
        if now - self._logged.get(reason, float("-inf")) >= LOG_INTERVAL:
            self._logged[reason] = now
            log.warning("listener %s: connection from %s rejected (%s%s); %d so far", listener,
                        client or "?", reason, f": {detail}" if detail else "", total)


class _Client:
    """One client address: its open connections and its rate bucket."""

    __slots__ = ("conns", "last", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.conns = 0
        self.tokens = tokens
        self.last = now


class Gate:
    """The accept-time rules of one listener (see the module docstring)."""

    def __init__(self, config: ListenerConfig, route: Route, rejections: Rejections) -> None:
        self.route = route
        self.loop = route.loop
        self.clock = route.loop.time
        self.rejections = rejections
        self.open = 0  # sockets this listener holds: header pending or proxied
        self.headers: set[HeaderReader] = set()  # waiting for their PROXY header
        self.clients: OrderedDict[str, _Client] = OrderedDict()
        # The listener's: stop and restart accepting (max_conns).
        self.pause: Callable[[], None] = _nothing
        self.resume: Callable[[], None] = _nothing
        self.paused = False
        # What an admitted client becomes: a TLS listener's runs its handshake first
        # (terminate.py sets both).
        self.connection: type[GatedConnection] = GatedConnection
        self.tls: TlsHandshake | None = None
        self.configure(config)

    def configure(self, config: ListenerConfig) -> None:
        """Take (new) limits; a reload keeps the table and the counts."""
        self.name = config.name
        self.accept_proxy = config.accept_proxy
        self.header_timeout = config.timeouts.proxy_header
        self.max_conns = config.max_conns
        self.allow: tuple[Network, ...] = config.allow
        self.deny: tuple[Network, ...] = config.deny
        per_client = config.per_client
        self.client_conns = per_client.max_conns if per_client else 0
        self.client_rate = per_client.rate if per_client else 0.0
        self.burst = max(1.0, self.client_rate)
        # What admit() asks per connection, decided here once: a rule not configured costs
        # one attribute test, not a call.
        self.screens = bool(self.allow or self.deny)
        self.limits_clients = bool(self.client_conns or self.client_rate)
        if not per_client:
            self.clients.clear()
        if self.paused and (not self.max_conns or self.open < self.max_conns):
            self._resume()

    def factory(self) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the listener's sockets."""
        if self.accept_proxy:
            return partial(HeaderReader, self)
        return partial(self.connection, self.route, self)

    # -- the listener's connection count (max_conns) ------------------------------------------

    def accepted(self, transport: asyncio.Transport) -> bool:
        """A new socket: count it; past max_conns close it, and at max_conns stop accepting."""
        limit = self.max_conns
        if limit:
            if self.open >= limit:
                self.reject(transport, "max_conns", f"{limit} open")
                self._pause()
                return False
            if self.open + 1 >= limit:
                self._pause()
        self.open += 1
        return True

    def released(self) -> None:
        self.open -= 1
        if self.paused and self.open < self.max_conns:
            self._resume()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.pause()

    def _resume(self) -> None:
        self.paused = False
        self.resume()

    # -- PROXY headers --------------------------------------------------------------------------

    def header_started(self, reader: HeaderReader) -> None:
        self.headers.add(reader)

    def header_ended(self, reader: HeaderReader) -> None:
        self.headers.discard(reader)

    def admit_proxied(self, transport: asyncio.Transport, addresses: Addresses | None,
                      rest: bytes) -> None:
        """A complete header: the client connection takes over the transport."""
        conn = self.connection(self.route, self)
        conn.transport = transport
        conn.source = addresses
        if addresses is not None:
            conn.client_ip = addresses.source
        else:  # LOCAL / UNKNOWN: the sender speaks for itself
            peer = transport.get_extra_info("peername")
            conn.client_ip = peer[0] if peer else ""
        transport.set_protocol(conn)
        if self.admit(conn):
            conn.start()
            if rest and not conn.closed:  # to what reads the socket now (TLS, or conn)
                transport.get_protocol().data_received(rest)  # type: ignore[attr-defined]

    def close_headers(self) -> None:
        """Close connections still sending their header (the listener is stopping)."""
        for reader in list(self.headers):
            reader.close()

    # -- per client -----------------------------------------------------------------------------

    def admit(self, conn: GatedConnection) -> bool:
        """Apply allow/deny and the per-client limits to an accepted connection; a rejected
        one is closed here (and counted)."""
        ip = conn.client_ip
        reason: AdmitReason | None = self._check(ip, conn) if self.screens else None
        if reason is None and self.limits_clients:
            reason = self._per_client(ip, conn)
        if reason is None:
            return True
        conn.closed = True
        conn.outcome = reason
        conn.started = self.clock()
        self.reject(conn.transport, reason, "", ip)
        self.released()
        self.route.events.closed(conn)  # the access log names the client
        return False

    def _check(self, ip: str, conn: GatedConnection) -> AdmitReason | None:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return "denied"  # no address (a UNIX socket peer): not on any allow list
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network in self.deny:
            if address in network:
                return "denied"
        if self.allow:
            for network in self.allow:
                if address in network:
                    return None
            return "denied"
        return None

    def _per_client(self, ip: str, conn: GatedConnection) -> AdmitReason | None:
        clients = self.clients
        now = self.clock()
        client = clients.get(ip)
        if client is None:
            client = clients[ip] = _Client(self.burst, now)
            if len(clients) > MAX_CLIENTS:
                clients.popitem(last=False)  # its open connections still hold the object
        else:
            clients.move_to_end(ip)
        limit = self.client_conns
        if limit and client.conns >= limit:
            return "client_conns"
        rate = self.client_rate
        if rate:
            tokens = client.tokens + (now - client.last) * rate
            if tokens > self.burst:  # min() is a call; this is the same, cheaper
                tokens = self.burst
            client.last = now
            if tokens < 1.0:
                client.tokens = tokens
                return "client_rate"
            client.tokens = tokens - 1.0
        client.conns += 1
        conn.client = client
        return None

    def reject(self, transport: asyncio.BaseTransport, reason: str, detail: str,
               client: str = "") -> None:
        if not client:
            peer = transport.get_extra_info("peername")
            client = peer[0] if peer else ""
        transport.close()
        self.rejections.count(self.name, reason, client, detail)


class GatedConnection(ClientConnection):
    """A client connection of a listener with a Gate: admitted before anything is picked,
    and handing its slots back when it ends."""

    __slots__ = ("client", "gate")

    def __init__(self, route: Route, gate: Gate) -> None:
        ClientConnection.__init__(self, route)  # not super(): no proxy object per client
        self.gate = gate
        self.client: _Client | None = None  # its per-client entry, if that is limited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        gate = self.gate
        if not gate.accepted(transport):  # type: ignore[arg-type]
            self.closed = True
            return
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        if not (gate.screens or gate.limits_clients) or gate.admit(self):
            self.start()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        ClientConnection.close(self, abort)
        self._release()

    def _release(self) -> None:
        client = self.client
        if client is not None:
            client.conns -= 1
            self.client = None
        self.gate.released()

    def never_started(self) -> None:
        """Admitted, but gone before it began (its TLS handshake failed): give back its
        slots; the handshake's own counter tells of it, not the connection metrics."""
        if not self.closed:
            self.closed = True
            self._release()


def _nothing() -> None:
    pass


def raise_fd_limit(listeners: tuple[ListenerConfig, ...]) -> int:
    """Raise the soft open-files limit to the hard one, and warn when the listeners'
    max_conns (two descriptors per proxied connection) cannot fit in it. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    wanted = 2 * sum(listener.max_conns for listener in listeners)
    if wanted > soft:
        log.warning("listeners' max_conns need up to %d file descriptors (two per proxied "
                    "connection) but the open files limit is %d: raise it (ulimit -n, "
                    "LimitNOFILE=) or lower max_conns", wanted, soft)
    return soft


class AcceptErrors:
    """The event loop's handler for errors nobody awaits, with one case of its own.

    Out of kernel memory (ENOBUFS, ENOMEM), or out of descriptors with not even the spare
    one left (sockets.ListenSocket sheds queued clients otherwise), the stdlib loop stops
    accepting on that socket for a second and reports it, once for every slot of its accept
    batch: a log flood while the balancer is already struggling. Here that report becomes one
    warning a second at most; everything else goes to the loop's default handler. (uvloop's
    libuv handles these cases on its own, quietly.)
    """

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.throttle = Throttle(LOG_INTERVAL, clock)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if context.get("message") != self.MESSAGE:
            if "_start_serving" in repr(context.get("handle")) and isinstance(
                    context.get("exception"), ValueError):
                # The stdlib's retry (above) of a socket closed meanwhile: paused or stopped.
                log.debug("stale accept retry after a listener closed: %s", context)
                return
            loop.default_exception_handler(context)
            return
        count = self.throttle.due()
        if count is None:
            return
        more = f" ({count - 1} more since the last report)" if count > 1 else ""
        log.warning("cannot accept: %s; accepting pauses for 1s, open connections are still "
                    "served%s", context.get("exception"), more)

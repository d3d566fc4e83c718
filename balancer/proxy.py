"""The data path: each accepted client connection is piped to one upstream connection.

Two `asyncio.Protocol` objects per proxied connection, written for the hot path:

- `ClientConnection` accepts the client, picks a server, connects (retrying the next server on
  failure) and owns the pair's lifecycle: timers, counters and closing.
- `UpstreamConnection` is the thin other half; it forwards to its client.

The rules, in one place:

- Backpressure: when one side's transport buffer passes its high-water mark (`pause_writing`),
  reading from the *other* side stops until that buffer drains (`resume_writing`). Memory per
  connection is therefore bounded by the buffer limits, whatever the peers' speeds.
- Half-close: EOF from one side is forwarded with `write_eof()` and the other direction keeps
  flowing. When both directions have ended, or either side is lost, *both* transports are closed
  here, explicitly: uvloop aborts the process if a half-closed transport is left for the garbage
  collector to free.
- Nothing on the per-chunk path logs, allocates beyond the chunk itself, or looks up labels.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .upstream import Server, Upstream

log = logging.getLogger("balancer.proxy")

# Per-transport write buffer limits. 256 KiB keeps bulk transfers streaming (a uvloop read is
# up to 256 KiB) while bounding what one stalled connection can hold.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class Route:
    """What a listener hands every new client connection: where to go, within which limits.

    Values are copied out of the config once so the per-connection path reads plain attributes.
    A reload builds a new Route; connections keep the one they were accepted with.
    """

    __slots__ = (
        "connect_timeout",
        "connections",
        "idle_timeout",
        "listener_name",
        "loop",
        "on_closed",
        "retry_budget",
        "tries",
        "upstream",
    )

    def __init__(
        self,
        listener_name: str,
        upstream: Upstream,
        loop: asyncio.AbstractEventLoop,
        on_closed: Callable[[ClientConnection], None] | None = None,
    ) -> None:
        config = upstream.config
        self.listener_name = listener_name
        self.upstream = upstream
        self.loop = loop
        self.connect_timeout = config.timeouts.connect
        self.idle_timeout = config.timeouts.idle
        self.tries = config.retries.tries
        self.retry_budget = config.retries.timeout
        self.connections: set[ClientConnection] = set()
        self.on_closed = on_closed


class UpstreamConnection(asyncio.Protocol):
    """The upstream half of a proxied connection: forwards what the server sends."""

    __slots__ = ("client", "transport")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.transport: asyncio.Transport = None  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        client.bytes_down += len(data)
        client.last_io = client.clock()
        client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.upstream_ended()
        return True  # keep our write side open: the client may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    # The upstream's send buffer is full: stop reading the client until it drains.
    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class ClientConnection(asyncio.Protocol):
    """The client half, and the owner of the pair's state."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client_eof",
        "client_ip",
        "clock",
        "closed",
        "connect_task",
        "idle_timer",
        "last_io",
        "outcome",
        "route",
        "server",
        "started",
        "transport",
        "upstream",
        "upstream_eof",
        "upstream_write",
    )

    def __init__(self, route: Route) -> None:
        self.route = route
        self.clock = route.loop.time
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: UpstreamConnection | None = None
        self.upstream_write: Callable[[bytes], None] | None = None
        self.server: Server | None = None
        self.client_ip = ""
        self.started = 0.0
        self.last_io = 0.0
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self.outcome = "ok"
        self.connect_task: asyncio.Task[None] | None = None
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- accept and connect -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        route = self.route
        route.connections.add(self)
        # Hold the client's bytes in the kernel until there is somewhere to send them.
        transport.pause_reading()  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.started = self.last_io = self.clock()
        self.connect_task = route.loop.create_task(self._connect())

    async def _connect(self) -> None:
        """Try servers until one accepts, within `retries.tries` and `retries.timeout`."""
        route = self.route
        upstream = route.upstream
        deadline = self.started + route.retry_budget
        failed: Server | None = None
        for _ in range(route.tries):
            remaining = deadline - self.clock()
            if remaining <= 0:
                break
            server = upstream.pick(self.client_ip, failed)
            if server is None:
                break
            server.active += 1
            self.server = server
            address = server.config.address
            try:
                async with asyncio.timeout(min(route.connect_timeout, remaining)):
                    _, protocol = await route.loop.create_connection(
                        partial(UpstreamConnection, self), address.host, address.port
                    )
            except (OSError, TimeoutError) as exc:
                server.active -= 1
                self.server = None
                failed = server
                log.debug("connect to %s/%s failed: %r", upstream.name, server.key, exc)
                continue
            self.connect_task = None
            self._attach(protocol)  # type: ignore[arg-type]
            return
        self.connect_task = None
        self.outcome = "no_server"
        upstream.note_no_server()
        self.close()

    def _attach(self, upstream: UpstreamConnection) -> None:
        """Join the two halves and let bytes flow."""
        transport = upstream.transport
        if self.closed:  # the client left while the connect was completing
            transport.close()
            return
        self.upstream = upstream
        self.upstream_write = transport.write
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.last_io = self.clock()
        self.idle_timer = self.route.loop.call_later(self.route.idle_timeout, self._check_idle)
        self.transport.resume_reading()

    # -- the byte pump --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.last_io = self.clock()
        self.upstream_write(data)  # type: ignore[misc]

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream is not None:
            self.upstream.transport.write_eof()
        if self.upstream_eof:
            self.close()
        return True  # keep our write side open: the server may still be answering

    def upstream_ended(self) -> None:
        """The server sent FIN: pass it on, and finish if the client already had."""
        self.upstream_eof = True
        self.transport.write_eof()
        if self.client_eof:
            self.close()

    # The client's receive side is slow: stop reading the server until it drains.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- endings ----------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.outcome = "client_abort"
            self.close(abort=True)

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.outcome = "upstream_reset" if exc is not None else "upstream_closed"
            self.close(abort=exc is not None)

    def _check_idle(self) -> None:
        remaining = self.last_io + self.route.idle_timeout - self.clock()
        if remaining > 0:
            self.idle_timer = self.route.loop.call_later(remaining, self._check_idle)
            return
        self.idle_timer = None
        self.outcome = "idle_timeout"
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        """End the pair: close both transports now, release the server slot, report once.

        A graceful close flushes what is buffered; a transport that still holds bytes its peer
        never reads is aborted after the idle timeout, so no close can linger for ever.
        """
        if self.closed:
            return
        self.closed = True
        route = self.route
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        transports = [self.transport]
        if self.upstream is not None:
            transports.append(self.upstream.transport)
        for transport in transports:
            if abort:
                transport.abort()
            else:
                transport.close()
                if transport.get_write_buffer_size():
                    route.loop.call_later(route.idle_timeout, transport.abort)
        if self.server is not None:
            self.server.active -= 1
        route.connections.discard(self)
        if route.on_closed is not None:
            route.on_closed(self)

"""Keepalive pools: idle, already-connected upstream connections handed to new clients.

A pool hit takes the upstream connect off the client's critical path. The rules:

- Each usable server keeps `pool.size` idle connections; a taken one is replaced in the
  background, and an empty pool is refilled as soon as its server comes back up. No pool
  connects to a server that is down or draining, and idle connections count against
  `max_conns` with the server's open ones: a server limited to 2 never sees a third.
  A reload that lowers `pool.size` closes the surplus at once.
- An idle connection the server closes or resets is dropped at once, so a dead one is never
  handed out. One older than `pool.idle_timeout` is closed and replaced.
- Bytes a server sends before any client is attached (a banner) are kept and delivered first.
- A handover swaps the transport's protocol (`set_protocol`), so the data path itself has no
  "am I pooled?" test on every chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from .health import LATE_CONNECT_TIMER, failure_reason
from .tlsstream import open_tls

if TYPE_CHECKING:
    from .health import FailureReason, ServerHealth
    from .upstream import Server

log = logging.getLogger("balancer.pool")

# A server that talks a lot before any client arrives: stop reading it past this much.
MAX_BANNER = 64 * 1024
# After a failed refill connect, wait this long before trying again (the health state
# decides whether the server is tried at all).
REFILL_RETRY_DELAY = 1.0


class IdleConnection(asyncio.Protocol):
    """An upstream connection waiting in a pool."""

    __slots__ = ("banner", "banner_size", "born", "pool", "transport")

    def __init__(self, pool: ServerPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.banner: list[bytes] = []
        self.banner_size = 0
        self.born = pool.loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.banner.append(data)
        self.banner_size += len(data)
        if self.banner_size >= MAX_BANNER:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.pool.drop(self, "closed by server while idle")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.drop(self, "lost while idle")


class ServerPool:
    """The idle connections of one server, and the background work that keeps them."""

    def __init__(self, server: Server, size: int, idle_timeout: float,
                 connect_timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.size = size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.loop = loop
        self.idle: deque[IdleConnection] = deque()
        self.connecting = 0
        self.closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_timer: asyncio.TimerHandle | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        # Told whenever the number of idle connections changes (the metrics gauge).
        self.on_change: Callable[[ServerPool], None] | None = None
        # Told of each failed pool connect and its reason (the metrics' error counter).
        self.on_connect_failed: Callable[[ServerPool, FailureReason], None] | None = None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    def start(self) -> None:
        self.server.health.listeners.append(self._health_changed)
        self.refill()
        self._schedule_sweep()

    def _health_changed(self, health: ServerHealth) -> None:
        """A server back up (trial or active checks passed) gets its pool now: waiting for the
        next sweep would leave the first clients after a recovery without one."""
        if health.ok:
            self.refill()

    def take(self) -> IdleConnection | None:
        """Hand out the freshest live idle connection, or None (a miss). Either way the
        client is about to count as one more open connection to the server (`acquire`)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.transport.is_closing():
                self._changed()
                self.refill(arriving=1)
                return conn
        self._changed()
        self.refill(arriving=1)
        return None

    def drop(self, conn: IdleConnection, why: str) -> None:
        """Forget an idle connection that died or expired, close it, and replace it."""
        try:
            self.idle.remove(conn)
        except ValueError:
            return  # already handed out or dropped
        log.debug("pool %s: dropping idle connection: %s", self.server.key, why)
        conn.transport.close()
        self._changed()
        self.refill()

    # -- background upkeep ----------------------------------------------------------------

    def resize(self, size: int, idle_timeout: float) -> None:
        """New settings from a reload: a smaller pool closes its surplus now, not when the
        idle connections time out; a larger one fills up."""
        self.size = size
        self.idle_timeout = idle_timeout
        self._trim(self.room())
        self.refill()

    def room(self, arriving: int = 0) -> int:
        """How many connections the pool may hold: `size`, or less when `max_conns` counts
        the server's open connections (and `arriving` clients not yet counted) against it."""
        limit = self.server.config.max_conns
        if not limit:
            return self.size
        return max(0, min(self.size, limit - self.server.active - arriving))

    def _trim(self, room: int) -> None:
        """Close the oldest idle connections beyond `room`."""
        while len(self.idle) > room:
            conn = self.idle.popleft()
            log.debug("pool %s: closing a surplus idle connection", self.server.key)
            conn.transport.close()
            self._changed()

    def refill(self, arriving: int = 0) -> None:
        """Start connects until idle + connecting reaches `room()` (only for usable servers)."""
        if self.closed or self._retry_timer is not None:
            return
        room = self.room(arriving)
        while len(self.idle) + self.connecting < room and self._wanted():
            self.connecting += 1
            task = self.loop.create_task(self._connect_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _retry_later(self) -> None:
        if not self.closed and self._retry_timer is None:
            self._retry_timer = self.loop.call_later(REFILL_RETRY_DELAY, self._retry)

    async def _connect_one(self) -> None:
        address = self.server.config.address
        health = self.server.health
        trial = health.connect_started()
        tls = self.server.tls  # a pooled TLS connection has done its handshake
        deadline = self.loop.time() + self.connect_timeout
        try:
            idle = partial(IdleConnection, self)
            async with asyncio.timeout_at(deadline):
                if tls is None:
                    _, conn = await self.loop.create_connection(idle, address.host, address.port)
                else:
                    _, conn = await open_tls(self.loop, idle, address.host, address.port,
                                             tls.context, tls.server_hostname,
                                             self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.connecting -= 1
            if (isinstance(exc, TimeoutError)
                    and self.loop.time() - deadline > LATE_CONNECT_TIMER):
                # The loop stalled past the deadline: say nothing about the server, try again.
                health.connect_abandoned(trial)
                self._retry_later()
                return
            reason = failure_reason(exc)
            self.server.connect_failed(reason)
            if self.on_connect_failed is not None:
                self.on_connect_failed(self, reason)
            self._retry_later()
            return
        except asyncio.CancelledError:
            self.connecting -= 1
            health.connect_abandoned(trial)
            raise
        self.connecting -= 1
        if self.closed or len(self.idle) >= self.room():  # shrunk or filled up meanwhile
            health.connect_succeeded()
            conn.transport.close()
            return
        # Pooled before the health news: a server this brings back up refills its pool
        # (`_health_changed`) from the true count, not one short.
        self.idle.append(conn)
        self._changed()
        health.connect_succeeded()

    def _wanted(self) -> bool:
        """Keep connections only to servers that are fully up (a half-open server's one
        trial belongs to a real client) and not draining."""
        return self.server.health.ok and not self.server.draining

    def _retry(self) -> None:
        self._retry_timer = None
        self.refill()

    def _schedule_sweep(self) -> None:
        self._sweep_timer = self.loop.call_later(
            min(self.idle_timeout / 2, 5.0), self._sweep
        )

    def _sweep(self) -> None:
        """Close idle connections older than `idle_timeout`; top the pool up again."""
        cutoff = self.loop.time() - self.idle_timeout
        for conn in [c for c in self.idle if c.born <= cutoff]:
            self.drop(conn, "idle timeout")
        if not self._wanted():  # down or draining: hold no connections to it
            for conn in list(self.idle):
                self.drop(conn, f"server {self.server.health.display_state}")
        self._trim(self.room())  # other workers' clients may have taken the room
        self.refill()
        if not self.closed:
            self._schedule_sweep()

    def close(self) -> None:
        """Stop upkeep and close every idle connection (shutdown or reload)."""
        self.closed = True
        listeners = self.server.health.listeners
        if self._health_changed in listeners:
            listeners.remove(self._health_changed)
        for timer in (self._retry_timer, self._sweep_timer):
            if timer is not None:
                timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        while self.idle:
            self.idle.pop().transport.close()
        self._changed()

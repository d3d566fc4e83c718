"""Runtime upstreams: the live servers of one upstream and the choice of where a client goes.

`Server` is the mutable runtime twin of a frozen `ServerConfig`: it counts live connections and
knows whether it may take one more. `Upstream` owns its servers and two strategies, one for the
primary servers and one for the backups, which are only consulted when no primary is usable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .checks import ActiveChecker
from .config import HealthConfig, ServerConfig, UpstreamConfig
from .health import ServerHealth
from .pool import ServerPool
from .strategies import Strategy, make_strategy

log = logging.getLogger("balancer.upstream")

# At most one "no server available" warning per upstream per this many seconds: during an
# outage every client would otherwise log the same line.
NO_SERVER_LOG_INTERVAL = 5.0
# A server in slow start gets at least this share of its weight.
SLOW_START_FLOOR = 0.05


class Server:
    """One upstream server as the data path sees it."""

    __slots__ = (
        "active",
        "config",
        "draining",
        "health",
        "key",
        "pool",
        "ramp_until",
        "slow_start",
        "upstream_name",
    )

    def __init__(
        self,
        config: ServerConfig,
        upstream_name: str = "",
        health: HealthConfig | None = None,
        slow_start: float = 0.0,
    ) -> None:
        self.config = config
        self.key = config.key
        self.upstream_name = upstream_name
        self.active = 0  # client connections currently proxied to (or connecting to) it
        self.draining = False  # operator asked for no new connections
        self.health = ServerHealth(f"{upstream_name}/{self.key}", health or HealthConfig())
        self.health.listeners.append(self._health_changed)
        self.pool: ServerPool | None = None
        self.slow_start = slow_start
        self.ramp_until = 0.0  # while in slow start: when the ramp ends

    @property
    def up(self) -> bool:
        """Healthy enough to be offered traffic (up, or half-open with its trial free)."""
        return self.health.ok or self.health.available()

    @up.setter
    def up(self, value: bool) -> None:
        """Force the health verdict, as a failing or passing active check would."""
        self.health.set_active(value, "set by operator" if value else "forced down")

    @property
    def weight(self) -> float:
        """Weight strategies should use now: during slow start it ramps up to the real one."""
        weight = self.config.weight
        if self.ramp_until:
            left = self.ramp_until - time.monotonic()
            if left > 0:
                return weight * max(SLOW_START_FLOOR, 1 - left / self.slow_start)
            self.ramp_until = 0.0
        return weight

    def has_room(self) -> bool:
        """True when `max_conns` allows one more connection (0 means unlimited)."""
        limit = self.config.max_conns
        return limit == 0 or self.active < limit

    def usable(self) -> bool:
        """May a new connection be sent here: healthy, not draining, not full."""
        return (
            (self.health.ok or self.health.available())
            and not self.draining
            and self.has_room()
        )

    def _health_changed(self, health: ServerHealth) -> None:
        if health.ok and self.slow_start and health.reason != "initial":
            self.ramp_until = time.monotonic() + self.slow_start

    def __repr__(self) -> str:
        return f"Server({self.upstream_name}/{self.key}, active={self.active}, up={self.up})"


class Upstream:
    """The servers of one upstream and the strategies that choose among them."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.servers = [
            Server(s, config.name, config.health, config.slow_start) for s in config.servers
        ]
        self.primary: Strategy = make_strategy(
            config.strategy, [s for s in self.servers if not s.config.backup]
        )
        self.backup: Strategy = make_strategy(
            config.strategy, [s for s in self.servers if s.config.backup]
        )
        self.no_server_count = 0
        check = config.health.check
        self.checker = ActiveChecker(self.servers, check) if check is not None else None
        self._no_server_logged_at = float("-inf")

    def pick(self, client_ip: str, exclude: Server | None = None) -> Server | None:
        """Choose a server for a client, skipping `exclude` (the one that just failed).

        Backups are consulted only when no primary server is usable, as in HAProxy/nginx.
        """
        usable: Callable[[Server], bool]
        if exclude is None:
            usable = Server.usable
        else:
            def usable(server: Server) -> bool:
                return server is not exclude and server.usable()

        server = self.primary.pick(client_ip, usable)
        if server is None:
            server = self.backup.pick(client_ip, usable)
        return server

    def note_no_server(self) -> None:
        """A client could not be placed on any server: count it, warn at a bounded rate."""
        self.no_server_count += 1
        now = time.monotonic()
        if now - self._no_server_logged_at >= NO_SERVER_LOG_INTERVAL:
            self._no_server_logged_at = now
            log.warning(
                "upstream %s: no server available, client closed (%d so far)",
                self.name,
                self.no_server_count,
            )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the background work: active checks, and keepalive pools (`pool.size` > 0)."""
        if self.checker is not None:
            self.checker.start()
        size = self.config.pool.size
        if not size:
            return
        for server in self.servers:
            server.pool = ServerPool(
                server, size, self.config.pool.idle_timeout, self.config.timeouts.connect, loop
            )
            server.pool.start()

    def stop(self) -> None:
        """Stop checks and close the pools' idle connections."""
        if self.checker is not None:
            self.checker.stop()
        for server in self.servers:
            if server.pool is not None:
                server.pool.close()

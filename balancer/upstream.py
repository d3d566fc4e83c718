"""Runtime upstreams: the live servers of one upstream and the choice of where a client goes.

`Server` is the mutable runtime twin of a frozen `ServerConfig`: it counts live connections and
knows whether it may take one more. `Upstream` owns its servers and two strategies, one for the
primary servers and one for the backups, which are only consulted when no primary is usable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .config import ServerConfig, UpstreamConfig
from .strategies import Strategy, make_strategy

log = logging.getLogger("balancer.upstream")

# At most one "no server available" warning per upstream per this many seconds: during an
# outage every client would otherwise log the same line.
NO_SERVER_LOG_INTERVAL = 5.0


class Server:
    """One upstream server as the data path sees it."""

    __slots__ = ("active", "config", "draining", "key", "up", "upstream_name")

    def __init__(self, config: ServerConfig, upstream_name: str = "") -> None:
        self.config = config
        self.key = config.key
        self.upstream_name = upstream_name
        self.active = 0  # client connections currently proxied to this server
        self.up = True  # health state: False while taken out by health checks
        self.draining = False  # operator asked for no new connections

    @property
    def weight(self) -> int:
        """Weight strategies should use now (slow start may lower it for a while)."""
        return self.config.weight

    def has_room(self) -> bool:
        """True when `max_conns` allows one more connection (0 means unlimited)."""
        limit = self.config.max_conns
        return limit == 0 or self.active < limit

    def usable(self) -> bool:
        """May a new connection be sent here: up, not draining, not full."""
        return self.up and not self.draining and self.has_room()

    def __repr__(self) -> str:
        return f"Server({self.upstream_name}/{self.key}, active={self.active}, up={self.up})"


class Upstream:
    """The servers of one upstream and the strategies that choose among them."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.servers = [Server(s, config.name) for s in config.servers]
        self.primary: Strategy = make_strategy(
            config.strategy, [s for s in self.servers if not s.config.backup]
        )
        self.backup: Strategy = make_strategy(
            config.strategy, [s for s in self.servers if s.config.backup]
        )
        self.no_server_count = 0
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

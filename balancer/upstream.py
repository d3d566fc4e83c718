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
from .health import DOWN, NOT_THE_SERVERS, UP, FailureReason, ServerHealth
from .pool import ServerPool
from .proc.shared import SharedCell
from .proxyproto import ENCODERS
from .stats import ServerStats, StateClock
from .strategies import Strategy, make_strategy
from .tls import UpstreamTls, client_context

log = logging.getLogger("balancer.upstream")

# At most one "no server available" warning per upstream per this many seconds: during an
# outage every client would otherwise log the same line.
NO_SERVER_LOG_INTERVAL = 5.0
# A server in slow start gets at least this share of its weight.
SLOW_START_FLOOR = 0.05


class Server:
    """One upstream server as the data path sees it."""

    __slots__ = (
        "_draining",
        "cell",
        "config",
        "count_watchers",
        "health",
        "key",
        "local_active",
        "peak",
        "pool",
        "proxy_version",
        "ramp_until",
        "send_proxy",
        "slow_start",
        "state_clock",
        "stats",
        "tls",
        "upstream_name",
        "watchers",
    )

    def __init__(
        self,
        config: ServerConfig,
        upstream_name: str = "",
        health: HealthConfig | None = None,
        slow_start: float = 0.0,
        cell: SharedCell | None = None,
    ) -> None:
        self.config = config
        self.key = config.key
        self.upstream_name = upstream_name
        self.local_active = 0  # this process's connections proxied to (or connecting to) it
        # Told of every change a pick depends on, for the strategies that keep servers in
        # order (loadindex.py, smoothindex.py): `watchers` of health and drain changes,
        # `count_watchers` of every acquire and release (apart: weighted's index needs a
        # count only with max_conns). Upstream.rebuild clears both for a new build.
        self.watchers: list[Callable[[Server], None]] = []
        self.count_watchers: list[Callable[[Server], None]] = []
        self._draining = False  # operator asked for no new connections
        self.peak = 0  # the most open at once (HAProxy smax): here, or sampled by a primary
        self.stats = ServerStats()  # this process's totals, for /status
        self.health = ServerHealth(f"{upstream_name}/{self.key}", health or HealthConfig())
        self.health.listeners.append(self._health_changed)
        self.state_clock = StateClock(self.health)
        # A worker's own check verdicts are DEBUG: the primary logs the cluster's.
        self.health.quiet_checks = cell is not None and cell.column is not None
        self.pool: ServerPool | None = None
        self.slow_start = slow_start
        self.ramp_until = 0.0  # while in slow start: when the ramp ends
        self.cell = cell  # shared with other workers, when there are any
        self.tls: UpstreamTls | None = None  # how to speak TLS to it, when the upstream does
        # The PROXY header encoder for connections to it (None: send none); see configure().
        self.send_proxy: Callable[[str, int, str, int], bytes] | None = None
        self.proxy_version: str | None = None

    # -- connection counting (global across workers when shared) ---------------------------

    @property
    def active(self) -> int:
        """Open connections to this server, of every worker."""
        cell = self.cell
        return self.local_active if cell is None else cell.total_active()

    def acquire(self) -> None:
        self.local_active += 1
        if self.local_active > self.peak:
            self.peak = self.local_active
        if self.cell is not None:
            self.cell.add_active(1)
        for watcher in self.count_watchers:
            watcher(self)

    def release(self) -> None:
        self.local_active -= 1
        if self.cell is not None:
            self.cell.add_active(-1)
        for watcher in self.count_watchers:
            watcher(self)

    @property
    def draining(self) -> bool:
        """Operator asked for no new connections."""
        return self._draining

    @draining.setter
    def draining(self, draining: bool) -> None:
        if draining != self._draining:
            self._draining = draining
            for watcher in self.watchers:
                watcher(self)

    def connect_failed(self, reason: FailureReason) -> None:
        """A connect to this server failed; `local`/`internal` failures are ours, not its."""
        if reason in NOT_THE_SERVERS:
            return
        self.health.connect_failed(reason)
        if self.cell is not None:
            self.cell.add_failure()

    @property
    def failures(self) -> int:
        cell = self.cell
        return self.health.total_failures if cell is None else cell.total_failures()

    def sync(self, now: float) -> None:
        """Follow what other workers decided: ejections, recoveries, drains."""
        cell = self.cell
        if cell is None:
            return
        until = cell.down_until
        if until > now:
            self.health.adopt_down(until, "marked down by another worker")
        elif until == 0.0:
            self.health.adopt_up("marked up by another worker")
        draining = cell.draining
        if draining != self.draining:
            self.draining = draining
            # DEBUG: whoever changed it (the primary's admin endpoint) logged it.
            log.debug("server %s/%s %s (shared state)", self.upstream_name, self.key,
                      "draining" if draining else "enabled")

    @property
    def up(self) -> bool:
        """Healthy enough to be offered traffic (up, or its trial free): a question only,
        for reports; picking a server is `usable()`."""
        return self.health.may_try()

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
        """May a new connection be sent here: healthy, not draining, not full. Asked for
        every server a pick looks at, so `draining` and `has_room` are read inline."""
        health = self.health
        if not (health.ok or health.available()) or self._draining:
            return False
        limit = self.config.max_conns
        return limit == 0 or self.active < limit

    def _health_changed(self, health: ServerHealth) -> None:
        if health.ok and self.slow_start and health.reason != "initial":
            self.ramp_until = time.monotonic() + self.slow_start
        cell = self.cell
        # Tell the other workers what this worker's connects decided (half-open stays local;
        # active checks and what it followed from others are never written back, so its
        # checks cannot undo another worker's ejection), and tell the primary's /status this
        # worker's active-check verdict. The primary's own cell has no column: it only reads.
        if cell is not None and cell.column is not None:
            if health.changed_by == "passive":
                if health.state == DOWN:
                    cell.down_until = health.down_until
                elif health.state == UP:
                    cell.down_until = 0.0
            cell.set_checked_down(not health.active_up, health.reason)
        for watcher in self.watchers:
            watcher(self)

    def __repr__(self) -> str:
        return f"Server({self.upstream_name}/{self.key}, active={self.active}, up={self.up})"


CellFor = Callable[[str], "SharedCell | None"]


def no_cell(key: str) -> SharedCell | None:
    """The `cell_for` of a balancer that shares no state (one process): no server has a row."""
    return None


class Upstream:
    """The servers of one upstream and the strategies that choose among them."""

    def __init__(self, config: UpstreamConfig, cell_for: CellFor = no_cell) -> None:
        self.cell_for = cell_for  # where a server's shared row lives (workers), if anywhere
        self.servers: list[Server] = []
        self.checker: ActiveChecker | None = None
        self.rebuild(config, {})
        self.no_server_count = 0
        self._no_server_logged_at = float("-inf")

    def rebuild(self, config: UpstreamConfig, keep: dict[str, Server]) -> None:
        """(Re)build the server list and strategies; servers in `keep` are reused as they are
        (health, counts, pool), with their new settings. Starts and stops nothing: a mirror
        (the primary's view) calls it alone, `reconfigure` around checks and pools."""
        self.config = config
        self.name = config.name
        self.needs_client_ip = config.strategy == "ip_hash"
        # Built anew at every (re)load: a renewed CA or client certificate applies at once.
        context = client_context(config.tls) if config.tls is not None else None
        servers = []
        for server_config in config.servers:
            server = keep.get(server_config.key)
            if server is None:
                server = Server(server_config, config.name, config.health, config.slow_start,
                                self.cell_for(f"{config.name}/{server_config.key}"))
            else:
                server.config = server_config
                server.slow_start = config.slow_start
                if not config.slow_start:  # a ramp in progress ends with slow start itself
                    server.ramp_until = 0.0
                elif server.ramp_until:  # a shorter slow_start ends a ramp sooner, not later
                    server.ramp_until = min(server.ramp_until,
                                            time.monotonic() + config.slow_start)
                server.health.reconfigure(config.health)
            server.tls = None if context is None or config.tls is None else UpstreamTls(
                context, config.tls.sni or server_config.address.host)
            version = server_config.send_proxy or config.send_proxy
            server.proxy_version = version = None if version == "off" else version
            server.send_proxy = ENCODERS[version] if version is not None else None
            servers.append(server)
        self.servers = servers
        for server in servers:  # the old generation's strategies stop following them
            server.watchers.clear()
            server.count_watchers.clear()
        self.primary: Strategy = make_strategy(
            config.strategy, [s for s in servers if not s.config.backup], config.hash
        )
        self.backup: Strategy = make_strategy(
            config.strategy, [s for s in servers if s.config.backup], config.hash
        )
        check = config.health.check
        self.checker = ActiveChecker(servers, check) if check is not None else None
        if check is None:  # no checks left to revise their verdict: it goes with them
            for server in servers:
                server.health.set_active(True, "active checks turned off")

    def reconfigure(self, config: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> list[Server]:
        """Apply a reloaded config in place. Servers that stay keep their health state, live
        connections and pool; removed servers' pools close, their connections finish (the
        caller bounds how long). Returns the removed servers."""
        if self.checker is not None:
            self.checker.stop()
        old = {server.key: server for server in self.servers}
        if config.tls != self.config.tls:  # idle connections made the old way go
            for server in old.values():
                if server.pool is not None:
                    server.pool.close()
                    server.pool = None
        self.rebuild(config, old)
        kept = {server.key for server in self.servers}
        removed = [server for key, server in old.items() if key not in kept]
        for server in removed:
            server.watchers.clear()  # in no strategy now: nothing to keep in order
            server.count_watchers.clear()
            if server.pool is not None:
                server.pool.close()
                server.pool = None
        self.start(loop)
        return removed

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

        server = self.primary.pick(client_ip, usable, exclude)
        if server is None:
            server = self.backup.pick(client_ip, usable, exclude)
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
        """Start the background work: active checks, and keepalive pools (`pool.size` > 0).
        Safe to call again after `reconfigure`: existing pools are resized, not replaced."""
        if self.checker is not None:
            self.checker.start()
        pool_config = self.config.pool
        for server in self.servers:
            pool = server.pool
            if pool_config.size and pool is None:
                server.pool = ServerPool(server, pool_config.size, pool_config.idle_timeout,
                                         self.config.timeouts.connect, loop)
                server.pool.start()
            elif pool_config.size and pool is not None:
                pool.resize(pool_config.size, pool_config.idle_timeout)
            elif pool is not None:
                pool.close()
                server.pool = None

    def stop(self) -> None:
        """Stop checks and close the pools' idle connections."""
        if self.checker is not None:
            self.checker.stop()
        for server in self.servers:
            if server.pool is not None:
                server.pool.close()

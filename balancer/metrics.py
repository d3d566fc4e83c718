"""Every Prometheus metric the balancer exports, defined in one place, and the sink that
feeds them from connection events.

Cost rules: nothing here runs per chunk, and nothing of prometheus-client runs per
connection. Each (listener, server) pair has its plain counts (`_Children`), bumped by the
connection events; `flush()` adds them to the prometheus-client objects once a second
(`FLUSH_INTERVAL`), at stop, and right before every scrape, so a scrape is exact at scrape
time (with workers the primary asks every worker to flush first, proc/). Byte counts of
open connections are brought up to date by the same flush, so long transfers show progress
without any work on the byte path. The histograms are plain bucket counts rendered at scrape
time (histogram.py). Works in prometheus-client's multiprocess mode (gauges declare how to
combine workers).
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge

from .events import ConnectionEvents
from .health import FAILURE_REASONS
from .histogram import HistogramChild, PlainHistogram
from .stats import ListenerStats, ServerStats

if TYPE_CHECKING:
    from .config import ListenerConfig
    from .health import FailureReason, ServerHealth
    from .pool import ServerPool
    from .proxy import ClientConnection
    from .upstream import Server, Upstream

# The errors' reason for a client no server could take: the connection's outcome too.
NO_SERVER: Final = "no_server"

# What became of a reload, the `result` label of balancer_config_reloads_total.
ReloadResult = Literal["success", "failure"]

SNI_REJECTIONS = ("not_tls", "timeout", "no_route")
FLUSH_INTERVAL = 1.0  # seconds between two flushes of the plain counts (and open bytes)

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class Metrics:
    """The metric families. One instance per registry (tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.connections = Counter(
            "balancer_connections", "Client connections proxied to a server.",
            ["listener", "upstream", "server"], **kw)
        self.active = Gauge(
            "balancer_active_connections", "Client connections open now.",
            ["listener", "upstream", "server"], multiprocess_mode="livesum", **kw)
        self.errors = Counter(
            "balancer_connection_errors", "Failed upstream connects (clients' and keepalive "
            "pools'; reasons local and internal are the balancer's own, never the server's), "
            "and clients no server could take (reason no_server).",
            ["upstream", "server", "reason"], **kw)
        self.retries = Counter(
            "balancer_retries", "Connects retried on another server.", ["upstream"], **kw)
        self.bytes = Counter(
            "balancer_bytes", "Bytes proxied; direction upstream is client to server.",
            ["upstream", "server", "direction"], **kw)
        self.connect_seconds = PlainHistogram(
            "balancer_upstream_connect_seconds", "Time to connect to a server.",
            ["upstream", "server"], buckets=CONNECT_BUCKETS, **kw)
        self.duration = PlainHistogram(
            "balancer_connection_duration_seconds", "Lifetime of client connections.",
            ["upstream"], buckets=DURATION_BUCKETS, **kw)
        self.server_up = Gauge(
            "balancer_server_up", "1 when the server takes traffic by health state, else 0.",
            ["upstream", "server"], multiprocess_mode="livemin", **kw)
        self.server_info = Gauge(
            "balancer_server_info", "1 for every configured server, with how it was found: "
            "static (the file), dns NAME (discovered), ...",
            ["upstream", "server", "source"], multiprocess_mode="livemax", **kw)
        self.pool_idle = Gauge(
            "balancer_pool_idle_connections", "Idle pre-connected upstream connections.",
            ["upstream", "server"], multiprocess_mode="livesum", **kw)
        self.pool_requests = Counter(
            "balancer_pool_requests", "Clients that found a pooled connection (hit) or not.",
            ["upstream", "server", "result"], **kw)
        self.tls_handshake_errors = Counter(
            "balancer_tls_handshake_errors", "Client TLS handshakes that failed on a "
            "terminating listener (bad bytes, old version, no shared cipher, timeout).",
            ["listener"], **kw)
        self.tls_handshake_seconds = PlainHistogram(
            "balancer_tls_handshake_seconds", "Time from accept to a completed client TLS "
            "handshake.", ["listener"], buckets=HANDSHAKE_BUCKETS, **kw)
        self.sni_rejected = Counter(
            "balancer_sni_rejected", "Clients an SNI listener closed: not a TLS ClientHello "
            "(not_tls), none within 5 s (timeout), no upstream for the name (no_route).",
            ["listener", "reason"], **kw)
        self.rejected = Counter(
            "balancer_rejected_connections", "Client connections closed before any server was "
            "picked, by reason: max_conns, client_conns, client_rate, denied, bad_proxy_header.",
            ["listener", "reason"], **kw)
        self.config_reloads = Counter(
            "balancer_config_reloads", "Configuration reloads by result.", ["result"], **kw)
        for result in get_args(ReloadResult):
            self.config_reloads.labels(result)
        self.histograms = (self.connect_seconds, self.duration, self.tls_handshake_seconds)


_process_metrics: Metrics | None = None


def process_metrics() -> Metrics:
    """The metric families of this process, registered once on the default registry."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = Metrics()
    return _process_metrics


class InstanceMetrics:
    """The managed app instances (apps.py), kept by the primary process alone. Per upstream
    and state only: an instance's pid or port would make the cardinality grow with every
    restart, and the instances' own process metrics are theirs to export."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw: dict[str, Any] = {"registry": registry} if registry is not None else {}
        self.restarts = Counter(
            "balancer_instance_restarts", "App instances restarted: after a crash, or "
            "replaced for passing max_memory.", ["upstream"], **kw)
        self.instances = Gauge(
            "balancer_instances", "App instances by state (starting, ready, draining, "
            "stopping, backoff).", ["upstream", "state"], multiprocess_mode="livesum", **kw)


_instance_metrics: InstanceMetrics | None = None


def instance_metrics() -> InstanceMetrics:
    """The instance metric families, registered once on the default registry."""
    global _instance_metrics
    if _instance_metrics is None:
        _instance_metrics = InstanceMetrics()
    return _instance_metrics


def count_reload(result: ReloadResult) -> None:
    """Count a reload of this process's configuration (the primary's, with workers)."""
    process_metrics().config_reloads.labels(result).inc()


def reject_reload(log: logging.Logger, problems: Iterable[str]) -> bool:
    """A reload changed nothing (the running config stays): log each reason and count the
    failure. Returns False, what a rejected reload reports."""
    for problem in problems:
        log.error("reload rejected: %s", problem)
    count_reload("failure")
    return False


class _Children:
    """The labelled children one (listener, server) pair needs, bound once, and the counts
    the connection events made since the last flush (plain ints: no lock, no call)."""

    __slots__ = ("active", "bytes_down", "bytes_up", "connect", "connections", "down",
                 "duration", "hits", "listener", "misses", "new", "open", "pool_hit",
                 "pool_miss", "stats", "up")

    def __init__(self, metrics: Metrics, listener: str, upstream: str, server: str,
                 stats: ServerStats, listener_stats: ListenerStats) -> None:
        self.stats = stats  # the same counts as plain ints, for /status
        self.listener = listener_stats
        self.connections = metrics.connections.labels(listener, upstream, server)
        self.active = metrics.active.labels(listener, upstream, server)
        self.connect: HistogramChild = metrics.connect_seconds.labels(upstream, server)
        self.duration: HistogramChild = metrics.duration.labels(upstream)
        self.bytes_up = metrics.bytes.labels(upstream, server, "upstream")
        self.bytes_down = metrics.bytes.labels(upstream, server, "downstream")
        self.pool_hit = metrics.pool_requests.labels(upstream, server, "hit")
        self.pool_miss = metrics.pool_requests.labels(upstream, server, "miss")
        # Since the last flush: connections paired, opened minus closed, pool hits and
        # misses, bytes each way.
        self.new = self.open = self.hits = self.misses = self.up = self.down = 0

    def flush(self) -> None:
        """Add the counts since the last flush to the prometheus-client children."""
        for pending, child in _PENDING:
            count = getattr(self, pending)
            if count:
                getattr(self, child).inc(count)  # the active gauge's may be negative
                setattr(self, pending, 0)


# _Children's counts since the last flush, and the child each one goes to.
_PENDING = (("new", "connections"), ("open", "active"), ("hits", "pool_hit"),
            ("misses", "pool_miss"), ("up", "bytes_up"), ("down", "bytes_down"))


class MetricsEvents(ConnectionEvents):
    """Feeds `Metrics` from the data path's events."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._children: dict[tuple[str, Server], _Children] = {}
        # Open, paired connections -> bytes already counted (up, down).
        self._counted: dict[ClientConnection, tuple[int, int, _Children]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._watched: dict[tuple[str, str], Server] = {}
        self.listeners: dict[str, ListenerStats] = {}  # for /status, by listener name
        self._failed: Server | None = None  # the server of the last failed connect
        # Servers a reload (or discovery) removed whose connections here have not all ended:
        # their label sets go with the last one. Label sets never dropped piled up with every
        # server that ever came and went (19k of them made /metrics take over 10 s). With
        # workers (multiprocess mode, where children cannot be removed) the primary leaves
        # departed servers out when it renders instead (proc/cluster.py).
        self._leaving: set[Server] = set()
        self._forgets = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        self._sources: dict[tuple[str, str], str] = {}  # shown in balancer_server_info
        # Pools whose idle count changed since the last flush, and their gauges: a pool
        # changes twice per pooled connection (taken, refilled), a set.add each.
        self._pool_gauges: dict[ServerPool, Any] = {}
        self._pools_changed: set[ServerPool] = set()

    # -- wiring -----------------------------------------------------------------------------

    def watch_upstream(self, upstream: Upstream) -> None:
        """Export health and pool state of an upstream's servers as they change (servers
        already watched, e.g. kept by a reload, are skipped)."""
        for server in upstream.servers:
            self._show_source(upstream.name, server)
            if self._watched.get((upstream.name, server.key)) is server:
                continue
            self._watched[(upstream.name, server.key)] = server
            up = self.metrics.server_up.labels(upstream.name, server.key)

            def on_health(health: ServerHealth, gauge: Any = up) -> None:
                gauge.set(1 if health.ok else 0)

            on_health(server.health)
            server.health.listeners.append(on_health)
            for reason in FAILURE_REASONS:
                if reason != "tls" or upstream.config.tls is not None:
                    self.metrics.errors.labels(upstream.name, server.key, reason)
        self.metrics.errors.labels(upstream.name, "", NO_SERVER)
        self.metrics.retries.labels(upstream.name)

    def _show_source(self, upstream: str, server: Server) -> None:
        """balancer_server_info says how a server was found (static, `dns NAME`, ...)."""
        key = (upstream, server.key)
        source = server.config.source
        old = self._sources.get(key)
        if old == source:
            return
        if old is not None:
            self._hide_source(upstream, server.key, old)
        self._sources[key] = source
        self.metrics.server_info.labels(upstream, server.key, source).set(1)

    def _hide_source(self, upstream: str, key: str, source: str) -> None:
        if self._forgets:
            self.metrics.server_info.remove(upstream, key, source)
        else:  # multiprocess mode cannot remove it (the primary filters departed servers)
            self.metrics.server_info.labels(upstream, key, source).set(0)

    def servers_left(self, servers: Iterable[Server]) -> None:
        """`servers` are no longer configured: drop their label sets now, or once their
        last connection through this process has ended."""
        if not self._forgets:
            return
        for server in servers:
            if server.local_active:
                self._leaving.add(server)
            else:
                self._forget(server)

    def _forget(self, server: Server) -> None:
        self._leaving.discard(server)
        upstream, key = server.upstream_name, server.key
        if server.pool is not None:
            self._pool_gauges.pop(server.pool, None)
        listeners = [pair[0] for pair in self._children if pair[1] is server]
        for listener in listeners:  # their counts first: a server that came back shows them
            self._children.pop((listener, server)).flush()
        if self._watched.get((upstream, key)) not in (server, None):
            return  # it came back (a new Server for the same address) and shows again
        self._watched.pop((upstream, key), None)
        source = self._sources.pop((upstream, key), None)
        if source is not None:
            self._hide_source(upstream, key, source)
        metrics = self.metrics
        for listener in listeners:
            metrics.connections.remove(listener, upstream, key)
            metrics.active.remove(listener, upstream, key)
        for reason in FAILURE_REASONS:
            metrics.errors.remove(upstream, key, reason)
        for direction in ("upstream", "downstream"):
            metrics.bytes.remove(upstream, key, direction)
        for result in ("hit", "miss"):
            metrics.pool_requests.remove(upstream, key, result)
        for family in (metrics.connect_seconds, metrics.server_up, metrics.pool_idle):
            family.remove(upstream, key)

    def watch_listener(self, config: ListenerConfig) -> None:
        """Show a TLS or SNI listener's counters from zero, before the first failure."""
        if config.tls is not None:
            self.metrics.tls_handshake_errors.labels(config.name)
        if config.sni:
            for reason in SNI_REJECTIONS:
                self.metrics.sni_rejected.labels(config.name, reason)

    def watch_pool(self, pool: ServerPool) -> None:
        """Export a pool's idle count, and count its failed connects with the clients': a
        server that refuses only pool connects still shows in the errors (as in /status
        `failures`, which counts both)."""
        self._pool_gauges[pool] = self.metrics.pool_idle.labels(pool.server.upstream_name,
                                                                 pool.server.key)
        errors = self.metrics.errors
        pool.on_change = self._pools_changed.add
        self._pools_changed.add(pool)
        pool.on_connect_failed = lambda p, reason: errors.labels(
            p.server.upstream_name, p.server.key, reason).inc()

    def start(self) -> None:
        """Begin the once-a-second byte-counter update for open connections."""
        self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()

    def _tick(self) -> None:
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._tick)

    def flush(self) -> None:
        """Bring the prometheus-client objects up to date: the bytes open connections moved
        since the last flush, then every pair's counts since then."""
        counted = self._counted
        for conn, (up, down, children) in list(counted.items()):
            self._count_bytes(conn, up, down, children)
            counted[conn] = (conn.bytes_up, conn.bytes_down, children)
        for children in self._children.values():
            children.flush()
        changed = list(self._pools_changed)
        self._pools_changed.clear()  # (the pools hold its `add`: the same set stays)
        for pool in changed:
            if pool in self._pool_gauges:
                self._pool_gauges[pool].set(len(pool.idle))
        for histogram in self.metrics.histograms:
            histogram.flush()

    def listener(self, name: str) -> ListenerStats:
        stats = self.listeners.get(name)
        if stats is None:
            stats = self.listeners[name] = ListenerStats()
        return stats

    @staticmethod
    def _count_bytes(conn: ClientConnection, up: int, down: int, children: _Children) -> None:
        """Count what `conn` moved beyond `up` and `down` bytes (already counted)."""
        moved = conn.bytes_up - up
        if moved:
            children.up += moved
            children.stats.bytes_in += moved
        moved = conn.bytes_down - down
        if moved:
            children.down += moved
            children.stats.bytes_out += moved

    def _new_children(self, key: tuple[str, Server]) -> _Children:
        listener, server = key
        children = _Children(self.metrics, listener, server.upstream_name, server.key,
                             server.stats, self.listener(listener))
        self._children[key] = children
        return children

    # -- events -----------------------------------------------------------------------------
    # `connected` and `closed` run for every connection: a lookup, plain additions, and the
    # histograms' observe written out (bisect as in HistogramChild.observe); bytes by _count_bytes.

    def connected(self, conn: ClientConnection, connect_seconds: float, pooled: bool) -> None:
        server = conn.server
        assert server is not None
        key = (conn.route.listener_name, server)
        children = self._children.get(key) or self._new_children(key)
        children.new += 1
        children.open += 1
        stats = children.stats
        stats.connections += 1
        children.listener.connections += 1
        if pooled:
            children.hits += 1
        else:
            histogram = children.connect
            histogram.counts[bisect_left(histogram.bounds, connect_seconds)] += 1
            histogram.sum += connect_seconds
            stats.connect_us += int(connect_seconds * 1_000_000)
            stats.connect_count += 1
            if server.pool is not None:
                children.misses += 1
        self._counted[conn] = (0, 0, children)

    def connect_failed(self, conn: ClientConnection, server: Server,
                       reason: FailureReason) -> None:
        self.metrics.errors.labels(server.upstream_name, server.key, reason).inc()
        server.stats.connect_errors += 1
        self._failed = server  # a retry, if one follows, is reported next (proxy.py)

    def retried(self, conn: ClientConnection) -> None:
        self.metrics.retries.labels(conn.route.upstream.name).inc()
        if self._failed is not None:
            self._failed.stats.retries += 1
            self._failed = None

    def tls_handshake(self, listener: str, seconds: float) -> None:
        self.metrics.tls_handshake_seconds.labels(listener).observe(seconds)

    def tls_handshake_failed(self, listener: str) -> None:
        self.metrics.tls_handshake_errors.labels(listener).inc()
        self.listener(listener).tls_handshake_errors += 1

    def sni_rejected(self, listener: str, reason: str) -> None:
        self.metrics.sni_rejected.labels(listener, reason).inc()

    def closed(self, conn: ClientConnection) -> None:
        counted = self._counted.pop(conn, None)
        if counted is not None:
            up, down, children = counted
            self._count_bytes(conn, up, down, children)
            children.open -= 1
            lifetime = conn.clock() - conn.started
            histogram = children.duration
            histogram.counts[bisect_left(histogram.bounds, lifetime)] += 1
            histogram.sum += lifetime
        elif conn.outcome == NO_SERVER:
            self.metrics.errors.labels(conn.route.upstream.name, "", NO_SERVER).inc()
        server = conn.server
        if self._leaving and server in self._leaving and not server.local_active:
            self._forget(server)

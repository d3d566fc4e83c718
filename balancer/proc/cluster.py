"""The primary's view of a multi-worker balancer, for /status, /healthz, /metrics and drain.

The primary moves no bytes, so its upstreams are mirrors: the same `Upstream` and `Server`
objects the workers use, bound to the shared table and synced from it (active connections of
all workers, ejections, drains, and the workers' active-check verdicts). Nothing here starts
pools or checks, and nothing here writes health to the table: the primary's cells only read.

Active checks run in every worker, each on its own. The primary shows a server down by
active check as soon as one live worker's checks say so (with that worker's reason), and up
again once none does: a worker that failed its checks sends the server nothing, so "up"
promises that every worker would use it. Its passive state is the shared `down_until`, read
afresh at every sync whatever the mirror showed before, and /healthz and /status only read
it: a re-ejection by the workers shows as down here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import socket
import time
from collections.abc import Callable, Container, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..config import Address, Config, ListenerConfig
from ..histogram import from_counters
from ..upstream import Server, Upstream
from .shared import COUNTERS, SYNC_INTERVAL, SharedCell, SharedTable

log = logging.getLogger("balancer.cluster")


class ListenerView:
    """A listener as the primary sees it: its sockets and the load of its upstream."""

    def __init__(self, config: ListenerConfig, sockets: list[list[socket.socket]],
                 upstreams: list[Upstream]) -> None:
        self.config = config
        self.name = config.name
        self.sockets = sockets
        self.upstreams = upstreams
        # Read now: the primary closes its sockets when a stop begins, and /status still
        # answers while the workers drain. (A slot waiting to restart has its group closed.)
        first = next(group[0] for group in sockets if group[0].fileno() != -1)
        self._bound = str(Address(*first.getsockname()[:2]))

    def active_count(self) -> int:
        return sum(server.active for up in self.upstreams for server in up.servers)

    def bound(self) -> str:
        return self._bound


class ClusterView:
    """What admin.py needs (`listeners`, `upstreams`, `set_draining`), built from shared state."""

    def __init__(self, config: Config, table: SharedTable, rows: dict[str, int],
                 sockets: dict[str, list[list[socket.socket]]],
                 workers: Callable[[], dict[str, Any]] | None = None) -> None:
        self.table = table
        self.workers = workers
        self.rows = rows
        self.sockets = sockets
        self.upstreams: dict[str, Upstream] = {}
        self.listeners: list[ListenerView] = []
        self.membership: Any = None  # the supervisor's: managed instances for /status
        self._timer: asyncio.TimerHandle | None = None
        self.apply(config)

    def cluster_status(self) -> dict[str, Any]:
        """The primary's generation and each worker's, for /status."""
        return self.workers() if self.workers is not None else {}

    def worker_columns(self) -> dict[int, tuple[int, int]]:
        """pid -> (open connections, new connections so far) of every worker, for History."""
        return {w["pid"]: (w["active"], w["connections"])
                for w in self.cluster_status().get("workers", [])}

    def listener_totals(self, name: str) -> tuple[int, ...]:
        """A listener's totals over every worker (LISTENER_COUNTERS order)."""
        cell = self.cell_for(f"listener {name}")
        return tuple(cell.totals()) if cell is not None else (0,) * COUNTERS

    def cell_for(self, key: str) -> SharedCell | None:
        row = self.rows.get(key)
        # No column: the primary reads every worker's counts and verdicts and writes none.
        return None if row is None else self.table.cell(row, None)

    def apply(self, config: Config) -> None:
        """Mirror a (re)loaded config; servers that stay keep their mirrored state."""
        upstreams = {}
        for name, cfg in config.upstreams.items():
            upstream = self.upstreams.get(name)
            if upstream is None:
                upstream = Upstream(cfg, self.cell_for)
            else:
                upstream.rebuild(cfg, {s.key: s for s in upstream.servers})
            upstreams[name] = upstream
        self.upstreams = upstreams
        self.listeners = [
            ListenerView(cfg, self.sockets[cfg.name], [upstreams[n] for n in cfg.upstreams])
            for cfg in config.listeners
        ]

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(0, self._sync)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def refresh(self) -> None:
        """Read the shared table once: what every worker decided and counts."""
        now = time.monotonic()
        for upstream in self.upstreams.values():
            for server in upstream.servers:
                follow(server, now)

    def _sync(self) -> None:
        self.refresh()
        self._timer = asyncio.get_running_loop().call_later(SYNC_INTERVAL, self._sync)

    def set_draining(self, upstream: str, address: str, draining: bool) -> None:
        """Written to the shared table; every worker follows within SYNC_INTERVAL."""
        for server in self.upstreams[upstream].servers:
            if server.key == address and server.cell is not None:
                server.cell.draining = draining  # workers follow within SYNC_INTERVAL
                if server.draining != draining:
                    log.warning("server %s/%s %s by operator", upstream, address,
                                "draining" if draining else "enabled")
                server.draining = draining


def follow(server: Server, now: float) -> None:
    """Mirror one server's row: the workers' passive verdict (`down_until`), their
    active-check verdicts (down if any live worker's checks say so) and the drain flag."""
    cell = server.cell
    if cell is None:
        return
    reasons = cell.checked_down()
    server.health.mirror(cell.down_until, now, reasons[0] if reasons else None)
    server.draining = cell.draining
    # HAProxy's smax: the most seen at a sync, or by one worker alone (a lower bound).
    server.peak = max(server.peak, cell.total_active(), cell.peak())


class ClusterCollector(multiprocess.MultiProcessCollector):
    """prometheus-client's multiprocess collector, minus the files a worker is creating at
    that moment: it opens a new file before giving it its size, and a file read empty raises
    struct.error (a /metrics request racing a worker's first connection answered nothing,
    with a traceback in the log). Such a file holds no value yet: skipping it loses none."""

    def collect(self) -> Any:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):  # removed meanwhile: also nothing to read
                if os.path.getsize(path) >= 8:  # its header: the bytes used
                    files.append(path)
        return self.merge(files, accumulate=True)


def render_cluster_metrics(path: str | None = None,
                           rows: Container[str] | None = None) -> bytes:
    """Every worker's metrics, combined (prometheus-client multiprocess mode), plus the
    primary's own process metrics. With `rows` (the shared table's `upstream/host:port`
    keys), a server without a row is left out: it was removed and its last connection has
    ended (multiprocess mode cannot remove a worker's label sets, so they are filtered here:
    with servers coming and going they would pile up without end). The histograms arrive as
    counter pairs and leave as histograms (histogram.py)."""
    registry = CollectorRegistry()
    collector: Collector = ClusterCollector(None, path)
    if rows is not None:
        collector = _KnownServers(collector, rows)
    registry.register(_Histograms(collector))
    ProcessCollector(registry=registry)
    return generate_latest(registry)


class _Histograms(Collector):
    """The samples of `inner`, with the workers' histogram counter pairs made histograms."""

    def __init__(self, inner: Collector) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Metric]:
        return from_counters(self.inner.collect())


class _KnownServers(Collector):
    """The samples of `inner` without those of servers no longer in `rows`."""

    def __init__(self, inner: Collector, rows: Container[str]) -> None:
        self.inner = inner
        self.rows = rows

    def collect(self) -> Iterable[Metric]:
        rows = self.rows
        for family in self.inner.collect():
            family.samples = [
                sample for sample in family.samples
                if not sample.labels.get("server")
                or f"{sample.labels.get('upstream')}/{sample.labels['server']}" in rows]
            yield family

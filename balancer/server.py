"""One balancer process: its listeners, its connection registry, reload, and a timed drain.

`Balancer` owns the lifecycle (uvicorn's `server.py` is the model): `start()` binds every
listener, `wait_stopped()` returns once a stop was requested, `shutdown()` stops accepting and
lets open connections finish up to a deadline before closing what remains. Every live
connection sits in its listener's registry; that registry is what makes draining possible.
`reload()` applies a new config in place, so servers that stay keep their health and pools.

The same class runs a single-process balancer and each worker of a multi-worker one; a worker
gets its listening sockets and a view of the shared state from the primary.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from prometheus_client import generate_latest

from .accesslog import AccessLog
from .admin import AdminBindError, AdminServer
from .config import (
    Address,
    Config,
    ConfigError,
    ListenerConfig,
    LogConfig,
    LoopName,
    load_config,
    reload_problems,
)
from .events import ConnectionEvents, FanOutEvents
from .limits import (
    REASONS,
    AcceptErrors,
    Gate,
    GatedConnection,
    Rejections,
    raise_fd_limit,
    uses_gate,
)
from .loops import new_event_loop, resolve_loop_name
from .membership import Apply, Membership, Reason
from .metrics import MetricsEvents, count_reload, process_metrics, reject_reload
from .notify import Notifier
from .proc.shared import COUNTERS, SYNC_INTERVAL, SharedCell
from .proxy import ClientConnection, Route
from .signals import handle_stop_signals, remove_stop_signals
from .sni import SniListenerState, SniPreread, SniRouter
from .sockets import LISTEN_BACKLOG, BindError, bind_group, set_defer_accept
from .splice import threshold
from .terminate import GatedTlsConnection, TlsHandshake
from .tls import ServerCertificates
from .tlsstream import TlsTransport
from .upstream import CellFor, Server, Upstream, no_cell
from .watch import ConfigWatcher

log = logging.getLogger("balancer.server")

PUBLISH_EVERY = round(1 / SYNC_INTERVAL)  # syncs between two copies of the totals (1 s)

class Listener:
    """One bound address feeding client connections into its upstream(s).

    A plain listener hands accepted sockets straight to `ClientConnection` (nothing else on
    that path); a TLS listener first runs the handshake (terminate.py), an SNI listener first
    reads the ClientHello (sni.py). Each upstream a listener sends to has its own `Route`.

    A plain listener with accept-time rules (limits.py: PROXY headers, max_conns, per-client
    limits, allow/deny) keeps its sockets and serves a duplicate of each: closing the servers
    then stops accepting without closing the sockets, so clients wait in the kernel backlog
    while accepting is paused (max_conns) or the protocol changes on reload.
    """

    def __init__(
        self,
        config: ListenerConfig,
        upstreams: dict[str, Upstream],
        loop: asyncio.AbstractEventLoop,
        events: ConnectionEvents,
        rejections: Rejections | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self.loop = loop
        self.events = events
        self.rejections = rejections or Rejections()
        self.socks: list[socket.socket] = []
        self.gate: Gate | None = None
        self.closed = False
        self._resuming: asyncio.Task[None] | None = None
        self.routes: dict[str, Route] = {}  # upstream name -> route; kept while connections use it
        self.route: Route | None = None  # where plain/TLS clients go; an SNI fallback
        self.certificates: ServerCertificates | None = None
        self.tls: TlsHandshake | None = None
        self.sni: SniListenerState | None = None
        self.handshakes: set[TlsTransport] = set()
        self.servers: list[asyncio.Server] = []
        self.use(config, upstreams)
        self._use_gate(config)

    def _use_gate(self, config: ListenerConfig) -> None:
        """A plain listener keeps the plain protocol; PROXY headers or limits add a Gate."""
        route = self.route
        if not uses_gate(config) or route is None or config.mode == "sni":
            if route is not None:
                route.gate = None
            self.gate = None
            return
        if self.gate is None:
            self.gate = Gate(config, route, self.rejections)
            self.gate.pause = self.pause_accepting
            self.gate.resume = self.resume_accepting
        else:
            self.gate.route = route
            self.gate.configure(config)
        if self.tls is not None:  # admitted clients do their handshake (terminate.py)
            self.gate.connection = GatedTlsConnection
            self.gate.tls = self.tls
        else:
            self.gate.connection = GatedConnection
            self.gate.tls = None
        route.gate = self.gate

    def apply(self, config: ListenerConfig, upstreams: dict[str, Upstream]) -> None:
        """A reload of a kept listener: new routes and limits in place; a change of protocol
        (PROXY headers, or limits where there were none) swaps the servers while clients wait
        in the backlog."""
        was_plain = self.gate is None
        changed = ((config.accept_proxy, uses_gate(config))
                   != (self.config.accept_proxy, uses_gate(self.config)))
        self.use(config, upstreams)
        self._use_gate(config)
        self._defer_accept()
        if changed and not (self.gate is not None and self.gate.paused):
            if was_plain:  # its servers own the sockets and close them: keep copies
                self.socks = [sock.dup() for sock in self.socks]
            self.pause_accepting()
            self.resume_accepting()

    def use(self, config: ListenerConfig, upstreams: dict[str, Upstream]) -> None:
        """Point new connections at the (re)loaded config; open ones keep their route. TLS
        contexts are built anew from the certificates just read."""
        self.config = config
        for name in config.upstreams:
            route = self.routes.get(name)
            if route is None:
                route = self.routes[name] = Route(config.name, upstreams[name], self.loop,
                                                  self.events)
                if self.servers:
                    route.start_idle_sweep()
            else:
                route.use(upstreams[name])
            route.splice_at = threshold(config.splice_auto)
        self.route = self.routes[config.upstream] if config.upstream is not None else None
        self.certificates = ServerCertificates(config.tls) if config.tls is not None else None
        # A TLS listener's accept stage, built with the certificates just read.
        self.tls = (TlsHandshake(self.route, self.certificates, self.handshakes, self.events)
                    if self.certificates is not None and self.route is not None else None)
        if config.sni:
            router = SniRouter(dict(config.sni), config.upstream)
            if self.sni is None:
                self.sni = SniListenerState(router, self.routes, self.events, self.name,
                                            self.loop)
            else:
                self.sni.router = router

    def _factory(self) -> Callable[[], asyncio.Protocol]:
        mode = self.config.mode
        if mode == "sni":
            assert self.sni is not None
            return partial(SniPreread, self.sni)
        assert self.route is not None
        if self.gate is not None:  # its rules first, then a TLS listener's handshake
            return self.gate.factory()
        if mode == "tls":
            return self._tls_stage
        return partial(ClientConnection, self.route)

    def _tls_stage(self) -> TlsTransport:
        # Read at accept time, so a reload's new certificates serve the next client.
        assert self.tls is not None
        return self.tls.transport()

    async def start(self, socks: list[socket.socket] | None = None, *,
                    ours: bool = False) -> None:
        """Bind the configured address as a group of sockets (see sockets.py), or serve
        `socks` (a worker's share of a listener the primary bound). The address must be
        free, unless `reuse_port` says to share it or it is `ours` (a reload renaming a
        listener binds next to the old one)."""
        announce = socks is None
        if socks is None:
            bind = self.config.bind
            try:
                socks = bind_group(bind.host, bind.port,
                                   exclusive=not (ours or self.config.reuse_port))
            except BindError as exc:
                raise BindError(f"listener {self.name}: {exc}") from exc
        self.socks = socks
        self._defer_accept()
        try:
            await self._serve()
        except OSError:
            self.stop_accepting()
            raise
        for route in self.routes.values():
            route.start_idle_sweep()
        if announce:
            log.info("listening on %s (%s -> upstream %s)", self.bound(), self.name,
                     self.describe())

    def _defer_accept(self) -> None:
        """Apply `defer_accept` to the sockets (also on reload; a worker's are the primary's
        sockets, so each worker setting it is harmless)."""
        if self.socks and not set_defer_accept(self.socks, self.config.defer_accept):
            log.warning("listener %s: defer_accept is not supported on this system; ignored",
                        self.name)

    def describe(self) -> str:
        """Where this listener sends clients, for the start-up line."""
        config = self.config
        target = config.upstream or "-"
        if config.mode == "sni":
            return f"{target}, by SNI to {', '.join(sorted({up for _, up in config.sni}))}"
        return f"{target}, TLS terminated" if config.mode == "tls" else target

    async def _serve(self) -> None:
        # A plain listener's servers own its sockets; a gated one serves duplicates, so that
        # pausing (closing the servers) leaves the sockets, and their backlog, in place.
        factory = self._factory()
        plain = self.gate is None
        for sock in self.socks:
            self.servers.append(await self.loop.create_server(
                factory, sock=sock if plain else sock.dup(), backlog=LISTEN_BACKLOG))

    def address(self) -> tuple[str, int]:
        """The address actually bound (the port is real even when the config said 0)."""
        assert self.socks
        sockname = self.socks[0].getsockname()
        return sockname[0], sockname[1]

    def pause_accepting(self) -> None:
        """Stop accepting; a gated listener's sockets stay open and queue new clients."""
        for server in self.servers:
            server.close()
        self.servers = []

    def resume_accepting(self) -> None:
        if self.closed or self._resuming is not None:
            return
        self._resuming = self.loop.create_task(self._resume())

    async def _resume(self) -> None:
        try:
            if not self.servers:
                await self._serve()
        except OSError as exc:
            log.error("listener %s: cannot accept again: %s", self.name, exc)
        finally:
            self._resuming = None
        if self.closed or (self.gate is not None and self.gate.paused):
            self.pause_accepting()  # stopped (or full again) while the servers were made

    def stop_accepting(self) -> None:
        self.closed = True
        self.pause_accepting()
        for sock in self.socks:
            sock.close()
        if self.gate is not None:
            self.gate.close_headers()

    def stop(self) -> None:
        """Stop accepting, end handshakes and hello reads in progress, stop the idle sweeps
        (the process is going away)."""
        self.stop_accepting()
        for stage in [*self.handshakes, *(self.sni.pending if self.sni else ())]:
            stage.abort()
        for route in self.routes.values():
            route.stop_idle_sweep()

    def active_count(self) -> int:
        return sum(len(route.connections) for route in self.routes.values())

    def bound(self) -> str:
        """`host:port` really bound (the port is real even when the config said 0)."""
        if not self.socks or self.socks[0].fileno() < 0:
            return str(self.config.bind)
        return str(Address(*self.address()))

    async def wait_closed(self) -> None:
        for server in self.servers:
            await server.wait_closed()

    @property
    def connections(self) -> set[ClientConnection]:
        if len(self.routes) == 1:
            return next(iter(self.routes.values())).connections
        return {conn for route in self.routes.values() for conn in route.connections}


class Balancer:
    """The listeners and upstreams of one process, started, reloaded and stopped as a unit."""

    def __init__(
        self,
        config: Config,
        *,
        sockets: dict[str, list[socket.socket]] | None = None,
        cell_for: CellFor = no_cell,
        serve_admin: bool = True,
    ) -> None:
        self.config = config
        self.sockets = sockets  # listener name -> socket, when a primary bound them
        self.cell_for = cell_for
        self.serve_admin = serve_admin
        self.upstreams: dict[str, Upstream] = {}
        self.listeners: list[Listener] = []
        self.retired: list[Listener] = []  # removed by a reload, finishing their connections
        # Servers a reload removed whose connections may still run: "upstream/key" -> server.
        self.departed: dict[str, Server] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._reload_lock = asyncio.Lock()
        self._stopping = False
        self._sync_timer: asyncio.TimerHandle | None = None
        self.events = FanOutEvents([])
        self.metrics_events: MetricsEvents | None = None
        self.access_log: AccessLog | None = None
        self.admin: AdminServer | None = None
        self.membership: Membership | None = None  # set by its owner (serve): servers found
        self.rejections = Rejections()
        self._syncs = 0
        self._listener_cells: dict[str, SharedCell | None] = {}  # with workers

    async def start(self) -> None:
        """Bind every listener; on any failure, release what was bound and raise."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        raise_fd_limit(self.config.listeners)
        loop.set_exception_handler(AcceptErrors())
        loop.set_exception_handler(AcceptErrors())
        self._stop_requested = asyncio.Event()
        self._drained = asyncio.Event()
        self.upstreams = {
            name: Upstream(cfg, self.cell_for) for name, cfg in self.config.upstreams.items()
        }
        self._add_event_sinks()
        try:
            for cfg in self.config.listeners:
                await self._open_listener(cfg)
            if self.config.metrics is not None and self.serve_admin:
                self.admin = AdminServer(self, self.config.metrics, self.render_metrics)
                await self.admin.start()
        except OSError:
            for listener in self.listeners:
                listener.stop_accepting()
            raise
        for upstream in self.upstreams.values():
            upstream.start(loop)
        self._watch_pools()
        if self.metrics_events is not None:
            self.metrics_events.start()
        if self.cell_for is not no_cell:
            self._sync_timer = loop.call_later(SYNC_INTERVAL, self._sync)
        # Everything allocated so far (modules, config, servers) lives for the whole run:
        # move it out of the collector's view, so a full collection scans only what
        # connections allocate and pauses the data path far less.
        gc.freeze()

    async def _open_listener(self, cfg: ListenerConfig) -> Listener:
        assert self._loop is not None
        listener = Listener(cfg, self.upstreams, self._loop, self.events, self.rejections)
        self._count_rejections(cfg)
        sock = self.sockets.get(cfg.name) if self.sockets is not None else None
        await listener.start(sock)
        self.listeners.append(listener)
        if self.metrics_events is not None:
            self.metrics_events.watch_listener(cfg)
        return listener

    def _add_event_sinks(self) -> None:
        """Metrics (when exported) and the access log (when on) listen to connections."""
        if self.config.metrics is not None:
            self.metrics_events = MetricsEvents(process_metrics())
            for upstream in self.upstreams.values():
                self.metrics_events.watch_upstream(upstream)
            self.events.add(self.metrics_events)
            rejected = self.metrics_events.metrics.rejected
            stats = self.metrics_events.listener

            def on_reject(name: str, reason: str) -> None:
                rejected.labels(name, reason).inc()
                counts = stats(name).rejected
                counts[reason] = counts.get(reason, 0) + 1

            self.rejections.on_reject = on_reject
        if self.config.log.access is not None:
            self.access_log = AccessLog(self.config.log)
            self.events.add(self.access_log)

    def _count_rejections(self, cfg: ListenerConfig) -> None:
        """Export every rejection reason of a listener with rules, from 0."""
        if self.metrics_events is not None and uses_gate(cfg):
            for reason in REASONS:
                self.metrics_events.metrics.rejected.labels(cfg.name, reason)

    def _watch_pools(self) -> None:
        if self.metrics_events is None:
            return
        for upstream in self.upstreams.values():
            for server in upstream.servers:
                if server.pool is not None and server.pool.on_change is None:
                    self.metrics_events.watch_pool(server.pool)

    def flush_metrics(self) -> None:
        """Bring the Prometheus objects up to date with the plain counts (metrics.py)."""
        if self.metrics_events is not None:
            self.metrics_events.flush()

    def render_metrics(self) -> bytes:
        """/metrics of one process: exact at scrape time."""
        self.flush_metrics()
        return generate_latest()

    def listener_totals(self, name: str) -> tuple[int, ...]:
        """A listener's running totals, in proc/shared.py LISTENER_COUNTERS order."""
        if self.metrics_events is None:
            return (0,) * COUNTERS
        return self.metrics_events.listener(name).totals(REASONS)

    def _sync(self) -> None:
        """Follow the shared state other workers write (see shared.py), and once a second
        (when the byte counts were flushed) publish this worker's totals there."""
        now = time.monotonic()
        for upstream in self.upstreams.values():
            for server in upstream.servers:
                server.sync(now)
        self._syncs += 1
        if self._syncs % PUBLISH_EVERY == 0:
            self._publish()
        assert self._loop is not None
        self._sync_timer = self._loop.call_later(SYNC_INTERVAL, self._sync)

    def _publish(self) -> None:
        """Copy this worker's totals and last checks into its column of the shared table."""
        for upstream in self.upstreams.values():
            for server in upstream.servers:
                if server.cell is not None:
                    stats = server.stats
                    server.cell.publish(stats.totals())
                    server.cell.publish_last((stats.check_code, stats.check_us, server.peak))
        cells = self._listener_cells
        for listener in self.listeners:
            if listener.name not in cells:
                cells[listener.name] = self.cell_for(f"listener {listener.name}")
            cell = cells[listener.name]
            if cell is not None:
                cell.publish(self.listener_totals(listener.name))

    # -- reload -------------------------------------------------------------------------------

    async def reload(self, config: Config,
                     sockets: dict[str, list[socket.socket]] | None = None) -> None:
        """Apply a new (already valid) config without dropping a connection.

        What cannot change in place (see `reload_problems`) raises ConfigError. A moved admin
        endpoint and new listeners are bound first: if one cannot be, nothing changes and
        OSError (AdminBindError for the admin endpoint) is raised.
        Then upstreams are reconfigured in place (servers that stay keep health and pools) and
        removed listeners stop accepting. Connections through a removed listener or to a
        removed server may finish for up to `shutdown_timeout`, then they are closed.
        Reloads run one at a time, in the order they were asked for.
        """
        async with self._reload_lock:
            await self._reload(config, sockets)

    async def _reload(self, config: Config,
                      sockets: dict[str, list[socket.socket]] | None) -> None:
        loop = self._loop
        assert loop is not None
        problems = reload_problems(self.config, config)
        if config.log != self.config.log:
            problems += log_problems(config.log)
        if problems:
            raise ConfigError(problems)
        admin = None
        if self.admin is not None and config.metrics is not None:
            admin = await self.admin.rebound(config.metrics)
        given = self.sockets or {}  # the sockets the primary gave us before this reload
        if sockets is not None:
            self.sockets = sockets
        added = {name: Upstream(cfg, self.cell_for)
                 for name, cfg in config.upstreams.items() if name not in self.upstreams}
        current = {listener.name: listener for listener in self.listeners}
        # A listener given new sockets (the primary bound it anew) is reopened on them, as is
        # one that changes how it starts connections (plain, tls, sni).
        kept = {cfg.name for cfg in config.listeners
                if cfg.name in current and current[cfg.name].config.bind == cfg.bind
                and current[cfg.name].config.mode == cfg.mode
                and (sockets is None or sockets.get(cfg.name) is given.get(cfg.name))}
        held = {listener.address()[1] for listener in self.listeners}  # ports we listen on
        opened: list[Listener] = []
        try:
            for cfg in config.listeners:
                if cfg.name not in kept:
                    listener = Listener(cfg, {**self.upstreams, **added}, loop, self.events,
                                        self.rejections)
                    self._count_rejections(cfg)
                    await listener.start(self.sockets.get(cfg.name) if self.sockets else None,
                                         ours=cfg.bind.port in held)
                    opened.append(listener)
        except OSError:
            for listener in opened:
                listener.stop_accepting()
            if admin is not None and admin is not self.admin:
                await admin.stop()
            raise
        if self.admin is not None and admin is not None and config.metrics is not None:
            await self.admin.replace_by(admin, config.metrics)
            self.admin = admin
        gone: set[Server] = set()  # servers no longer in the config
        for name, upstream_config in config.upstreams.items():
            if name in added:
                self.upstreams[name] = added[name]
                added[name].start(loop)
            else:
                gone.update(self.upstreams[name].reconfigure(upstream_config, loop))
            if self.metrics_events is not None:
                self.metrics_events.watch_upstream(self.upstreams[name])
        for cfg in config.listeners:
            if cfg.name in kept:
                current[cfg.name].apply(cfg, self.upstreams)
                self._count_rejections(cfg)
        retiring = [lst for lst in self.listeners if lst.name not in kept]
        for listener in retiring:
            listener.stop_accepting()
            self.retired.append(listener)
        self.listeners = [current[name] for name in kept] + opened
        if self.metrics_events is not None:
            for listener in self.listeners:
                self.metrics_events.watch_listener(listener.config)
        for name in [n for n in self.upstreams if n not in config.upstreams]:
            removed = self.upstreams.pop(name)
            removed.stop()
            gone.update(removed.servers)
        for server in gone:
            self.departed[f"{server.upstream_name}/{server.key}"] = server
        if gone or retiring:
            loop.call_later(config.shutdown_timeout, self._end_leftovers, gone, retiring)
        if self.metrics_events is not None:
            self.metrics_events.servers_left(gone)
        self._watch_pools()
        self._listener_cells = {}  # rows may have moved
        if config.log != self.config.log:
            self._apply_log(config.log)
        self.config = config
        log.info("configuration reloaded: %d listener(s), %d upstream(s)",
                 len(self.listeners), len(self.upstreams))

    def _apply_log(self, config: LogConfig) -> None:
        """A reload changed `log`: the access log follows at once (for connections that end
        from now on)."""
        if self.access_log is not None:
            self.events.remove(self.access_log)
            self.access_log.close()
            self.access_log = None
        if config.access is not None:
            self.access_log = AccessLog(config)
            self.events.add(self.access_log)

    def _end_leftovers(self, gone: set[Server], retiring: list[Listener]) -> None:
        """`shutdown_timeout` after a reload: close what still runs through a listener or to
        a server that the reload removed, as a shutdown would."""
        leftovers = [conn for lst in [*self.listeners, *self.retired] for conn in lst.connections
                     if lst in retiring or conn.server in gone]
        if leftovers:
            log.info("closing %d connection(s) left from before the reload", len(leftovers))
        for conn in leftovers:
            conn.outcome = "shutdown"
            conn.close(abort=True)
        for name, server in list(self.departed.items()):
            if server in gone:
                del self.departed[name]
        for listener in retiring:
            listener.stop()
            if listener in self.retired:
                self.retired.remove(listener)

    def set_draining(self, upstream: str, address: str, draining: bool) -> None:
        """Operator drain: no new connections for a server; open ones continue."""
        for server in self.upstreams[upstream].servers:
            if server.key == address and server.draining != draining:
                server.draining = draining
                if server.cell is not None:
                    server.cell.draining = draining
                log.warning("server %s/%s %s by operator", upstream, address,
                            "draining" if draining else "enabled")

    def server_active(self, upstream: str, key: str) -> int:
        """Open connections to a server, counting one a reload removed that still finishes."""
        count = 0
        current = self.upstreams.get(upstream)
        if current is not None:
            count += sum(s.local_active for s in current.servers if s.key == key)
        departed = self.departed.get(f"{upstream}/{key}")
        if departed is not None:
            count += departed.local_active
        return count

    # -- stop ---------------------------------------------------------------------------------

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        return {listener.name: listener.address() for listener in self.listeners}

    def open_connections(self) -> int:
        return sum(len(lst.connections) for lst in [*self.listeners, *self.retired])

    def request_stop(self) -> None:
        """Begin shutdown; safe to call from a signal handler, and more than once."""
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def wait_stopped(self) -> None:
        assert self._stop_requested is not None, "start() first"
        await self._stop_requested.wait()

    def _connection_closed(self) -> None:
        if self._stopping and self._drained is not None and not self.open_connections():
            self._drained.set()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let open connections finish for up to `timeout`, close the rest."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        self._stopping = True
        # Only now: until a stop, a connection's end has no one to tell (one call less each).
        self.events.add(_DrainWatch(self))
        for listener in self.listeners:
            listener.stop_accepting()
        for upstream in self.upstreams.values():
            upstream.stop()
        if self._sync_timer is not None:
            self._sync_timer.cancel()
        open_now = self.open_connections()
        if open_now and self._drained is not None:
            log.info("draining %d open connection(s), up to %gs", open_now, timeout)
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        self.close_all()
        for listener in [*self.listeners, *self.retired]:
            listener.stop()
            await listener.wait_closed()
        if self.metrics_events is not None:
            self.metrics_events.stop()
        if self.cell_for is not no_cell:
            self._publish()  # the last second's counts, flushed just now
        if self.admin is not None:
            await self.admin.stop()
        if self.access_log is not None:
            self.access_log.close()

    def close_all(self) -> None:
        """Abort every open connection now (the deadline passed, or a second signal came)."""
        remaining = [c for lst in [*self.listeners, *self.retired] for c in lst.connections]
        if remaining:
            log.info("closing %d connection(s) still open", len(remaining))
        for connection in remaining:
            connection.outcome = "shutdown"
            connection.close(abort=True)


class _DrainWatch(ConnectionEvents):
    """Tells a stopping balancer when its last connection has ended."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer

    def closed(self, conn: ClientConnection) -> None:
        self.balancer._connection_closed()


def log_problems(config: LogConfig) -> list[str]:
    """An access log file a reload names must open before the reload changes anything."""
    if config.access in (None, "stderr"):
        return []
    try:
        with open(config.access, "a"):
            pass
    except OSError as exc:
        return [f"log.access: cannot open {config.access}: {exc.strerror or exc}"]
    return []


async def read_config(path: str) -> Config:
    """`load_config` for a reload: in a thread, so parsing and validating a large file does
    not stall the connections this loop serves, and any error at all (not only a
    ConfigError) becomes a ConfigError: a reload fails in the open, counted, never as an
    exception in a task nobody awaits."""
    try:
        return await asyncio.to_thread(load_config, path)
    except ConfigError:
        raise
    except Exception as exc:
        log.exception("unexpected error reading %s", path)
        raise ConfigError([f"{path}: cannot load: {exc!r}"]) from None


async def reload_from(membership: Membership, path: str) -> bool:
    """SIGHUP in a single process: re-read `path`; a bad file leaves the old config serving."""
    try:
        config = await read_config(path)
    except ConfigError as exc:
        return reject_reload(log, exc.problems)
    return await membership.reload(config)


def applier(balancer: Balancer) -> Apply:
    """How a single process applies a config: a reload of its one `Balancer`."""

    async def apply(config: Config, reason: Reason) -> bool:
        try:
            await balancer.reload(config)
        except ConfigError as exc:
            problems = exc.problems
        except AdminBindError as exc:
            problems = [f"{exc} (the admin endpoint stays where it was)"]
        except OSError as exc:
            problems = [f"cannot open a new listener: {exc}"]
        else:
            if reason == "reload":
                count_reload("success")
            return True
        if reason == "reload":
            return reject_reload(log, problems)
        log.error("could not apply the servers found: %s", "; ".join(problems))
        return False

    return apply


async def serve(config: Config, config_path: str | None = None,
                watcher: ConfigWatcher | None = None) -> int:
    """Run one balancer until SIGINT/SIGTERM; a second signal skips the drain; SIGHUP
    reloads `config_path`, and so does a change of its content that `watcher` sees (with
    `--watch-config` or the config's own `watch_config: true`)."""
    balancer = Balancer(config)
    membership = Membership(config, applier(balancer), balancer.server_active)
    balancer.membership = membership  # the admin endpoint's rollouts and instances
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()
    notifier = Notifier.from_environment()

    async def reload(path: str) -> bool:
        notifier.reloading()
        try:
            return await reload_from(membership, path)
        finally:
            notifier.ready()

    def start_reload(path: str) -> None:
        task = loop.create_task(reload(path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_hangup() -> None:
        if config_path is None:
            log.warning("received SIGHUP, but there is no config file to reload")
            return
        log.info("received SIGHUP, reloading %s", config_path)
        start_reload(config_path)

    def request_stop() -> None:
        notifier.stopping()
        balancer.request_stop()

    handle_stop_signals(loop, request_stop, balancer.close_all, log)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    watching: asyncio.Task[None] | None = None
    try:
        try:
            await membership.start()
            balancer.config = membership.effective()
            await balancer.start()
            membership.go_live()
            if watcher is not None:
                path = watcher.path
                watching = loop.create_task(watcher.run(
                    lambda: membership.config.watch_config, lambda: start_reload(path)))
            notifier.ready()
            await balancer.wait_stopped()
            await balancer.shutdown()
        finally:  # after the clients drained: managed instances are stopped last
            await membership.stop()
    finally:
        if watching is not None:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        remove_stop_signals(loop)
        loop.remove_signal_handler(signal.SIGHUP)
    log.info("stopped")
    return 0


def run(config: Config, loop_name: LoopName | None = None, config_path: str | None = None,
        pid_file: str | None = None, watcher: ConfigWatcher | None = None) -> int:
    """Create the event loop (after any fork) and serve `config` until stopped."""
    name = resolve_loop_name(loop_name or config.loop)
    loop = new_event_loop(name)
    asyncio.set_event_loop(loop)
    log.debug("event loop: %s", name)
    if pid_file:
        write_pid_file(pid_file)
    try:
        return loop.run_until_complete(serve(config, config_path, watcher))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)


def write_pid_file(path: str) -> None:
    import os

    Path(path).write_text(f"{os.getpid()}\n")

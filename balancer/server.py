"""One balancer process: its listeners, its connection registry, and a timed drain on stop.

`Balancer` owns the lifecycle (uvicorn's `server.py` is the model): `start()` binds every
listener, `wait_stopped()` returns once a stop was requested, `shutdown()` stops accepting and
lets open connections finish up to a deadline before closing what remains. Every live
connection sits in its listener's registry; that registry is what makes draining possible.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from functools import partial

from .accesslog import AccessLog
from .admin import AdminServer
from .config import Config, ListenerConfig
from .loops import new_event_loop, resolve_loop_name
from .metrics import Metrics, MetricsEvents
from .proxy import ClientConnection, ConnectionEvents, FanOutEvents, Route
from .upstream import Upstream

_metrics: Metrics | None = None


def process_metrics() -> Metrics:
    """The metric families of this process, registered once on the default registry."""
    global _metrics
    if _metrics is None:
        _metrics = Metrics()
    return _metrics

log = logging.getLogger("balancer.server")

LISTEN_BACKLOG = 1024


class Listener:
    """One bound address feeding client connections into one upstream."""

    def __init__(
        self,
        config: ListenerConfig,
        upstream: Upstream,
        loop: asyncio.AbstractEventLoop,
        events: ConnectionEvents,
    ) -> None:
        self.config = config
        self.name = config.name
        self.route = Route(config.name, upstream, loop, events)
        self.loop = loop
        self.server: asyncio.AbstractServer | None = None

    async def start(self, reuse_port: bool = False) -> None:
        bind = self.config.bind
        self.server = await self.loop.create_server(
            partial(ClientConnection, self.route),
            bind.host,
            bind.port,
            backlog=LISTEN_BACKLOG,
            reuse_port=reuse_port or None,
        )
        host, port = self.address()
        log.info("listening on %s:%d (%s -> upstream %s)", host, port, self.name,
                 self.route.upstream.name)

    def address(self) -> tuple[str, int]:
        """The address actually bound (the port is real even when the config said 0)."""
        assert self.server is not None and self.server.sockets
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    @property
    def connections(self) -> set[ClientConnection]:
        return self.route.connections


class Balancer:
    """The listeners and upstreams of one process, started and stopped as a unit."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstreams: dict[str, Upstream] = {}
        self.listeners: list[Listener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._drained: asyncio.Event | None = None
        self._stopping = False
        self.events = FanOutEvents([])
        self.metrics_events: MetricsEvents | None = None
        self.access_log: AccessLog | None = None
        self.admin: AdminServer | None = None

    async def start(self) -> None:
        """Bind every listener; on any failure, release what was bound and raise."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_requested = asyncio.Event()
        self._drained = asyncio.Event()
        self.upstreams = {name: Upstream(cfg) for name, cfg in self.config.upstreams.items()}
        self._add_event_sinks()
        self.listeners = [
            Listener(cfg, self.upstreams[cfg.upstream], loop, self.events)
            for cfg in self.config.listeners
        ]
        try:
            for listener in self.listeners:
                await listener.start()
            if self.config.metrics is not None:
                self.admin = AdminServer(self, self.config.metrics.admin_token)
                bind = self.config.metrics.bind
                await self.admin.start(bind.host, bind.port)
        except OSError:
            for listener in self.listeners:
                listener.stop_accepting()
            raise
        for upstream in self.upstreams.values():
            upstream.start(loop)
            if self.metrics_events is not None:
                for server in upstream.servers:
                    if server.pool is not None:
                        self.metrics_events.watch_pool(server.pool)
        if self.metrics_events is not None:
            self.metrics_events.start()

    def _add_event_sinks(self) -> None:
        """Metrics (when exported) and the access log (when on) listen to connections."""
        if self.config.metrics is not None:
            self.metrics_events = MetricsEvents(process_metrics())
            for upstream in self.upstreams.values():
                self.metrics_events.watch_upstream(upstream)
            self.events.sinks.append(self.metrics_events)
        if self.config.log.access is not None:
            self.access_log = AccessLog(self.config.log)
            self.events.sinks.append(self.access_log)
        self.events.sinks.append(_DrainWatch(self))

    def set_draining(self, upstream: str, address: str, draining: bool) -> None:
        """Operator drain: no new connections for a server; open ones continue."""
        for server in self.upstreams[upstream].servers:
            if server.key == address and server.draining != draining:
                server.draining = draining
                log.warning("server %s/%s %s by operator", upstream, address,
                            "draining" if draining else "enabled")

    def bound_addresses(self) -> dict[str, tuple[str, int]]:
        return {listener.name: listener.address() for listener in self.listeners}

    def open_connections(self) -> int:
        return sum(len(listener.connections) for listener in self.listeners)

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
        for listener in self.listeners:
            listener.stop_accepting()
        for upstream in self.upstreams.values():
            upstream.stop()
        open_now = self.open_connections()
        if open_now and self._drained is not None:
            log.info("draining %d open connection(s), up to %.0fs", open_now, timeout)
            try:
                async with asyncio.timeout(timeout):
                    await self._drained.wait()
            except TimeoutError:
                pass
        self.close_all()
        for listener in self.listeners:
            if listener.server is not None:
                await listener.server.wait_closed()
        if self.metrics_events is not None:
            self.metrics_events.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.access_log is not None:
            self.access_log.close()

    def close_all(self) -> None:
        """Abort every open connection now (the deadline passed, or a second signal came)."""
        remaining = [c for listener in self.listeners for c in listener.connections]
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


async def serve(config: Config) -> int:
    """Run one balancer until SIGINT/SIGTERM; a second signal skips the drain."""
    balancer = Balancer(config)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        # Only set flags here; the main coroutine does the work.
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            balancer.request_stop()
        else:
            log.info("received %s again, closing all connections now",
                     signal.Signals(signum).name)
            balancer.close_all()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await balancer.start()
        await balancer.wait_stopped()
        await balancer.shutdown()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    log.info("stopped")
    return 0


def run(config: Config, loop_name: str | None = None) -> int:
    """Create the event loop (after any fork) and serve `config` until stopped."""
    name = resolve_loop_name(loop_name or config.loop)
    loop = new_event_loop(name)
    asyncio.set_event_loop(loop)
    log.debug("event loop: %s", name)
    try:
        return loop.run_until_complete(serve(config))
    finally:
        asyncio.set_event_loop(None)
        loop.close()

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
- Bulk: past 1 MiB one way, on a chunk of 16 KiB or more (a bulk flow's, not a small
  message's), that direction moves to a splice(2) pump (splice.py) when both transports are
  plain TCP; the rules above hold there too, and the per-chunk cost of offering it is one
  comparison (two past 1 MiB).
- Nothing on the per-chunk path logs, allocates beyond the chunk itself, or looks up labels.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING

from .events import ConnectionEvents, Outcome
from .health import LATE_CONNECT_TIMER, NOT_THE_SERVERS, FailureReason, failure_reason
from .splice import NEVER, SPLICE_MIN_CHUNK, SplicePump, can_splice, threshold
from .tlsstream import open_tls

if TYPE_CHECKING:
    from .limits import Gate
    from .pool import IdleConnection
    from .proxyproto import Addresses
    from .upstream import Server, Upstream

log = logging.getLogger("balancer.proxy")

# Per-transport write buffer limits. 256 KiB keeps bulk transfers streaming (a uvloop read is
# up to 256 KiB) while bounding what one stalled connection can hold.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class ConnectWatch:
    """A connect being timed: its deadline, and the connection until the connect settles."""

    __slots__ = ("conn", "deadline")

    def __init__(self, deadline: float, conn: ClientConnection) -> None:
        self.deadline = deadline
        self.conn: ClientConnection | None = conn


def _cancel_connect(connecting: Coroutine[object, None, object],
                    _waited: object = None, steps: int = 8) -> None:
    """Finish an abandoned connect coroutine: throw `CancelledError` in until it ends.

    Runs as a done callback of the cancelled future it was waiting on, after that future's
    other callbacks. A coroutine that awaits again while cleaning up has that future cancelled
    too (bounded: a connect's cleanup awaits nothing in practice).
    """
    for _ in range(steps):
        try:
            waiting = connecting.throw(asyncio.CancelledError())
        except (asyncio.CancelledError, StopIteration):
            return
        except Exception:  # the cleanup itself failed: nothing more to undo
            log.debug("abandoned connect raised while cancelling", exc_info=True)
            return
        if isinstance(waiting, asyncio.Future):
            waiting.cancel()
    connecting.close()


def _expire_one(entry: ConnectWatch, loop: asyncio.AbstractEventLoop,
                late_ok: bool = True) -> None:
    """Time out `entry`'s connect, unless it settled, or the timer is late (see
    LATE_CONNECT_TIMER): then once more after the next poll, which sees a finished connect."""
    conn = entry.conn
    if conn is None:
        return
    now = loop.time()
    if late_ok and now - entry.deadline > LATE_CONNECT_TIMER:
        loop.call_at(now + LATE_CONNECT_TIMER, _expire_one, entry, loop, False)
        return
    conn.connect_timed_out()


class Route:
    """What a listener hands every new client connection: where to go, within which limits.

    Values are copied out of the config once so the per-connection path reads plain attributes.
    A reload builds a new Route; connections keep the one they were accepted with.
    """

    __slots__ = (
        "clock",
        "connect_expiry",
        "connect_timeout",
        "connect_watch",
        "connections",
        "events",
        "gate",
        "idle_sweep",
        "idle_timeout",
        "listener_name",
        "loop",
        "retry_budget",
        "splice_at",
        "tries",
        "upstream",
    )

    def __init__(
        self,
        listener_name: str,
        upstream: Upstream,
        loop: asyncio.AbstractEventLoop,
        events: ConnectionEvents | None = None,
    ) -> None:
        self.listener_name = listener_name
        self.loop = loop
        self.clock = loop.time  # bound once: every connection of the route shares it
        self.connections: set[ClientConnection] = set()
        self.events = events or ConnectionEvents()
        self.idle_sweep: asyncio.TimerHandle | None = None
        # Connects in flight, oldest first.
        self.connect_watch: deque[ConnectWatch] = deque()
        self.connect_expiry: asyncio.TimerHandle | None = None
        self.gate: Gate | None = None  # the listener's accept-time limits, if it has any
        self.splice_at = threshold(True)  # the listener's splice_auto (Listener.use)
        self.use(upstream)

    def watch_connect(self, conn: ClientConnection, timeout: float,
                      now: float | None = None) -> ConnectWatch:
        """Time a connect out after `timeout`, cheaper than a timer of its own.

        Every connect of a route gets the same timeout, so deadlines arrive in order: a FIFO
        and one timer for its head replace a TimerHandle made and cancelled per connect.
        Settling a connect is `entry.conn = None`. A retry limited by the remaining budget has
        an earlier deadline than the tail, so it gets a timer of its own. `now`: the loop's
        time, if the caller just read it.
        """
        loop = self.loop
        deadline = (loop.time() if now is None else now) + timeout
        entry = ConnectWatch(deadline, conn)
        watch = self.connect_watch
        if watch and watch[-1].deadline > deadline:
            loop.call_at(deadline, _expire_one, entry, loop)
            return entry
        watch.append(entry)
        if self.connect_expiry is None:
            self.connect_expiry = loop.call_at(deadline, self._expire_connects)
        return entry

    def _expire_connects(self) -> None:
        loop = self.loop
        now = loop.time()
        watch = self.connect_watch
        while watch and watch[0].deadline <= now:
            _expire_one(watch.popleft(), loop)  # a settled connect's entry: nothing
        # The next deadline, but at most a hundred wake-ups a second under a stream of
        # connects: a timeout may fire up to 10 ms late.
        self.connect_expiry = (
            loop.call_at(max(watch[0].deadline, now + 0.01), self._expire_connects)
            if watch else None
        )

    def start_idle_sweep(self) -> None:
        """Close connections idle for `idle_timeout`: one timer per listener sweeping every
        connection, rather than a timer per connection (cheaper on the accept path), and a
        flag per chunk rather than a clock read (cheaper on the byte path). A connection is
        closed between `idle_timeout` and `idle_timeout` + one sweep period."""
        period = max(0.02, min(1.0, self.idle_timeout / 8))
        self.idle_sweep = self.loop.call_later(period, self._sweep_idle)

    def _sweep_idle(self) -> None:
        now = self.loop.time()
        cutoff = now - self.idle_timeout
        idle = []
        for conn in self.connections:
            if conn.moved:  # bytes since the last sweep: quiet from now on, if at all
                conn.moved = False
                conn.quiet_since = now
            elif conn.quiet_since <= cutoff and conn.upstream is not None:
                idle.append(conn)
        for conn in idle:
            conn.outcome = "idle_timeout"
            conn.close(abort=True)
        self.start_idle_sweep()

    def stop_idle_sweep(self) -> None:
        if self.idle_sweep is not None:
            self.idle_sweep.cancel()
            self.idle_sweep = None

    def use(self, upstream: Upstream) -> None:
        """Point new connections at `upstream` with its current limits (also on reload)."""
        config = upstream.config
        self.upstream = upstream
        self.connect_timeout = config.timeouts.connect
        self.idle_timeout = config.timeouts.idle
        self.tries = config.retries.tries
        self.retry_budget = config.retries.timeout


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
        client.moved = True
        client.transport.write(data)
        if client.bytes_down >= client.splice_at_down and len(data) >= SPLICE_MIN_CHUNK:
            client.start_splice(False)

    def eof_received(self) -> bool:
        self.client.upstream_ended()
        return True  # keep our write side open: the client may still be sending

    def send_eof(self) -> None:
        """Pass the client's FIN on (over TLS, a close_notify and then the FIN)."""
        self.transport.write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.upstream_lost(exc)

    # The upstream's send buffer is full: stop reading the client until it drains.
    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class PooledUpstreamConnection(UpstreamConnection):
    """A pooled upstream connection on probation, until the server's first byte.

    The server may have closed a pooled connection just as it was handed out. Until the server
    has sent something, the client's bytes are kept, and if the connection dies they are
    replayed on a fresh connect: a server's idle timeout never becomes a client's error.
    """

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.client.confirm_pooled()
        UpstreamConnection.data_received(self, data)

    def eof_received(self) -> bool:
        self.client.pooled_failed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client.closed:  # a graceful close that flushed: only its abort timer is left
            client.upstream_lost(exc)
        else:
            client.pooled_failed()


class ClientConnection(asyncio.Protocol):
    """The client half, and the owner of the pair's state."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "client_eof",
        "client_ip",
        "client_linger",
        "clock",
        "closed",
        "connect_began",
        "connect_timer",
        "connecting",
        "early",
        "moved",
        "outcome",
        "paired",
        "quiet_since",
        "retry_deadline",
        "route",
        "server",
        "source",
        "splice_at_down",
        "splice_at_up",
        "splicing",
        "started",
        "transport",
        "trial",
        "tries_left",
        "upstream",
        "upstream_eof",
        "upstream_linger",
        "upstream_write",
        "waiting",
    )

    def __init__(self, route: Route) -> None:
        self.route = route
        self.clock = route.clock
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.upstream: UpstreamConnection | None = None
        # Until the upstream is connected, client bytes wait in `early` (bounded, see below).
        self.upstream_write: Callable[[bytes], None] = self._hold_early
        self.early: list[bytes] = []
        self.server: Server | None = None
        self.client_ip = ""
        self.source: Addresses | None = None  # the client's addresses from a PROXY header
        self.started = 0.0
        self.quiet_since = 0.0  # for the idle sweep: no bytes moved since then...
        self.moved = False  # ...unless bytes moved since the last sweep
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        # Past these byte counts a direction moves to splice (splice.py); NEVER: it does not.
        # Whether the transports allow it is asked only then: nothing per connection.
        self.splice_at_up = self.splice_at_down = route.splice_at
        self.splicing: list[SplicePump] | None = None
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self.outcome: Outcome = "ok"
        self.paired = False  # reported as connected (once, even if a pooled one is replaced)
        self.tries_left = 0
        self.retry_deadline = 0.0  # connects (retries included) must be done by then
        self.trial = False  # this connect is a half-open server's one trial
        self.connecting: (
            Coroutine[asyncio.Future[object], None, tuple[object, UpstreamConnection]] | None
        ) = None
        self.waiting: asyncio.Future[object] | None = None  # what `connecting` waits on
        self.connect_timer: ConnectWatch | None = None
        self.connect_began = 0.0
        # After a graceful close with bytes still buffered: the timer that aborts each
        # transport if its peer never reads them (cancelled once the transport is gone).
        self.client_linger: asyncio.TimerHandle | None = None
        self.upstream_linger: asyncio.TimerHandle | None = None

    # -- accept and connect -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.route.upstream.needs_client_ip:  # a getpeername() only where it is used
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0] if peer else ""
        self.start()

    def start(self) -> None:
        """Pick a server and connect (or take a pooled connection). A listener with a PROXY
        header or limits (limits.py) calls this itself once the client is admitted, with
        `transport`, `client_ip` and `source` set."""
        route = self.route
        route.connections.add(self)
        self.started = self.quiet_since = self.clock()
        self.tries_left = route.tries
        self.retry_deadline = self.started + route.retry_budget
        server = route.upstream.pick(self.client_ip)
        if server is None:
            self._no_server()
            return
        pool = server.pool
        if pool is not None and server.health.ok:  # a half-open server's trial is a real connect
            idle = pool.take()
            if idle is not None:  # a pool hit: no connect on the client's path at all
                server.acquire()
                self.server = server
                self._attach_idle(idle)
                return
        self._connect_to(server)

    def _connect_to(self, server: Server) -> None:
        """Start connecting to `server`, within the connect timeout and the retry budget.

        The connect coroutine is driven by `_connect_step` rather than wrapped in a Task: a
        Task per client costs a registry entry and an extra loop pass on the accept path,
        and the connect needs neither (measured in benchmarks/, the new-connection figure).
        """
        route = self.route
        server.acquire()
        self.server = server
        # Taken now, not when the connect resumes: other clients accepted in this same loop
        # pass must already see a half-open server's one trial as in use. (`ok` means up:
        # no trial to take, and no call to find that out.)
        health = server.health
        self.trial = not health.ok and health.connect_started()
        self.tries_left -= 1
        now = self.connect_began = self.clock()
        timeout = route.connect_timeout
        if self.retry_deadline - now < timeout:  # (min() is a call more per connection)
            timeout = self.retry_deadline - now
        self.connect_timer = route.watch_connect(self, timeout, now)
        address = server.config.address
        self.waiting = None
        tls = server.tls
        if tls is None:
            self.connecting = route.loop.create_connection(
                self._new_upstream, address.host, address.port
            )
        else:  # the handshake is part of the connect, within the same timeout
            self.connecting = open_tls(
                route.loop, self._new_upstream, address.host, address.port, tls.context,
                tls.server_hostname, timeout)
        self._connect_step(None)

    def _new_upstream(self) -> UpstreamConnection:
        return UpstreamConnection(self)

    def _connect_step(self, waited: asyncio.Future[object] | None) -> None:
        """Advance the connect coroutine one step, as a Task would."""
        if waited is not self.waiting:  # a stale wake-up from an abandoned connect
            return
        connecting = self.connecting
        assert connecting is not None
        try:
            waiting = connecting.send(None)
        except StopIteration as done:
            self.connecting = self.waiting = None
            self._connected(done.value[1])
        except OSError as exc:
            self.connecting = self.waiting = None
            self._connect_failed(failure_reason(exc))
        except Exception:  # not a network failure: a bug; never leave the client hanging
            self.connecting = self.waiting = None
            log.exception("connect to %s failed unexpectedly", self.server)
            self._connect_failed("internal")
        else:
            self.waiting = waiting
            waiting.add_done_callback(self._connect_step)

    def _abandon_connect(self) -> None:
        """Stop a connect in progress the way `Task.cancel` would.

        The future the coroutine waits on is cancelled, so its own done callbacks run first
        (the stdlib loop's unregisters the socket from the selector: a descriptor left there
        makes a later connect that reuses the number hang), and only then is `CancelledError`
        thrown into the coroutine, which closes the half-made socket. Merely closing the
        coroutine skipped the first step and left the future to log "exception was never
        retrieved" on uvloop.
        """
        connecting = self.connecting
        if connecting is None:
            return
        self.connecting = None
        self._settle_connect_timer()
        waiting = self.waiting
        self.waiting = None
        if waiting is None:
            connecting.close()
            return
        waiting.remove_done_callback(self._connect_step)
        if waiting.done() and not waiting.cancelled():
            # It failed in this same loop pass, before our step ran: mark its exception
            # seen, since the coroutine it belonged to will never read it.
            waiting.exception()
        waiting.cancel()
        waiting.add_done_callback(partial(_cancel_connect, connecting))

    def _settle_connect_timer(self) -> None:
        """The connect ended (or was abandoned): its deadline no longer applies."""
        entry = self.connect_timer
        if entry is not None:
            entry.conn = None
            self.connect_timer = None

    def connect_timed_out(self) -> None:
        """The route's connect timer: this connect took longer than allowed."""
        self.connect_timer = None
        self._abandon_connect()
        self._connect_failed("timeout")

    def _connected(self, upstream: UpstreamConnection) -> None:
        entry = self.connect_timer  # _settle_connect_timer, inline: once per connection
        if entry is not None:
            entry.conn = None
            self.connect_timer = None
        health = self.server.health  # type: ignore[union-attr]
        if health.fails or not health.ok:  # an up server without failures: nothing to reset
            health.connect_succeeded()
        self._attach(upstream, self.clock() - self.connect_began, False)

    def _connect_failed(self, reason: FailureReason) -> None:
        """Count the failure against the server, then try the next one while the tries and
        the budget last. Only connects are retried: once paired, a connection is committed."""
        self._settle_connect_timer()
        server = self.server
        assert server is not None
        route = self.route
        server.release()
        self.server = None
        server.connect_failed(reason)
        route.events.connect_failed(self, server, reason)
        log.debug("connect to %s/%s failed: %s", route.upstream.name, server.key, reason)
        if self.closed:
            return
        if reason in NOT_THE_SERVERS:
            # Out of descriptors or ports (or a bug of ours): another server would fail the
            # same way, so close this client; the server's health is untouched.
            server.health.connect_abandoned(self.trial)
            self.outcome = "local_error"
            self.close(abort=True)
            return
        if self.tries_left > 0 and self.clock() < self.retry_deadline:
            next_server = route.upstream.pick(self.client_ip, server)
            if next_server is not None:
                route.events.retried(self)
                self._connect_to(next_server)
                return
        self._no_server()

    def _no_server(self) -> None:
        self.outcome = "no_server"
        self.route.upstream.note_no_server()
        self.close()

    def _attach_idle(self, idle: IdleConnection) -> None:
        """Take over a pooled connection: swap in our protocol, deliver any banner first."""
        upstream = PooledUpstreamConnection(self)
        transport = idle.transport
        upstream.transport = transport
        transport.set_protocol(upstream)
        self._attach(upstream, 0.0, True)
        if idle.banner:  # the server has spoken: it is alive, no probation needed
            self.confirm_pooled()
            banner = b"".join(idle.banner)
            self.bytes_down += len(banner)
            transport.resume_reading()  # first: the write below may pause it again
            self.transport.write(banner)
        else:
            self.upstream_write = self._send_and_keep

    def _send_and_keep(self, data: bytes) -> None:
        """Probation: send, and keep a copy for a replay (up to one buffer's worth)."""
        self.early.append(data)
        self.upstream.transport.write(data)  # type: ignore[union-attr]
        if sum(map(len, self.early)) >= WRITE_HIGH_WATER:
            self.confirm_pooled()  # too much to keep: commit to this connection

    def confirm_pooled(self) -> None:
        """The pooled connection proved alive: back to the plain data path."""
        upstream = self.upstream
        if upstream is None or type(upstream) is not PooledUpstreamConnection:
            return
        plain = self._new_upstream()
        plain.transport = upstream.transport
        plain.transport.set_protocol(plain)
        self.upstream = plain
        self.upstream_write = plain.transport.write
        self.early = []

    def pooled_failed(self) -> None:
        """The pooled connection died before the server said anything: connect afresh and
        replay what the client sent (still in `early`)."""
        upstream = self.upstream
        if self.closed or upstream is None:
            return
        upstream.transport.abort()
        self.upstream = None
        self.upstream_write = self._hold_early
        server = self.server
        assert server is not None
        log.debug("pooled connection to %s died unused; reconnecting", server.key)
        server.release()  # _connect_to takes the slot again, wherever it goes
        self.server = None
        # A replay is a fresh start, however long the client talked to the dead connection:
        # it gets the full tries and budget, not what was left from the accept.
        self.tries_left = self.route.tries
        self.retry_deadline = self.clock() + self.route.retry_budget
        if not server.usable():  # it went down or filled up meanwhile: go elsewhere
            other = self.route.upstream.pick(self.client_ip, server)
            if other is None:
                self._no_server()
                return
            server = other
        self._connect_to(server)

    def _attach(self, upstream: UpstreamConnection, connect_seconds: float, pooled: bool) -> None:
        """Join the two halves and let bytes flow."""
        transport = upstream.transport
        if self.closed:  # the client left while the connect was completing
            transport.close()
            return
        if not self.paired:
            self.paired = True
            self.route.events.connected(self, connect_seconds, pooled)
        self.upstream = upstream
        self.upstream_write = transport.write
        early = self.early
        encode = self.server.send_proxy  # type: ignore[union-attr]
        if encode is not None:  # the first bytes on this server connection, pooled or new
            if early:  # in the same write as the bytes held: one syscall, not two
                early.insert(0, self._proxy_header(encode))
            else:  # at once: a server that speaks first waits for it
                transport.write(self._proxy_header(encode))
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.moved = True
        if early:
            # Resume first: writing the held bytes may itself fill the buffer and pause us.
            self.transport.resume_reading()
            transport.writelines(early)
            self.early = []
        if self.client_eof:
            upstream.send_eof()

    def _proxy_header(self, encode: Callable[[str, int, str, int], bytes]) -> bytes:
        """The client's addresses: from its own PROXY header, else from its socket."""
        source = self.source
        if source is not None:
            return encode(*source)
        transport = self.transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        return encode(peer[0], peer[1], local[0], local[1])

    def _hold_early(self, data: bytes) -> None:
        """Keep bytes that arrive before the upstream is connected.

        The client is still read meanwhile, so a client that leaves during the connect is
        noticed at once; past one buffer's worth we stop reading it (backpressure again).
        """
        self.early.append(data)
        if sum(map(len, self.early)) >= WRITE_HIGH_WATER:
            self.transport.pause_reading()

    # -- the byte pump --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.moved = True
        self.upstream_write(data)
        if self.bytes_up >= self.splice_at_up and len(data) >= SPLICE_MIN_CHUNK:
            self.start_splice(True)

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream_eof:  # both directions have ended: close() sends our FIN
            self.close()
        elif self.upstream is not None:  # else _attach forwards it after the early bytes
            self.upstream.send_eof()
        return True  # keep our write side open: the server may still be answering

    def upstream_ended(self) -> None:
        """The server sent FIN: pass it on, and finish if the client already had."""
        self.upstream_eof = True
        if self.client_eof:  # both directions have ended: close() sends our FIN
            self.close()
        else:
            self.route.loop.call_soon(self._pass_upstream_eof)

    def _pass_upstream_eof(self) -> None:
        if not self.closed:
            self.transport.write_eof()

    # The client's receive side is slow: stop reading the server until it drains.
    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    # -- splice (splice.py) -------------------------------------------------------------------

    def start_splice(self, up: bool) -> None:
        """Move one direction to a splice pump, once what its destination holds has drained
        (until then, every chunk asks again); never on a pooled connection on probation."""
        upstream = self.upstream
        if self.closed or upstream is None or type(upstream) is PooledUpstreamConnection:
            return
        src, dst = (self.transport, upstream.transport) if up else (upstream.transport,
                                                                    self.transport)
        if up:
            self.splice_at_up = NEVER
        else:
            self.splice_at_down = NEVER
        if not can_splice(src, dst):  # TLS on either side: the normal path, for good
            return
        if dst.get_write_buffer_size():  # ask again on the next chunk
            if up:
                self.splice_at_up = 0
            else:
                self.splice_at_down = 0
            return
        try:
            pump = SplicePump(self, up, self.route.loop, src, dst)
        except OSError:  # out of descriptors, say: this direction stays on the transports
            return
        src.pause_reading()  # for good: from now on the pump reads src
        if self.splicing is None:
            self.splicing = [pump]
        else:
            self.splicing.append(pump)
        pump.start()

    def splice_eof(self, up: bool) -> None:
        """A pump read its source's FIN: the same as the transport's eof_received."""
        if up:
            self.eof_received()
        else:
            self.upstream_ended()

    def splice_failed(self, up: bool, read_side: bool) -> None:
        """A pump's splice failed (a reset): end the pair as a lost transport would."""
        if not self.closed:
            client_side = up == read_side  # the client is the source up, the target down
            self.outcome = "client_abort" if client_side else "upstream_reset"
            self.close(abort=True)

    # -- endings ----------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.outcome = "client_abort"
            self.close(abort=True)
        elif self.client_linger is not None:  # flushed after all: no abort to wait for
            self.client_linger.cancel()
            self.client_linger = None

    def upstream_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.outcome = "upstream_reset" if exc is not None else "upstream_closed"
            self.close(abort=exc is not None)
        elif self.upstream_linger is not None:
            self.upstream_linger.cancel()
            self.upstream_linger = None

    def close(self, abort: bool = False) -> None:
        """End the pair: close both transports now, release the server slot, report once.

        A graceful close flushes what is buffered; a transport that still holds bytes its peer
        never reads is aborted after the idle timeout, so no close can linger for ever.
        """
        if self.closed:
            return
        self.closed = True
        route = self.route
        if self.connecting is not None:  # the client left during the connect
            self._abandon_connect()
            if self.server is not None:
                self.server.health.connect_abandoned(self.trial)
        upstream = self.upstream
        if self.splicing is not None:  # their descriptors hold the sockets open too
            for pump in self.splicing:
                pump.stop()
        if abort:
            self.transport.abort()
            if upstream is not None:
                upstream.transport.abort()
        else:
            self.client_linger = self._close_gracefully(self.transport)
            if upstream is not None:
                self.upstream_linger = self._close_gracefully(upstream.transport)
        if self.server is not None:
            self.server.release()
        route.connections.discard(self)
        route.events.closed(self)
        # Unlink the pair: with no cycle left, both halves are freed by reference counting
        # as soon as uvloop lets go of them, rather than by the garbage collector.
        self.upstream = None

    def _close_gracefully(self, transport: asyncio.Transport) -> asyncio.TimerHandle | None:
        """Close after the buffered bytes are sent; if some are left, the timer that aborts
        the transport should its peer never read them (cancelled when it is lost)."""
        if transport.is_closing():  # closing already (a TLS peer's close_notify ended it)
            return None
        transport.close()
        if not transport.get_write_buffer_size():
            return None
        return self.route.loop.call_later(self.route.idle_timeout, transport.abort)

"""Issue 18, experiment 1: three minimal TCP forwarders (one listener, one upstream) that
differ only in how a connection is accepted, connected and pumped.

- `transports` (A, the baseline): `create_server` + `create_connection` with two Protocols,
  the shape of balancer/proxy.py without its routing, counters and timers (the connect
  coroutine is stepped without a Task, client bytes that arrive first are held).
- `rawaccept` (B, the issue's proposal): a raw non-blocking listening socket watched with
  `add_reader`, up to MAXACCEPT `accept()`s per wake-up (HAProxy's `tune.maxaccept`); the
  upstream connect is a non-blocking `connect` plus one writer callback; only then are both
  sockets handed to `connect_accepted_socket`, so transports exist only once data can flow.
- `sockets` (C, the ceiling): accept and connect as in B, then no transport at all: bytes are
  pumped by `add_reader`/`add_writer` callbacks, `recv_into` one shared buffer and `send`.

All three keep the balancer's data-path rules. Backpressure: when a destination cannot take
more (a transport past its high-water mark, or a `send` that would block), its source is not
read until it drains. Half-close: an EOF is passed on (`write_eof`, `shutdown(SHUT_WR)`) and
the other direction keeps flowing; when both have ended both sides are closed, explicitly.
Errors abort both sides. Prototypes: no connect timeout, retries or limits.

    python -m benchmarks.accept_proxies VARIANT LOOP PORT UPSTREAM_PORT

VARIANT is transports, rawaccept or sockets; LOOP is uvloop or asyncio; it listens on
127.0.0.1:PORT and forwards to 127.0.0.1:UPSTREAM_PORT until it is killed.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

VARIANTS = ("transports", "rawaccept", "sockets")
LOOPS = ("uvloop", "asyncio")
MAXACCEPT = 64  # accepts per wake-up of the listening socket, as HAProxy's tune.maxaccept
BACKLOG = 4096
HIGH_WATER, LOW_WATER = 256 * 1024, 64 * 1024  # proxy.py's transport write limits
CHUNK = 256 * 1024  # one read, as uvloop's (the sockets variant)
NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


# -- A and B: transports --------------------------------------------------------------------


class Half(asyncio.Protocol):
    """One transport of a pair: what it reads is written to its peer."""

    __slots__ = ("closed", "eof", "peer", "transport")

    def __init__(self) -> None:
        self.peer: Half | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None:  # else the connect passes it on once it is made
            if peer.eof:  # both directions have ended
                self.close_pair()
            else:
                peer.transport.write_eof()
        return True  # keep our write side open: the peer may still be sending

    # The peer's buffer is full: stop reading us until it drains.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.close_pair(abort=True)

    def close_pair(self, abort: bool = False) -> None:
        """Close both transports now (graceful: they flush what they hold first)."""
        for half in (self, self.peer):
            if half is not None and not half.closed:
                half.closed = True
                transport = half.transport
                if transport is not None:
                    if abort:
                        transport.abort()
                    else:
                        transport.close()


class Client(Half):
    """A's client half: connects to the upstream itself, holding early bytes meanwhile."""

    __slots__ = ("connecting", "early")

    def __init__(self, loop: asyncio.AbstractEventLoop, port: int) -> None:
        super().__init__()
        self.early: list[bytes] = []
        self.connecting: Coroutine[Any, None, Any] | None = loop.create_connection(
            self._new_upstream, "127.0.0.1", port)

    def _new_upstream(self) -> Half:
        upstream = Half()
        upstream.peer = self
        return upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Half.connection_made(self, transport)
        self._step(None)

    def _step(self, _waited: object) -> None:
        """Advance the connect coroutine one step, as a Task would (as proxy.py does)."""
        try:
            waiting = self.connecting.send(None)  # type: ignore[union-attr]
        except StopIteration as done:
            self.connecting = None
            self._connected(done.value[1])
        except OSError:
            self.connecting = None
            self.close_pair(abort=True)
        else:
            waiting.add_done_callback(self._step)

    def _connected(self, upstream: Half) -> None:
        if self.closed:  # the client left during the connect
            upstream.closed = True
            upstream.transport.close()
            return
        self.peer = upstream
        if self.early:
            self.transport.resume_reading()  # first: the write below may pause it again
            upstream.transport.writelines(self.early)
            self.early = []
        if self.eof:
            upstream.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:  # connecting: hold, and stop reading past one buffer's worth
            self.early.append(data)
            if sum(map(len, self.early)) >= HIGH_WATER:
                self.transport.pause_reading()
            return
        peer.transport.write(data)


def drive(coro: Coroutine[Any, None, Any], failed: Callable[[], None]) -> None:
    """Run `coro` to its end without a Task; `failed()` if it raises."""

    def step(_waited: object) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration:
            return
        except Exception:
            failed()
            return
        waiting.add_done_callback(step)

    step(None)


class Acceptor:
    """A raw listening socket: up to MAXACCEPT accepts each time it is readable."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket,
                 accepted: Callable[[int], None]) -> None:
        self.accept = lsock._accept  # type: ignore[attr-defined]  # (fd, address): no object yet
        self.accepted = accepted
        loop.add_reader(lsock.fileno(), self.ready)

    def ready(self) -> None:
        accept, accepted = self.accept, self.accepted
        for _ in range(MAXACCEPT):
            try:
                fd, _address = accept()  # accept4 gives the client's address: no getpeername
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the next wake-up tries again
                return
            accepted(fd)


class RawAccept:
    """B: raw accept, non-blocking connect with one writer callback, then two transports."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket,
                 upstream: tuple[str, int]) -> None:
        self.loop = loop
        self.upstream = upstream
        self.acceptor = Acceptor(loop, lsock, self.accepted)

    def accepted(self, fd: int) -> None:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        up = socket.socket(socket.AF_INET, NONBLOCKING_STREAM)
        err = up.connect_ex(self.upstream)
        if err not in (0, errno.EINPROGRESS):
            client.close()
            up.close()
            return
        self.loop.add_writer(up.fileno(), self.connected, client, up)

    def connected(self, client: socket.socket, up: socket.socket) -> None:
        """Writable: connected (a refused connect shows as the upstream's first read error;
        no SO_ERROR question, as HAProxy). Now the transports: both, with their protocols."""
        loop = self.loop
        loop.remove_writer(up.fileno())
        c, u = Half(), Half()
        c.peer, u.peer = u, c

        def failed() -> None:  # the transport that failed closed its socket itself
            c.close_pair(abort=True)

        drive(loop.connect_accepted_socket(lambda: u, up), failed)
        drive(loop.connect_accepted_socket(lambda: c, client), failed)


# -- C: sockets, no transport ---------------------------------------------------------------

BUFFER = bytearray(CHUNK)
VIEW = memoryview(BUFFER)  # shared by every flow: a chunk is sent at once, or its rest copied


class Flow:
    """One direction of a pair, src -> dst, on loop callbacks: read only while dst takes
    everything (else wait for dst to be writable, not reading src); EOF -> SHUT_WR."""

    __slots__ = ("dfd", "dst", "ended", "loop", "pair", "pending", "sfd", "src")

    def __init__(self, pair: Pair, src: socket.socket, dst: socket.socket) -> None:
        self.pair = pair
        self.loop = pair.loop
        self.src, self.dst = src, dst
        self.sfd, self.dfd = src.fileno(), dst.fileno()
        self.pending = b""  # what dst did not take; src is not read while there is any
        self.ended = False

    def readable(self) -> None:
        try:
            n = self.src.recv_into(BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.pair.close()
            return
        if not n:
            self.ended = True
            self.loop.remove_reader(self.sfd)
            pair = self.pair
            if pair.up.ended and pair.down.ended:  # both ended, all sent: close() sends FIN
                pair.close()
                return
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pair.close()
            return
        try:
            sent = self.dst.send(VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.pair.close()
            return
        if sent < n:  # backpressure: keep the rest, stop reading src until dst drains
            self.pending = VIEW[sent:n].tobytes()
            self.loop.add_writer(self.dfd, self.writable)
            self.loop.remove_reader(self.sfd)

    def writable(self) -> None:
        try:
            sent = self.dst.send(self.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.pair.close()
            return
        if sent < len(self.pending):
            self.pending = self.pending[sent:]
            return
        self.pending = b""
        self.loop.add_reader(self.sfd, self.readable)
        self.loop.remove_writer(self.dfd)

    def unregister(self) -> None:
        if not self.ended:
            self.loop.remove_reader(self.sfd)
        if self.pending:
            self.loop.remove_writer(self.dfd)


class Pair:
    """C: a client socket and its upstream socket, two Flows between them."""

    __slots__ = ("client", "closed", "down", "loop", "up", "upstream")

    def __init__(self, loop: asyncio.AbstractEventLoop, client: socket.socket,
                 upstream: socket.socket) -> None:
        self.loop = loop
        self.client, self.upstream = client, upstream
        self.up = Flow(self, client, upstream)
        self.down = Flow(self, upstream, client)
        self.closed = False
        loop.add_writer(upstream.fileno(), self.connected)

    def connected(self) -> None:
        """The connect finished: read both sides (a refused connect shows as the upstream's
        first read error; no SO_ERROR question). Reader first, then the writer goes: on
        uvloop the descriptor's poll handle is kept rather than closed and made again."""
        loop = self.loop
        loop.add_reader(self.down.sfd, self.down.readable)
        loop.remove_writer(self.down.sfd)
        loop.add_reader(self.up.sfd, self.up.readable)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.unregister()
        self.down.unregister()
        self.client.close()
        self.upstream.close()


class Sockets:
    """C's listener: raw accept, non-blocking connect, then a Pair."""

    def __init__(self, loop: asyncio.AbstractEventLoop, lsock: socket.socket,
                 upstream: tuple[str, int]) -> None:
        self.loop = loop
        self.upstream = upstream
        # As the transports do, but set once: Linux's accepted sockets inherit it.
        lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.acceptor = Acceptor(loop, lsock, self.accepted)

    def accepted(self, fd: int) -> None:
        # The C-level socket type: no Python __init__ per socket.
        client = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
        client.setblocking(False)  # TCP_NODELAY it has from the listener (Linux)
        up = socket.SocketType(socket.AF_INET, NONBLOCKING_STREAM)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = up.connect_ex(self.upstream)
        if err not in (0, errno.EINPROGRESS):
            client.close()
            up.close()
            return
        Pair(self.loop, client, up)


# -- running one ---------------------------------------------------------------------------


def listening_socket(port: int) -> socket.socket:
    lsock = socket.create_server(("127.0.0.1", port), backlog=BACKLOG)
    lsock.setblocking(False)
    return lsock


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def start(loop: asyncio.AbstractEventLoop, variant: str, port: int,
          upstream_port: int) -> object:
    """Set `variant` up on `loop` (not yet running); returns what must be kept alive."""
    lsock = listening_socket(port)
    upstream = ("127.0.0.1", upstream_port)
    if variant == "transports":
        return loop.run_until_complete(loop.create_server(
            lambda: Client(loop, upstream_port), sock=lsock, backlog=BACKLOG))
    if variant == "rawaccept":
        return RawAccept(loop, lsock, upstream)
    if variant == "sockets":
        return Sockets(loop, lsock, upstream)
    raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in VARIANTS or argv[1] not in LOOPS:
        print(f"usage: python -m benchmarks.accept_proxies {{{','.join(VARIANTS)}}} "
              f"{{{','.join(LOOPS)}}} PORT UPSTREAM_PORT", file=sys.stderr)
        return 2
    loop = new_loop(argv[1])
    keep = start(loop, argv[0], int(argv[2]), int(argv[3]))
    try:
        loop.run_forever()
    finally:
        del keep
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The balancer's own TLS transport (tlsstream.py) on both loops, with real peers.

Half-close through TLS, both ways, with a real TLS peer that half-closes (Node's `tls` with
`allowHalfOpen`, tests/tls_peer.js) on the TLS side and a plain backend or client on the
other: a close_notify is a FIN, and the other direction keeps flowing, as over TCP. Then
backpressure both ways (a slow client pausing a TLS server, a slow TLS server pausing a
client), churn (clean ends, resets, silent clients) through TLS on both sides with the
balancer's descriptors counted, and a handshake that outlives a stall of the loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .test_tls import (
    Certs,
    admin_port,
    metric,
    no_tracebacks,
    terminating,
    tls_backend,
    tls_upstream,
)
from .utils import Backend, _read_listening_line, eventually, read_backend_line, wait_until

pytestmark = pytest.mark.both_loops

PEER = Path(__file__).parent / "tls_peer.js"
PAYLOAD = 3 * 1024 * 1024 + 17  # more than any buffer on the way, and not a round size


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


class TlsPeer(Backend):
    """tls_peer.js as a TLS server (stopped by the start_backend-style fixture below)."""

    def __init__(self, mode: str, cert: Path, key: Path, *extra: str) -> None:
        self.mode = mode
        self.name = f"tls-peer-{mode}"
        self.proc = subprocess.Popen(
            ["node", str(PEER), "server", mode, "--cert", str(cert), "--key", str(key), *extra],
            stdout=subprocess.PIPE, text=True)
        self.port = _read_listening_line(self.proc, self.name)


@pytest.fixture
def tls_peer(certs: Certs) -> Any:
    started: list[TlsPeer] = []

    def start(mode: str, *extra: str) -> TlsPeer:
        peer = TlsPeer(mode, *certs.issue(f"peer-{mode}", "127.0.0.1"), *extra)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


async def node_client(mode: str, port: int, certs: Certs, name: str, size: int,
                      version: str = "TLSv1.3") -> str:
    """Run tls_peer.js as a client; what the server sent it (its own bound: 20 s)."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(PEER), "client", mode, "--port", str(port), "--ca", str(certs.ca_file),
        "--name", name, "--bytes", str(size), "--max-version", version, stdout=subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert "error" not in result, result
    return result["received"]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
async def test_a_tls_client_half_closes_and_still_gets_the_answer(
        start_backend, start_balancer, certs, version) -> None:
    """The client's close_notify reaches the server as a FIN; the server's answer, sent only
    after it, still reaches the client, then the server's FIN as a close_notify (OpenSSL
    allows both in TLS 1.2 as in 1.3)."""
    backend = start_backend("sink", "app")
    balancer = start_balancer(terminating([backend.address],
                                          [certs.issue("a", "a.example.com")]))
    expected = f"{PAYLOAD} {hashlib.sha256(b'x' * PAYLOAD).hexdigest()}\n"
    for _ in range(2):
        assert await node_client("sink", balancer.port, certs, "a.example.com",
                                 PAYLOAD, version) == expected
    no_tracebacks(balancer)


async def test_a_tls_client_keeps_sending_after_the_servers_fin(
        start_backend, start_balancer, certs) -> None:
    """The server's FIN reaches the client as a close_notify; what the client sends after
    it still reaches the server."""
    backend = start_backend("halfclose", "app")
    balancer = start_balancer(terminating([backend.address],
                                          [certs.issue("a", "a.example.com")]))
    assert await node_client("first", balancer.port, certs, "a.example.com",
                             PAYLOAD) == "bye\n"
    assert await read_backend_line(backend) == f"received {PAYLOAD}"
    no_tracebacks(balancer)


async def test_a_clients_fin_reaches_a_tls_server_as_close_notify(
        start_balancer, certs, tls_peer) -> None:
    """A plain client's FIN goes to a TLS server as its close_notify; the server's answer,
    sent only after it, still comes back, then its end as the client's FIN."""
    peer = tls_peer("sink")
    balancer = start_balancer(tls_upstream([f"127.0.0.1:{peer.port}"], certs))
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"y" * PAYLOAD)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == f"received {PAYLOAD}\n".encode()
        writer.close()
        await writer.wait_closed()
    no_tracebacks(balancer)


async def test_a_tls_servers_close_notify_leaves_the_client_sending(
        start_balancer, certs, tls_peer) -> None:
    """A TLS server that ends first: its close_notify is the client's FIN, and the client's
    bytes after it still reach the server, whose count proves it."""
    peer = tls_peer("first")
    balancer = start_balancer(tls_upstream([f"127.0.0.1:{peer.port}"], certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await asyncio.wait_for(reader.read(), 10) == b"bye\n"  # then the FIN
    writer.write(b"z" * PAYLOAD)
    writer.write_eof()
    assert await read_backend_line(peer, 20) == f"received {PAYLOAD}"
    writer.close()
    await writer.wait_closed()
    no_tracebacks(balancer)


async def test_tls_on_both_sides_half_closes_end_to_end(
        start_balancer, certs, tls_peer) -> None:
    """Terminated on the listener, TLS again to the server: a close_notify crosses both."""
    peer = tls_peer("sink")
    config = tls_upstream([f"127.0.0.1:{peer.port}"], certs)
    config["listeners"][0]["tls"] = terminating(
        [], [certs.issue("a", "a.example.com")])["listeners"][0]["tls"]
    balancer = start_balancer(config)
    assert await node_client("sink", balancer.port, certs, "a.example.com",
                             PAYLOAD) == f"received {PAYLOAD}\n"
    no_tracebacks(balancer)


async def test_a_slow_client_pauses_a_tls_server(start_backend, start_balancer, certs) -> None:
    """Backpressure through our TLS transport on the server side: a client that stops
    reading stops the balancer reading the TLS server; every byte arrives in the end."""
    total = 48 * 1024 * 1024
    cert, key = certs.issue("backend-source", "127.0.0.1")
    backend = start_backend("source", "app", "--bytes", str(total), "--tls-cert", str(cert),
                            "--tls-key", str(key))
    balancer = start_balancer(tls_upstream([backend.address], certs))
    before = balancer.status_kib("VmRSS")
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    first = await asyncio.wait_for(reader.readexactly(1024), 10)
    await asyncio.sleep(1.0)  # the window in which a balancer without backpressure grows
    grown = balancer.status_kib("VmRSS") - before
    assert grown < 16 * 1024, f"balancer grew {grown} KiB while its client did not read"
    received = len(first)
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 20):
        received += len(chunk)
    assert received == total
    writer.close()
    await writer.wait_closed()
    no_tracebacks(balancer)


async def test_a_slow_tls_server_pauses_the_client(start_balancer, certs, tls_peer) -> None:
    """Backpressure through our TLS transport on the client side: a TLS server that reads
    nothing at first stops the balancer reading its client; every byte arrives in the end,
    and the answer sent after the client's FIN (a close_notify on the way) comes back."""
    total = 48 * 1024 * 1024
    peer = tls_peer("sink", "--pause-ms", "1500")
    balancer = start_balancer(tls_upstream([f"127.0.0.1:{peer.port}"], certs))
    before = balancer.status_kib("VmRSS")
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)

    async def send() -> None:
        block = b"s" * (1 << 20)
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()
        writer.write_eof()

    sending = asyncio.ensure_future(send())
    try:
        await asyncio.sleep(1.0)  # the window in which a balancer without backpressure grows
        grown = balancer.status_kib("VmRSS") - before
        assert grown < 16 * 1024, f"balancer grew {grown} KiB while its server did not read"
        assert not sending.done()  # the client is held back, not buffered
        await asyncio.wait_for(sending, 30)
        assert await asyncio.wait_for(reader.read(), 20) == f"received {total}\n".encode()
    finally:
        sending.cancel()
        writer.close()
    await writer.wait_closed()
    no_tracebacks(balancer)


async def test_churn_through_tls_on_both_sides_leaves_no_descriptor(
        start_backend, start_balancer, certs) -> None:
    """Clean ends, client resets and clients that leave right after the handshake, through
    TLS termination and TLS to the server: every descriptor is given back, nothing is left
    for the garbage collector to close (uvloop aborts on that), and it still serves."""
    backend = tls_backend(start_backend, certs, "echo", "app")
    config = tls_upstream([backend.address], certs)
    config["listeners"][0]["tls"] = terminating(
        [], [certs.issue("a", "a.example.com")])["listeners"][0]["tls"]
    balancer = start_balancer(config)
    client = certs.client()

    async def one(kind: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", balancer.port, ssl=client, server_hostname="a.example.com"), 10)
        if kind == 0:  # a clean exchange, then a close_notify
            writer.write(b"ping\n")
            assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        elif kind == 1:  # a reset in the middle of an exchange
            writer.write(b"x" * 100_000)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        writer.close()  # kind 2: gone right after the handshake
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 5)

    await one(0)  # the first client opens what the process keeps (a resolver's, say)
    port = admin_port(balancer)

    async def active() -> float:
        return await metric(port, "balancer_active_connections")

    await wait_until(active, lambda n: n == 0)
    idle_fds = balancer.fd_count()
    for round_ in range(10):
        await asyncio.gather(*(one((round_ + i) % 3) for i in range(15)))
    await eventually(lambda: balancer.fd_count() == idle_fds, timeout=10)
    await one(0)
    assert balancer.proc.poll() is None
    no_tracebacks(balancer)


def _answer_handshake(listener: socket.socket, context: ssl.SSLContext,
                      stall: Any) -> bytes:
    """A TLS server by hand (one connection): once the ClientHello is in, it has the client's
    loop stalled (`stall()` returns once the stall has begun) and answers meanwhile; then the
    first bytes it gets."""
    listener.settimeout(10)
    raw, _ = listener.accept()
    raw.settimeout(10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    try:
        incoming.write(raw.recv(65536))
        stall()
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        while True:
            try:
                return tls.read(100)
            except ssl.SSLWantReadError:
                incoming.write(raw.recv(65536))
    finally:
        raw.close()


def test_a_loop_stalled_past_the_handshake_deadline_still_completes_it(
        certs: Certs, balancer_loop: str) -> None:
    """The server's flight arrives while the loop is stuck in a callback (a long collection,
    say) past the handshake deadline. The handshake, whose answer is waiting unread, must not
    fail for the loop's own delay: it holds because both loops poll before they run due
    timers (libuv since 1.45, asyncio always) and the handshake advances inside the poll's
    callback. (A handshake step deferred with call_soon fails here on both loops.)"""
    from balancer.loops import new_event_loop
    from balancer.tlsstream import open_tls

    cert, key = certs.issue("server", "127.0.0.1")
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    loop = new_event_loop(balancer_loop)

    stalling = threading.Event()

    def stuck() -> None:  # the stall: 1 s in a callback, past the 0.5 s deadline
        stalling.set()
        time.sleep(1.0)

    def stall() -> None:
        loop.call_soon_threadsafe(stuck)
        assert stalling.wait(10)

    async def connect() -> bytes:
        server = asyncio.ensure_future(asyncio.to_thread(_answer_handshake, listener,
                                                         server_context, stall))
        tls, _ = await open_tls(loop, asyncio.Protocol, "127.0.0.1",
                                listener.getsockname()[1], certs.client(), "127.0.0.1", 0.5)
        tls.write(b"hello")
        try:
            return await asyncio.wait_for(server, 10)
        finally:
            tls.close()

    try:
        assert loop.run_until_complete(connect()) == b"hello"
    finally:
        loop.close()
        listener.close()

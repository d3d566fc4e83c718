"""The data path through a real balancer process: integrity, half-close, aborts, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket

import pytest

from .utils import blackhole, eventually, make_config, read_backend_line, reset, who_answers

MiB = 1 << 20
pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def warm_up(port: int) -> None:
    """One full round trip, so lazily created fds exist before a baseline is taken."""
    reader, writer = await connect(port)
    writer.write(b"warm")
    writer.write_eof()
    await read_to_eof(reader)
    writer.close()


async def test_integrity_64_mib_each_way(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address]))
    payload = os.urandom(64 * MiB)
    reader, writer = await connect(balancer.port)

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), MiB):
            writer.write(view[offset : offset + MiB])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await read_to_eof(reader, timeout=60)
    await sender
    writer.close()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_500_concurrent_connections(start_backend, start_balancer):
    backends = [start_backend("echo", f"e{i}") for i in range(2)]
    balancer = start_balancer(make_config([b.address for b in backends]))

    async def one(i: int) -> bool:
        reader, writer = await connect(balancer.port)
        message = f"client {i} ".encode() * 100
        writer.write(message)
        writer.write_eof()
        echoed = await read_to_eof(reader, timeout=30)
        writer.close()
        return echoed == message

    results = await asyncio.gather(*(one(i) for i in range(500)))
    assert all(results)
    assert balancer.alive()


async def test_client_half_close_keeps_the_answer_flowing(start_backend, start_balancer):
    sink = start_backend("sink")
    balancer = start_balancer(make_config([sink.address]))
    reader, writer = await connect(balancer.port)
    data = b"x" * (3 * MiB + 7)
    writer.write(data)
    writer.write_eof()  # our FIN must reach the sink, which only then answers
    answer = await read_to_eof(reader)
    writer.close()
    assert answer == f"{len(data)} {hashlib.sha256(data).hexdigest()}\n".encode()


async def test_upstream_half_close_keeps_the_request_flowing(start_backend, start_balancer):
    backend = start_backend("halfclose")
    balancer = start_balancer(make_config([backend.address]))
    reader, writer = await connect(balancer.port)
    # The server's FIN arrives first ...
    assert await read_to_eof(reader) == b"bye\n"
    # ... and the client can still send for as long as it likes.
    for _ in range(4):
        writer.write(b"y" * MiB)
        await writer.drain()
    writer.write_eof()
    assert await read_backend_line(backend) == f"received {4 * MiB}"
    writer.close()


async def test_upstream_reset_closes_the_client_promptly(start_backend, start_balancer):
    backend = start_backend("abort")
    balancer = start_balancer(make_config([backend.address], retries={"tries": 1}))
    reader, writer = await connect(balancer.port)
    try:
        data = await read_to_eof(reader, timeout=3)
    except ConnectionResetError:
        data = b""
    writer.close()
    assert data == b""
    assert balancer.alive()


async def test_client_abort_closes_the_upstream(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address]))
    baseline = balancer.fd_count()  # no fd is created lazily: this is the idle count
    sockets = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", balancer.port))
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        sockets.append(sock)
    assert balancer.fd_count() >= baseline + 40  # each client holds two fds in the balancer
    for sock in sockets:  # RST, not FIN
        reset(sock)
    await eventually(lambda: balancer.fd_count() == baseline)
    assert balancer.alive()


async def test_upstream_slow_reader_bounds_memory(start_backend, start_balancer):
    """1 GiB pushed at an upstream that reads ~1 MiB/s for its first 2 s."""
    sink = start_backend("sink", "slow", "--slow-seconds", "2")
    balancer = start_balancer(make_config([sink.address]))
    await warm_up(balancer.port)
    peak_before = balancer.status_kib("VmHWM")
    reader, writer = await connect(balancer.port)
    block = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(1024):
        writer.write(block)
        digest.update(block)
        await writer.drain()
    writer.write_eof()
    answer = await read_to_eof(reader, timeout=60)
    writer.close()
    assert answer == f"{1024 * MiB} {digest.hexdigest()}\n".encode()
    growth_mib = (balancer.status_kib("VmHWM") - peak_before) / 1024
    assert growth_mib < 8, f"balancer peak RSS grew by {growth_mib:.1f} MiB"


async def test_client_slow_reader_bounds_memory(start_backend, start_balancer):
    """An upstream sends 1 GiB at full speed; the client reads ~1 MiB/s for its first 2 s."""
    source = start_backend("source", "src", "--bytes", str(1024 * MiB))
    balancer = start_balancer(make_config([source.address]))
    await warm_up_source(balancer.port)
    peak_before = balancer.status_kib("VmHWM")
    reader, writer = await connect(balancer.port)
    loop = asyncio.get_running_loop()
    slow_until = loop.time() + 2
    total = 0
    while loop.time() < slow_until:  # a slow reader, by design
        total += len(await reader.read(16 * 1024))
        await asyncio.sleep(0.016)
    while chunk := await asyncio.wait_for(reader.read(MiB), 30):
        total += len(chunk)
    writer.close()
    assert total == 1024 * MiB
    growth_mib = (balancer.status_kib("VmHWM") - peak_before) / 1024
    assert growth_mib < 8, f"balancer peak RSS grew by {growth_mib:.1f} MiB"


async def warm_up_source(port: int) -> None:
    reader, writer = await connect(port)
    await reader.read(MiB)
    writer.close()


async def test_unreachable_upstream_closes_client_promptly(start_balancer):
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    balancer = start_balancer(make_config([f"127.0.0.1:{dead}"]))
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await connect(balancer.port)
    writer.write(b"anyone?")
    # Our bytes may reach a socket the balancer has already closed (a reset): also "closed".
    with contextlib.suppress(ConnectionResetError):
        assert await read_to_eof(reader, timeout=5) == b""
    assert loop.time() - started < 2
    writer.close()
    assert balancer.alive()


async def test_idle_timeout_closes_both_sides(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address], timeouts={"idle": "300ms"}))
    baseline = balancer.fd_count()  # no fd is created lazily: this is the idle count
    loop = asyncio.get_running_loop()
    reader, writer = await connect(balancer.port)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    quiet_since = loop.time()
    assert await read_to_eof(reader, timeout=5) == b""  # closed by the balancer
    assert 0.25 <= loop.time() - quiet_since < 2
    writer.close()
    await eventually(lambda: balancer.fd_count() == baseline)


async def test_traffic_keeps_a_connection_past_the_idle_timeout(start_backend, start_balancer):
    """Idle means no bytes either way: a connection that talks more often than the idle
    timeout lives for many times that timeout."""
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address], timeouts={"idle": "300ms"}))
    reader, writer = await connect(balancer.port)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for i in range(12):  # 1.2 s of a ping every 100 ms: four idle timeouts' worth
        writer.write(b"%02d" % i)
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"%02d" % i
        quiet_since = loop.time()
        await asyncio.sleep(0.1)  # the pacing under test, not a synchronisation
    assert loop.time() - began > 1.2
    assert await read_to_eof(reader, timeout=5) == b""  # quiet now: closed by the balancer
    assert 0.25 <= loop.time() - quiet_since < 2
    writer.close()


async def test_client_resetting_during_connect_leaks_nothing(start_balancer):
    sockets = blackhole()
    address = f"127.0.0.1:{sockets[0].getsockname()[1]}"
    try:
        balancer = start_balancer(make_config([address], timeouts={"connect": "30s"},
                                              retries={"timeout": "30s"}))
        baseline = balancer.fd_count()
        clients = [socket.create_connection(("127.0.0.1", balancer.port)) for _ in range(10)]
        await eventually(lambda: balancer.fd_count() >= baseline + 20)  # client + pending connect
        for client in clients:
            reset(client)
        # Noticed at once (the client is read during the connect), not after 30 s.
        await eventually(lambda: balancer.fd_count() == baseline, timeout=5)
        assert balancer.alive()
    finally:
        for sock in sockets:
            sock.close()


async def test_silent_client_closing_during_connect_leaks_nothing(start_balancer):
    """A FIN during the connect is a half-close (the request may be complete), so it waits
    for the connect, as nginx and HAProxy do; when that times out, everything is released."""
    sockets = blackhole()
    address = f"127.0.0.1:{sockets[0].getsockname()[1]}"
    try:
        balancer = start_balancer(make_config([address], timeouts={"connect": "300ms"},
                                              retries={"tries": 1}))
        baseline = balancer.fd_count()
        clients = [socket.create_connection(("127.0.0.1", balancer.port)) for _ in range(10)]
        for client in clients:
            client.close()
        await eventually(lambda: balancer.fd_count() == baseline, timeout=5)
        assert balancer.alive()
    finally:
        for sock in sockets:
            sock.close()


async def test_churn_keeps_process_alive_and_fds_at_baseline(
    start_backend, start_balancer
):
    """Thousands of short connections; half where the upstream closes first, half the client."""
    replier = start_backend("reply", "r")  # answers one line and closes first
    namer = start_backend("name", "n")  # sends its name; the client closes first
    up_first = start_balancer(make_config([replier.address]))
    client_first = start_balancer(make_config([namer.address]))
    baselines = (up_first.fd_count(), client_first.fd_count())

    async def upstream_closes_first(i: int) -> bool:
        reader, writer = await connect(up_first.port)
        writer.write(b"%d\n" % i)
        data = await read_to_eof(reader)
        writer.close()
        return data == b"r:%d\n" % i

    async def client_closes_first() -> bool:
        reader, writer = await connect(client_first.port)
        line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return line == b"n\n"

    ok = 0
    for _ in range(20):  # 20 rounds x 50 concurrent x 2 kinds = 2,000 connections
        results = await asyncio.gather(
            *(upstream_closes_first(i) for i in range(50)),
            *(client_closes_first() for _ in range(50)),
        )
        ok += sum(results)
    assert ok == 2000
    for balancer, baseline in zip((up_first, client_first), baselines, strict=True):
        await eventually(lambda b=balancer, n=baseline: b.fd_count() == n, timeout=10)
        assert balancer.alive()


async def test_server_given_by_hostname_is_resolved_and_reached(
    start_backend, start_balancer
):
    """A server named by host name (as in docker-compose) goes through the resolver on the
    connect path, not only the numeric fast path."""

    backend = start_backend("name", "byname")
    balancer = start_balancer(make_config([f"localhost:{backend.port}"]))
    assert [await who_answers(balancer.port) for _ in range(3)] == ["byname"] * 3


async def test_connect_deadlines_fire_on_time_in_and_out_of_order():
    """Connect timeouts share one FIFO per listener; a deadline earlier than the queue's tail
    (a retry cut short by the budget) must still fire on time, and a settled connect never."""
    from balancer.config import Address, ServerConfig, TimeoutsConfig, UpstreamConfig
    from balancer.proxy import Route
    from balancer.upstream import Upstream

    loop = asyncio.get_running_loop()
    upstream = Upstream(UpstreamConfig("app", (ServerConfig(Address("127.0.0.1", 9)),),
                                       timeouts=TimeoutsConfig(connect=0.3)))
    route = Route("test", upstream, loop)
    fired: dict[str, float] = {}
    done = asyncio.Event()
    began = loop.time()

    class Connect:
        def __init__(self, name: str) -> None:
            self.name = name

        def connect_timed_out(self) -> None:
            fired[self.name] = loop.time() - began
            if len(fired) == 3:
                done.set()

    route.watch_connect(Connect("first"), 0.3)
    route.watch_connect(Connect("second"), 0.3)
    settled = route.watch_connect(Connect("settled"), 0.3)
    settled.conn = None  # its connect finished in time
    route.watch_connect(Connect("short"), 0.1)  # earlier than the tail: out of order
    await asyncio.wait_for(done.wait(), 2)
    assert set(fired) == {"first", "second", "short"}
    assert 0.1 <= fired["short"] < 0.25
    assert 0.3 <= fired["first"] < 0.45 and 0.3 <= fired["second"] < 0.45
    assert route.connect_expiry is None and not route.connect_watch  # nothing left armed


def receive_window_of_one_segment(port: int) -> socket.socket:
    """A client that has sent its FIN and reads nothing yet, with a small MSS and receive
    buffer: the kernel then holds only ~100 KiB for it (on loopback its sender's send buffer
    otherwise grows to MiBs), so what a server sends beyond that waits in the balancer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    sock.connect(("127.0.0.1", port))
    sock.shutdown(socket.SHUT_WR)
    return sock


def read_all_and_close(sock: socket.socket) -> int:
    total = 0
    while data := sock.recv(MiB):
        total += len(data)
    sock.close()
    return total


async def test_a_close_that_flushes_in_the_end_leaves_nothing_behind(start_backend,
                                                                     start_balancer):
    """Both sides have ended while bytes for a slow client are still buffered: the balancer
    closes at once, aborts the transport if the bytes are never read, and forgets that
    abort (timer and transport) once they are. 1,000 such closes must not grow memory by
    the ~1.3 KiB each that a pending timer holds for the idle timeout (10 min)."""
    payload = 192 * 1024  # a ~100 KiB kernel share, the rest waits in the balancer
    source = start_backend("source", "src", "--bytes", str(payload))
    config = make_config([source.address])
    config["log"] = {"access": "stderr"}  # one line per close: the event to wait for
    balancer = start_balancer(config)

    def closed() -> int:
        return sum(line.endswith(" ok") for line in list(balancer.lines))

    async def round_of(clients: int) -> None:
        before = closed()
        held = [receive_window_of_one_segment(balancer.port) for _ in range(clients)]
        # The balancer closes each pair with bytes still buffered for its client...
        balancer.wait_for_log(lambda: closed() >= before + clients, 20)
        # ...and every byte still arrives, then the transport is gone.
        received = await asyncio.gather(*[asyncio.to_thread(read_all_and_close, s)
                                          for s in held])
        assert received == [payload] * clients

    for _ in range(30):  # warm-up: allocator and buffers reach their steady state
        await round_of(10)
    baseline = balancer.status_kib("VmRSS")
    for _ in range(100):
        await round_of(10)
    growth = balancer.status_kib("VmRSS") - baseline
    assert growth < 600, f"RSS grew by {growth} KiB over 1,000 flushed closes"

"""Bulk through splice(2) (balancer/splice.py): the pump takes over past 1 MiB one way (on a
bulk-sized chunk), and integrity, backpressure, half-close, resets and byte counters stay as
on the normal path.

The pump is on by default (`splice_auto`), so the other data-path tests (tests/test_proxy.py:
64 MiB each way, 1 GiB to a slow reader either way, half-closes after megabytes) run through
it too, since they pass 1 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import struct
import sys
import termios
from pathlib import Path

import pytest

from balancer.loops import new_event_loop
from balancer.splice import AVAILABLE, SPLICE_AFTER, SplicePump

from .utils import (
    admin_port,
    eventually,
    make_config,
    reset,
    scrape,
    total,
    wait_until,
    with_metrics,
)

MiB = 1 << 20
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.both_loops,
    pytest.mark.skipif(not AVAILABLE, reason="splice(2) is Linux only"),
]


def pipes(pid: int) -> int:
    """How many pipe descriptors the process holds (a pump holds two per direction)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("pipe:")
        except OSError:
            continue  # closed meanwhile
    return count


async def test_bulk_both_ways_is_spliced_counted_and_released(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(with_metrics(make_config([echo.address])))
    metrics = admin_port(balancer)
    baseline_pipes = pipes(balancer.pid)
    baseline_fds = balancer.fd_count()
    payload = os.urandom(16 * MiB + 12345)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(payload[: 2 * MiB])
    await writer.drain()
    got = bytearray()
    while len(got) < 2 * MiB:  # the echo of 2 MiB: past the threshold both ways
        got += await asyncio.wait_for(reader.read(MiB), 10)
    # Both directions now go through pumps (4 pipe descriptors), while bytes still flow.
    writer.write(payload[2 * MiB : 3 * MiB])
    await writer.drain()
    await eventually(lambda: pipes(balancer.pid) >= baseline_pipes + 4, timeout=10)

    async def send_rest() -> None:
        writer.write(payload[3 * MiB :])
        await writer.drain()
        writer.write_eof()  # the FIN goes through the pump to the echo, which then ends

    sender = asyncio.create_task(send_rest())
    got += await asyncio.wait_for(reader.read(), 60)
    await sender
    writer.close()
    await writer.wait_closed()
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    await eventually(lambda: balancer.fd_count() == baseline_fds, timeout=10)
    assert pipes(balancer.pid) == baseline_pipes

    def counted(samples: dict) -> bool:
        return (total(samples, "balancer_bytes_total", direction="upstream") == len(payload)
                and total(samples, "balancer_bytes_total", direction="downstream")
                == len(payload))

    await wait_until(lambda: scrape(metrics), counted, timeout=10)


async def test_short_exchanges_are_never_spliced(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address]))
    baseline = pipes(balancer.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    block = b"x" * (SPLICE_AFTER // 4)
    for _ in range(3):  # 768 KiB each way: under the threshold
        writer.write(block)
        assert await asyncio.wait_for(reader.readexactly(len(block)), 10) == block
    assert pipes(balancer.pid) == baseline
    writer.close()
    await writer.wait_closed()


async def test_small_messages_stay_past_the_threshold_until_bulk_comes(start_backend,
                                                                       start_balancer):
    # A long-lived connection of small messages (a redis client's) passes 1 MiB too; for it
    # the pump would cost more than the copies it saves, so only a bulk-sized chunk moves it.
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address]))
    baseline = pipes(balancer.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    message = b"m" * 4096
    for _ in range(SPLICE_AFTER // len(message) + 64):  # 1.25 MiB each way, one at a time
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), 10) == message
    assert pipes(balancer.pid) == baseline
    block = os.urandom(MiB)  # now bulk: both directions move to pumps
    writer.write(block)
    assert await asyncio.wait_for(reader.readexactly(len(block)), 10) == block
    await eventually(lambda: pipes(balancer.pid) >= baseline + 4, timeout=10)
    writer.write(block)  # and the bytes still flow through them
    assert await asyncio.wait_for(reader.readexactly(len(block)), 10) == block
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("who", ["client", "server"])
async def test_a_reset_during_a_spliced_transfer_closes_both_sides(start_backend,
                                                                   start_balancer, who):
    # Once a pump carries the client's bytes, one end resets; the balancer must close both
    # sides and free every descriptor, pipes included. The client's reset is found by the
    # pump's next read, so its sink reads at full speed (behind a slow reader the reset, as
    # on the normal path, is found once the pump may read again); the server's, by the
    # upstream transport, still reading the other way.
    sink = start_backend("sink", "fast") if who == "client" else start_backend(
        "sink", "slow", "--slow-seconds", "30")
    balancer = start_balancer(make_config([sink.address]))
    baseline_fds = balancer.fd_count()
    baseline_pipes = pipes(balancer.pid)
    sock = socket.create_connection(("127.0.0.1", balancer.port))
    try:
        sock.setblocking(False)
        block = b"y" * MiB
        sent = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while pipes(balancer.pid) < baseline_pipes + 2 and loop.time() < deadline:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                await asyncio.sleep(0.05)  # wait for room
        assert pipes(balancer.pid) >= baseline_pipes + 2, f"no pump after {sent} bytes"
        if who == "client":
            reset(sock)
        else:
            sink.stop()  # the sink's process ends: its kernel resets the connection
    finally:
        sock.close()
    await eventually(lambda: balancer.fd_count() == baseline_fds, timeout=15)
    assert pipes(balancer.pid) == baseline_pipes
    assert balancer.alive()


def received_not_read(local_port: int, remote_port: int) -> int:
    """Bytes in the receive queue of the 127.0.0.1:local_port socket connected to
    127.0.0.1:remote_port (the balancer's side of a client connection), from /proc/net/tcp."""
    local, remote = f"0100007F:{local_port:04X}", f"0100007F:{remote_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16)
    return 0


async def test_a_client_reset_behind_queued_bytes_is_noticed_once_the_server_reads(
        start_backend, start_balancer):
    # The pump waits for a stalled server (the client is not read meanwhile) while the
    # client's last bytes fill the balancer's receive queue; then the client resets. Once the
    # server reads again the pump moves those bytes and must meet the reset queued behind
    # them. On uvloop it used to read one pipe load and hear nothing more (libuv reports
    # EPOLLERR once, see SplicePump._readable): the connection stayed until the idle timeout.
    # The sink reads at full speed (the pump forms past 1 MiB), stalls at 32 MiB for 5 s (the
    # pump waits, the client's bytes queue up), then reads at full speed again.
    sink = start_backend("sink", "stall", "--pause-after", str(32 * MiB), "--pause-seconds", "5")
    balancer = start_balancer(make_config([sink.address]))
    baseline_fds = balancer.fd_count()
    baseline_pipes = pipes(balancer.pid)
    sock = socket.create_connection(("127.0.0.1", balancer.port))
    try:
        sock.setblocking(False)
        client_port = sock.getsockname()[1]
        block = b"z" * MiB
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20

        samples = [0]

        def stalled() -> bool:
            """Bytes queued and, since the last look, neither read nor added to: the pump
            waits for the sink and every buffer on the client's way is full."""
            samples.append(received_not_read(balancer.port, client_port))
            return (pipes(balancer.pid) >= baseline_pipes + 2
                    and samples[-1] >= 64 * 1024 and samples[-1] == samples[-2])

        while not stalled() and loop.time() < deadline:
            try:
                sock.send(block)
            except BlockingIOError:
                await asyncio.sleep(0.05)  # wait for room
        assert pipes(balancer.pid) >= baseline_pipes + 2, "no pump"
        assert samples[-1] >= 64 * 1024 and samples[-1] == samples[-2], "not stalled"
        reset(sock)
    finally:
        sock.close()
    # The sink reads again at most 5 s after it stalled; the idle timeout is 10 minutes.
    await eventually(lambda: balancer.fd_count() == baseline_fds, timeout=20)
    assert pipes(balancer.pid) == baseline_pipes
    assert balancer.alive()


class Recorder:
    """A pump's owner (the ClientConnection's part): keeps what the pump reports."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.bytes_up = self.bytes_down = 0
        self.moved = False
        self.ended: asyncio.Future[tuple[object, ...]] = loop.create_future()

    def splice_eof(self, up: bool) -> None:
        if not self.ended.done():
            self.ended.set_result(("eof", up))

    def splice_failed(self, up: bool, read_side: bool) -> None:
        if not self.ended.done():
            self.ended.set_result(("failed", up, read_side))


class Accepted(asyncio.Protocol):
    """Keeps each transport it is made with (what it receives is dropped)."""

    def __init__(self, made: list[asyncio.BaseTransport]) -> None:
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(transport)


async def _pump_over_a_reset(queued: int) -> tuple[tuple[object, ...], int]:
    """A pump from a connection whose peer sent `queued` bytes and then reset, to a
    connection whose peer reads: what the pump reported, and how many bytes it counted."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    sources = await loop.create_server(lambda: Accepted(transports), "127.0.0.1", 0)
    sinks = await loop.create_server(lambda: Accepted(transports), "127.0.0.1", 0)
    peer = socket.create_connection(sources.sockets[0].getsockname()[:2])
    pump = None
    try:
        await eventually(lambda: len(transports) == 1)
        src = transports[0]
        src.pause_reading()  # the pump reads it, as after ClientConnection.start_splice
        dst, _ = await loop.create_connection(asyncio.Protocol,
                                              *sinks.sockets[0].getsockname()[:2])
        await eventually(lambda: len(transports) == 2)  # the sink's side, which reads
        transports.append(dst)
        fd = src.get_extra_info("socket").fileno()
        peer.sendall(b"q" * queued)

        def waiting() -> int:
            return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]

        await eventually(lambda: waiting() == queued)
        reset(peer)  # the reset now sits behind `queued` unread bytes
        recorder = Recorder(loop)
        pump = SplicePump(recorder, True, loop, src, dst)
        pump.start()
        try:
            outcome = await asyncio.wait_for(recorder.ended, 5)
        except TimeoutError:
            outcome = ("nothing reported",)
        return outcome, recorder.bytes_up
    finally:
        peer.close()
        if pump is not None:
            pump.stop()
        for transport in transports:
            transport.abort()
        sources.close()
        sinks.close()
        await asyncio.wait_for(asyncio.gather(sources.wait_closed(), sinks.wait_closed()), 5)
        await asyncio.sleep(0)  # one loop pass: the pump closes its descriptors in it


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_the_pump_meets_a_reset_queued_behind_bytes(loop_name):
    # The mechanism under the end-to-end tests, in one process: registered on a descriptor
    # whose peer has reset behind 32 KiB not yet read, the pump must read those bytes, then
    # report the reset. On uvloop the registration is called once (EPOLLERR), then dropped.
    loop = new_event_loop(loop_name)
    try:
        outcome, counted = loop.run_until_complete(
            asyncio.wait_for(_pump_over_a_reset(32 * 1024), 30))
    finally:
        loop.close()
    assert outcome == ("failed", True, True)  # up, reading side
    assert counted == 32 * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_tls_listener_keeps_the_normal_path(start_backend, start_balancer, tmp_path):
    # A TLS transport's socket carries records, not the bytes: never spliced.
    import ssl
    import subprocess

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=t.local"],
                   check=True, capture_output=True)
    echo = start_backend("echo")
    config = make_config([echo.address])
    config["listeners"][0]["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
    balancer = start_balancer(config)
    baseline = pipes(balancer.pid)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port, ssl=context)
    payload = os.urandom(4 * MiB)
    writer.write(payload)
    got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
    assert got == payload
    assert pipes(balancer.pid) == baseline
    writer.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.wait_closed()


async def test_splice_auto_false_keeps_bulk_on_the_normal_path(start_backend, start_balancer):
    # The opt-out: a listener with `splice_auto: false` never splices, however much moves.
    echo = start_backend("echo")
    config = make_config([echo.address])
    config["listeners"][0]["splice_auto"] = False
    balancer = start_balancer(config)
    baseline = pipes(balancer.pid)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    block = os.urandom(MiB)
    for _ in range(4):
        writer.write(block)
        assert await asyncio.wait_for(reader.readexactly(len(block)), 10) == block
        assert pipes(balancer.pid) == baseline
    writer.close()
    await writer.wait_closed()

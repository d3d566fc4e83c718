"""Listener limits over real sockets: allow/deny, per-client connections and rate, max_conns
with clients waiting in the backlog, counted rejections; clients come from distinct loopback
sources (127.0.0.7, 127.0.0.8, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest

from balancer import limits
from balancer.config import Address, ListenerConfig, PerClientConfig, ServerConfig, UpstreamConfig
from balancer.limits import Gate, Rejections
from balancer.proxy import Route
from balancer.upstream import Upstream

from .utils import admin_port, eventually, make_config, scrape, total, with_metrics

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]


def limited(config: dict, **listener: object) -> dict:
    config["listeners"][0].update(listener)
    return config


async def open_client(port: int, source: str = "127.0.0.1"):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def served(port: int, source: str = "127.0.0.1", proxy_header: bytes = b""):
    """A client that got through to the `name` backend: its greeting arrived."""
    reader, writer = await open_client(port, source)
    if proxy_header:
        writer.write(proxy_header)
    line = await asyncio.wait_for(reader.readline(), 10)
    assert line == b"a\n", f"{source}: not served ({line!r})"
    return reader, writer


async def refused(port: int, source: str = "127.0.0.1", proxy_header: bytes = b"") -> None:
    """A client closed at once, without a byte from any server."""
    reader, writer = await open_client(port, source)
    if proxy_header:
        writer.write(proxy_header)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 10) == b"", f"{source}: was served"
    await finish(writer)


async def finish(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def rejected(balancer, reason: str) -> float:
    return total(await scrape(admin_port(balancer)), "balancer_rejected_connections_total",
                 reason=reason)


async def test_deny_is_checked_first_then_allow(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = with_metrics(limited(make_config([backend.address]),
                                  allow=["127.0.0.0/29", "2001:db8::/32"],
                                  deny=["127.0.0.6/31"]))
    balancer = start_balancer(config)
    _, writer = await served(balancer.port, "127.0.0.5")
    await finish(writer)
    await refused(balancer.port, "127.0.0.7")  # allowed, but denied first
    await refused(balancer.port, "127.0.0.9")  # not in the allow list
    assert await rejected(balancer, "denied") == 2


async def test_per_client_max_conns(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = with_metrics(limited(make_config([backend.address]),
                                  per_client={"max_conns": 2}))
    balancer = start_balancer(config)
    held = [await served(balancer.port, "127.0.0.7") for _ in range(2)]
    await refused(balancer.port, "127.0.0.7")
    other = await served(balancer.port, "127.0.0.8")  # another client is not affected
    await finish(held.pop()[1])
    # The closed one's slot is free again (the balancer may see the close a moment later).
    for _ in range(100):
        reader, writer = await open_client(balancer.port, "127.0.0.7")
        line = await asyncio.wait_for(reader.readline(), 10)
        await finish(writer)
        if line == b"a\n":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the slot never came back")
    for _, writer in [*held, other]:
        await finish(writer)
    assert await rejected(balancer, "client_conns") >= 1


async def test_per_client_rate(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = with_metrics(limited(make_config([backend.address]),
                                  per_client={"rate": "5/s"}))
    balancer = start_balancer(config)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(5):  # the bucket holds one second's worth
        _, writer = await served(balancer.port, "127.0.0.7")
        await finish(writer)
    if loop.time() - began < 0.15:  # fast enough that under 1 token has come back
        await refused(balancer.port, "127.0.0.7")
        assert await rejected(balancer, "client_rate") == 1
    _, writer = await served(balancer.port, "127.0.0.8")
    await finish(writer)
    await asyncio.sleep(0.25)  # a rate is about time: a token comes back after 200 ms
    _, writer = await served(balancer.port, "127.0.0.7")
    await finish(writer)


async def test_per_client_key_is_the_proxy_address(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = with_metrics(limited(make_config([backend.address]), accept_proxy=True,
                                  per_client={"max_conns": 1}))
    balancer = start_balancer(config)
    one = b"PROXY TCP4 192.0.2.1 192.0.2.100 1000 80\r\n"
    two = b"PROXY TCP4 192.0.2.2 192.0.2.100 1000 80\r\n"
    _, first = await served(balancer.port, proxy_header=one)
    _, second = await served(balancer.port, proxy_header=two)  # same socket peer, other client
    await refused(balancer.port, proxy_header=one)
    assert await rejected(balancer, "client_conns") == 1
    for writer in (first, second):
        await finish(writer)


async def test_max_conns_makes_clients_wait_then_serves_them(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = with_metrics(limited(make_config([backend.address]), max_conns=2))
    balancer = start_balancer(config)
    held = [await served(balancer.port, f"127.0.0.{7 + i}") for i in range(2)]
    # The third waits in the backlog: connected (the kernel accepted it) but not served...
    reader, writer = await open_client(balancer.port, "127.0.0.9")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.5)
    # ...until one closes, then it is served, not refused.
    await finish(held.pop()[1])
    assert await asyncio.wait_for(reader.readline(), 10) == b"a\n"
    for _, w in [*held, (reader, writer)]:
        await finish(w)
    assert await rejected(balancer, "max_conns") == 0


async def test_rejections_are_logged_at_most_once_a_second(start_backend, start_balancer):
    backend = start_backend("name", "a")
    config = limited(make_config([backend.address]), deny=["127.0.0.7/32"])
    balancer = start_balancer(config)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(20):
        await refused(balancer.port, "127.0.0.7")
    elapsed = loop.time() - began
    await asyncio.to_thread(balancer.wait_for_line, r"rejected \(denied\)")
    lines = [line for line in balancer.lines if "rejected (denied)" in line]
    assert 1 <= len(lines) <= int(elapsed) + 1
    assert "127.0.0.7" in lines[0]


async def test_reload_adds_and_removes_limits_on_a_kept_listener(start_backend, start_balancer,
                                                                 tmp_path):
    import signal

    import yaml

    backend = start_backend("name", "a")
    config = make_config([backend.address])
    balancer = start_balancer(config, "--pid-file", str(tmp_path / "pid"))
    _, writer = await served(balancer.port, "127.0.0.7")
    await finish(writer)
    config["listeners"][0]["bind"] = f"127.0.0.1:{balancer.port}"  # the same listener
    config["listeners"][0]["deny"] = ["127.0.0.7/32"]
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    await asyncio.to_thread(balancer.wait_for_line, "configuration reloaded")
    await refused(balancer.port, "127.0.0.7")
    _, writer = await served(balancer.port, "127.0.0.8")
    await finish(writer)
    del config["listeners"][0]["deny"]
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    await asyncio.to_thread(balancer.wait_for_log, lambda: sum(
        "configuration reloaded" in line for line in balancer.lines) >= 2, 10)
    _, writer = await served(balancer.port, "127.0.0.7")
    await finish(writer)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) is missing")
async def test_out_of_file_descriptors_keeps_cpu_low_and_recovers(start_backend,
                                                                  start_balancer):
    backend = start_backend("name", "a")
    # Under `prlimit --nofile=96:96`. The accept path is under test: upstream connects that
    # fail for lack of descriptors close only those clients (test_local_errors.py).
    balancer = start_balancer(make_config([backend.address]), nofile=96)
    held = []
    try:
        # Far more clients than 96 descriptors hold at two per proxied connection; the kernel
        # completes every handshake into the backlog, whatever the balancer can accept.
        for _ in range(150):
            held.append(await asyncio.open_connection("127.0.0.1", balancer.port,
                                                      local_addr=("127.0.0.7", 0)))
        await eventually(lambda: balancer.fd_count() >= 90, timeout=10)
        # Nobody is left waiting in the queue: a client either is served or sees its
        # connection closed (the stdlib loop alone would keep the rest queued, and spin).
        replies = await asyncio.gather(*(asyncio.wait_for(reader.read(100), 10)
                                         for reader, _ in held))
        assert set(replies) <= {b"a\n", b""}, set(replies)
        assert replies.count(b"") >= 150 - 96 // 2, replies.count(b"a\n")
        before = cpu_seconds(balancer.pid)
        await asyncio.sleep(2)  # a measurement window, not a synchronisation
        used = cpu_seconds(balancer.pid) - before
        assert used < 0.2, f"{used:.2f}s of CPU in 2s at the descriptor limit"
        assert balancer.alive()
        # One line a second at most (the stdlib loop alone logs once per queued client).
        noise = [line for line in balancer.lines
                 if "Too many open files" in line or "out of system resource" in line]
        assert len(noise) <= 4, noise[:10]
    finally:
        for _, writer in held:
            writer.close()
    # Service resumes by itself once descriptors are free again.
    for _ in range(200):
        with contextlib.suppress(ConnectionError, TimeoutError):
            reader, writer = await open_client(balancer.port, "127.0.0.8")
            line = await asyncio.wait_for(reader.readline(), 2)
            await finish(writer)
            if line == b"a\n":
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the balancer never served again")


def _gate(**listener: object):
    """A Gate on a listener config, for the table's own rules (no sockets involved)."""
    upstream = Upstream(UpstreamConfig("app", (ServerConfig(Address("127.0.0.1", 1)),)))
    loop = asyncio.new_event_loop()
    per_client = PerClientConfig(**listener)  # type: ignore[arg-type]
    config = ListenerConfig("l", Address("127.0.0.1", 0), "app", per_client=per_client)
    gate = Gate(config, Route("l", upstream, loop), Rejections())
    loop.close()
    return gate


class _Conn:
    client = None


def test_per_client_table_is_bounded_and_least_recently_seen_goes(monkeypatch):
    monkeypatch.setattr(limits, "MAX_CLIENTS", 3)
    gate = _gate(max_conns=10)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert gate._per_client(ip, _Conn()) is None
    assert gate._per_client("10.0.0.1", _Conn()) is None  # seen again: most recent now
    assert gate._per_client("10.0.0.4", _Conn()) is None  # evicts 10.0.0.2, the oldest
    assert list(gate.clients) == ["10.0.0.3", "10.0.0.1", "10.0.0.4"]
    assert gate.clients["10.0.0.1"].conns == 2


def test_per_client_rate_is_a_bucket_of_one_second(monkeypatch):
    gate = _gate(rate=5.0)
    now = [100.0]
    gate.clock = lambda: now[0]
    results = [gate._per_client("10.0.0.1", _Conn()) for _ in range(6)]
    assert results == [None] * 5 + ["client_rate"]
    assert gate._per_client("10.0.0.2", _Conn()) is None  # its own bucket
    now[0] += 0.2  # one token back
    assert gate._per_client("10.0.0.1", _Conn()) is None
    assert gate._per_client("10.0.0.1", _Conn()) == "client_rate"


async def test_max_conns_beyond_the_descriptor_limit_is_warned_about(start_backend,
                                                                     start_balancer):
    backend = start_backend("name", "a")
    config = limited(make_config([backend.address]), max_conns=100)
    balancer = start_balancer(config, nofile=150)  # 100 connections need 200 descriptors
    line = await asyncio.to_thread(balancer.wait_for_line, r"max_conns need up to 200 file")
    assert "open files limit is 150" in line
    _, writer = await served(balancer.port)  # a warning, not a refusal to start
    await finish(writer)


async def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(start_backend,
                                                                   start_balancer):
    import resource

    backend = start_backend("name", "a")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"the hard limit ({hard}) is not one to raise to")
    # The balancer inherits a soft limit below the hard one.
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        balancer = start_balancer(make_config([backend.address]))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits_text = Path(f"/proc/{balancer.pid}/limits").read_text()
    line = next(x for x in limits_text.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)], line


def test_a_storm_of_one_event_is_one_line_an_interval_with_its_count():
    from balancer.ratelog import Throttle

    now = [100.0]
    throttle = Throttle(1.0, lambda: now[0])
    assert throttle.due(3) == 3  # the first line at once
    assert [throttle.due(2) for _ in range(4)] == [None] * 4  # held back, counted
    now[0] += 1.0
    assert throttle.due(0) == 8  # the next line reports all held back
    assert throttle.due() is None

"""Passive and active health checks, retries and keepalive pools, with real processes."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import time

import pytest

from .test_distribution import who_answers
from .utils import NodeBackend, eventually, free_port, make_config, read_backend_line

pytestmark = pytest.mark.timeout(120)


def attempts_on(balancer, address: str) -> int:
    """Failed connects to `address`, from the balancer's debug log."""
    return sum(f"connect to app/{address} failed" in line for line in balancer.lines)


async def serve_until(port: int, done, timeout: float = 10.0, pause: float = 0.05) -> list[str]:
    """Send clients one by one until `done()` holds; every client must be answered."""
    answers = []
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "condition not reached"
        answers.append(await who_answers(port))
        await asyncio.sleep(pause)  # pacing, so a 10 s wait is not 10,000 connections
    return answers


async def test_refusing_server_is_ejected_given_one_trial_and_restored(
    start_backend, start_balancer
):
    good = [start_backend("name", n) for n in "bc"]
    dead_port = free_port()
    dead = f"127.0.0.1:{dead_port}"
    config = make_config(
        [dead, *(b.address for b in good)], "round_robin",
        health={"max_fails": 2, "fail_timeout": "1s"},
    )
    balancer = start_balancer(config, "-v", "debug")
    # Every client is served by the others (retry), while the dead one fails twice.
    answers = [await who_answers(balancer.port) for _ in range(12)]
    assert set(answers) == {"b", "c"}
    balancer.wait_for_line(
        rf"server app/{re.escape(dead)} down: 2 connect failures in 1s \(last: refused\)"
    )
    assert attempts_on(balancer, dead) == 2
    # While down: no attempts at all. After fail_timeout: exactly one trial, which fails and
    # takes it out for twice as long.
    answers = await serve_until(balancer.port, lambda: attempts_on(balancer, dead) >= 3)
    assert set(answers) <= {"b", "c"}
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down: trial connection failed")
    more = [await who_answers(balancer.port) for _ in range(10)]
    assert attempts_on(balancer, dead) == 3 and set(more) == {"b", "c"}
    # The server comes back: the next trial succeeds and it rejoins the rotation.
    start_backend("name", "a", port=dead_port)
    answers = await serve_until(balancer.port, lambda: any(
        f"server app/{dead} up" in line for line in balancer.lines))
    assert set(answers) <= {"a", "b", "c"}
    assert "a" in [await who_answers(balancer.port) for _ in range(6)]


async def test_active_http_check_takes_out_a_hanging_server(start_backend, start_balancer):
    hanging = start_backend("hang", "h")
    healthy = start_backend("http", "ok")
    check = {"interval": "100ms", "timeout": "200ms", "rise": 2, "fall": 2,
             "type": "http", "path": "/health"}
    config = make_config([hanging.address, healthy.address], "round_robin",
                         health={"max_fails": 0, "check": check})
    balancer = start_balancer(config)
    balancer.wait_for_line(
        rf"server app/{re.escape(hanging.address)} down: 2 active checks failed "
        r"\(last: timeout\)"
    )
    for _ in range(6):  # every client now goes to the healthy server
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 5)).endswith(b"ok\n")
        writer.close()


async def test_stopped_and_restarted_backend_is_taken_out_and_back(
    start_backend, start_balancer
):
    steady = start_backend("name", "steady")
    flappy = start_backend("name", "flappy")
    check = {"interval": "100ms", "timeout": "200ms", "rise": 2, "fall": 2, "type": "tcp"}
    config = make_config([steady.address, flappy.address], "round_robin",
                         health={"max_fails": 0, "check": check})
    balancer = start_balancer(config)
    port = flappy.port
    flappy.stop()
    balancer.wait_for_line(rf"server app/{re.escape(flappy.address)} down: 2 active checks")
    assert {await who_answers(balancer.port) for _ in range(6)} == {"steady"}
    start_backend("name", "flappy", port=port)
    balancer.wait_for_line(rf"server app/{re.escape(flappy.address)} up: 2 active checks passed")
    assert {await who_answers(balancer.port) for _ in range(6)} == {"steady", "flappy"}


async def test_all_servers_down_closes_client_within_budget(start_balancer):
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    config = make_config(dead, retries={"tries": 3, "timeout": "1s"})
    balancer = start_balancer(config)
    baseline = balancer.fd_count()
    for _ in range(5):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 1.5
        writer.close()
    balancer.wait_for_line("upstream app: no server available")
    await eventually(lambda: balancer.fd_count() == baseline)


async def test_no_retry_once_bytes_reached_the_client(start_backend, start_balancer):
    talker = start_backend("resetafter", "r")  # sends "hello", resets at the client's EOF
    other = start_backend("name", "other")
    balancer = start_balancer(make_config([talker.address, other.address], "round_robin"))
    seen = []
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        # The first 5 bytes ("hello" or "other") have reached us; only then the FIN, which
        # makes `talker` reset and the name backend finish after its greeting.
        data = await asyncio.wait_for(reader.readexactly(5), 5)
        writer.write_eof()
        try:
            while chunk := await asyncio.wait_for(reader.read(100), 5):
                data += chunk
        except ConnectionResetError:
            pass
        writer.close()
        seen.append(data)
    # A connection that got "hello" was never moved to the other server afterwards: no
    # "hello" followed by another greeting.
    assert sorted(seen) == [b"hello", b"hello", b"other\n", b"other\n"]


async def test_pool_connects_before_any_client_and_serves_correct_bytes(
    start_backend, start_balancer
):
    backends = [start_backend("echo", f"e{i}", "--report") for i in range(2)]
    config = make_config([b.address for b in backends], "round_robin", pool={"size": 3})
    balancer = start_balancer(config)
    for backend in backends:  # N connections each before any client
        assert [await read_backend_line(backend) for _ in range(3)] == ["open"] * 3
    payload = bytes(range(256)) * 4096
    for _ in range(6):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == payload
        writer.close()
    assert balancer.alive()


async def test_pool_size_stays_at_n_under_churn(start_backend, start_balancer):
    backend = start_backend("echo", "e", "--report")
    config = make_config([backend.address], pool={"size": 4})
    balancer = start_balancer(config)
    opened = closed = 0

    async def drain_events(count: int) -> None:
        nonlocal opened, closed
        for _ in range(count):
            line = await read_backend_line(backend)
            opened += line == "open"
            closed += line == "closed"

    await drain_events(4)
    for _ in range(50):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"x"
        writer.close()
    # 50 clients used 50 pooled connections (each closed) and 50 replacements were opened.
    await drain_events(100)
    assert (opened - closed) == 4


async def test_pool_banner_is_delivered_first(start_backend, start_balancer):
    backend = start_backend("banner", "bn", "--report")
    config = make_config([backend.address], pool={"size": 2})
    balancer = start_balancer(config)
    assert [await read_backend_line(backend) for _ in range(2)] == ["open", "open"]
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"ping")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"banner bn\nping"
    writer.close()


async def test_server_closing_idle_pool_connections_never_fails_a_client(
    start_backend, start_balancer
):
    backend = start_backend("idleclose", "ic", "--idle-close", "0.15")
    config = make_config([backend.address], pool={"size": 3, "idle_timeout": "60s"})
    balancer = start_balancer(config, "-v", "debug")
    for i in range(40):  # spans many of the server's idle closes
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        message = b"request %d" % i
        writer.write(message)
        assert await asyncio.wait_for(reader.readexactly(len(message)), 5) == message
        writer.close()
        await asyncio.sleep(0.03)  # pacing: clients arrive while connections age
    balancer.wait_for_line("dropping idle connection: closed by server while idle")


@pytest.mark.skipif(shutil.which("node") is None,
                    reason="needs Node.js: `node` is not on PATH (the backends are Node.js apps)")
async def test_killing_a_node_backend_under_load_fails_no_new_connection(start_balancer):
    nodes = [NodeBackend(f"n{i}") for i in range(3)]
    try:
        config = make_config([n.address for n in nodes], "round_robin",
                             health={"max_fails": 1, "fail_timeout": "5s"})
        balancer = start_balancer(config)
        killed_at: list[float] = []
        results: list[tuple[float, bool]] = []  # (start time, success) per request

        async def request() -> None:
            began = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                body = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                results.append((began, body.startswith(b"HTTP/1.1 200")))
            except (OSError, TimeoutError):
                results.append((began, False))

        async def worker() -> None:
            while len(results) < 1200:
                await request()

        load = [asyncio.create_task(worker()) for _ in range(16)]
        await eventually(lambda: len(results) >= 300, timeout=30)
        nodes[1].proc.send_signal(signal.SIGKILL)  # in the middle of the load
        nodes[1].proc.wait(5)
        killed_at.append(time.monotonic())
        await asyncio.wait_for(asyncio.gather(*load), 60)
        after = [ok for began, ok in results if began > killed_at[0]]
        assert len(after) >= 500
        assert all(after), f"{after.count(False)} new connections failed after the kill"
        before = [ok for began, ok in results if began <= killed_at[0]]
        assert before.count(False) <= 16  # at most the requests in flight at the kill
    finally:
        for node in nodes:
            node.stop()


async def test_client_leaving_during_connect_is_no_failure_and_leaks_no_slot(
    start_backend, start_balancer
):
    """A client that resets while its upstream connect is pending is neither a connect
    failure nor a reason to retry: the server's slot is freed and its record stays clean."""
    from .test_observability import admin_port, http, scrape, total, with_metrics
    from .test_proxy import full_accept_queue, reset

    sockets = full_accept_queue()
    slow = f"127.0.0.1:{sockets[0].getsockname()[1]}"
    good = start_backend("echo", "good")
    try:
        servers = [slow, {"address": good.address, "backup": True}]
        config = with_metrics(make_config(servers, health={"max_fails": 3},
                                          timeouts={"connect": "30s"},
                                          retries={"timeout": "30s"}))
        balancer = start_balancer(config)
        port = admin_port(balancer)

        async def slow_active() -> int:
            body = json.loads((await http(port, path="/status"))[1])
            return {s["address"]: s for s in body["upstreams"]["app"]["servers"]}[slow]["active"]

        clients = [socket.create_connection(("127.0.0.1", balancer.port)) for _ in range(6)]
        deadline = time.monotonic() + 5
        while await slow_active() < 6:  # every client is waiting on the slow connect
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        for client in clients:
            reset(client)
        deadline = time.monotonic() + 5
        while await slow_active() != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        body = json.loads((await http(port, path="/status"))[1])
        state = {s["address"]: s for s in body["upstreams"]["app"]["servers"]}
        assert state[slow]["state"] == "up" and state[slow]["failures"] == 0
        assert state[good.address]["active"] == 0  # nothing was retried on the backup
        samples = await scrape(port)
        assert total(samples, "balancer_retries_total") == 0
        assert total(samples, "balancer_connection_errors_total") == 0
        assert not any(" down: " in line for line in balancer.lines)
    finally:
        for sock in sockets:
            sock.close()


async def test_half_open_server_gets_exactly_one_trial_from_a_burst(
    start_backend, start_balancer
):
    """Clients accepted in the same loop pass must not all take the half-open server's one
    trial: least_conn prefers the dead server (it holds no connections), so a trial that is
    reserved late would be handed to several of them."""
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], "least_conn",
                         health={"max_fails": 1, "fail_timeout": "1s"})
    balancer = start_balancer(config, "-v", "debug")
    assert await who_answers(balancer.port) == "good"  # via a retry: the dead one is out
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down: 1 connect failures")
    assert attempts_on(balancer, dead) == 1
    # The ejection lasts fail_timeout (1 s): only the clock can end it.
    await asyncio.sleep(1.2)
    # Stopped, the balancer cannot accept: the 16 connections wait in the kernel's queues
    # and are all accepted in its first loop passes after SIGCONT.
    balancer.proc.send_signal(signal.SIGSTOP)
    try:
        burst = [socket.create_connection(("127.0.0.1", balancer.port)) for _ in range(16)]
    finally:
        balancer.proc.send_signal(signal.SIGCONT)
    try:
        answers = await asyncio.gather(*(
            asyncio.to_thread(lambda s=s: s.makefile().readline().strip()) for s in burst))
    finally:
        for sock in burst:
            sock.close()
    assert answers == ["good"] * 16
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down: trial connection failed")
    assert attempts_on(balancer, dead) == 2

"""Passive and active health checks, retries and keepalive pools, with real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import time

import pytest

from .utils import (
    NodeBackend,
    admin_port,
    attempts_on,
    blackhole,
    eventually,
    free_port,
    http,
    make_config,
    read_backend_line,
    reset,
    scrape,
    start_with_a_refusing_pooled_server,
    total,
    wait_until,
    who_answers,
    with_metrics,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]


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

    sockets = blackhole()
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


def syn_sent_to(port: int) -> bool:
    """Whether some socket of this machine is in SYN_SENT towards 127.0.0.1:`port`."""
    target = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return any(fields[2] == target and fields[3] == "02"
                   for fields in (line.split() for line in list(table)[1:]))


def full_listener() -> tuple[socket.socket, socket.socket]:
    """A listener whose one queue slot a filler holds: a connect to it sends SYNs that drop."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    return listener, filler


async def stall_through_a_connect(balancer, listener: socket.socket) -> socket.socket:
    """Stop the balancer (SIGSTOP stands in for a stall: a long collection, a starved
    process) while its connect to `listener` is in flight, let the kernel finish that
    handshake, and resume it past a 2.5 s connect deadline (generous: a pool's connect
    begins before the test can look, and must not time out before the stop). Returns the
    server's side."""
    port = listener.getsockname()[1]
    await eventually(lambda: syn_sent_to(port), timeout=5, interval=0.005)
    began = time.monotonic()
    os.kill(balancer.pid, signal.SIGSTOP)
    try:
        listener.settimeout(10)
        listener.accept()[0].close()  # the filler: the queue has room again...
        # ...for the SYN the kernel retransmits after 1 s: the handshake completes while the
        # balancer is stopped.
        upstream, _ = await asyncio.to_thread(listener.accept)
        # The stall itself, not a synchronisation: past the 2.5 s connect deadline.
        await asyncio.sleep(max(0.0, began + 3.0 - time.monotonic()))
    finally:
        os.kill(balancer.pid, signal.SIGCONT)
    upstream.settimeout(10)
    return upstream


async def assert_nothing_blamed(balancer) -> None:
    """No connect error counted, and the one server still up with no failure."""
    port = admin_port(balancer)
    assert total(await scrape(port), "balancer_connection_errors_total") == 0
    server = json.loads((await http(port, path="/status"))[1])["upstreams"]["app"]["servers"][0]
    assert server["state"] == "up" and server["failures"] == 0, server


STALL_CONFIG = {"health": {"max_fails": 1, "fail_timeout": "60s"},
                "timeouts": {"connect": "2500ms"}, "retries": {"tries": 1}}


async def test_a_stalled_balancer_does_not_blame_the_server_for_its_own_delay(start_balancer):
    """A client's connect that the kernel finished while the balancer was stalled past the
    connect deadline is used, not failed as a timeout: failing it would eject a healthy
    server for the balancer's own delay."""
    listener, filler = full_listener()
    client = None
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        balancer = start_balancer(with_metrics(make_config([address], **STALL_CONFIG)))
        client = socket.create_connection(("127.0.0.1", balancer.port))
        client.sendall(b"hello")
        with await stall_through_a_connect(balancer, listener) as upstream:
            assert upstream.recv(100) == b"hello"
            upstream.sendall(b"hi\n")
            client.settimeout(10)
            assert client.recv(100) == b"hi\n"
        await assert_nothing_blamed(balancer)
    finally:
        for sock in (listener, filler, client):
            if sock is not None:
                sock.close()


async def test_a_stalled_balancer_retries_a_pool_connect_without_blaming_the_server(
        start_balancer):
    """The same stall during a pool's connect: the timeout cannot be trusted, so it counts
    against nobody and the pool connects again (and is filled)."""
    listener, filler = full_listener()
    try:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        balancer = start_balancer(with_metrics(make_config([address], pool={"size": 1},
                                                           **STALL_CONFIG)))
        with await stall_through_a_connect(balancer, listener):
            pass
        # The pool's next try: the queue has room now, so the connect completes at once
        # (a server blamed for the stall would be down, and this accept would time out).
        again, _ = await asyncio.to_thread(listener.accept)
        again.close()
        await assert_nothing_blamed(balancer)
    finally:
        listener.close()
        filler.close()


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


def log_time(line: str) -> float:
    """Seconds since the epoch from a log line's `asctime` (millisecond precision)."""
    from datetime import datetime

    stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


@pytest.mark.parametrize(("connect_ms", "attempts"), [(400, 3), (800, 2)])
async def test_retry_budget_caps_each_attempts_timeout(start_balancer, connect_ms, attempts):
    """Each attempt waits min(timeouts.connect, what is left of retries.timeout), so with
    three blackhole servers and a 1 s budget the client is closed at ~1.0 s: 400+400+200 ms,
    or 800+200 ms (the budget, not `tries`, ends it; an uncapped last attempt would take
    1.6 s). Every failure is a timeout."""

    holes = [blackhole() for _ in range(3)]
    servers = [f"127.0.0.1:{hole[0].getsockname()[1]}" for hole in holes]
    try:
        config = with_metrics(make_config(
            servers, health={"max_fails": 0}, timeouts={"connect": f"{connect_ms}ms"},
            retries={"tries": 3, "timeout": "1s"}))
        balancer = start_balancer(config)
        port = admin_port(balancer)
        clients = 2
        for _ in range(clients):
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            elapsed = time.monotonic() - started
            writer.close()
            assert 0.9 <= elapsed < 1.35, f"closed after {elapsed:.3f}s, budget 1s"
        samples = await scrape(port)
        errors = "balancer_connection_errors_total"
        assert total(samples, errors, upstream="app", reason="timeout") == clients * attempts
        assert total(samples, errors, reason="refused") == 0
        assert total(samples, errors, reason="reset") == 0
        assert total(samples, errors, server="", reason="no_server") == clients
        assert total(samples, "balancer_retries_total") == clients * (attempts - 1)
    finally:
        for hole in holes:
            for sock in hole:
                sock.close()


@pytest.mark.parametrize("strategy", ["round_robin", "least_conn", "ip_hash"])
async def test_retry_never_tries_the_same_server_twice_in_a_row(
    start_backend, start_balancer, strategy
):
    """With passive checks off the refusing server stays in rotation (round_robin offers it
    first to every client; ip_hash would offer it again to the same client address); the
    retry must go to the other one, so each client costs at most one failed connect and is
    always served."""
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], strategy, health={"max_fails": 0},
                         retries={"tries": 3})
    config["log"] = {"access": "stderr", "format": "text"}
    balancer = start_balancer(config, "-v", "debug")

    def access_lines() -> int:
        return sum(" -> app/" in line for line in balancer.lines)

    costs = []
    before = 0
    for client in range(1, 13):  # from 127.0.0.1 .. 127.0.0.12: ip_hash spreads them
        assert await who_answers(balancer.port, f"127.0.0.{client}") == "good"
        # A client's access line is written after its connect-failure lines: once it is
        # in, this client's failures are all counted, and none of the next one's.
        balancer.wait_for_log(lambda n=client: access_lines() >= n, 10)
        now = attempts_on(balancer, dead)
        costs.append(now - before)
        before = now
    assert max(costs) <= 1, costs
    assert sum(costs) >= (6 if strategy == "round_robin" else 1), costs  # it was offered


async def test_idle_pool_connections_are_replaced_after_idle_timeout(
    start_backend, start_balancer
):

    backend = start_backend("echo", "e", "--report")
    config = with_metrics(make_config([backend.address],
                                      pool={"size": 2, "idle_timeout": "300ms"}))
    launched = time.monotonic()
    balancer = start_balancer(config, "-v", "debug")
    port = admin_port(balancer)

    async def pool_idle() -> int:
        body = json.loads((await http(port, path="/status"))[1])
        return body["upstreams"]["app"]["servers"][0]["pool_idle"]

    opened = closed = 0
    first_close = 0.0
    samples = []
    for _ in range(60):  # bounded: 4 replacements are 8 lines, after the first 2 opens
        line = await read_backend_line(backend, timeout=5)
        opened += line == "open"
        if line == "closed":
            closed += 1
            first_close = first_close or time.monotonic()
        # Replacements may reach the backend before the closes they replace, never more.
        assert opened - closed <= 4, (opened, closed)
        samples.append(await pool_idle())
        if closed >= 4 and opened == closed + 2:
            break
    assert closed >= 4 and opened == closed + 2, (opened, closed)
    # No idle connection was closed before it was idle_timeout old.
    assert first_close - launched >= 0.3
    # The pool is refilled at once: only a replacement's local connect can be caught.
    assert max(samples) == 2 and samples.count(2) >= len(samples) / 2, samples
    balancer.wait_for_line("dropping idle connection: idle timeout")
    assert await wait_until(pool_idle, lambda n: n == 2) == 2


async def test_no_pool_connects_to_a_server_while_it_is_down(start_backend, start_balancer):
    from balancer.pool import REFILL_RETRY_DELAY

    balancer, dead, port = start_with_a_refusing_pooled_server(start_backend, start_balancer)
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down")

    async def dead_failures() -> int:
        body = json.loads((await http(port, path="/status"))[1])
        state = {s["address"]: s for s in body["upstreams"]["app"]["servers"]}[dead]
        assert state["state"] == "down" and state["pool_idle"] == 0
        return state["failures"]

    # Both first pool connects fail (one ejects, one lands while down): let them settle.
    before = await wait_until(dead_failures, lambda n: n >= 2)
    # A configured period must elapse: several refill retry periods, with no client traffic.
    await asyncio.sleep(3 * REFILL_RETRY_DELAY + 0.5)
    assert await dead_failures() == before


async def test_half_open_trial_comes_only_after_the_ejection_time(start_backend, start_balancer):
    """The trial follows `fail_timeout` after the ejection, and a failed trial ejects for
    twice as long: measured between the balancer's own log lines (their timestamps)."""
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], "round_robin",
                         health={"max_fails": 1, "fail_timeout": "1s"})
    balancer = start_balancer(config, "-v", "debug")
    # Clients every 50 ms: each ejection ends while they are arriving.
    answers = await serve_until(balancer.port, lambda: attempts_on(balancer, dead) >= 3,
                                timeout=15)
    assert set(answers) == {"good"}
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down: trial connection failed "
                           r"\(refused\); out for 4s")
    name = f"server app/{dead} "
    downs = [line for line in balancer.lines if name + "down: " in line]
    trials = [line for line in balancer.lines if name + "half-open: " in line]
    fails = [line for line in balancer.lines if f"connect to app/{dead} failed" in line]
    assert len(downs) == 3 and len(trials) == 2 and len(fails) == 3, balancer.lines[-20:]
    assert "out for 1s" in downs[0] and "out for 2s" in downs[1]
    for down, trial, fail, out_for in zip(downs[:2], trials, fails[1:], (1.0, 2.0), strict=True):
        waited = log_time(trial) - log_time(down)
        # Timestamps are truncated to the millisecond; a trial comes within a second of its
        # time, given clients every 50 ms.
        assert out_for - 0.002 <= waited < out_for + 1.0, (down, trial)
        assert log_time(fail) - log_time(down) >= out_for - 0.002, (down, fail)


async def test_a_pool_connect_that_brings_its_server_back_does_not_overfill_the_pool():
    """In process, with a real listener: the server is ejected while the pool's first
    connects are in flight; the first to land brings it back up, and the refill that recovery
    starts must count that connection, or the pool ends one over its size."""
    from balancer.config import Address, HealthConfig, ServerConfig
    from balancer.pool import ServerPool
    from balancer.upstream import Server

    accepted: list[asyncio.StreamWriter] = []
    listener = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server = Server(ServerConfig(Address("127.0.0.1", port)), "app",
                    HealthConfig(max_fails=1, fail_timeout=30.0))
    pool = ServerPool(server, 2, 60.0, 5.0, asyncio.get_running_loop())
    settled = asyncio.Event()
    pool.on_change = lambda p: p.connecting == 0 and p.idle and settled.set()
    try:
        pool.start()  # two connects in flight ...
        server.connect_failed("refused")  # ... when a client's connect ejects the server
        assert server.health.state == "down" and pool.connecting == 2
        await asyncio.wait_for(settled.wait(), 5)
        assert server.health.state == "up"
        assert len(pool.idle) == 2 and pool.connecting == 0
    finally:
        pool.close()
        for writer in accepted:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def pooled_in_balancer(balancer, idle: int) -> None:
    """Wait until the balancer holds `idle` pooled connections (or more). The backend's
    "open" comes first, and a client accepted before the balancer has seen its connect
    complete finds the pool empty (the stdlib loop takes a few passes over a connect)."""
    from .test_observability import admin_port, http

    port = admin_port(balancer)

    async def pool_idle() -> int:
        body = json.loads((await http(port, path="/status"))[1])
        return body["upstreams"]["app"]["servers"][0]["pool_idle"]

    await wait_until(pool_idle, lambda n: n >= idle)


async def test_pooled_connection_dying_after_the_retry_budget_is_still_replayed(
    start_backend, start_balancer
):
    """A client takes a pooled connection and stays quiet longer than `retries.timeout`; the
    server then closes that connection unused. The replay is a fresh start with the full
    budget, not an instant timeout on what was left of the accept's budget."""
    # The client must take the pooled connection while it is idle: it connects once the
    # balancer itself counts it idle (the backend's "open" can come first), and 3 s of idle
    # time leave room for a loaded machine before the backend closes it.
    backend = start_backend("idleclose", "ic", "--idle-close", "3.0", "--report")
    config = with_metrics(make_config([backend.address], pool={"size": 1},
                                      retries={"tries": 2, "timeout": "300ms"}))
    balancer = start_balancer(config, "-v", "debug")
    assert await read_backend_line(backend) == "open"
    port = admin_port(balancer)
    await wait_until(lambda: scrape(port),
                     lambda s: total(s, "balancer_pool_idle_connections") == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    # Quiet past the budget, until the server's idle close kills the pooled connection.
    balancer.wait_for_line("died unused; reconnecting", timeout=10)
    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), 5) == b"still here"
    writer.close()
    await writer.wait_closed()
    assert not any("no server available" in line for line in balancer.lines)


async def test_a_pool_respects_max_conns(start_backend, start_balancer):
    """`max_conns: 2` with `pool.size: 4`: idle pooled connections count against the limit
    with the clients', so two held clients leave the pool no room and the backend never
    sees a third connection."""
    from .test_observability import with_metrics

    backend = start_backend("echo", "e", "--report")
    config = with_metrics(make_config([{"address": backend.address, "max_conns": 2}],
                                      pool={"size": 4}))
    balancer = start_balancer(config)
    assert [await read_backend_line(backend) for _ in range(2)] == ["open", "open"]
    await pooled_in_balancer(balancer, 2)
    held = []
    try:
        for _ in range(2):  # each takes a pooled connection; no refill has room
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            held.append(writer)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
        # The server is full: a third client finds no server (and costs it no connect).
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # A refill would have been started as a client was placed, before this probe's
        # connect: the backend's next connection is the probe's own.
        with socket.create_connection(("127.0.0.1", backend.port)):
            assert await read_backend_line(backend) == "open"
        assert await read_backend_line(backend) == "closed"
    finally:
        for writer in held:
            writer.close()
    # Both clients gone: the pool may use the room again, up to max_conns.
    lines = [await read_backend_line(backend) for _ in range(2)]
    assert lines == ["closed", "closed"]

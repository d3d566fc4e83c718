"""Workers, crash restart, reload and graceful stop, with real processes and signals."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from balancer.admin import health_problems, server_status
from balancer.config import parse_config
from balancer.proc.cluster import ClusterView
from balancer.proc.shared import REASON_BYTES, SharedTable
from balancer.upstream import Upstream

from .utils import (
    admin_port,
    echo_round_trip,
    eventually,
    fd_count,
    free_port,
    hold_echo_connections,
    http,
    make_config,
    scrape,
    start_workers,
    total,
    wait_until,
    who_answers,
    with_metrics,
    worker_pids,
)

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def socket_count(pid: int) -> int:
    """Open sockets only (metrics files come and go as label sets first appear)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            count += os.readlink(fd).startswith("socket:")
    return count


async def assert_refused(port: int) -> None:
    """A connect to `port` is refused (a handshake the kernel completed would be a failure)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return
    writer.close()
    raise AssertionError(f"a connection to port {port} was accepted")


async def test_two_workers_share_the_port(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, make_config([echo.address]))
    pids = worker_pids(balancer)
    assert len(pids) == 2
    baselines = {pid: fd_count(pid) for pid in pids}
    held = await hold_echo_connections(balancer.port, 24)
    # Each worker holds some of the connections (two fds each): the kernel spread them.
    grown = {pid: fd_count(pid) - baselines[pid] for pid in pids}
    assert all(n >= 2 for n in grown.values()), grown
    assert sum(grown.values()) == 48
    for writer in held:
        writer.close()


async def test_killed_worker_is_replaced_under_load(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, make_config([echo.address]))
    victim = worker_pids(balancer)[0]
    results: list[bool] = []
    stop = asyncio.Event()
    concurrency = 8

    async def client_loop() -> None:
        while not stop.is_set():
            results.append(await echo_round_trip(balancer.port))

    load = [asyncio.create_task(client_loop()) for _ in range(concurrency)]
    await eventually(lambda: len(results) >= 200, timeout=20)
    signal_at = len(results)
    started = re.compile(r"worker \d started \(pid (\d+)\)")

    def started_pids() -> list[int]:
        return [int(m.group(1)) for x in list(balancer.lines) if (m := started.search(x))]

    booted = len(started_pids())
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    # Waited for without blocking the loop, so the clients keep connecting meanwhile. The
    # time is when this test saw the line: an upper bound of the real replacement time.
    await eventually(lambda: len(started_pids()) > booted, timeout=10, interval=0.01)
    replaced_in = time.monotonic() - killed_at
    replacement = started_pids()[booted]
    assert replacement != victim
    assert any(re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL", x)
               for x in balancer.lines)
    await eventually(lambda: len(results) >= signal_at + 300, timeout=30)
    stop.set()
    await asyncio.gather(*load)
    new_pids = worker_pids(balancer)
    assert len(new_pids) == 2 and victim not in new_pids and replacement in new_pids
    assert replaced_in < 1.0, replaced_in
    # Only connections open on the killed worker may fail: at most one per client task.
    assert results.count(False) <= concurrency, results.count(False)


async def test_least_conn_counts_connections_of_all_workers(start_backend, start_balancer):
    backends = [start_backend("name", n) for n in "ab"]
    config = make_config([b.address for b in backends], "least_conn")
    balancer = start_workers(start_balancer, config)
    pids = worker_pids(balancer)
    baselines = {pid: fd_count(pid) for pid in pids}
    held = []
    answers: Counter[str] = Counter({"a": 0, "b": 0})
    try:
        for _ in range(16):  # spread over both workers by the kernel
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            held.append(writer)
            answers[(await asyncio.wait_for(reader.readline(), 10)).decode().strip()] += 1
            # Globally least loaded every time, whichever worker took this client: a worker
            # that saw only its own connections would soon pick the server another one filled.
            assert max(answers.values()) - min(answers.values()) <= 1, answers
        assert answers == {"a": 8, "b": 8}
        # Both workers placed clients (two fds per connection): the split above was shared.
        grown = {pid: fd_count(pid) - baselines[pid] for pid in pids}
        assert sum(grown.values()) == 32 and all(n >= 2 for n in grown.values()), grown
    finally:
        for writer in held:
            writer.close()


def test_least_conn_reads_every_column_of_the_shared_table(tmp_path):
    """Two workers' upstreams on two columns of one table: each pick sees both workers'
    connections, in any interleaving, and a release in one worker frees room for the other."""
    servers = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    config = parse_config({
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"strategy": "least_conn", "servers": servers}},
    })
    rows = {f"app/{address}": row for row, address in enumerate(servers)}
    table = SharedTable(tmp_path / "shared", 8, 2, create=True)
    workers = [Upstream(config.upstreams["app"],
                        lambda key, c=column: table.cell(rows[key], c)) for column in (0, 1)]
    rng = random.Random(7)
    held = []
    for _ in range(60):
        server = rng.choice(workers).pick("127.0.0.1")
        assert server is not None
        server.acquire()
        held.append(server)
        load = [server.active for server in workers[0].servers]
        assert max(load) - min(load) <= 1, load
    assert [server.active for server in workers[1].servers] == [20, 20, 20]
    for server in [s for s in held if s.key == servers[1]][:5]:  # ends in either worker
        server.release()
    assert {workers[i].pick("127.0.0.1").key for i in (0, 1)} == {servers[1]}
    table.close()


async def test_metrics_and_status_aggregate_all_workers(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, with_metrics(make_config([echo.address])))
    port = admin_port(balancer)
    for _ in range(20):
        assert await echo_round_trip(balancer.port, b"12345")
    held = []
    for _ in range(6):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"x")
        await reader.readexactly(1)
        held.append(writer)
    samples = await scrape(port)
    assert total(samples, "balancer_connections_total") == 26
    assert total(samples, "balancer_active_connections") == 6
    _, body = await http(port, path="/status")
    server = json.loads(body)["upstreams"]["app"]["servers"][0]
    assert server["active"] == 6 and server["state"] == "up"
    for writer in held:
        writer.close()


async def test_a_stopping_workers_last_counts_reach_metrics(start_backend, start_balancer):
    """A worker keeps its counts in plain ints until the next flush (once a second, or when
    the primary asks before a scrape); one that stops flushes them as it exits, so nothing
    it counted is lost to a restart, a replacement or a scale-down."""
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, with_metrics(make_config([echo.address])))
    port = admin_port(balancer)
    for _ in range(10):
        assert await echo_round_trip(balancer.port, b"12345")
    for pid in worker_pids(balancer):  # at once: no scrape, and no flush tick, in between
        os.kill(pid, signal.SIGTERM)
    await eventually(lambda: sum("exited with status 0" in x for x in list(balancer.lines))
                     == 2, timeout=20)
    await eventually(lambda: sum(" started (pid" in x for x in list(balancer.lines)) == 4,
                     timeout=20)
    samples = await scrape(port)
    assert total(samples, "balancer_connections_total") == 10
    assert total(samples, "balancer_bytes_total", direction="upstream") == 50
    assert total(samples, "balancer_bytes_total", direction="downstream") == 50
    assert total(samples, "balancer_connection_duration_seconds_count") == 10
    assert total(samples, "balancer_upstream_connect_seconds_count") == 10
    assert total(samples, "balancer_active_connections") == 0


async def test_reload_under_load_drops_nothing(start_backend, start_balancer, tmp_path):
    a, b = start_backend("echo", "a"), start_backend("echo", "b")
    base = with_metrics(make_config([a.address]))
    balancer = start_workers(start_balancer, base, 2, "--pid-file", str(tmp_path / "pid"))
    port = admin_port(balancer)
    # Reload by rewriting the file the balancer was started with, then `balancer reload`.
    config_path = balancer.config_path
    long_reader, long_writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    long_writer.write(b"before")
    assert await long_reader.readexactly(6) == b"before"
    results: list[bool] = []
    stop = asyncio.Event()

    async def client_loop() -> None:
        while not stop.is_set():
            results.append(await echo_round_trip(balancer.port, b"r" * 100))

    load = [asyncio.create_task(client_loop()) for _ in range(6)]
    for i in range(10):
        servers = [a.address, b.address] if i % 2 == 0 else [a.address]
        config = dict(base, upstreams={"app": {"servers": servers}})
        config["workers"] = 2
        config_path.write_text(yaml.safe_dump(config))
        done = len([x for x in balancer.lines if "configuration reloaded from" in x])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "balancer", "reload", "-c", str(config_path),
            "--pid-file", str(tmp_path / "pid"), stdout=asyncio.subprocess.PIPE)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await eventually(lambda n=done: len(
            [x for x in balancer.lines if "configuration reloaded from" in x]) > n, timeout=10)
        served = len(results)
        await eventually(lambda n=served: len(results) >= n + 20, timeout=10)
    stop.set()
    await asyncio.gather(*load)
    assert len(results) >= 200 and all(results), results.count(False)
    long_writer.write(b"after")  # the connection from before the reloads still works
    assert await long_reader.readexactly(5) == b"after"
    long_writer.close()
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="success") == 10


@pytest.mark.parametrize("workers", [1, 2])
async def test_broken_reload_keeps_the_old_config(start_backend, start_balancer, workers):
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]))
    config["workers"] = workers
    balancer = (start_workers(start_balancer, config, workers) if workers > 1
                else start_balancer(config))
    port = admin_port(balancer)
    balancer.config_path.write_text(BROKEN)
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line(r"reload rejected: upstreams\.app\.servers\[0\]\.weight: "
                           r"must be a positive integer, got 0")
    assert await who_answers(balancer.port) == "a"  # still serving the old config
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    assert balancer.alive()


BROKEN = """\
listeners:
  - name: test
    bind: 127.0.0.1:0
    upstream: app
upstreams:
  app:
    servers:
      - address: 127.0.0.1:1
        weight: 0
"""


async def test_single_process_reload_adds_a_server_and_keeps_health(
    start_backend, start_balancer
):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    config = make_config([a.address])
    balancer = start_balancer(config)
    assert {await who_answers(balancer.port) for _ in range(4)} == {"a"}
    config["upstreams"]["app"]["servers"] = [a.address, b.address]
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line("configuration reloaded")
    assert {await who_answers(balancer.port) for _ in range(4)} == {"a", "b"}


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_a_transfer_finish_then_exits_0(start_backend, start_balancer,
                                                           workers):
    sink = start_backend("sink", "slow", "--slow-seconds", "1")
    config = make_config([sink.address])
    balancer = (start_workers(start_balancer, config, workers) if workers > 1
                else start_balancer(config))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    block = b"z" * MiB
    writer.write(block)
    await writer.drain()
    balancer.send_signal(signal.SIGTERM)  # mid-transfer
    balancer.wait_for_line("shutting down|stopping workers")
    # The process holding the transfer has stopped accepting; with workers, the other one
    # (it had no connection) has exited.
    balancer.wait_for_line("draining 1 open connection")
    if workers > 1:
        balancer.wait_for_line(r"worker \d \(pid \d+\) exited")
    # Stop accepting at once: a new client is refused while the transfer still runs, not
    # left in an accept queue nobody serves (and reset when the balancer exits).
    await assert_refused(balancer.port)
    assert balancer.alive()
    digest = hashlib.sha256(block)
    for _ in range(7):
        writer.write(block)
        digest.update(block)
        await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert answer == f"{8 * MiB} {digest.hexdigest()}\n".encode()
    assert balancer.proc.wait(15) == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_sigterm_exits_at_once(start_backend, start_balancer, workers):
    echo = start_backend("echo")
    config = make_config([echo.address])
    config["shutdown_timeout"] = "60s"
    balancer = (start_workers(start_balancer, config, workers) if workers > 1
                else start_balancer(config))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"x")
    await reader.readexactly(1)
    balancer.send_signal(signal.SIGTERM)
    balancer.wait_for_line("draining 1 open connection")
    started = time.monotonic()
    balancer.send_signal(signal.SIGTERM)
    assert balancer.proc.wait(10) == 0
    assert time.monotonic() - started < 5  # not the 60 s drain
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_drain_via_admin_reaches_every_worker(start_backend, start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    config = with_metrics(make_config([a.address, b.address]), admin_token="t0k")
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")  # followers log at DEBUG
    port = admin_port(balancer)
    path = f"/servers/app/{a.address}/drain"
    assert (await http(port, "POST", path))[0] == 401
    status, body = await http(port, "POST", path, {"Authorization": "Bearer t0k"})
    assert status == 200 and json.loads(body)["state"] == "draining"
    # Every worker follows within a sync interval and says so; then no new client reaches a.
    followed(balancer, a.address, "draining")
    assert {await who_answers(balancer.port) for _ in range(12)} == {"b"}
    _, body = await http(port, path="/status")
    assert json.loads(body)["upstreams"]["app"]["servers"][0]["state"] == "draining"
    await http(port, "POST", f"/servers/app/{a.address}/enable", {"Authorization": "Bearer t0k"})
    followed(balancer, a.address, "enabled")
    assert "a" in {await who_answers(balancer.port) for _ in range(12)}
    # Each change is logged once for the balancer, by the primary that made it.
    for state in ("draining", "enabled"):
        assert announced(balancer, rf"server app/{re.escape(a.address)} {state}") == [
            ("WARNING", None)], state


def announced(balancer, pattern: str) -> list[tuple[str, str | None]]:
    """(level, worker pid or None for the primary) of every log line above DEBUG that
    matches `pattern`: what an operator reading the log at INFO sees."""
    regex = re.compile(rf"^\S+ \S+ (\w+) (?:\[worker (\d+)\] )?\S+: .*{pattern}")
    return [(m.group(1), m.group(2)) for x in list(balancer.lines)
            if (m := regex.search(x)) and m.group(1) != "DEBUG"]


def followed(balancer, address: str, state: str) -> None:
    """Wait until both workers logged that they follow the shared drain state."""
    in_both_workers(balancer, rf"server app/{re.escape(address)} {state} ")


def in_both_workers(balancer, pattern: str, timeout: float = 5.0) -> None:
    """Wait until both workers have logged a line matching `pattern`."""
    regex = re.compile(rf"\[worker (\d+)\] .*{pattern}")

    def both() -> bool:
        return len({m.group(1) for x in balancer.lines if (m := regex.search(x))}) == 2

    balancer.wait_for_log(both, timeout=timeout)


def slot_pids(balancer, slot: int) -> list[int]:
    """Every pid the primary has said started in `slot`, in order."""
    started = re.compile(rf"worker {slot} started \(pid (\d+)\)")
    return [int(m.group(1)) for x in list(balancer.lines) if (m := started.search(x))]


async def test_a_crash_loop_backs_off_its_slot_while_the_other_keeps_serving(
    start_backend, start_balancer
):
    """An OOM-killer loop on one worker: it is restarted ever later (at once, then after
    0.1 s doubling), the other worker serves every new client meanwhile, and the primary
    never gives up (it used to after 5 crashes in 30 s, taking the port down)."""
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, make_config([echo.address]))
    survivor = slot_pids(balancer, 1)[-1]
    kills = 7
    for n in range(kills):
        victim = slot_pids(balancer, 0)[-1]
        os.kill(victim, signal.SIGKILL)
        if n < kills - 1:
            await eventually(lambda n=n: len(slot_pids(balancer, 0)) > n + 1, timeout=10,
                             interval=0.01)
    # The 7th crash in a row waits 0.1 * 2**5 = 3.2 s, with slot 0's sockets closed: every
    # new client is served by slot 1 at once, none waits in a queue nobody reads.
    balancer.wait_for_line(r"worker 0 crashed 7 times in a row: restarting it in 3.2s")
    assert len(slot_pids(balancer, 0)) == kills
    for _ in range(40):
        assert await asyncio.wait_for(echo_round_trip(balancer.port), 1.0)
    assert len(slot_pids(balancer, 0)) == kills, "the round trips outlasted the backoff"
    await eventually(lambda: len(slot_pids(balancer, 0)) > kills, timeout=10)
    assert balancer.alive()
    assert slot_pids(balancer, 1) == [survivor]
    assert sorted(worker_pids(balancer)) == sorted([survivor, slot_pids(balancer, 0)[-1]])
    # The delay is logged once per change; the first crash restarted at once.
    delays = [m.group(1) for x in balancer.lines
              if (m := re.search(r"worker 0 crashed \d+ times in a row: restarting it in "
                                 r"(\S+)s", x))]
    assert delays == ["0.1", "0.2", "0.4", "0.8", "1.6", "3.2"]
    assert not any("giving up" in x for x in balancer.lines)
    assert await echo_round_trip(balancer.port)


def test_a_worker_that_cannot_boot_makes_the_primary_give_up(start_balancer, tmp_path):
    """A bad environment fails every boot the same way: the primary stops (exit 1) instead
    of restarting it for ever."""
    config = make_config(["127.0.0.1:1"])
    config["log"] = {"access": str(tmp_path / "missing" / "access.log")}
    config["workers"] = 2
    balancer = start_balancer(config)
    assert balancer.proc.wait(20) == 1
    assert any(re.search(r"worker could not start: .*No such file or directory", x)
               for x in balancer.lines), "\n".join(balancer.lines[-15:])
    assert any("giving up: worker 0 could not boot" in x for x in balancer.lines)
    assert len(slot_pids(balancer, 0)) == 0


async def test_passive_ejection_in_one_worker_reaches_the_other(start_backend, start_balancer):
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], "round_robin",
                         health={"max_fails": 1, "fail_timeout": "30s"})
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")  # followers log at DEBUG
    down = re.compile(rf"\[worker (\d+)\] .*server app/{re.escape(dead)} down: (.*)")

    def downs() -> list[tuple[str, str]]:
        return [m.groups() for x in balancer.lines if (m := down.search(x))]

    answers = set()
    deadline = time.monotonic() + 10
    while not downs():  # clients until one worker's connect to the dead server fails
        assert time.monotonic() < deadline
        answers.add(await who_answers(balancer.port))
        # The ejection is logged before the client is retried elsewhere; let the log
        # reader catch up, so no further client races the shared state.
        with contextlib.suppress(AssertionError):
            balancer.wait_for_log(lambda: bool(downs()), timeout=0.1)
    first_seen = time.monotonic()
    balancer.wait_for_log(lambda: len({pid for pid, _ in downs()}) == 2, timeout=1.0)
    assert time.monotonic() - first_seen < 1.0
    reasons = sorted(reason for _, reason in downs())
    assert reasons[0].startswith("1 connect failures") or reasons[1].startswith("1 connect")
    assert any(r == "marked down by another worker" for r in reasons)
    assert answers == {"good"}


async def server_state(port: int) -> dict:
    _, body = await http(port, path="/status")
    return json.loads(body)["upstreams"]["app"]["servers"][0]


async def test_active_checks_of_the_workers_reach_the_primarys_status(
    start_backend, start_balancer
):
    backend = start_backend("name", "only")
    check = {"interval": "100ms", "timeout": "200ms", "rise": 2, "fall": 2, "type": "tcp"}
    config = with_metrics(make_config([backend.address],
                                      health={"max_fails": 0, "check": check}))
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")  # followers log at DEBUG
    port = admin_port(balancer)
    assert await http(port, path="/healthz") == (200, b"ok\n")
    backend_port = backend.port
    backend.stop()
    address = re.escape(backend.address)
    in_both_workers(balancer, rf"server app/{address} down: 2 active checks failed")
    # The primary reads the workers' verdicts every sync interval.
    status = await wait_until(lambda: http(port, path="/healthz"), lambda r: r[0] == 503)
    assert status == (503, b"listener test: no server up in upstream app\n")
    server = await server_state(port)
    assert server["state"] == "down", server
    assert server["reason"] == "2 active checks failed (last: refused)", server
    start_backend("name", "only", port=backend_port)
    in_both_workers(balancer, rf"server app/{address} up: 2 active checks passed")
    assert await wait_until(lambda: http(port, path="/healthz"),
                            lambda r: r[0] == 200) == (200, b"ok\n")
    assert (await server_state(port))["state"] == "up"


async def test_primary_shows_down_while_any_live_worker_checks_fail(tmp_path):
    """The primary's view of two workers' columns in one shared table, without processes."""
    config = parse_config({
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"servers": ["127.0.0.1:1", "127.0.0.1:2"],
                              "health": {"check": {"type": "tcp"}}}},
    })
    rows = {"app/127.0.0.1:1": 0, "app/127.0.0.1:2": 1}
    table = SharedTable(tmp_path / "shared", 8, 2, create=True)
    workers = [Upstream(config.upstreams["app"],
                        lambda key, c=column: table.cell(rows[key], c)) for column in (0, 1)]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        view = ClusterView(config, table, rows, {"test": [[sock]]})
    first = view.upstreams["app"].servers[0]

    def refreshed() -> dict:
        view.refresh()
        return server_status(first)

    assert refreshed()["state"] == "up"
    workers[0].servers[0].health.set_active(False, "2 active checks failed (last: timeout)")
    assert refreshed()["state"] == "down"
    assert server_status(first)["reason"] == "2 active checks failed (last: timeout)"
    assert health_problems(view) == []  # the second server is still up
    for worker in workers:  # the second server fails too, in one worker only
        worker.servers[1].health.set_active(worker is workers[1], "checks")
    view.refresh()
    assert health_problems(view) == ["listener test: no server up in upstream app"]
    workers[0].servers[0].health.set_active(True, "2 active checks passed")
    assert refreshed()["state"] == "up"  # the other worker never said down
    assert health_problems(view) == []
    table.clear_column(0)  # the worker that failed the second server's checks was reaped
    view.refresh()
    assert server_status(view.upstreams["app"].servers[1])["state"] == "up"
    # A reason longer than its slot is cut, never mis-decoded.
    workers[1].servers[0].health.set_active(False, "é" * REASON_BYTES)
    assert refreshed()["reason"] == "é" * (REASON_BYTES // 2)
    table.close()


async def test_killed_worker_leaves_no_stale_active_connections(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, with_metrics(make_config([echo.address])))
    port = admin_port(balancer)
    pids = worker_pids(balancer)
    baselines = {pid: socket_count(pid) for pid in pids}
    held = []
    try:
        for _ in range(12):
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            held.append(writer)
            writer.write(b"x")
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        # Two fds per connection in the worker that holds it; kill the busier worker.
        holding = {pid: (socket_count(pid) - baselines[pid]) // 2 for pid in pids}
        assert sum(holding.values()) == 12, holding
        victim = max(holding, key=holding.__getitem__)
        assert total(await scrape(port), "balancer_active_connections") == 12
        os.kill(victim, signal.SIGKILL)
        # Logged once the primary has reaped it (mark_process_dead, its column cleared).
        await eventually(lambda: any(f"(pid {victim}) was killed by SIGKILL" in x
                                     for x in list(balancer.lines)), timeout=10)
        left = 12 - holding[victim]
        assert total(await scrape(port), "balancer_active_connections") == left
        assert (await server_state(port))["active"] == left
    finally:
        for writer in held:
            writer.close()


def processes_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds `entry` (a balancer's metrics directory)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if entry.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


async def test_stop_during_a_replacement_leaves_no_worker_behind(start_backend,
                                                                 start_balancer):
    echo = start_backend("echo")
    balancer = start_workers(start_balancer, make_config([echo.address]))
    victim = worker_pids(balancer)[0]
    # The workers of this balancer, and only they, were started with its metrics directory
    # in their environment (the primary set it after its own start).
    entry = next(e for e in Path(f"/proc/{victim}/environ").read_bytes().decode().split("\0")
                 if e.startswith("PROMETHEUS_MULTIPROC_DIR="))
    assert sorted(processes_with_env(entry)) == sorted(worker_pids(balancer))
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: any(f"(pid {victim}) was killed by SIGKILL" in x
                                 for x in list(balancer.lines)), timeout=10, interval=0.005)
    balancer.send_signal(signal.SIGTERM)  # while the replacement is starting
    assert balancer.proc.wait(20) == 0
    assert processes_with_env(entry) == []


def state_dir_of(balancer) -> Path:
    """The state folder (shared table, metrics files) of a running multi-worker balancer."""
    worker = worker_pids(balancer)[0]
    environ = Path(f"/proc/{worker}/environ").read_bytes().decode().split("\0")
    return Path(next(e for e in environ if e.startswith("PROMETHEUS_MULTIPROC_DIR="))
                .split("=", 1)[1])


async def test_state_folder_of_a_killed_primary_is_removed_at_the_next_start(
    start_backend, start_balancer, tmp_path, monkeypatch
):
    # A temp folder of their own: any balancer's start cleans up, also other tests' ones.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    echo = start_backend("echo")
    killed = start_workers(start_balancer, make_config([echo.address]))
    running = start_workers(start_balancer, make_config([echo.address]))
    leftover, kept = state_dir_of(killed), state_dir_of(running)
    assert leftover.parent == tmp_path
    workers = worker_pids(killed)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.proc.wait(10) == -signal.SIGKILL
    # Its workers notice the primary has gone and leave; the folder stays behind.
    await eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
                     timeout=20)
    assert leftover.is_dir()
    following = start_workers(start_balancer, make_config([echo.address]))
    assert not leftover.exists()
    assert kept.is_dir()  # a running balancer's folder stays
    assert any(f"removed {leftover}, left by a balancer (pid {killed.pid})" in line
               for line in following.lines)
    assert await echo_round_trip(following.port)


async def test_a_hung_worker_is_killed_and_replaced(start_backend, start_balancer):
    """A worker stopped with SIGSTOP (as a hung event loop) stops beating: past
    `worker_timeout` the primary kills it and starts another in its slot, which serves the
    clients that queued meanwhile and every new one (the kernel keeps handing the stopped
    worker its share: without the heartbeat, those clients hang for as long as it does)."""
    echo = start_backend("echo")
    config = make_config([echo.address])
    config["worker_timeout"] = "1s"
    balancer = start_workers(start_balancer, config)
    victim, survivor = slot_pids(balancer, 0)[-1], slot_pids(balancer, 1)[-1]
    os.kill(victim, signal.SIGSTOP)
    try:
        # Clients while it is stopped: about half land in its queue, and are served once
        # its replacement runs (1 s of silence, then a new worker boots).
        queued = await asyncio.gather(*(asyncio.wait_for(echo_round_trip(balancer.port), 10)
                                        for _ in range(20)))
        assert all(queued), queued.count(False)
        line = balancer.wait_for_line(rf"worker 0 \(pid {victim}\) has not run its event loop")
        assert "(worker_timeout 1s): killing it" in line
        balancer.wait_for_line(rf"worker 0 \(pid {victim}\) was killed: hung")
        await eventually(lambda: len(slot_pids(balancer, 0)) == 2, timeout=10)
        assert not Path(f"/proc/{victim}").exists()
        for _ in range(40):
            assert await asyncio.wait_for(echo_round_trip(balancer.port), 1.0)
        assert slot_pids(balancer, 1) == [survivor]  # the healthy worker was left alone
        assert sorted(worker_pids(balancer)) == sorted([survivor, slot_pids(balancer, 0)[-1]])
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)


async def test_a_passive_ejection_is_logged_once_for_the_balancer(start_backend,
                                                                 start_balancer):
    """The worker whose connects ejected the server logs it; the other worker, the primary
    and a replacement worker follow the shared state at DEBUG (each used to log its own
    "down" line: three for one outage with two workers, and a fourth from the replacement)."""
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], "round_robin",
                         health={"max_fails": 1, "fail_timeout": "30s"})
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")
    down = rf"server app/{re.escape(dead)} down: "
    deadline = time.monotonic() + 10
    while not announced(balancer, down):  # one client at a time, until one worker ejects
        assert time.monotonic() < deadline
        assert await who_answers(balancer.port) == "good"
        with contextlib.suppress(AssertionError):  # logged before the client was retried
            balancer.wait_for_log(lambda: bool(announced(balancer, down)), timeout=1.0)
    [(level, decider)] = announced(balancer, down)
    assert level == "WARNING"
    followers = re.compile(rf"DEBUG (?:\[worker (\d+)\] )?\S+: {down}marked down by "
                           "another worker")

    def following() -> set[str | None]:
        return {m.group(1) for x in list(balancer.lines) if (m := followers.search(x))}

    other = next(str(pid) for pid in worker_pids(balancer) if str(pid) != decider)
    balancer.wait_for_log(lambda: {other, None} <= following(), timeout=5)
    victim = slot_pids(balancer, 0)[-1]
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: len(slot_pids(balancer, 0)) == 2, timeout=10)
    replacement = str(slot_pids(balancer, 0)[-1])
    balancer.wait_for_log(lambda: replacement in following(), timeout=5)
    assert {await who_answers(balancer.port) for _ in range(6)} == {"good"}
    assert announced(balancer, down) == [("WARNING", decider)]


async def test_an_active_check_outage_is_logged_once_by_the_primary(start_backend,
                                                                   start_balancer):
    """Every worker runs its own checks and logs their verdict at DEBUG; the primary logs the
    cluster's once: down at WARNING, up again at INFO."""
    backend = start_backend("name", "only")
    check = {"interval": "100ms", "timeout": "200ms", "rise": 2, "fall": 2, "type": "tcp"}
    config = make_config([backend.address], health={"max_fails": 0, "check": check})
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")
    address = re.escape(backend.address)
    backend_port = backend.port
    backend.stop()
    in_both_workers(balancer, rf"server app/{address} down: 2 active checks failed")
    balancer.wait_for_log(lambda: bool(announced(balancer, rf"server app/{address} down")), 5)
    start_backend("name", "only", port=backend_port)
    in_both_workers(balancer, rf"server app/{address} up: 2 active checks passed")
    balancer.wait_for_log(lambda: bool(announced(balancer, rf"server app/{address} up")), 5)
    assert announced(balancer, rf"server app/{address} down: 2 active checks failed") == [
        ("WARNING", None)]
    assert announced(balancer, rf"server app/{address} up: active checks pass in every "
                               "worker") == [("INFO", None)]
    assert len(announced(balancer, rf"server app/{address} (up|down)")) == 2


async def knock(port: int) -> bytes:
    """One client that sends nothing and reads to EOF (b"" when no server could take it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_primary_reports_a_re_ejection_by_the_workers(start_balancer):
    """The only server is dead: ejected, tried again after fail_timeout, and ejected again
    by the workers. The primary's /healthz and /status, asked all along, must follow the
    workers (down, 503) and not move the server to half-open themselves."""
    dead = f"127.0.0.1:{free_port()}"
    config = with_metrics(make_config([dead], health={"max_fails": 1, "fail_timeout": "2s"}))
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")  # followers: DEBUG
    port = admin_port(balancer)
    assert await knock(balancer.port) == b""  # its connect is refused: ejected for 2 s
    await wait_until(lambda: http(port, path="/healthz"), lambda r: r[0] == 503)
    trial_failed = re.compile(rf"\[worker \d+\] .*server app/{re.escape(dead)} down: "
                              r"trial connection failed")
    deadline = time.monotonic() + 10
    while not any(trial_failed.search(line) for line in list(balancer.lines)):
        assert time.monotonic() < deadline, "no worker tried the server again"
        await http(port, path="/healthz")  # reports while the ejection runs out
        await http(port, path="/status")
        await knock(balancer.port)  # a client: the trial, once the ejection is over
        await asyncio.sleep(0.05)  # pacing: the ejection lasts two seconds
    # Out again (for 2 or 4 s, by whichever worker failed its trial last): so says the primary.
    status = await wait_until(lambda: http(port, path="/healthz"), lambda r: r[0] == 503,
                              timeout=1.8)
    assert status == (503, b"listener test: no server up in upstream app\n")
    server = await server_state(port)
    assert server["state"] == "down", server
    assert server["reason"] == "marked down by another worker", server


async def test_one_workers_check_verdict_leaves_anothers_ejection_alone(tmp_path):
    """Two workers' Upstreams on two columns of one shared table, without processes: worker
    0 ejects the server; worker 1, which has not synced yet, sees its checks fail (the same
    dead server trips both kinds of check at about the same time). The ejection must stay
    in the table, and worker 1 then follows it."""
    config = parse_config({
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"servers": ["127.0.0.1:1"],
                              "health": {"max_fails": 1, "fail_timeout": "30s",
                                         "check": {"type": "tcp"}}}},
    })
    table = SharedTable(tmp_path / "shared", 8, 2, create=True)
    workers = [Upstream(config.upstreams["app"], lambda key, c=column: table.cell(0, c))
               for column in (0, 1)]
    ejector, other = (worker.servers[0] for worker in workers)
    ejector.connect_failed("refused")
    until = ejector.cell.down_until
    assert until > time.monotonic() + 29
    other.health.set_active(False, "2 active checks failed (last: refused)")
    assert other.cell.down_until == until  # it used to write 0: "up" for everyone
    other.sync(time.monotonic())
    assert other.health.state == "down" and not other.usable()  # it follows the ejection
    other.health.set_active(True, "2 active checks passed")  # nor when they pass again:
    assert other.cell.down_until == until  # only its own half-open trial would decide
    assert other.health.state == "half_open"
    ejector.health.set_active(False, "2 active checks failed (last: refused)")
    assert ejector.cell.down_until == until
    table.close()


async def test_checks_of_the_workers_never_write_an_ejection_off(start_backend, start_balancer):
    """A worker ejects a dead server (30 s); the checks of both workers fail, then pass again
    once it is back. Checks are each worker's own: they end the ejection only as a half-open
    trial, and only that trial's success, a real connect, tells every worker (and the
    primary) that the server is up. They used to write the ejection off in the shared table
    for everyone, whether the server took connections or not."""
    good = start_backend("name", "good")
    flappy = start_backend("name", "flappy")
    flappy_port = flappy.port
    address = flappy.address
    # fall 3 x 300 ms: clients reach the dead server (and a worker ejects it) well before
    # the checks of either worker can say it is down.
    check = {"type": "tcp", "interval": "300ms", "timeout": "200ms", "rise": 2, "fall": 3}
    config = with_metrics(make_config([address, good.address], "round_robin",
                                      health={"max_fails": 1, "fail_timeout": "30s",
                                              "check": check}))
    balancer = start_workers(start_balancer, config, 2, "-v", "debug")  # own checks: DEBUG
    port = admin_port(balancer)
    flappy.stop()
    ejected = re.compile(rf"\[worker \d+\] .*server app/{re.escape(address)} down: 1 connect")
    deadline = time.monotonic() + 10
    while not any(ejected.search(line) for line in list(balancer.lines)):
        assert time.monotonic() < deadline, "no worker ejected the server"
        assert await who_answers(balancer.port) == "good"  # retried elsewhere
    # Both workers' checks fail (3 x 300 ms) meanwhile; neither says so (already down).
    await asyncio.sleep(2.0)  # a configured period: the checks' fall, with a margin
    start_backend("name", "flappy", port=flappy_port)
    in_both_workers(balancer, rf"server app/{re.escape(address)} \S+: 2 active checks passed")
    status = await wait_until(lambda: server_state(port),
                              lambda s: "active checks failed" not in s["reason"])
    assert status["state"] == "down", status  # the ejection stands until a trial
    assert status["reason"] == "marked down by another worker", status
    answers = set()
    for _ in range(20):  # the first client a worker sends there is its trial
        answers.add(await who_answers(balancer.port))
        if "flappy" in answers:
            break
    assert "flappy" in answers
    status = await wait_until(lambda: server_state(port), lambda s: s["state"] == "up")
    assert status["reason"] == "marked up by another worker", status

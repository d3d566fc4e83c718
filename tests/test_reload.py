"""Reload in one process: what a valid new config changes, and what it must keep."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from collections import Counter
from typing import Any

import pytest
import yaml

from .test_resilience import serve_until
from .utils import (
    admin_port,
    attempts_on,
    eventually,
    free_port,
    http,
    make_config,
    read_backend_line,
    reload,
    scrape,
    start,
    total,
    wait_until,
    who_answers,
    with_metrics,
)

pytestmark = pytest.mark.timeout(60)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def test_reload_changes_strategy_and_weights(start_backend, start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    config = make_config([a.address, b.address], "round_robin")
    balancer = start_balancer(config)
    assert Counter([await who_answers(balancer.port) for _ in range(4)]) == {"a": 2, "b": 2}
    config["upstreams"]["app"]["strategy"] = "weighted"
    config["upstreams"]["app"]["servers"] = [{"address": a.address, "weight": 3}, b.address]
    reload(balancer, config)
    assert Counter([await who_answers(balancer.port) for _ in range(8)]) == {"a": 6, "b": 2}


async def test_reload_keeps_a_down_server_down_and_the_pools(start_backend, start_balancer):
    """Servers that stay keep their passive-health record and their idle pool connections."""
    a = start_backend("echo", "a", "--report")
    dead = f"127.0.0.1:{free_port()}"
    config = with_metrics(make_config([dead, a.address], "round_robin", pool={"size": 2},
                                      health={"max_fails": 1, "fail_timeout": "30s"}))
    balancer = start_balancer(config, "-v", "debug")
    port = admin_port(balancer)
    assert [await read_backend_line(a) for _ in range(2)] == ["open", "open"]
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down")  # its pool's connect failed
    failed_before = attempts_on(balancer, dead)

    config["upstreams"]["app"]["servers"] = [dead, {"address": a.address, "weight": 2}]
    reload(balancer, config)
    status = json.loads((await http(port, path="/status"))[1])
    servers = {s["address"]: s for s in status["upstreams"]["app"]["servers"]}
    assert servers[dead]["state"] == "down" and servers[a.address]["weight"] == 2
    assert servers[a.address]["pool_idle"] == 2
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await echo(reader, writer, b"through a pooled connection") == \
        b"through a pooled connection"
    writer.close()
    await writer.wait_closed()
    assert attempts_on(balancer, dead) == failed_before  # still out: no connect attempted

    # Stop the balancer and balance the backend's books: every connection it ever saw is
    # reported open, then closed. A pool rebuilt by the reload would have opened 2 more.
    balancer.send_signal(signal.SIGTERM)
    assert balancer.proc.wait(10) == 0
    lines: list[str] = []
    while not lines or lines.count("open") != lines.count("closed"):
        lines.append(await read_backend_line(a))
        assert len(lines) < 20
    assert lines.count("open") == 1  # the refill after the client took one; no new pool


async def test_reload_lowering_pool_size_closes_the_surplus_at_once(start_backend,
                                                                   start_balancer):
    """4 -> 1: three idle connections are closed by the reload itself, not a minute later
    when they reach their idle timeout (60 s by default)."""
    backend = start_backend("echo", "e", "--report")
    config = with_metrics(make_config([backend.address], pool={"size": 4}))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    assert [await read_backend_line(backend) for _ in range(4)] == ["open"] * 4
    config["upstreams"]["app"]["pool"] = {"size": 1}
    reload(balancer, config)
    assert [await read_backend_line(backend, timeout=5) for _ in range(3)] == ["closed"] * 3
    status = json.loads((await http(port, path="/status"))[1])
    assert status["upstreams"]["app"]["servers"][0]["pool_idle"] == 1
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await echo(reader, writer, b"pooled") == b"pooled"  # the one kept still serves
    writer.close()


async def test_reload_swaps_a_listener_and_bounds_its_old_connections(
    start_backend, start_balancer
):
    e = start_backend("echo", "e")
    config = make_config([e.address])
    config["shutdown_timeout"] = "1s"
    balancer = start_balancer(config)
    old_port = balancer.port
    reader, writer = await asyncio.open_connection("127.0.0.1", old_port)
    assert await echo(reader, writer, b"before") == b"before"

    config["listeners"] = [{"name": "new", "bind": "127.0.0.1:0", "upstream": "app"}]
    reload(balancer, config)
    reloaded_at = time.monotonic()
    line = balancer.wait_for_line(r"listening on .*\(new -> upstream app\)")
    new_port = int(re.search(r":(\d+) \(new", line).group(1))
    new_reader, new_writer = await asyncio.open_connection("127.0.0.1", new_port)
    assert await echo(new_reader, new_writer, b"new") == b"new"
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", old_port)
    # The connection through the removed listener still works, until shutdown_timeout.
    assert await echo(reader, writer, b"after") == b"after"
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    assert time.monotonic() - reloaded_at >= 0.9
    balancer.wait_for_line(r"closing 1 connection\(s\) left from before the reload")
    assert await echo(new_reader, new_writer, b"still") == b"still"  # not a leftover
    for w in (writer, new_writer):
        w.close()


async def test_reload_removing_a_server_bounds_its_connections(start_backend, start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    config = make_config([a.address, b.address], "round_robin")
    config["shutdown_timeout"] = "1s"
    balancer = start_balancer(config)
    held = {}
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        name = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        held[name] = (reader, writer)
    assert set(held) == {"a", "b"}

    config["upstreams"]["app"]["servers"] = [a.address]
    reload(balancer, config)
    reloaded_at = time.monotonic()
    assert {await who_answers(balancer.port) for _ in range(4)} == {"a"}
    assert await echo(*held["b"], b"b still serves") == b"b still serves"
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(held["b"][0].readexactly(1), 5)
    assert time.monotonic() - reloaded_at >= 0.9
    assert await echo(*held["a"], b"a is kept") == b"a is kept"
    for _, writer in held.values():
        writer.close()



def test_reload_turning_slow_start_off_ends_a_ramp_in_progress():
    """A server mid-ramp when a reload sets `slow_start: 0` gets its full weight at once
    (the ramp divided by slow_start, so this used to raise ZeroDivisionError on every pick)."""
    from balancer.config import Address, HealthConfig, ServerConfig, UpstreamConfig
    from balancer.upstream import Upstream

    def config(slow_start: float) -> UpstreamConfig:
        servers = tuple(ServerConfig(Address("127.0.0.1", 3001 + i), weight=4)
                        for i in range(2))
        return UpstreamConfig("app", servers, strategy="least_conn",
                              health=HealthConfig(max_fails=1), slow_start=slow_start)

    upstream = Upstream(config(30.0))
    first = upstream.servers[0]
    bring_back(first)
    assert first.weight < 4
    upstream.reconfigure(config(0.0), loop=None)  # type: ignore[arg-type]
    assert first.weight == 4
    assert upstream.pick("10.0.0.1") is not None


def bring_back(server: Any) -> None:
    """Take a server down and bring it back, so that its slow start ramps from the floor."""
    server.health.connect_failed("refused")
    server.health.down_until = 0.0
    server.health.connect_started()
    server.health.connect_succeeded()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rejected(balancer, pattern: str) -> None:
    """Wait for the balancer to log that a reload was rejected for `pattern`."""
    balancer.wait_for_line(rf"reload rejected: {pattern}")


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_rotates_the_admin_token(start_backend, start_balancer, workers):
    """A leaked token is rotated by SIGHUP: the old one stops working at once."""
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]), admin_token="old")
    balancer = start(start_balancer, config, workers)
    port = admin_port(balancer)
    drain, enable = (f"/servers/app/{a.address}/{action}" for action in ("drain", "enable"))
    assert (await http(port, "POST", drain, bearer("old")))[0] == 200

    config["metrics"]["admin_token"] = "new"
    reload(balancer, config)
    assert (await http(port, "POST", enable, bearer("old")))[0] == 401
    status, body = await http(port, "POST", enable, bearer("new"))
    assert status == 200 and json.loads(body)["state"] == "up"


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_moves_the_admin_endpoint(start_backend, start_balancer, workers):
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]))
    balancer = start(start_balancer, config, workers)
    old_port = admin_port(balancer)
    new_port = free_port()
    config["metrics"]["bind"] = f"127.0.0.1:{new_port}"
    reload(balancer, config)
    balancer.wait_for_line(rf"admin endpoint on http://127\.0\.0\.1:{new_port}/")
    assert await http(new_port, path="/healthz") == (200, b"ok\n")
    with pytest.raises(ConnectionRefusedError):
        await http(old_port, path="/healthz")
    assert await who_answers(balancer.port) == "a"


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_to_a_taken_admin_port_changes_nothing(start_backend, start_balancer,
                                                            workers):
    """The new bind fails: the reload is rejected as a whole, so the old endpoint and the old
    token stay (a half-applied reload would rotate the token on a port about to go away)."""
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]), admin_token="old")
    balancer = start(start_balancer, config, workers)
    port = admin_port(balancer)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config["metrics"] = {"bind": f"127.0.0.1:{taken.getsockname()[1]}",
                             "admin_token": "new"}
        config["workers"] = workers
        balancer.config_path.write_text(yaml.safe_dump(config))
        balancer.send_signal(signal.SIGHUP)
        rejected(balancer, r"metrics\.bind: cannot listen on 127\.0\.0\.1:\d+: "
                           r"Address already in use \(the admin endpoint stays where it was\)")
    drain = f"/servers/app/{a.address}/drain"
    assert (await http(port, "POST", drain, bearer("new")))[0] == 401
    assert (await http(port, "POST", drain, bearer("old")))[0] == 200
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    assert total(samples, "balancer_config_reloads_total", result="success") == 0
    assert not any("configuration reloaded" in line for line in balancer.lines)


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_removing_the_metrics_section_is_rejected(start_backend, start_balancer,
                                                               workers):
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]))
    balancer = start(start_balancer, config, workers)
    port = admin_port(balancer)
    del config["metrics"]
    config["workers"] = workers
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    rejected(balancer, r"metrics: removing the metrics section needs a restart")
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    assert not any("configuration reloaded" in line for line in balancer.lines)


HOSTILE = {
    "deep": ("listeners: " + "[" * 5000 + "]" * 5000 + "\n",
             r"nested deeper than 32 levels at line 1, column \d+"),
    "large": ("#" * (3 << 20) + "\n", r"too large: over 1 MiB"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("hostile", sorted(HOSTILE))
async def test_a_hostile_file_on_sighup_is_a_counted_failure(start_backend, start_balancer,
                                                            hostile, workers):
    """A file nested 5,000 deep used to raise RecursionError in a task nobody awaited: no
    message, no failure counted."""
    a = start_backend("name", "a")
    balancer = start(start_balancer, with_metrics(make_config([a.address])), workers)
    port = admin_port(balancer)
    text, problem = HOSTILE[hostile]
    balancer.config_path.write_text(text)
    balancer.send_signal(signal.SIGHUP)
    rejected(balancer, f"{re.escape(str(balancer.config_path))}: {problem}")
    assert await who_answers(balancer.port) == "a"
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    assert not [line for line in balancer.lines if "Traceback" in line or "never" in line]


async def test_reloading_a_large_config_does_not_stall_traffic(start_backend, start_balancer):
    """A valid config of 4,000 servers takes seconds to parse: done on the event loop, every
    connection waited that long. The stall allowed is measured against the parse time on
    this machine now, so a loaded machine slows both sides alike. (One process only: with
    workers the primary parses, and it carries no client bytes to measure.)"""
    from balancer.config import load_config

    e = start_backend("echo", "e")
    spares = [{"address": f"127.1.{i // 250}.{i % 250 + 1}:9", "weight": 3, "max_conns": 100,
               "backup": True} for i in range(4000)]  # backups: never used while e is up
    config = make_config([e.address, *spares])
    balancer = start_balancer(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await echo(reader, writer, b"warm") == b"warm"
    started = time.perf_counter()
    load_config(balancer.config_path)
    parse_seconds = time.perf_counter() - started
    assert parse_seconds > 0.5  # big enough to mean something

    config["upstreams"]["app"]["servers"][1]["weight"] = 4
    before = sum("configuration reloaded" in line for line in balancer.lines)
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    slowest = 0.0
    deadline = time.monotonic() + 30
    while sum("configuration reloaded" in line for line in balancer.lines) == before:
        assert time.monotonic() < deadline, "no reload within 30 s"
        sent = time.perf_counter()
        assert await echo(reader, writer, b"ping") == b"ping"
        slowest = max(slowest, time.perf_counter() - sent)
    writer.close()
    assert slowest < parse_seconds / 3, (slowest, parse_seconds)


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_turns_the_access_log_on_and_refuses_a_file_it_cannot_open(
        start_backend, start_balancer, tmp_path, workers):
    """`log` used to be reported as reloaded and left as it was."""
    e = start_backend("echo", "e")
    config = with_metrics(make_config([e.address]))
    balancer = start(start_balancer, config, workers)
    port = admin_port(balancer)
    access = tmp_path / "access.log"
    config["log"] = {"access": str(access), "format": "json"}
    reload(balancer, config)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await echo(reader, writer, b"logged") == b"logged"
    writer.close()
    await eventually(lambda: access.exists() and access.read_text().count("\n") == 1)
    assert json.loads(access.read_text())["bytes_up"] == 6

    config["log"] = {"access": str(tmp_path / "missing" / "access.log")}
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    rejected(balancer, r"log\.access: cannot open .*missing/access\.log: "
                       r"No such file or directory")
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    # With workers the primary refuses it: workers refusing it one by one were replaced by
    # workers that could not boot on it.
    assert not [line for line in balancer.lines if "could not apply" in line]


def test_reload_shortening_slow_start_mid_ramp_ends_the_ramp_in_time():
    """60 s -> 10 s, 10 s into the ramp: the ramp ends within 10 s, climbing from where the
    shorter ramp puts it, instead of sitting at the 5% floor for 40 s and then jumping."""
    from balancer.config import Address, HealthConfig, ServerConfig, UpstreamConfig
    from balancer.upstream import SLOW_START_FLOOR, Upstream

    def config(slow_start: float) -> UpstreamConfig:
        servers = (ServerConfig(Address("127.0.0.1", 3001), weight=100),)
        return UpstreamConfig("app", servers, health=HealthConfig(max_fails=1),
                              slow_start=slow_start)

    upstream = Upstream(config(60.0))
    server = upstream.servers[0]
    bring_back(server)
    server.ramp_until -= 10  # 10 s into the 60 s ramp
    assert 16 < server.weight < 17.5
    upstream.reconfigure(config(10.0), loop=None)  # type: ignore[arg-type]
    assert server.ramp_until <= time.monotonic() + 10.0
    assert server.weight >= 100 * SLOW_START_FLOOR
    server.ramp_until -= 5  # halfway through the new 10 s
    assert 49 < server.weight < 51
    server.ramp_until -= 5.1
    assert server.weight == 100 and server.ramp_until == 0.0


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_turning_active_checks_off_clears_their_verdict(start_backend,
                                                                    start_balancer, workers):
    """The only server fails its HTTP checks (it does not speak HTTP) and gets no traffic;
    a reload without checks must bring it back, or nothing ever would."""
    a = start_backend("name", "a")
    check = {"type": "http", "interval": "100ms", "timeout": "200ms", "rise": 1, "fall": 1}
    config = with_metrics(make_config([a.address], health={"check": check}))
    balancer = start(start_balancer, config, workers)
    port = admin_port(balancer)
    await wait_until(lambda: http(port, path="/healthz"), lambda r: r[0] == 503)
    config["upstreams"]["app"]["health"] = {}
    reload(balancer, config)
    assert await wait_until(lambda: http(port, path="/healthz"),
                            lambda r: r[0] == 200) == (200, b"ok\n")
    server = json.loads((await http(port, path="/status"))[1])["upstreams"]["app"]["servers"][0]
    assert server["state"] == "up", server
    assert {await who_answers(balancer.port) for _ in range(4)} == {"a"}


async def test_reload_turning_passive_checks_off_ends_an_ejection(start_backend,
                                                                   start_balancer):
    """`max_fails: 0` by reload while a server is ejected: it is back in rotation (every
    client that tries it is retried elsewhere), instead of half-open with its refused
    trial held for ever."""
    good = start_backend("name", "good")
    dead = f"127.0.0.1:{free_port()}"
    config = make_config([dead, good.address], "round_robin",
                         health={"max_fails": 1, "fail_timeout": "1s"})
    balancer = start_balancer(config, "-v", "debug")
    await serve_until(balancer.port, lambda: attempts_on(balancer, dead) >= 1)
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down: 1 connect failures")
    config["upstreams"]["app"]["health"] = {"max_fails": 0, "fail_timeout": "1s"}
    reload(balancer, config)
    balancer.wait_for_line(rf"server app/{re.escape(dead)} up: passive checks turned off")
    before = attempts_on(balancer, dead)
    answers = await serve_until(balancer.port, lambda: attempts_on(balancer, dead) >= before + 3)
    assert set(answers) == {"good"}

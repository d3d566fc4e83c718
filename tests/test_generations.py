"""Config generations: every worker ends on the primary's current config, whatever happens
during a reload (a worker restarting, a worker failing, a stop, a config of any size)."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket

import pytest

from .utils import (
    LISTENING,
    admin_port,
    admin_status,
    converged,
    echo_round_trip,
    eventually,
    fd_count,
    http,
    make_config,
    rewrite,
    scrape,
    start_workers,
    total,
    wait_until,
    who_answers,
    with_metrics,
    worker_pids,
)

pytestmark = pytest.mark.timeout(120)


def listening_port(balancer, name: str) -> int:
    """The port of listener `name` (also one a reload added)."""
    line = balancer.wait_for_line(rf"listening on .* \({name} -> upstream")
    match = LISTENING.search(line)
    assert match is not None
    return int(match.group(2))


def two_listeners(servers: list[str]) -> dict:
    config = with_metrics(make_config(servers))
    config["listeners"].append({"name": "extra", "bind": "127.0.0.1:0", "upstream": "app"})
    return config


@pytest.mark.both_loops  # the workers' end of the channel runs on their loop
async def test_a_reload_during_a_worker_restart_reaches_the_new_worker(start_backend,
                                                                       start_balancer):
    b1, b2 = start_backend("name", "b1"), start_backend("name", "b2")
    balancer = start_workers(start_balancer, two_listeners([b1.address]))
    port = admin_port(balancer)
    extra = balancer.ports["extra"]
    assert converged(1)(await admin_status(port))
    os.kill(worker_pids(balancer)[0], signal.SIGKILL)
    await asyncio.sleep(0.05)  # the scenario: the replacement is booting when SIGHUP comes
    reloaded = with_metrics(make_config([b2.address]))
    reloaded["workers"] = 2
    rewrite(balancer, reloaded)
    balancer.send_signal(signal.SIGHUP)
    state = await wait_until(lambda: admin_status(port), converged(2), timeout=20)
    assert [s["address"] for s in state["upstreams"]["app"]["servers"]] == [b2.address]
    answers = [await who_answers(balancer.port) for _ in range(200)]
    assert answers.count("b2") == 200, answers.count("b1")
    with pytest.raises(ConnectionRefusedError):  # no worker serves the removed listener
        await asyncio.open_connection("127.0.0.1", extra)


def many_servers(real: str, count: int) -> dict:
    """`real` and `count - 1` backups that nothing listens on: traffic goes to `real` only,
    and the config is far larger than a SOCK_SEQPACKET message (~212 KB)."""
    servers: list = [real]
    servers += [{"address": f"127.0.0.2:{10000 + i}", "backup": True} for i in range(count - 1)]
    config = with_metrics(make_config(servers))
    config["workers"] = 2
    return config


@pytest.mark.both_loops  # the workers' end of the channel runs on their loop
async def test_5000_servers_start_with_two_workers(start_backend, start_balancer):
    a = start_backend("name", "a")
    balancer = start_workers(start_balancer, many_servers(a.address, 5000))
    state = await admin_status(admin_port(balancer))
    assert converged(1)(state)
    assert len(state["upstreams"]["app"]["servers"]) == 5000
    assert [await who_answers(balancer.port) for _ in range(20)] == ["a"] * 20


@pytest.mark.both_loops  # the workers' end of the channel runs on their loop
async def test_a_reload_from_10_to_5000_servers_applies(start_backend, start_balancer):
    a = start_backend("name", "a")
    balancer = start_workers(start_balancer, many_servers(a.address, 10))
    port = admin_port(balancer)
    rewrite(balancer, many_servers(a.address, 5000))
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line(r"configuration reloaded from .* \(generation 2\)", timeout=30)
    state = await admin_status(port)
    assert converged(2)(state)
    assert len(state["upstreams"]["app"]["servers"]) == 5000
    assert total(await scrape(port), "balancer_config_reloads_total", result="success") == 1
    assert [await who_answers(balancer.port) for _ in range(20)] == ["a"] * 20


async def test_a_channel_error_fails_the_reload_and_the_slot_is_restarted(start_backend,
                                                                          start_balancer):
    echo = start_backend("echo")
    config = with_metrics(make_config([echo.address]))
    balancer = start_workers(start_balancer, config)
    port = admin_port(balancer)
    victim = worker_pids(balancer)[0]
    # No room for one more fd in that worker: the sockets of a new listener cannot arrive.
    limit = fd_count(victim)
    resource.prlimit(victim, resource.RLIMIT_NOFILE, (limit, limit))
    config = two_listeners([echo.address])
    config["workers"] = 2
    rewrite(balancer, config)
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line(rf"worker \d \(pid {victim}\) could not apply generation 2")
    balancer.wait_for_line(r"reload: generation 2 .* 1 worker\(s\) could not apply it")
    await wait_until(lambda: admin_status(port), converged(2), timeout=20)
    assert victim not in worker_pids(balancer)
    assert total(await scrape(port), "balancer_config_reloads_total", result="failure") == 1
    extra = listening_port(balancer, "extra")
    # Both workers serve the new listener (the kernel spreads 40 connections over both).
    held = []
    for _ in range(40):
        reader, writer = await asyncio.open_connection("127.0.0.1", extra)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
        held.append(writer)
    for writer in held:
        writer.close()


async def test_sigterm_during_a_reload_closes_the_removed_listener(start_backend,
                                                                  start_balancer):
    echo = start_backend("echo")
    config = two_listeners([echo.address])
    config["shutdown_timeout"] = "20s"
    balancer = start_workers(start_balancer, config)
    removed = balancer.ports["extra"]
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"x")  # held open: the workers drain it, so the primary stays up
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
    stuck = worker_pids(balancer)[1]
    os.kill(stuck, signal.SIGSTOP)  # the primary waits for its answer
    try:
        config = with_metrics(make_config([echo.address]))
        config["workers"] = 2
        config["shutdown_timeout"] = "20s"
        rewrite(balancer, config)
        balancer.send_signal(signal.SIGHUP)
        balancer.wait_for_line(r"applying generation 2 in 2 worker")
        balancer.send_signal(signal.SIGTERM)
        balancer.wait_for_line(r"received SIGTERM")
    finally:
        os.kill(stuck, signal.SIGCONT)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", removed), timeout=5).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:  # queued on a socket that closed under it: closing
            return False
        return False

    await eventually(refused, timeout=5)
    assert balancer.alive()  # still draining the held connection
    writer.close()
    await writer.wait_closed()
    assert await asyncio.to_thread(balancer.proc.wait, 20) == 0


async def test_workers_agree_after_reloads_and_kills(start_backend, start_balancer):
    """A short version of the soak test: reloads while workers die end on one generation."""
    backends = [start_backend("echo", f"b{i}") for i in range(3)]
    config = with_metrics(make_config([backends[0].address]))
    balancer = start_workers(start_balancer, config)
    port = admin_port(balancer)
    generation = 1
    for i in range(6):
        if i % 2 == 0:
            os.kill(worker_pids(balancer)[i % 2], signal.SIGKILL)
        servers = [b.address for b in backends[: 1 + i % 3]]
        reloaded = with_metrics(make_config(servers))
        reloaded["workers"] = 2
        rewrite(balancer, reloaded)
        generation += 1
        balancer.send_signal(signal.SIGHUP)
        balancer.wait_for_line(rf"applying generation {generation} ", timeout=10)
    await wait_until(lambda: admin_status(port), converged(generation), timeout=30)
    assert all([await echo_round_trip(balancer.port) for _ in range(20)])


def new_addresses(real: str, round_: int, count: int = 1000) -> dict:
    """`real` and `count - 1` backups on addresses no earlier round used."""
    servers: list = [real]
    servers += [{"address": f"127.0.0.{3 + round_ // 60}:{1024 + (round_ % 60) * 1000 + i}",
                 "backup": True} for i in range(count - 1)]
    config = with_metrics(make_config(servers))
    config["workers"] = 2
    return config


async def test_reloads_to_new_addresses_never_fill_the_shared_table(start_backend,
                                                                    start_balancer):
    a = start_backend("name", "a")
    balancer = start_workers(start_balancer, new_addresses(a.address, 0))
    port = admin_port(balancer)
    rounds = 18  # 18 x 1,000 addresses: more than the table's 16,384 rows if none is freed
    for round_ in range(1, rounds + 1):
        rewrite(balancer, new_addresses(a.address, round_))
        balancer.send_signal(signal.SIGHUP)
        balancer.wait_for_log(lambda r=round_: any(
            f"(generation {r + 1})" in x or "reload rejected" in x for x in balancer.lines),
            timeout=30)
    assert not [x for x in balancer.lines if "reload rejected" in x]
    # The log, not /metrics: rendering the label sets of 19,000 servers takes the primary
    # seconds (the metrics of removed servers stay).
    assert len([x for x in balancer.lines if "configuration reloaded from" in x]) == rounds
    assert converged(rounds + 1)(await admin_status(port))
    assert await who_answers(balancer.port) == "a"


async def test_a_drained_removed_and_readded_server_comes_back_up(start_backend,
                                                                  start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    balancer = start_workers(start_balancer, with_metrics(make_config([a.address, b.address])))
    port = admin_port(balancer)
    code, _ = await http(port, "POST", f"/servers/app/{a.address}/drain")
    assert code == 200
    for generation, servers in ((2, [b.address]), (3, [a.address, b.address])):
        config = with_metrics(make_config(servers))
        config["workers"] = 2
        rewrite(balancer, config)
        balancer.send_signal(signal.SIGHUP)
        await wait_until(lambda: admin_status(port), converged(generation), timeout=20)
    state = await admin_status(port)
    assert [s["state"] for s in state["upstreams"]["app"]["servers"]] == ["up", "up"]
    answers = [await who_answers(balancer.port) for _ in range(40)]
    assert answers.count("a") >= 10, answers.count("a")  # round robin in both workers


async def test_a_worker_that_does_not_answer_a_reload_is_replaced(start_backend,
                                                                  start_balancer):
    """Its late answer is never read as the answer to the next reload: that one is applied
    by every worker (the replacement included)."""
    b1, b2, b3 = (start_backend("name", n) for n in ("b1", "b2", "b3"))
    balancer = start_workers(start_balancer, with_metrics(make_config([b1.address])))
    port = admin_port(balancer)
    stuck = worker_pids(balancer)[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        config = with_metrics(make_config([b2.address]))
        config["workers"] = 2
        rewrite(balancer, config)
        balancer.send_signal(signal.SIGHUP)
        balancer.wait_for_line(rf"worker \d \(pid {stuck}\) could not apply generation 2: no "
                               r"answer within 15s; replacing it", timeout=25)
        balancer.wait_for_line(r"worker \d started \(pid \d+\) on generation 2", timeout=20)
    finally:
        os.kill(stuck, signal.SIGCONT)  # it answers late, then drains and exits
    config = with_metrics(make_config([b3.address]))
    config["workers"] = 2
    rewrite(balancer, config)
    balancer.send_signal(signal.SIGHUP)
    await wait_until(lambda: admin_status(port), converged(3), timeout=20)
    assert stuck not in worker_pids(balancer)
    assert [await who_answers(balancer.port) for _ in range(100)] == ["b3"] * 100
    samples = await scrape(port)
    assert total(samples, "balancer_config_reloads_total", result="failure") == 1
    assert total(samples, "balancer_config_reloads_total", result="success") == 1

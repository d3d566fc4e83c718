"""DNS service discovery end to end: a real dnsmasq, real backends on 127.0.0.2, .3, ... (one
port, as replicas would be), and the real `balancer` process following the answers."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .dnsmasq import Dnsmasq, available
from .utils import (
    admin_port,
    admin_status,
    free_port,
    scrape,
    start_workers,
    wait_until,
    who_answers,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops,
              pytest.mark.skipif(not available(), reason="dnsmasq (dnsmasq-base) not installed")]

INTERVAL = "200ms"
HOLD = 1.5


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path / "dns")
    yield server
    server.stop()


def port_free_on(hosts: range, attempts: int = 20) -> int:
    """A port that every 127.0.0.N of `hosts` can bind (as the backends will, with
    SO_REUSEADDR): free on 127.0.0.1 alone is not enough, a socket on 127.0.0.2 may hold it."""
    for _ in range(attempts):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((f"127.0.0.{host}", port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no port free on all of 127.0.0.{hosts.start}-{hosts.stop - 1}")


@pytest.fixture
def replicas(start_backend) -> Any:
    """Factory: `replicas(2, 3, 4)` -> the port of `name` backends on 127.0.0.2, .3, .4, one
    port for all, each answering with its own address."""
    port = port_free_on(range(1, 10))

    def start(*hosts: int) -> int:
        for host in hosts:
            start_backend("name", f"127.0.0.{host}", "--host", f"127.0.0.{host}", port=port)
        return port

    return start


def ips(*hosts: int) -> list[str]:
    return [f"127.0.0.{host}" for host in hosts]


def dns_config(dns: Dnsmasq, servers: list[Any], strategy: str = "round_robin",
               hold: float = HOLD, **top: Any) -> dict:
    return {
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"strategy": strategy, "servers": servers}},
        "resolvers": {"nameservers": [dns.nameserver], "interval": INTERVAL,
                      "timeout": "500ms", "hold": f"{hold}s"},
        "metrics": {"bind": "127.0.0.1:0"},
        **top,
    }


async def servers_of(port: int) -> dict[str, dict]:
    status = await admin_status(port)
    return {s["address"]: s for s in status["upstreams"]["app"]["servers"]}


def having(*addresses: str) -> Any:
    return lambda servers: set(servers) == set(addresses)


async def answers(port: int, count: int) -> Counter[str]:
    """Who answered each of `count` clients (one after the other)."""
    seen: Counter[str] = Counter()
    for _ in range(count):
        seen[await who_answers(port)] += 1
    return seen


def new_line(balancer: Any, pattern: str, since: int, timeout: float = 5.0) -> None:
    """Wait for a log line matching `pattern` among those after the first `since`."""
    regex = re.compile(pattern)
    balancer.wait_for_log(lambda: any(regex.search(x) for x in balancer.lines[since:]), timeout)


def change_line(port: int, added: list[str] = (), removed: list[str] = (),  # type: ignore[assignment]
                source: str = "dns app") -> str:
    """The regex of membership's one line per change."""
    parts = [rf"\+{re.escape(f'{a}:{port}')}" for a in added]
    parts += [rf"-{re.escape(f'{r}:{port}')}" for r in removed]
    return rf"upstream app: {' '.join(parts)} \({re.escape(source)}\)"


async def test_scale_up_and_down_while_a_connection_through_a_leaving_server_finishes(
        dns, replicas, start_balancer):
    port = replicas(2, 3, 4, 5)
    await dns.set("app", ips(2, 3))
    balancer = start_balancer(dns_config(dns, [{"discover": f"app:{port}", "max_conns": 50}]))
    admin = admin_port(balancer)
    servers = await wait_until(lambda: servers_of(admin), having(*(f"{a}:{port}"
                                                                  for a in ips(2, 3))))
    assert {(s["source"], s["max_conns"]) for s in servers.values()} == {("dns app", 50)}
    info = {dict(labels)["server"]: (dict(labels)["source"], value)
            for (name, labels), value in (await scrape(admin)).items()
            if name == "balancer_server_info"}
    assert info == {f"{a}:{port}": ("dns app", 1.0) for a in ips(2, 3)}
    assert set(await answers(balancer.port, 4)) == set(ips(2, 3))

    await dns.set("app", ips(2, 5, 3, 4))  # scale up: the new two join at once
    balancer.wait_for_line(change_line(port, added=ips(4, 5)), timeout=5)
    assert set(await answers(balancer.port, 8)) == set(ips(2, 3, 4, 5))

    # A client on .5 stays connected while .4 and .5 leave the answer.
    for _ in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        if (await reader.readline()).decode().strip() == "127.0.0.5":
            break
        writer.close()
    else:
        raise AssertionError("round robin over 4 servers never reached 127.0.0.5")
    try:
        await dns.set("app", ips(3, 2))
        balancer.wait_for_line(change_line(port, removed=ips(4, 5)), timeout=5)
        assert set(await answers(balancer.port, 6)) == set(ips(2, 3))  # no new clients there
        writer.write(b"still here\n")  # ... and the held one goes on
        assert await asyncio.wait_for(reader.readline(), 5) == b"still here\n"
        status = await wait_until(lambda: servers_of(admin), having(*(f"{a}:{port}"
                                                                     for a in ips(2, 3))))
        assert all(s["state"] == "up" for s in status.values())
    finally:
        writer.close()
    # Its metrics go with its last connection.
    gone = f"127.0.0.5:{port}"
    await wait_until(lambda: scrape(admin), lambda samples: not any(
        dict(labels).get("server") == gone for _, labels in samples))


async def test_traffic_goes_on_for_hold_when_the_dns_server_goes_away_then_stops(
        dns, replicas, start_balancer):
    port = replicas(2, 3)
    await dns.set("app", ips(2, 3))
    balancer = start_balancer(dns_config(dns, [f"127.0.0.3:{port}",
                                               {"discover": f"app:{port}"}], hold=HOLD))
    admin = admin_port(balancer)
    await wait_until(lambda: servers_of(admin), having(f"127.0.0.2:{port}", f"127.0.0.3:{port}"))
    dns.stop()
    stopped = time.monotonic()
    since = len(balancer.lines)
    balancer.wait_for_line(r"dns app: lookup failed \(.*\): keeping the last answer "
                           rf"\(2 server\(s\)\) for up to {HOLD:g}s", timeout=5)
    assert set(await answers(balancer.port, 4)) == set(ips(2, 3))  # within hold: as before
    balancer.wait_for_line(rf"dns app: lookup failed \(.*\) for {HOLD:g}s: no servers from "
                           "it in upstream app now", timeout=HOLD + 5)
    assert time.monotonic() - stopped >= HOLD - 0.3
    # Membership names what left the running set: 127.0.0.3 is also a static server (a
    # static address wins over a found one, and outlives it), so it neither left nor, below,
    # joins.
    balancer.wait_for_line(change_line(port, removed=ips(2)), timeout=5)
    assert set(await answers(balancer.port, 4)) == {"127.0.0.3"}
    assert len([line for line in balancer.lines if "keeping the last answer" in line]) == 1
    dns.start()
    balancer.wait_for_line(r"dns app: answers again", timeout=5)
    new_line(balancer, change_line(port, added=ips(2)), since)
    await wait_until(lambda: servers_of(admin), having(f"127.0.0.2:{port}", f"127.0.0.3:{port}"))


async def test_srv_records_give_ports_and_weights(tmp_path, replicas, start_balancer):
    port = replicas(2, 3)
    dns = Dnsmasq(tmp_path / "dns", srv=[f"_app._tcp.svc,a.svc,{port},0,3",
                                         f"_app._tcp.svc,b.svc,{port},0,1"])
    try:
        await dns.set("a.svc", ips(2))
        await dns.set("b.svc", ips(3))
        balancer = start_balancer(dns_config(dns, [{"discover": "_app._tcp.svc"}], "weighted"))
        admin = admin_port(balancer)
        servers = await wait_until(lambda: servers_of(admin),
                                   having(f"127.0.0.2:{port}", f"127.0.0.3:{port}"))
        assert {a: (s["weight"], s["source"]) for a, s in servers.items()} == {
            f"127.0.0.2:{port}": (3, "dns _app._tcp.svc"),
            f"127.0.0.3:{port}": (1, "dns _app._tcp.svc")}
        # Smooth weighted round robin: exactly 3 to 1 over every 4 picks.
        assert await answers(balancer.port, 16) == {"127.0.0.2": 12, "127.0.0.3": 4}
    finally:
        dns.stop()


async def test_two_balancers_send_each_client_to_the_same_server_whatever_the_order(
        tmp_path, replicas, start_balancer):
    """dnsmasq rotates its answers, and each balancer has its own nameserver listing the
    addresses in another order: the ring is built from addresses, never list positions."""
    hosts = list(range(2, 9))
    port = replicas(*hosts)
    first, second = Dnsmasq(tmp_path / "one"), Dnsmasq(tmp_path / "two")
    try:
        await first.set("app", ips(*hosts))
        await second.set("app", ips(*reversed(hosts)))
        balancers = [start_balancer(dns_config(dns, [{"discover": f"app:{port}"}], "ip_hash"))
                     for dns in (first, second)]
        everyone = having(*(f"{a}:{port}" for a in ips(*hosts)))
        for balancer in balancers:
            await wait_until(lambda b=balancer: servers_of(admin_port(b)), everyone)
        clients = [f"127.0.{third}.{fourth}" for third in (1, 2) for fourth in range(1, 21)]
        picks = [[await who_answers(b.port, local_host=client) for client in clients]
                 for b in balancers]
        assert picks[0] == picks[1]
        assert len(set(picks[0])) >= 4  # the clients spread; not all on one server
    finally:
        first.stop()
        second.stop()


async def test_with_workers_the_primary_resolves_and_the_workers_follow(
        dns, replicas, start_balancer):
    port = replicas(2, 3, 4)
    await dns.set("app", ips(2))
    balancer = start_workers(start_balancer, dns_config(dns, [{"discover": f"app:{port}"}]), 2)
    admin = admin_port(balancer)
    await wait_until(lambda: servers_of(admin), having(f"127.0.0.2:{port}"))
    await dns.set("app", ips(2, 3, 4))
    balancer.wait_for_line(change_line(port, added=ips(3, 4)), timeout=5)
    await wait_until(lambda: servers_of(admin), having(*(f"{a}:{port}" for a in ips(2, 3, 4))))

    async def every_server_answers() -> set[str]:
        return set(await answers(balancer.port, 6))

    await wait_until(every_server_answers, lambda seen: seen == set(ips(2, 3, 4)), timeout=10)
    # One process resolved: one line per change, not one per worker.
    assert len([line for line in balancer.lines if "(dns app)" in line
                and "+127.0.0.3" in line]) == 1
    await dns.set("app", ips(4))
    balancer.wait_for_line(change_line(port, removed=ips(2, 3)), timeout=5)
    await wait_until(every_server_answers, lambda seen: seen == {"127.0.0.4"}, timeout=10)

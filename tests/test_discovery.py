"""DNS discovery's resolver and watches (balancer/discovery.py) against a real dnsmasq."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from balancer.config import (
    MAX_IP_HASH_WEIGHT,
    Config,
    DiscoverConfig,
    ResolversConfig,
    ServerConfig,
    UpstreamConfig,
)
from balancer.discovery import MAX_SERVERS, DnsDiscovery, NameWatch, Resolver, found, servers_of

from .dnsmasq import Dnsmasq, available

pytestmark = pytest.mark.skipif(not available(), reason="dnsmasq (dnsmasq-base) not installed")

SRV = ["_app._tcp.svc,a.svc,3001,0,10", "_app._tcp.svc,b.svc,3002,0,30",
       "_app._tcp.svc,c.svc,3003,5,7", "_app._tcp.svc,gone.svc,3004,0,5"]


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(tmp_path / "dns", srv=SRV)
    yield server
    server.stop()


def resolver(dns: Dnsmasq, **settings: float) -> Resolver:
    return Resolver(ResolversConfig(nameservers=(("127.0.0.1", dns.port),), **settings))


class Updates:
    """Membership.update as discovery calls it, recorded and awaitable."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[ServerConfig, ...], float]] = []
        self.queue: asyncio.Queue[tuple[str, ...]] = asyncio.Queue()

    def __call__(self, upstream: str, source: str, servers: object) -> None:
        servers = tuple(servers)  # type: ignore[call-overload]
        self.calls.append((upstream, source, servers, time.monotonic()))
        self.queue.put_nowait(tuple(str(s.address) for s in servers))

    async def next(self, timeout: float = 5.0) -> tuple[str, ...]:
        return await asyncio.wait_for(self.queue.get(), timeout)


async def test_a_and_aaaa_records_each_make_a_server_in_address_order(dns: Dnsmasq) -> None:
    await dns.set("app", ["127.0.0.3", "::2", "127.0.0.2"])
    answer = await resolver(dns).lookup(DiscoverConfig("app", 3000))
    assert not answer.failed
    assert [(f.host, f.port) for f in answer.found] == [
        ("127.0.0.2", None), ("127.0.0.3", None), ("::2", None)]


async def test_srv_records_give_port_weight_and_backups_by_priority(dns: Dnsmasq) -> None:
    for name, address in (("a.svc", "127.0.0.2"), ("b.svc", "127.0.0.3"),
                          ("c.svc", "127.0.0.4")):
        await dns.set(name, [address])
    entry = DiscoverConfig("_app._tcp.svc", None, max_conns=7)
    answer = await resolver(dns).lookup(entry)
    # gone.svc has no address (NXDOMAIN): its record gives no server, and is no failure.
    assert not answer.failed
    assert [(f.host, f.port, f.weight, f.backup) for f in answer.found] == [
        ("127.0.0.2", 3001, 10, False), ("127.0.0.3", 3002, 30, False),
        ("127.0.0.4", 3003, 7, True)]


async def test_an_answer_too_big_for_udp_comes_over_tcp_and_is_cut(dns: Dnsmasq) -> None:
    addresses = [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(300)]
    await dns.set("big", addresses)
    answer = await resolver(dns).lookup(DiscoverConfig("big", 80))
    assert answer.cut == 300 - MAX_SERVERS
    assert len(answer.found) == MAX_SERVERS
    assert answer.found[0].host == "127.0.1.1" and answer.found[-1].host == "127.0.2.6"


async def test_nxdomain_and_no_records_are_answers_a_dead_nameserver_is_a_failure(
        dns: Dnsmasq) -> None:
    lookup = resolver(dns, timeout=0.3)
    nxdomain = await lookup.lookup(DiscoverConfig("nothing", 80))
    assert (nxdomain.found, nxdomain.failed, nxdomain.problem) == ((), False, "NXDOMAIN")
    await dns.set("v4only", ["127.0.0.2"])
    assert [f.host for f in (await lookup.lookup(DiscoverConfig("v4only", 80))).found] == [
        "127.0.0.2"]
    dns.stop()
    failed = await lookup.lookup(DiscoverConfig("v4only", 80))
    assert failed.failed and not failed.found


async def test_a_failing_lookup_keeps_the_last_answer_for_hold_then_empties_once(
        dns: Dnsmasq, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "balancer.discovery")
    await dns.set("app", ["127.0.0.2", "127.0.0.3"])
    updates = Updates()
    watch = NameWatch("up", DiscoverConfig("app", 3000, max_conns=9),
                      resolver(dns, interval=0.1, timeout=0.2, hold=1.0), updates)
    watch.start()
    try:
        assert await updates.next() == ("127.0.0.2:3000", "127.0.0.3:3000")
        assert {(s.max_conns, s.source) for s in updates.calls[0][2]} == {(9, "dns app")}
        await dns.set("app", ["127.0.0.4", "127.0.0.2"])
        assert await updates.next() == ("127.0.0.2:3000", "127.0.0.4:3000")
        dns.stop()
        stopped = time.monotonic()
        assert await updates.next() == ()
        # Nothing changed before `hold` had passed since the last good answer.
        assert updates.calls[-1][3] - stopped >= 1.0 - 0.25
    finally:
        await watch.stop()
    messages = [r.getMessage() for r in caplog.records]
    kept = [m for m in messages if "keeping the last answer (2 server(s)) for up to 1s" in m]
    emptied = [m for m in messages if "for 1s: no servers from it in upstream up now" in m]
    assert len(kept) == 1 and len(emptied) == 1, messages


async def test_an_empty_answer_is_believed_after_hold_and_a_return_is_at_once(
        dns: Dnsmasq) -> None:
    await dns.set("app", ["127.0.0.2"])
    updates = Updates()
    watch = NameWatch("up", DiscoverConfig("app", 3000),
                      resolver(dns, interval=0.1, timeout=0.5, hold=0.8), updates)
    watch.start()
    try:
        assert await updates.next() == ("127.0.0.2:3000",)
        await dns.set("app", [])
        removed = time.monotonic()
        assert await updates.next() == ()
        assert updates.calls[-1][3] - removed >= 0.8 - 0.25
        await dns.set("app", ["127.0.0.3"])
        assert await updates.next(timeout=1.0) == ("127.0.0.3:3000",)
    finally:
        await watch.stop()


def config(dns: Dnsmasq, *discover: DiscoverConfig, **resolvers: float) -> Config:
    settings = ResolversConfig(nameservers=(("127.0.0.1", dns.port),), **resolvers)
    upstream = UpstreamConfig("up", servers=(), discover=discover)
    return Config(listeners=(), upstreams={"up": upstream}, resolvers=settings)


async def test_start_waits_for_first_answers_and_reconfigure_follows_the_file(
        dns: Dnsmasq) -> None:
    await dns.set("app", ["127.0.0.2"])
    await dns.set("db", ["127.0.0.5"])
    updates = Updates()
    discovery = DnsDiscovery(updates)
    app = DiscoverConfig("app", 3000)
    await discovery.start(config(dns, app, interval=0.2))
    try:
        assert [c[:2] for c in updates.calls] == [("up", "dns app")]
        assert await updates.next() == ("127.0.0.2:3000",)
        # A changed key applies to the answer in use at once; a new item starts; a
        # removed one takes its servers with it.
        discovery.reconfigure(config(dns, replace(app, weight=5), interval=0.2))
        assert await updates.next() == ("127.0.0.2:3000",)
        assert updates.calls[-1][2][0].weight == 5
        discovery.reconfigure(config(dns, DiscoverConfig("db", 5432), interval=0.2))
        first, second = await updates.next(), await updates.next()
        assert {first, second} == {(), ("127.0.0.5:5432",)}
    finally:
        await discovery.stop()
    assert not discovery.watches


def test_an_ip_hash_names_weights_are_scaled_down_in_proportion_to_the_rings_budget() -> None:
    entry = DiscoverConfig("_x._tcp.y", None)
    answer = [found(f"10.0.{i // 250}.{i % 250 + 1}", 80, 256 if i % 2 else 64)
              for i in range(256)]
    assert sum(s.weight for s in servers_of(entry, answer)) == 128 * 320  # unbounded
    servers = servers_of(entry, answer, MAX_IP_HASH_WEIGHT)
    assert sum(s.weight for s in servers) <= MAX_IP_HASH_WEIGHT
    assert {s.weight for s in servers} == {6, 25}  # 1 : 4 as before, floored
    assert servers_of(entry, [found("10.0.0.1", 80, 65535 // 256)], 8)[0].weight == 8
    assert [s.weight for s in servers_of(entry, answer[:2], MAX_IP_HASH_WEIGHT)] == [64, 256]


async def test_a_cut_answer_is_said_once_and_an_ip_hash_ring_gets_its_budget(
        dns: Dnsmasq, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "balancer.discovery")
    await dns.set("big", [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(300)])
    updates = Updates()
    discovery = DnsDiscovery(updates)
    settings = ResolversConfig(nameservers=(("127.0.0.1", dns.port),), interval=0.05)
    upstream = UpstreamConfig("up", servers=(), strategy="ip_hash", hash="ring",
                              discover=(DiscoverConfig("big", 80, weight=100),))
    await discovery.start(Config(listeners=(), upstreams={"up": upstream}, resolvers=settings))
    try:
        servers = updates.calls[0][2]
        assert len(servers) == MAX_SERVERS and {s.weight for s in servers} == {16}
        watch = discovery.watches[("up", "big")]
        for _ in range(3):
            await watch.refresh()
    finally:
        await discovery.stop()
    cuts = [r for r in caplog.records if "answer of 300 servers cut to the first 256" in
            r.getMessage()]
    assert len(cuts) == 1

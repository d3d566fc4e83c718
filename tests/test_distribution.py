"""Strategies end to end: which backend answers, through a real balancer process."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from balancer.config import ServerConfig, parse_address
from balancer.strategies import Maglev
from balancer.upstream import Server

from .utils import eventually, make_config, who_answers

pytestmark = pytest.mark.timeout(90)


async def test_weighted_exact_counts_per_cycle(start_backend, start_balancer):
    weights = {"a": 5, "b": 2, "c": 1}
    backends = {n: start_backend("name", n) for n in weights}
    servers = [{"address": backends[n].address, "weight": w} for n, w in weights.items()]
    balancer = start_balancer(make_config(servers, "weighted"))
    cycle = sum(weights.values())
    for _ in range(3):
        answers = [await who_answers(balancer.port) for _ in range(cycle)]
        assert Counter(answers) == weights
        # Smooth: the heavy server never takes the whole cycle's share in one burst.
        longest_run = max(len(run) for run in "".join(answers).replace("b", " ")
                          .replace("c", " ").split())
        assert longest_run < weights["a"]


async def test_round_robin_is_even(start_backend, start_balancer):
    backends = [start_backend("name", n) for n in "abc"]
    balancer = start_balancer(make_config([b.address for b in backends], "round_robin"))
    answers = [await who_answers(balancer.port) for _ in range(30)]
    assert Counter(answers) == {"a": 10, "b": 10, "c": 10}


async def test_least_conn_follows_held_connections(start_backend, start_balancer):
    backends = {n: start_backend("name", n) for n in "abc"}
    servers = [{"address": backends["a"].address, "weight": 2},
               {"address": backends["b"].address},
               {"address": backends["c"].address}]
    balancer = start_balancer(make_config(servers, "least_conn"))
    held: list[tuple[str, asyncio.StreamWriter]] = []
    for _ in range(8):  # hold every connection open: counts must track weight 2:1:1
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        held.append(((await asyncio.wait_for(reader.readline(), 10)).decode().strip(), writer))
    assert Counter(name for name, _ in held) == {"a": 4, "b": 2, "c": 2}
    # Release b's two connections: b is now the least loaded, so the next two go to b.
    fds = balancer.fd_count()
    for name, writer in held:
        if name == "b":
            writer.close()
    await eventually(lambda: balancer.fd_count() == fds - 4)
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        assert (await asyncio.wait_for(reader.readline(), 10)).strip() == b"b"
        held.append(("b", writer))
    for _, writer in held:
        writer.close()


async def ip_hash_map(port: int, hosts: list[str]) -> dict[str, str]:
    return {host: await who_answers(port, host) for host in hosts}


async def test_ip_hash_sticky_and_bounded_remap(start_backend, start_balancer):
    backends = [start_backend("name", n) for n in "abcd"]
    hosts = [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(1000)]
    # A connect that times out on a loaded machine would be retried on the next server of
    # the ring and look like lost stickiness: give connects time, and never eject.
    patient = {"timeouts": {"connect": "10s"}, "health": {"max_fails": 0}}
    full = start_balancer(make_config([b.address for b in backends], "ip_hash", hash="ring",
                                      **patient))
    first = await ip_hash_map(full.port, hosts)
    assert await ip_hash_map(full.port, hosts) == first  # sticky
    assert set(first.values()) == set("abcd")  # spread over every server
    # Remove server "d": only its clients may move, and about 1/N of all clients at most.
    reduced = start_balancer(make_config([b.address for b in backends[:3]], "ip_hash",
                                         hash="ring", **patient))
    second = await ip_hash_map(reduced.port, hosts)
    moved = [h for h in hosts if first[h] != second[h]]
    assert all(first[h] == "d" for h in moved)
    assert len(moved) / len(hosts) <= 1 / 4 + 0.05


async def test_ip_hash_maglev_by_default_sticky_and_bounded_remap(start_backend, start_balancer):
    backends = [start_backend("name", n) for n in "abcd"]
    hosts = [f"127.0.{i // 250}.{i % 250 + 2}" for i in range(1000)]
    patient = {"timeouts": {"connect": "10s"}, "health": {"max_fails": 0}}
    full = start_balancer(make_config([b.address for b in backends], "ip_hash", **patient))
    first = await ip_hash_map(full.port, hosts)
    assert await ip_hash_map(full.port, hosts) == first  # sticky
    # Exactly Maglev's table for these servers (the default), as any balancer builds it.
    servers = [Server(ServerConfig(parse_address(b.address))) for b in backends]
    table = Maglev(servers)
    names = dict(zip(servers, "abcd", strict=True))
    assert first == {host: names[table.pick(host, Server.usable)] for host in hosts}
    counts = Counter(first.values())
    assert set(counts) == set("abcd")
    assert max(counts.values()) <= 1.2 * len(hosts) / 4, counts  # Maglev's even shares
    # The same servers listed in another order: the same table, every client where it was.
    shuffled = start_balancer(make_config([b.address for b in backends[::-1]], "ip_hash",
                                          **patient))
    assert await ip_hash_map(shuffled.port, hosts) == first
    reduced = start_balancer(make_config([b.address for b in backends[:3]], "ip_hash",
                                         **patient))
    second = await ip_hash_map(reduced.port, hosts)
    moved = [h for h in hosts if first[h] != second[h]]
    assert "d" not in second.values()
    assert len(moved) / len(hosts) <= 1 / 4 + 0.05
    assert sum(1 for h in moved if first[h] != "d") <= 0.02 * len(hosts)  # Maglev's price


async def test_backup_only_when_primaries_unusable(start_backend, start_balancer):
    primary = start_backend("name", "primary")
    backup = start_backend("name", "backup")
    servers = [{"address": primary.address, "max_conns": 1},
               {"address": backup.address, "backup": True}]
    balancer = start_balancer(make_config(servers, "round_robin"))
    idle_fds = balancer.fd_count()
    assert await who_answers(balancer.port) == "primary"
    await eventually(lambda: balancer.fd_count() == idle_fds)  # that slot is free again
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert (await reader.readline()).strip() == b"primary"  # primary now full (max_conns 1)
    assert await who_answers(balancer.port) == "backup"
    writer.close()
    await writer.wait_closed()

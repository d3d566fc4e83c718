"""ip_hash tables compared: the consistent-hash ring against Maglev (`hash: ring|maglev`).

    python -m benchmarks.hashing [--clients 200000] [--out benchmarks/results]

Pure computation on stub servers (no sockets), so it runs anywhere in a few tens of seconds.
For each table it reports:
- balance: the busiest server's share of the hash space over the average share (ring: arc
  lengths; Maglev: table entries), at 10 and 50 servers, and the same over random client
  addresses (which add their own sampling noise, about 3% at 50 servers for 200,000);
- disruption: the share of those clients that move when one of N servers leaves (the mean
  over every server leaving in turn), and of those how many were not the leaving server's;
- build time at 256 servers (weight 1 and weight 16, the ring's cap), on one core;
- pick cost per client with every server usable, and with one server in ten unusable.
Writes benchmarks/results/hashing.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from balancer.config import Address, ServerConfig
from balancer.strategies import MAGLEV_TABLE_SIZE, IpHash, Maglev, Strategy, _maglev_table
from balancer.upstream import Server

TABLES: dict[str, type[Strategy]] = {"ring": IpHash, "maglev": Maglev}
RING_SPACE = 2**64


def stub_servers(count: int, weight: int = 1) -> list[Server]:
    """`count` servers on distinct addresses (10.0.x.y:3000), as discovery would find."""
    return [Server(ServerConfig(Address(f"10.0.{i // 250}.{i % 250 + 1}", 3000), weight=weight))
            for i in range(count)]


def clients(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(count)]


def always(server: Server) -> bool:
    return True


def space_shares(strategy: Strategy) -> list[float]:
    """Each server's share of the hash space, as the table itself gives it."""
    count = len(strategy.servers)
    owned = [0.0] * count
    if isinstance(strategy, Maglev):
        for owner in strategy.table:
            owned[owner] += 1
        return [value / MAGLEV_TABLE_SIZE for value in owned]
    assert isinstance(strategy, IpHash)
    hashes, owners = strategy.hashes, strategy.owners
    # A point owns the arc from the previous point (exclusive) to itself: bisect's rule.
    for position, point in enumerate(hashes):
        previous = hashes[position - 1] - (RING_SPACE if position == 0 else 0)
        owned[owners[position]] += point - previous
    return [value / RING_SPACE for value in owned]


def busiest_over_average(shares: list[float]) -> float:
    return max(shares) / (sum(shares) / len(shares))


def assign(strategy: Strategy, ips: list[str]) -> list[str]:
    pick = strategy.pick
    return [pick(ip, always).key for ip in ips]  # type: ignore[union-attr]


def balance(name: str, count: int, ips: list[str]) -> tuple[float, float]:
    strategy = TABLES[name](stub_servers(count))
    sampled = Counter(assign(strategy, ips))
    return (busiest_over_average(space_shares(strategy)),
            max(sampled.values()) / (len(ips) / count))


def disruption(name: str, count: int, ips: list[str], leaving: int) -> tuple[float, float]:
    """Mean share of clients moved when one server leaves, and of others' clients moved."""
    servers = stub_servers(count)
    before = assign(TABLES[name](servers), ips)
    moved_all: list[float] = []
    moved_others: list[float] = []
    for gone in random.Random(count).sample(range(count), leaving):
        after = assign(TABLES[name](servers[:gone] + servers[gone + 1:]), ips)
        key = servers[gone].key
        moved = sum(1 for b, a in zip(before, after, strict=True) if a != b)
        others = sum(1 for b, a in zip(before, after, strict=True) if a != b and b != key)
        moved_all.append(moved / len(ips))
        moved_others.append(others / len(ips))
    return statistics.mean(moved_all), statistics.mean(moved_others)


def build_seconds(name: str, count: int, weight: int, runs: int) -> float:
    servers = stub_servers(count, weight)
    times = []
    for _ in range(runs):
        _maglev_table.cache_clear()  # a new server set each time, as a membership change is
        start = time.process_time()
        TABLES[name](servers)
        times.append(time.process_time() - start)
    return min(times)


def pick_us(name: str, count: int, ips: list[str], down_every: int = 0) -> float:
    """µs per pick through Server.usable; every `down_every`-th server down (0: none)."""
    servers = stub_servers(count)
    for index, server in enumerate(servers):
        if down_every and index % down_every == 0:
            server.health.set_active(False, "benchmark")
    strategy = TABLES[name](servers)
    pick = strategy.pick
    usable = Server.usable
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for ip in ips:
            pick(ip, usable)
        best = min(best, time.process_time() - start)
    return best * 1e6 / len(ips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hashing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200_000)
    parser.add_argument("--leaving", type=int, default=5,
                        help="servers removed in turn for the disruption figure (default 5)")
    parser.add_argument("--heavy", action="store_true",
                        help="also build the ring at its weight cap (256 x 16: ~5 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    logging.getLogger("balancer").setLevel(logging.ERROR)  # the stub servers' health lines
    ips = clients(args.clients)
    lines = [
        "# ip_hash: ring vs Maglev",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
        f"{args.clients:,} random IPv4 clients; stub servers; times are this process's "
        f"CPU time (min of 3), Python {sys.version.split()[0]}; load average at start "
        f"{os.getloadavg()[0]:.1f} (a busy machine inflates CPU time less than wall "
        "time, but it still does)",
        "- ring: 160 points per unit of weight; Maglev: 65,537 slots",
        "",
        "| figure | ring | maglev |",
        "|---|---|---|",
    ]

    def row(label: str, values: dict[str, str]) -> None:
        line = f"| {label} | {values['ring']} | {values['maglev']} |"
        lines.append(line)
        print(line, file=sys.stderr, flush=True)

    for count in (10, 50):
        space: dict[str, str] = {}
        sampled: dict[str, str] = {}
        for name in TABLES:
            by_space, by_clients = balance(name, count, ips)
            space[name] = f"{by_space:.3f}"
            sampled[name] = f"{by_clients:.3f}"
        row(f"busiest/average, hash space, {count} servers", space)
        row(f"busiest/average, {args.clients:,} clients, {count} servers", sampled)
    for count in (10, 50):
        moved: dict[str, str] = {}
        for name in TABLES:
            total, others = disruption(name, count, ips, min(args.leaving, count))
            moved[name] = f"{total:.2%} ({others:.2%} not its own)"
        row(f"clients moved when 1 of {count} leaves (1/N = {1 / count:.2%})", moved)
    weights = (1, 16) if args.heavy else (1,)
    for weight in weights:
        built = {name: f"{build_seconds(name, 256, weight, 1 if weight > 1 else 3) * 1e3:.0f} ms"
                 for name in TABLES}
        row(f"build, 256 servers of weight {weight}", built)
    if not args.heavy:
        built = {"ring": "(--heavy)",
                 "maglev": f"{build_seconds('maglev', 256, 16, 3) * 1e3:.0f} ms"}
        row("build, 256 servers of weight 16", built)
    sample = ips[:50_000]
    for count in (10, 256, 1000):
        row(f"pick, {count} servers, all usable",
            {name: f"{pick_us(name, count, sample):.2f} µs" for name in TABLES})
    row("pick, 256 servers, 1 in 10 down",
        {name: f"{pick_us(name, 256, sample, down_every=10):.2f} µs" for name in TABLES})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hashing.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'hashing.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

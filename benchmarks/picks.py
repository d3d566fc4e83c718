"""Cost of one pick per strategy as upstreams grow (issue 18: at most 2 µs at 1,000 servers,
1 µs at 10).

    python -m benchmarks.picks [--picks 20000] [--sizes 10,100,1000] [--out benchmarks/results]
                               [--report picks.md]

Stub servers (real `Server` objects, no sockets), one process, one core. Two figures per
strategy and size:
- `pick`: `strategy.pick(ip, usable)` alone, with an always-true `usable` and with the real
  `Server.usable` (health, drain flag, max_conns), every server idle;
- `conn`: what one connection costs the strategy in steady state: the pick, `acquire()` on
  the chosen server and `release()` of a random earlier one (about 4 x N held), through
  `Server.usable`: for least_conn that includes keeping its index in order.
`weighted` and `least_conn` are what an upstream of that size gets (a scan up to SCAN_UP_TO
servers, an index above); `(scan)` and `(index)` force one at every size, for comparison
(`--sizes 2,5,8,10,20,32` shows where the index starts to pay).
Writes benchmarks/results/picks.md (`--report` names another file).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from balancer.config import Address, ServerConfig
from balancer.strategies import (
    IpHash,
    LeastConn,
    Maglev,
    RandomTwo,
    RoundRobin,
    Strategy,
    Weighted,
)
from balancer.upstream import Server

SIZES = (10, 100, 1000)
VARIANTS: dict[str, Callable[[list[Server]], Strategy]] = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "weighted (scan)": lambda servers: Weighted(servers, indexed=False),
    "weighted (index)": lambda servers: Weighted(servers, indexed=True),
    "least_conn": LeastConn,
    "least_conn (scan)": lambda servers: LeastConn(servers, indexed=False),
    "least_conn (index)": lambda servers: LeastConn(servers, indexed=True),
    "ip_hash maglev": Maglev,
    "ip_hash ring": IpHash,
    "random_two": RandomTwo,
}


def stub_servers(count: int) -> list[Server]:
    rng = random.Random(count)
    return [Server(ServerConfig(Address(f"10.0.{i // 250}.{i % 250 + 1}", 3000),
                                weight=rng.choice((1, 1, 2, 3)), max_conns=1_000_000))
            for i in range(count)]


def always(server: Server) -> bool:
    return True


def pick_us(make: Callable[[list[Server]], Strategy], count: int, ips: list[str],
            usable: Callable[[Server], bool]) -> float:
    strategy = make(stub_servers(count))
    pick = strategy.pick
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for ip in ips:
            pick(ip, usable)
        best = min(best, time.process_time() - start)
    return best * 1e6 / len(ips)


def conn_us(make: Callable[[list[Server]], Strategy], count: int, ips: list[str]) -> float:
    strategy = make(stub_servers(count))
    pick = strategy.pick
    usable = Server.usable
    rng = random.Random(1)
    held: list[Server] = []
    limit = 4 * count
    for ip in ips[: limit + 10]:  # reach the steady state first
        server = pick(ip, usable)
        assert server is not None
        server.acquire()
        held.append(server)
        if len(held) > limit:
            held.pop(int(rng.random() * len(held))).release()
    draws = [rng.random() for _ in ips]
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for ip, draw in zip(ips, draws, strict=True):
            server = pick(ip, usable)
            server.acquire()  # type: ignore[union-attr]
            held.append(server)  # type: ignore[arg-type]
            held.pop(int(draw * len(held))).release()
        best = min(best, time.process_time() - start)
    return best * 1e6 / len(ips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.picks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picks", type=int, default=20_000)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="upstream sizes, comma-separated (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report", default="picks.md")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    logging.getLogger("balancer").setLevel(logging.ERROR)
    rng = random.Random(2)
    ips = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(args.picks)]
    header = " | ".join(f"{kind} {n}" for kind in ("pick", "pick usable", "conn")
                        for n in sizes)
    lines = [
        "# Cost per pick as upstreams grow",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; stub servers "
        f"(weights 1-3), {args.picks:,} picks x 3, this process's CPU time (min of 3), "
        f"Python {sys.version.split()[0]}; load average at start {os.getloadavg()[0]:.1f}",
        "- µs per pick. `pick`: always-true usable; `pick usable`: Server.usable; `conn`: "
        "pick + acquire + release of a random earlier connection (4 x N held), Server.usable",
        "",
        f"| strategy | {header} |",
        "|---|" + "---|" * (3 * len(sizes)),
    ]
    for name, make in VARIANTS.items():
        cells = [f"{pick_us(make, n, ips, always):.2f}" for n in sizes]
        cells += [f"{pick_us(make, n, ips, Server.usable):.2f}" for n in sizes]
        cells += [f"{conn_us(make, n, ips):.2f}" for n in sizes]
        line = f"| {name} | " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines.append(f"- load average at end {os.getloadavg()[0]:.1f}")
    (args.out / args.report).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cost of one pick per strategy as upstreams grow (issue 18: at most 2 µs at 1,000 servers,
1 µs at 10).

    python -m benchmarks.picks [--picks 20000] [--sizes 10,100,1000] [--out benchmarks/results]
                               [--report picks.md] [--rounds 5]

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
Every figure is measured once per round, round after round, and the least of its rounds
kept: a busy spell on a shared machine then slows one batch of each figure, not one figure
(this machine read one figure up to +-50% run to run when each was measured in one go).
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


BATCH_SECONDS = 0.4


def always(server: Server) -> bool:
    return True


class Cell:
    """One figure: a strategy over `count` stub servers, measured a batch at a time."""

    def __init__(self, make: Callable[[list[Server]], Strategy], count: int, ips: list[str],
                 kind: str) -> None:
        self.strategy = make(stub_servers(count))
        self.kind = kind  # "pick", "pick usable" or "conn"
        # A scan of 1,000 servers costs ~200 µs a pick: fewer picks keep its batch near
        # BATCH_SECONDS; every other figure takes all of `ips` (the same picks as before).
        start = time.process_time()
        for ip in ips[:100]:
            self.strategy.pick(ip, Server.usable)
        each = (time.process_time() - start) / 100
        self.ips = ips[: max(1000, min(len(ips), int(BATCH_SECONDS / max(each, 1e-9))))]
        self.best = float("inf")
        self.held: list[Server] = []
        rng = random.Random(1)
        if kind == "conn":  # reach the steady state first: about 4 x N held
            limit = 4 * count
            for ip in ips[: limit + 10]:
                server = self.strategy.pick(ip, Server.usable)
                assert server is not None
                server.acquire()
                self.held.append(server)
                if len(self.held) > limit:
                    self.held.pop(int(rng.random() * len(self.held))).release()
        self.draws = [rng.random() for _ in self.ips]

    def measure(self) -> None:
        """One batch; the figure is the least µs per pick of all batches."""
        pick = self.strategy.pick
        usable: Callable[[Server], bool] = always if self.kind == "pick" else Server.usable
        start = time.process_time()
        if self.kind == "conn":
            held = self.held
            for ip, draw in zip(self.ips, self.draws, strict=True):
                server = pick(ip, usable)
                server.acquire()  # type: ignore[union-attr]
                held.append(server)  # type: ignore[arg-type]
                held.pop(int(draw * len(held))).release()
        else:
            for ip in self.ips:
                pick(ip, usable)
        self.best = min(self.best, (time.process_time() - start) * 1e6 / len(self.ips))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.picks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picks", type=int, default=20_000)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="upstream sizes, comma-separated (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--report", default="picks.md")
    parser.add_argument("--rounds", type=int, default=5)
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
        f"(weights 1-3), {args.picks:,} picks a batch (fewer where a scan is slow: "
        f"{BATCH_SECONDS} s a batch, at least 1,000 picks), every figure once per round, "
        f"{args.rounds} rounds, this process's CPU time (the least of the rounds), "
        f"Python {sys.version.split()[0]}; load average at start {os.getloadavg()[0]:.1f}",
        "- µs per pick. `pick`: always-true usable; `pick usable`: Server.usable; `conn`: "
        "pick + acquire + release of a random earlier connection (4 x N held), Server.usable",
        "",
        f"| strategy | {header} |",
        "|---|" + "---|" * (3 * len(sizes)),
    ]
    kinds = ("pick", "pick usable", "conn")
    cells = {(name, kind, n): Cell(make, n, ips, kind)
             for name, make in VARIANTS.items() for kind in kinds for n in sizes}
    for _ in range(args.rounds):  # every figure once per round: a busy spell hits them all
        for cell in cells.values():
            cell.measure()
    for name in VARIANTS:
        figures = [f"{cells[name, kind, n].best:.2f}" for kind in kinds for n in sizes]
        line = f"| {name} | " + " | ".join(figures) + " |"
        lines.append(line)
        print(line, file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    lines.append(f"- load average at end {os.getloadavg()[0]:.1f}")
    (args.out / args.report).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / args.report}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

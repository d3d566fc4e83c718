"""CPU per new connection with 10 and with 1,000 servers in the upstream (least_conn).

    python -m benchmarks.pick_e2e [--duration 8] [--runs 3] [--strategy least_conn]

One nginx (single process, on CPU 1) listens on 1,000 loopback ports and answers 200 "ok"
on each; the balancer (`workers: 1`, uvloop, on CPU 0) balances over the first 10 of them
or over all 1,000. `wrk -t1 -c64 -H "Connection: close"` (one client and one upstream
connection per request); runs interleaved, median kept. The goal (issue 18): the CPU per
connection at 1,000 servers at most 1.15x that at 10. Writes
benchmarks/results/pick_e2e.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import conntrack
from .features import balancer_cpu
from .procs import CPU_LOAD, Supervisor, free_port, wait_port
from .proxies import nginx_http_backend
from .setup_latency import publish

CPU_PROXY = 0
SIZES = (10, 1000)


def start_nginx_many(sup: Supervisor, workdir: Path, count: int) -> list[int]:
    """One nginx on `count` ports of its own."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    cmd = nginx_http_backend(workdir / "nginx",
                             [f"127.0.0.1:{port} backlog=512" for port in ports])
    proc = sup.start("nginx", cmd, CPU_LOAD)
    for port in (ports[0], ports[-1]):
        wait_port(port, 15, proc.popen, proc.log)
    return ports


def config_for(port: int, servers: list[int], strategy: str) -> str:
    lines = "\n".join(f"      - 127.0.0.1:{p}" for p in servers)
    return f"""\
listeners:
  - name: bench
    bind: 127.0.0.1:{port}
    upstream: app
upstreams:
  app:
    strategy: {strategy}
    servers:
{lines}
    timeouts: {{connect: 2s, idle: 10m}}
workers: 1
loop: uvloop
"""


def one_run(sup: Supervisor, workdir: Path, servers: list[int], strategy: str,
            duration: float, run: int) -> float:
    port = free_port()
    return balancer_cpu(sup, workdir, f"{len(servers)}-{run}",
                        config_for(port, servers, strategy), port, duration)["cpu_us"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pick_e2e")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--strategy", default="least_conn")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    conntrack.add_flag(parser)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="balancer-picks-"))
    sup = Supervisor(workdir)
    figures: dict[int, list[float]] = {size: [] for size in SIZES}
    with conntrack.loopback_untracked(args.notrack) as tracking:
        try:
            ports = start_nginx_many(sup, workdir, max(SIZES))
            for run in range(args.runs):  # interleaved, so drift spreads evenly
                for size in SIZES:
                    figures[size].append(one_run(sup, workdir, ports[:size], args.strategy,
                                                 args.duration, run))
                    print(f"run {run + 1} {size:5d} servers {figures[size][-1]:6.1f} µs/conn",
                          flush=True)
        finally:
            sup.stop_all()
    median = {size: statistics.median(values) for size, values in figures.items()}
    ratio = median[SIZES[-1]] / median[SIZES[0]]
    lines = [
        f"# CPU per new connection: {args.strategy} over 10 vs 1,000 servers",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; wrk -t1 -c64 "
        f"`Connection: close`, {args.duration:g} s x {args.runs} runs interleaved (median); "
        "balancer (workers: 1, uvloop) on CPU 0, wrk and one nginx on 1,000 ports on CPU 1",
        f"- {'; '.join(tracking)}",
        "",
        "| servers | CPU µs / connection | runs |",
        "|---|---|---|",
        *(f"| {size:,} | {median[size]:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in figures[size])} |" for size in SIZES),
        "",
        f"1,000 / 10: {ratio:.2f}x (goal: at most 1.15x)",
    ]
    publish(lines, Path(args.out) / "pick_e2e.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

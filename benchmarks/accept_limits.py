"""CPU per new connection on the accept path, with and without listener limits.

    python -m benchmarks.accept_limits [--duration 10] [--runs 3]

Variants: a plain listener, and the same with `per_client` (max_conns and rate set far above
the load, so nothing is refused and only the gate and its table are paid for; wrk connects
from one address, so the table holds one entry: an O(1) table costs the same per lookup at
any size, bar cache misses). Each run is `wrk -t1 -c64` with
`Connection: close` (one client and one upstream connection per request), the balancer on
CPU 0, wrk and the nginx backends on CPU 1; runs are interleaved and the median kept.
Prints the CPU µs per connection and the ratio to the plain listener; writes
benchmarks/results/accept_limits.md. The goal for `per_client` is at most 1.05x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import conntrack
from .features import balancer_cpu
from .procs import Supervisor, free_port
from .proxies import balancer_conf, start_nginx_backend
from .setup_latency import publish

CPU_PROXY = 0
VARIANTS = ("plain", "per_client")


def config_for(variant: str, port: int, backends: list[int]) -> str:
    data = yaml.safe_load(balancer_conf(port, backends))
    if variant == "per_client":
        data["listeners"][0]["per_client"] = {"max_conns": 1_000_000, "rate": "1000000/s"}
    return yaml.safe_dump(data)


def one_run(sup: Supervisor, workdir: Path, variant: str, backends: list[int],
            duration: float, run: int) -> float:
    """CPU µs of the balancer per completed connection, for one fresh balancer."""
    port = free_port()
    return balancer_cpu(sup, workdir, f"{variant}-{run}", config_for(variant, port, backends),
                        port, duration)["cpu_us"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accept_limits")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    conntrack.add_flag(parser)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="balancer-accept-"))
    sup = Supervisor(workdir)
    figures: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    with conntrack.loopback_untracked(args.notrack) as tracking:
        try:
            backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
            for run in range(args.runs):  # interleaved, so drift spreads evenly
                for variant in VARIANTS:
                    figures[variant].append(
                        one_run(sup, workdir, variant, backends, args.duration, run))
                    print(f"run {run + 1} {variant:10s} {figures[variant][-1]:6.1f} µs/conn",
                          flush=True)
        finally:
            sup.stop_all()
    median = {variant: statistics.median(values) for variant, values in figures.items()}
    ratio = median["per_client"] / median["plain"]
    lines = [
        "# CPU per new connection: plain listener vs per_client limits",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; wrk -t1 -c64 "
        f"`Connection: close`, {args.duration:g} s x {args.runs} runs interleaved (median); "
        "balancer on CPU 0, wrk and two nginx backends on CPU 1",
        f"- {'; '.join(tracking)}",
        "",
        "| listener | CPU µs / connection | runs |",
        "|---|---|---|",
        *(f"| {variant} | {median[variant]:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in figures[variant])} |" for variant in VARIANTS),
        "",
        f"per_client / plain: {ratio:.3f}x (goal: at most 1.05x)",
    ]
    publish(lines, Path(args.out) / "accept_limits.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

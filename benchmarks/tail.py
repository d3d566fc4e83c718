"""Where the p99 at 1,000 keep-alive connections comes from: the tail, not the median.

    python -m benchmarks.tail [--connections 64,1000] [--runs 3] [--duration 6]
                              [--against REV] [--notrack]

The harness's p99 figure is one number per run; this prints what is behind it, for HAProxy
and the balancer (and any `--against` revision) interleaved: the same two nginx backends
(CPU 1), the proxy alone on CPU 0, `wrk -t1 --latency` on CPU 1 for each connection count.
Per run: requests/s, the proxy's CPU µs per request, wrk's latency percentiles and maximum
(a wrk run opens all its connections at once, so the first request of each connection
carries the accept and the upstream connect), the backends' context switches per request
(how often the proxy's writes wake them), and the kernel's loopback drops and TCP
retransmissions over the run (a retransmission timeout would put 200 ms into the tail).
Writes benchmarks/results/tail.md.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import conntrack, load
from .features import revisions
from .procs import Proc, Supervisor, cpu_seconds, tree_pids
from .proxies import Variant, start_nginx_backend, start_proxy
from .setup_latency import publish

PERCENTILES = re.compile(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$")
MAX_LATENCY = re.compile(r"^\s+Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)")
TO_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def switches(root: int) -> int:
    """Voluntary and involuntary context switches of a process tree, every thread."""
    total = 0
    for pid in tree_pids(root):
        for status in Path(f"/proc/{pid}/task").glob("*/status"):
            try:
                lines = status.read_text().splitlines()
            except OSError:  # the thread ended meanwhile
                continue
            total += sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
    return total


def net_counters() -> tuple[int, int]:
    """(packets the per-CPU backlogs dropped, TCP segments retransmitted), machine-wide."""
    drops = sum(int(line.split()[1], 16)
                for line in Path("/proc/net/softnet_stat").read_text().splitlines())
    tcp = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
           if line.startswith("Tcp:")]
    return drops, int(tcp[1][tcp[0].index("RetransSegs")])


def latency_ms(raw: str) -> dict[str, float]:
    """wrk's --latency percentiles and its maximum, in ms."""
    out: dict[str, float] = {}
    for line in raw.splitlines():
        if match := PERCENTILES.match(line):
            out[f"p{match.group(1)}"] = float(match.group(2)) * TO_MS[match.group(3)]
        elif match := MAX_LATENCY.match(line):
            out["max"] = float(match.group(1)) * TO_MS[match.group(2)]
    return out


def one_run(sup: Supervisor, workdir: Path, variant: Variant,
            backends: list[tuple[Proc, int]], connections: int, duration: float,
            run_id: str) -> dict[str, float]:
    """One fresh proxy: a warm-up, then the measured wrk run."""
    proc, port = start_proxy(sup, workdir, variant, [p for _, p in backends], None, run_id)
    assert proc is not None
    try:
        load.run_wrk(port, 2, connections)  # warm-up: the proxy's first connections
        back_pids = [b.pid for b, _ in backends]
        cpu0, back0, net0 = cpu_seconds(proc.pid), sum(map(switches, back_pids)), net_counters()
        res = load.run_wrk(port, duration, connections, latency=True)
        cpu1, back1, net1 = cpu_seconds(proc.pid), sum(map(switches, back_pids)), net_counters()
    finally:
        sup.stop(proc)
    requests = max(res.requests, 1)
    return {"rate": res.rate, "cpu_us": (cpu1 - cpu0) * 1e6 / requests,
            "wakeups": (back1 - back0) / requests, "drops": net1[0] - net0[0],
            "retrans": net1[1] - net0[1], "errors": res.errors, **latency_ms(res.raw)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tail")
    parser.add_argument("--connections", default="64,1000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--against", metavar="REV", action="append", default=[],
                        help="also the balancer at git revision REV (repeatable)")
    conntrack.add_flag(parser)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "tail.md")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.connections.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench-tail-"))
    sup = Supervisor(workdir)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with conntrack.loopback_untracked(args.notrack) as tracking:
        try:
            backends = [start_nginx_backend(sup, workdir, i) for i in (1, 2)]
            tree, *others = revisions(args.against, workdir).items()
            rows = {"haproxy": Variant("haproxy"), tree[0]: Variant("balancer"),
                    **{rev: Variant(f"balancer@{rev}", source=path) for rev, path in others}}
            for run in range(args.runs):
                for row, variant in rows.items():
                    for count in counts:
                        figures = one_run(sup, workdir, variant, backends, count,
                                          args.duration, f"{run}-{count}")
                        results.setdefault((row, count), []).append(figures)
                        print(f"run {run + 1} {row} c{count}: " + ", ".join(
                            f"{k} {v:.3g}" for k, v in figures.items()), file=sys.stderr)
        finally:
            sup.stop_all()
    lines = [f"# The p99 tail (`python -m benchmarks.tail`), {began}", "",
             f"{args.runs} interleaved runs of {args.duration:g} s per row and connection "
             f"count; medians, and the worst run's p99 and max; {'; '.join(tracking)}.", "",
             "| proxy | conns | req/s | CPU µs/req | p50 ms | p90 ms | p99 ms (worst) | "
             "max ms (worst) | backend wake-ups/req | drops | retrans | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (row, count), runs in results.items():
        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r.get(key, float("nan")) for r in runs)

        def worst(key: str, runs: list[dict[str, float]] = runs) -> float:
            return max(r.get(key, float("nan")) for r in runs)
        lines.append(
            f"| {row} | {count} | {med('rate'):,.0f} | {med('cpu_us'):.1f} | {med('p50'):.1f} "
            f"| {med('p90'):.1f} | {med('p99'):.1f} ({worst('p99'):.1f}) | {med('max'):.0f} "
            f"({worst('max'):.0f}) | {med('wakeups'):.3f} | {worst('drops'):.0f} | "
            f"{worst('retrans'):.0f} | {worst('errors'):.0f} |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

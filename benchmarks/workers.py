"""Single process against clustered: the balancer with 1 worker and with 2 workers.

    python -m benchmarks.workers [--duration 10] [--runs 3]

The seed question: on this machine, does running two workers beat one process? For each
variant (direct to one backend; balancer `workers: 1`; balancer `workers: 2`) it measures the
keep-alive request rate (`wrk -c64`) and the new-connection rate (`wrk -H "Connection: close"`)
and the balancer's own CPU time per request (all its processes, from /proc). Nothing is pinned
here: the point is what the processes do with the whole machine, wrk and the nginx backends
included. Medians of `--runs`; writes benchmarks/results/workers.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .load import run_wrk
from .procs import Supervisor, cpu_seconds, free_port, wait_port
from .proxies import start_nginx_backend
from .setup_latency import balancer_config, publish


def wait_for_log(log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} not in {log} within {timeout:g}s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workers")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="balancer-workers-"))
    sup = Supervisor(workdir)
    rows = []
    try:
        backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
        variants: list[tuple[str, int, object]] = [("direct to one backend", backends[0], None)]
        for workers in (1, 2):
            port = free_port()
            config = workdir / f"balancer-{workers}.yaml"
            config.write_text(balancer_config(port, backends, workers=workers))
            # INFO, so the primary's "worker N started" lines reach the log we wait on.
            cmd = [sys.executable, "-m", "balancer", "-c", str(config), "-v", "info"]
            proc = sup.start(f"balancer-{workers}w", cmd, None)
            wait_port(port, 20, proc.popen, proc.log)
            if workers > 1:  # the primary listens first; wait until every worker serves
                wait_for_log(proc.log, f"worker {workers - 1} started", 20)
            variants.append((f"balancer, {workers} worker(s)", port, proc))
        for name, port, proc in variants:
            figures = {}
            for kind, close in (("keepalive", False), ("conn", True)):
                rates, cpu = [], []
                for _ in range(args.runs):
                    before = cpu_seconds(proc.pid) if proc else 0.0
                    result = run_wrk(port, args.duration, 64, close=close)
                    used = (cpu_seconds(proc.pid) - before) if proc else 0.0
                    rates.append(result.rate)
                    cpu.append(used / max(result.requests, 1) * 1e6)
                figures[kind] = (statistics.median(rates), statistics.median(cpu))
            if proc is not None and not proc.alive():
                raise RuntimeError(proc.death())
            rows.append((name, figures))
            print(f"{name:26s} keep-alive {figures['keepalive'][0]:9,.0f} req/s "
                  f"({figures['keepalive'][1]:5.1f} µs CPU/req)   new conn "
                  f"{figures['conn'][0]:8,.0f} /s ({figures['conn'][1]:6.1f} µs CPU/conn)",
                  flush=True)
    finally:
        sup.stop_all()
    lines = [
        "# Single process against clustered",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; 2 CPUs shared by wrk, "
        f"two nginx backends and the balancer (nothing pinned); wrk -t1 -c64, "
        f"{args.duration:g} s x {args.runs} runs (median)",
        "",
        "| variant | keep-alive req/s | CPU µs/req | new conn/s | CPU µs/conn |",
        "|---|---|---|---|---|",
    ]
    for name, f in rows:
        cpu_req = f"{f['keepalive'][1]:.1f}" if "balancer" in name else "—"
        cpu_conn = f"{f['conn'][1]:.1f}" if "balancer" in name else "—"
        lines.append(f"| {name} | {f['keepalive'][0]:,.0f} | {cpu_req} | {f['conn'][0]:,.0f} "
                     f"| {cpu_conn} |")
    publish(lines, Path(args.out) / "workers.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

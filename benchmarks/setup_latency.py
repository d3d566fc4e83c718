"""Connection-setup latency through the balancer, without and with a keepalive pool.

    python -m benchmarks.setup_latency [--connections 3000] [--pool 8]

For each variant (direct to a backend; balancer with `pool.size: 0`; balancer with
`pool.size: N`) a client on CPU 1 opens connections one after another and times each from
`connect()` to the first byte of the answer to one HTTP request: what a new client waits.
The balancer runs on CPU 0, the nginx backends on CPU 1. Prints p50/p99 per variant and the
pooled/unpooled ratio; writes benchmarks/results/setup_latency.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .procs import Supervisor, free_port, wait_port
from .proxies import balancer_conf, start_nginx_backend

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
CPU_PROXY, CPU_LOAD = 0, 1


def balancer_config(port: int, backends: list[int], pool: int = 0, workers: int = 1) -> str:
    """The harness's balancer config (proxies.balancer_conf), with a pool and worker count."""
    data = yaml.safe_load(balancer_conf(port, backends))
    data["upstreams"]["app"]["pool"] = {"size": pool, "idle_timeout": "60s"}
    data["workers"] = workers
    return yaml.safe_dump(data)


def measure(port: int, count: int) -> list[float]:
    """Seconds from connect() to the first byte of the answer, per connection."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(REQUEST)
            if not sock.recv(1):
                raise RuntimeError("connection closed without an answer")
            times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_client(port: int, count: int) -> list[float]:
    """Measure from a child pinned to the load CPU, so the proxy's core stays its own."""
    os.sched_setaffinity(0, {CPU_LOAD})
    measure(port, min(200, count))  # warm-up: pools filled, caches warm
    return measure(port, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.setup_latency")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="balancer-setup-"))
    sup = Supervisor(workdir)
    rows: list[tuple[str, float, float]] = []
    try:
        backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
        variants = [("direct to one backend", backends[0], None)]
        for pool in (0, args.pool):
            port = free_port()
            config = workdir / f"balancer-pool{pool}.yaml"
            config.write_text(balancer_config(port, backends, pool=pool))
            cmd = [sys.executable, "-m", "balancer", "-c", str(config), "-v", "warning"]
            proc = sup.start(f"balancer-pool{pool}", cmd, CPU_PROXY)
            wait_port(port, 15, proc.popen, proc.log)
            variants.append((f"balancer, pool.size {pool}", port, proc))
        for name, port, proc in variants:
            times = run_client(port, args.connections)
            if proc is not None and not proc.alive():
                raise RuntimeError(proc.death())
            rows.append((name, percentile(times, 0.5) * 1e6, percentile(times, 0.99) * 1e6))
            print(f"{name:28s} p50 {rows[-1][1]:7.0f} µs   p99 {rows[-1][2]:7.0f} µs   "
                  f"mean {statistics.fmean(times) * 1e6:7.0f} µs", flush=True)
    finally:
        sup.stop_all()
    unpooled, pooled = rows[1], rows[2]
    lines = [
        "# Connection-setup latency (connect to first answer byte)",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; "
        f"{args.connections} sequential connections per variant; balancer on CPU 0, client "
        "and nginx backends on CPU 1",
        "",
        "| variant | p50 µs | p99 µs |",
        "|---|---|---|",
        *(f"| {name} | {p50:.0f} | {p99:.0f} |" for name, p50, p99 in rows),
        "",
        f"pooled / unpooled: p50 {pooled[1] / unpooled[1]:.2f}x, "
        f"p99 {pooled[2] / unpooled[2]:.2f}x",
    ]
    publish(lines, Path(args.out) / "setup_latency.md")
    return 0


def publish(lines: list[str], path: Path) -> None:
    """Print the Markdown report and write it to `path`."""
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

"""TLS termination: the balancer against HAProxy (`bind ... ssl crt`), in one run.

    python -m benchmarks.tls [--duration 10] [--runs 3]

Both proxies terminate TLS with the same RSA-2048 certificate (ECDHE key exchange, TLS 1.3 as
negotiated by default) in front of the same two nginx backends, pinned as the main harness
pins: the proxy alone on CPU 0, load and backends on CPU 1. Two figures, each the proxy's own
CPU time (utime+stime of its process tree, from /proc) divided by the work done:

- CPU per new TLS connection: `openssl s_time -new` (a full handshake every time, never a
  resumed session), each connection one `GET /` answered through the proxy.
- CPU per keep-alive request through TLS: `wrk -t1 -c64 https://...` (64 handshakes, then
  requests on them).

Runs are interleaved (run 1 of each proxy, then run 2...), medians kept, and the ratio of the
balancer to HAProxy is the figure to read. Writes benchmarks/results/tls.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .load import parse_s_time, run_s_time, run_wrk
from .procs import CPU_PROXY, Proc, Supervisor, cpu_seconds, free_port, wait_port
from .proxies import (
    REPO,
    balancer_command,
    balancer_tls_conf,
    haproxy_tls_conf,
    make_certificate,
    start_nginx_backend,
)

__all__ = ["main", "parse_s_time"]
from .setup_latency import publish

PROXIES = ("haproxy", "balancer")
GOALS = {"handshake": 1.5, "keepalive": 1.3}  # the goals, as ratios to HAProxy


def start(sup: Supervisor, workdir: Path, proxy: str, upstreams: list[int],
          files: tuple[Path, Path, Path], balancer_cmd: str | None) -> tuple[Proc, int]:
    port = free_port()
    cert, key, both = files
    if proxy == "haproxy":
        conf = workdir / f"haproxy-{port}.cfg"
        conf.write_text(haproxy_tls_conf(port, upstreams, both))
        proc = sup.start("haproxy", ["haproxy", "-db", "-f", str(conf)], CPU_PROXY)
    else:
        conf = workdir / f"balancer-{port}.yaml"
        conf.write_text(balancer_tls_conf(port, upstreams, cert, key))
        proc = sup.start("balancer", balancer_command(balancer_cmd, conf), CPU_PROXY,
                         cwd=str(REPO))
    wait_port(port, 20, proc.popen, proc.log)
    return proc, port


def measure(proc: Proc, port: int, test: str, seconds: float) -> tuple[float, float]:
    """(rate per second, proxy CPU µs per unit) of one run."""
    before = cpu_seconds(proc.pid)
    if test == "handshake":
        units = run_s_time(port, seconds)
        elapsed = seconds
    else:
        result = run_wrk(port, seconds, 64, url=f"https://127.0.0.1:{port}/")
        units, elapsed = result.requests, result.seconds
    used = cpu_seconds(proc.pid) - before
    if not proc.alive():
        raise RuntimeError(proc.death())
    return units / elapsed, used / max(units, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls")
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--balancer-cmd", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    missing = [tool for tool in ("haproxy", "wrk", "nginx", "openssl") if not shutil.which(tool)]
    if missing:
        print(f"benchmarks.tls: missing {', '.join(missing)}; nothing measured", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="balancer-tls-"))
    sup = Supervisor(workdir)
    cells: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        files = make_certificate(workdir)
        backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
        for run in range(args.runs):
            for test in ("handshake", "keepalive"):
                for proxy in PROXIES:
                    proc, port = start(sup, workdir, proxy, backends, files, args.balancer_cmd)
                    try:
                        rate, cpu = measure(proc, port, test, args.duration)
                    finally:
                        sup.stop(proc)
                    cells.setdefault((proxy, test), []).append((rate, cpu))
                    print(f"run {run + 1}/{args.runs} {test:9s} {proxy:8s} {rate:9,.0f}/s "
                          f"{cpu:7.1f} µs CPU each", file=sys.stderr, flush=True)
    finally:
        sup.stop_all()
    median = {key: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
              for key, v in cells.items()}
    ratio = {test: median[("balancer", test)][1] / median[("haproxy", test)][1]
             for test in ("handshake", "keepalive")}
    lines = [
        "# TLS termination: balancer against HAProxy",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; proxy pinned to CPU 0, "
        f"load and two nginx backends on CPU 1; RSA-2048 certificate, ECDHE, TLS 1.3; "
        f"{args.duration:g} s x {args.runs} runs, interleaved (median)",
        "- new connection: `openssl s_time -new` (full handshake, one GET each); keep-alive: "
        "`wrk -t1 -c64` over https",
        "",
        "| proxy | new TLS conn/s | CPU µs/handshake | keep-alive req/s | CPU µs/req |",
        "|---|---|---|---|---|",
    ]
    for proxy in PROXIES:
        hs, ka = median[(proxy, "handshake")], median[(proxy, "keepalive")]
        mark = "" if proxy == "haproxy" else " ({:.2f}x)"
        lines.append(f"| {proxy} | {hs[0]:,.0f} | {hs[1]:.1f}{mark.format(ratio['handshake'])} "
                     f"| {ka[0]:,.0f} | {ka[1]:.1f}{mark.format(ratio['keepalive'])} |")
    lines += ["", "Goals: at most {:.1f}x HAProxy's CPU per handshake (now {:.2f}x), at most "
              "{:.1f}x per keep-alive request (now {:.2f}x).".format(
                  GOALS["handshake"], ratio["handshake"], GOALS["keepalive"],
                  ratio["keepalive"])]
    lines += ["", "Every run, proxy CPU µs per unit (the spread shows the machine's noise):", ""]
    for (proxy, test), values in sorted(cells.items()):
        lines.append(f"- {test} {proxy}: " + ", ".join(f"{cpu:.1f}" for _, cpu in values))
    publish(lines, Path(args.out) / "tls.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

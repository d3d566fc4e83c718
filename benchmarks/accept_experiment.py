"""Issue 18, experiment 1, measured: the prototypes of accept_proxies.py side by side with
the balancer and HAProxy.

    python -m benchmarks.accept_experiment [--runs 5] [--duration 8] [--bulk-duration 5]
        [--tests conn,keepalive,bulk,syscalls] [--rows haproxy,balancer,A/uvloop,...]
        [--out benchmarks/results/accept_experiment.md]

Rows: HAProxy (`mode tcp`, the harness's config) and the balancer (the harness's config),
each with one upstream, and each prototype (A transports, B rawaccept, C sockets) on uvloop
and on the stdlib loop. Every proxy runs alone on CPU 0; wrk, iperf3 and the nginx backend
on CPU 1 (the harness's helpers: proxies.start_nginx_backend, runner.t_conn ...). Each run
starts a fresh proxy, warms it up for 2 s, then measures its utime+stime from /proc:

- conn: CPU µs per new connection, `wrk -t1 -c64 -H "Connection: close"`;
- keepalive: CPU µs per keep-alive request, `wrk -t1 -c64`;
- bulk: CPU ms per GiB of one iperf3 stream through the proxy (upstream an iperf3 server);
- syscalls: `strace -c -f` under `wrk -c16 -H "Connection: close"`, calls per connection
  (once per row, after the timed runs: strace slows everything, so only counts mean much).

Runs are interleaved (run i of every row back to back) and each records the 1-minute load
average; the table gives medians, the paired ratio to A/uvloop and to HAProxy (median of
run i against run i), and every run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import load, runner
from .procs import CPU_PROXY, Proc, StartError, Supervisor, free_port, wait_port
from .proxies import REPO, Variant, start_iperf_server, start_nginx_backend, start_proxy
from .setup_latency import publish
from .syscalls import traced

ROWS = ("haproxy", "balancer", "A/uvloop", "B/uvloop", "C/uvloop", "A/asyncio", "B/asyncio",
        "C/asyncio")
PROTOTYPE = {"A": "transports", "B": "rawaccept", "C": "sockets"}
TESTS = ("conn", "keepalive", "bulk", "syscalls")
BASELINE = "A/uvloop"


def prototype_command(row: str, port: int, upstream: int) -> list[str]:
    """`A/uvloop` -> the command running accept_proxies' `transports` variant on uvloop."""
    letter, loop = row.split("/")
    return [sys.executable, "-m", "benchmarks.accept_proxies", PROTOTYPE[letter], loop,
            str(port), str(upstream)]


def start_row(ctx: runner.Context, row: str, upstream: int, run_id: str) -> tuple[Proc, int]:
    """A fresh proxy of `row` in front of `upstream`, listening: (process, port)."""
    if row in ("haproxy", "balancer"):
        proc, port = start_proxy(ctx.sup, ctx.workdir, Variant(row), [upstream], None, run_id)
        assert proc is not None
        return proc, port
    port = free_port()
    proc = ctx.sup.start(f"{row.replace('/', '-')}-{run_id}",
                         prototype_command(row, port, upstream), CPU_PROXY, cwd=str(REPO))
    try:
        wait_port(port, 15, proc.popen, proc.log)
    except Exception:
        ctx.sup.stop(proc)
        raise
    return proc, port


def one_run(ctx: runner.Context, row: str, test: str, run_id: str) -> dict[str, Any]:
    """One measurement of `test` on a fresh proxy of `row`."""
    assert ctx.iperf is not None
    loadavg = float(Path("/proc/loadavg").read_text().split()[0])
    upstream = ctx.iperf[1] if test == "bulk" else ctx.backend_ports[0]
    proc, port = start_row(ctx, row, upstream, run_id)
    try:
        if test == "bulk":
            load.run_iperf(port, 1, 1)  # warm-up
            result = runner.t_bulk(ctx, proc, port)
        else:
            load.run_wrk(port, 2, 64, close=test == "conn")  # warm-up
            result = (runner.t_conn if test == "conn" else runner.t_keepalive)(ctx, proc, port)
            if result["errors"]:
                raise runner.RunFailed(f"{row}: {result['errors']} wrk errors")
        if not proc.alive():
            raise runner.RunFailed(proc.death())
        value = result["cpu_ms_per_gib"] if test == "bulk" else result["cpu_us"]
        return {"value": value, "loadavg": loadavg, "proxy_cpu_pct": result["proxy_cpu_pct"],
                "cpu0_busy_pct": result["cpu0_busy_pct"],
                "rate": result.get("gbps") if test == "bulk" else result["rate"]}
    finally:
        ctx.sup.stop(proc)


def count_syscalls(ctx: runner.Context, row: str, seconds: float) -> dict[str, float]:
    proc, port = start_row(ctx, row, ctx.backend_ports[0], "strace")
    try:
        calls, requests = traced(proc, port, seconds,
                                 ctx.workdir / f"strace-{row.replace('/', '-')}.txt")
    finally:
        ctx.sup.stop(proc)
    return {name: n / requests for name, n in calls.items()}


UNITS = {"conn": "CPU µs per new connection (wrk -c64, Connection: close)",
         "keepalive": "CPU µs per keep-alive request (wrk -c64)",
         "bulk": "CPU ms per GiB, one iperf3 stream"}


def paired(runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> float | None:
    """Median of run i against the base row's run i (the drift between runs cancels)."""
    ratios = [r["value"] / b["value"] for r, b in zip(runs, base, strict=False)
              if r.get("value") and b.get("value")]
    return statistics.median(ratios) if ratios else None


STALLED = 15.0  # proxy CPU % below which the load, not the proxy, set the pace of a run


def _cell(r: dict[str, Any]) -> str:
    """One run's figure; `~` marks a run whose proxy was mostly idle (the load generator
    stalled, seen here as connects taking seconds), so its fixed costs weigh on the figure."""
    if not r.get("value"):
        return "fail"
    stalled = (r.get("proxy_cpu_pct") or 0) < STALLED
    return f"{'~' if stalled else ''}{r['value']:.1f}"


def figure_table(test: str, rows: list[str], figures: dict[str, list[dict[str, Any]]]
                 ) -> list[str]:
    lines = [f"{UNITS[test]}:", "",
             f"| row | median | paired vs {BASELINE} | paired vs haproxy | runs | "
             "proxy CPU % | load |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = figures[row]
        ok = [r["value"] for r in runs if r.get("value")]
        median = f"{statistics.median(ok):.1f}" if ok else "FAIL"
        ratios = []
        for base in (BASELINE, "haproxy"):
            ratio = paired(runs, figures[base]) if base in figures else None
            ratios.append(f"{ratio:.3f}x" if ratio is not None else "—")
        each = ", ".join(_cell(r) for r in runs)
        pct = ", ".join(f"{r['proxy_cpu_pct']:.0f}" if r.get("proxy_cpu_pct") else "—"
                        for r in runs)
        loads = ", ".join(f"{r['loadavg']:.1f}" for r in runs)
        lines.append(f"| {row} | {median} | {ratios[0]} | {ratios[1]} | {each} | {pct} | "
                     f"{loads} |")
    return [*lines, ""]


def syscall_table(columns: dict[str, dict[str, float]]) -> list[str]:
    names = sorted({n for c in columns.values() for n in c
                    if max(col.get(n, 0) for col in columns.values()) >= 0.05},
                   key=lambda n: -max(col.get(n, 0) for col in columns.values()))
    return [
        "Syscalls per connection (`strace -c -f`, wrk -c16 Connection: close; rows under "
        "0.05 left out):", "",
        "| syscall | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {n} | " + " | ".join(f"{c.get(n, 0):.2f}" for c in columns.values()) + " |"
          for n in names),
        "| **total** | " + " | ".join(f"**{sum(c.values()):.1f}**"
                                      for c in columns.values()) + " |",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accept_experiment")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--bulk-duration", type=float, default=5.0)
    parser.add_argument("--strace-duration", type=float, default=5.0)
    parser.add_argument("--tests", default=",".join(TESTS))
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "accept_experiment.md"))
    args = parser.parse_args(argv)
    tests = [t for t in args.tests.split(",") if t]
    rows = [r for r in args.rows.split(",") if r]
    if bad := [t for t in tests if t not in TESTS] + [r for r in rows if r not in ROWS]:
        parser.error(f"unknown {bad}; tests: {','.join(TESTS)}; rows: {','.join(ROWS)}")
    workdir = Path(tempfile.mkdtemp(prefix="balancer-accept-"))
    sup = Supervisor(workdir)
    head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, check=False).stdout.strip()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    figures: dict[str, dict[str, list[dict[str, Any]]]] = {}
    columns: dict[str, dict[str, float]] = {}
    try:
        backend, backend_port = start_nginx_backend(sup, workdir, 0)
        ctx = runner.Context(sup, workdir, args.duration, [backend], [backend_port], None,
                             iperf=start_iperf_server(sup))
        timed = [t for t in tests if t != "syscalls"]
        for run in range(args.runs):
            for test in timed:
                ctx.duration = args.bulk_duration if test == "bulk" else args.duration
                for row in rows:
                    try:
                        r = one_run(ctx, row, test, f"{test}-{run}")
                    except (runner.RunFailed, StartError, load.LoadError, OSError) as exc:
                        r = {"value": None, "loadavg": 0.0, "error": str(exc)}
                    figures.setdefault(test, {}).setdefault(row, []).append(r)
                    shown = f"{r['value']:.1f}" if r.get("value") else f"FAIL {r.get('error')}"
                    print(f"run {run + 1}/{args.runs} {test:9s} {row:10s} {shown}  "
                          f"[proxy {r.get('proxy_cpu_pct') or 0:.0f}% CPU, CPU 0 "
                          f"{r.get('cpu0_busy_pct') or 0:.0f}% busy, load "
                          f"{r['loadavg']:.2f}]", flush=True)
        if "syscalls" in tests:
            for row in rows:
                columns[row] = count_syscalls(ctx, row, args.strace_duration)
                print(f"syscalls {row}: {sum(columns[row].values()):.1f} per connection",
                      flush=True)
    finally:
        sup.stop_all()
    load_end = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        "# Issue 18 experiment 1: accept/connect without a uvloop transport",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; commit {head}; "
        f"`python -m benchmarks.accept_experiment {' '.join(argv or sys.argv[1:])}`",
        f"- {args.runs} runs interleaved, {args.duration:g} s each ({args.bulk_duration:g} s "
        "bulk) after a warm-up; proxy alone on CPU 0, wrk/iperf3/nginx on CPU 1; one "
        "upstream for every row",
        f"- load average at start {' '.join(load_start)}, at end {' '.join(load_end)}",
        "",
    ]
    for test in tests:
        if test in figures:
            lines += figure_table(test, rows, figures[test])
    if columns:
        lines += syscall_table(columns)
    publish(lines, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

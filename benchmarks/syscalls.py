"""Syscalls per proxied connection: `strace -c -f` on each proxy under connection churn.

    python -m benchmarks.syscalls [--duration 5] [--variants plain,defer_accept] [--against REV]

Each proxy (HAProxy, then the balancer in each config variant of benchmarks.features and at
each `--against` revision) is started on CPU 0 in front of two nginx backends, warmed up, and
then traced (`strace -c -f` attached to every thread) while `wrk -t1 -c16` with
`Connection: close` runs on CPU 1: one client and one upstream connection per request. Each
syscall's count is divided by the requests wrk completed. strace slows the proxy down a lot,
so only the counts mean anything here, not the times. Writes benchmarks/results/syscalls.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import load
from .__main__ import _export
from .features import config_for
from .procs import CPU_PROXY, Proc, Supervisor, free_port, wait_port
from .proxies import REPO, haproxy_conf, start_nginx_backend
from .setup_latency import publish

ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c` table -> {syscall: calls} (the `total` line left out)."""
    calls = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = int(m.group(1))
    return calls


def traced(proc: Proc, port: int, seconds: float, out: Path) -> tuple[dict[str, int], int]:
    """(syscall counts, requests) of one wrk run with strace attached to every thread."""
    load.run_wrk(port, 1, 16, close=True)  # warm-up: lazily made things exist
    tids = [t for t in os.listdir(f"/proc/{proc.pid}/task")]
    args = ["strace", "-c", "-f", "-o", str(out)]
    for tid in tids:
        args += ["-p", tid]
    tracer = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attaching takes a moment; wrk starts after it
    try:
        result = load.run_wrk(port, seconds, 16, close=True)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
    return parse_strace_summary(out.read_text()), result.requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.syscalls")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--variants", default="plain")
    parser.add_argument("--against", action="append", default=[], metavar="REV")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "syscalls.md"))
    args = parser.parse_args(argv)
    if not shutil.which("strace"):
        print("benchmarks.syscalls: strace is not installed (apt-get install -y strace)",
              file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="balancer-syscalls-"))
    sup = Supervisor(workdir)
    columns: dict[str, dict[str, float]] = {}
    try:
        backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
        sources = {"balancer": REPO, **{f"balancer@{rev}": _export(rev, workdir)
                                        for rev in args.against}}
        runs: list[tuple[str, list[str], str | None, str]] = []
        port = free_port()
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, backends, False))
        runs.append(("haproxy", ["haproxy", "-db", "-f", str(conf)], None, str(port)))
        for name, source in sources.items():
            for variant in args.variants.split(","):
                port = free_port()
                conf = workdir / f"{name}-{variant}.yaml"
                conf.write_text(config_for(variant, port, backends))
                label = name if variant == "plain" else f"{name} {variant}"
                runs.append((label, [sys.executable, "-m", "balancer", "-c", str(conf), "-v",
                                     "warning"], str(source), str(port)))
        for label, cmd, cwd, port_text in runs:
            proc = sup.start(label.replace(" ", "-"), cmd, CPU_PROXY, cwd=cwd)
            try:
                wait_port(int(port_text), 15, proc.popen, proc.log)
                calls, requests = traced(proc, int(port_text), args.duration,
                                         workdir / f"strace-{len(columns)}.txt")
            finally:
                sup.stop(proc)
            columns[label] = {name: n / requests for name, n in calls.items()}
            print(f"{label}: {requests} connections, "
                  f"{sum(columns[label].values()):.1f} syscalls each", flush=True)
    finally:
        sup.stop_all()
    names = sorted({n for c in columns.values() for n in c if max(
        col.get(n, 0) for col in columns.values()) >= 0.05},
        key=lambda n: -max(col.get(n, 0) for col in columns.values()))
    lines = [
        "# Syscalls per proxied connection",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; `strace -c -f` on "
        f"each proxy (every thread) under `wrk -t1 -c16 -H 'Connection: close'` for "
        f"{args.duration:g} s, counts divided by the connections served; rows under 0.05 "
        "per connection left out",
        "",
        "| syscall | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {n} | " + " | ".join(f"{c.get(n, 0):.2f}" for c in columns.values()) + " |"
          for n in names),
        "| **total** | " + " | ".join(f"**{sum(c.values()):.1f}**" for c in columns.values())
        + " |",
    ]
    publish(lines, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

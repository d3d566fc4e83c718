"""What one new connection costs the balancer in steady units: Python calls and user-space
instructions, for config variants and revisions side by side.

    python -m benchmarks.conncost [--variants plain,metrics] [--against REV]
                                  [--measure calls,instructions] [--connections 600]
                                  [--rate 100] [--rounds 2] [--notrack]

CPU time per connection moves by +-10% run to run on a shared 2-core machine; these two do
not (much): `calls` runs the balancer under cProfile, switched on after a warm-up (SIGUSR1)
and dumped after the measured connections (SIGUSR2), and divides every function's call
count by the connections made; `instructions` runs it under valgrind's callgrind with
instrumentation off until the warm-up is done, then counts the user-space instructions
(`Ir`, kernel work not included) of the measured connections. The connections are paced
(`--rate` a second, one at a time: an HTTP/1.0 GET through the balancer to one of two
nginx backends, read to the end), so each is handled alone and a loop pass does the same
work in every row. Rows run in turn, round after round (interleaved).
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import conntrack
from .features import VARIANTS, config_for, revisions
from .procs import CPU_PROXY, Supervisor, free_port, wait_port
from .proxies import start_nginx_backend

# The balancer's CLI, with cProfile switched on and off from outside (run with -c, so that
# an exported revision's `balancer/` in the working directory is the one imported).
PROFILED = """\
import cProfile, signal, sys
from balancer.cli import main
profile = cProfile.Profile()
signal.signal(signal.SIGUSR1, lambda *_: profile.enable())
def dump(*_):
    profile.disable()
    profile.dump_stats(sys.argv[2])
signal.signal(signal.SIGUSR2, dump)
sys.exit(main(["-c", sys.argv[1], "-v", "warning"]))
"""


def paced(port: int, count: int, rate: float) -> int:
    """`count` connections one after another, at most `rate` a second; returns how many
    got a whole response."""
    done = 0
    request = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
    gap = 1.0 / rate
    start = time.monotonic()
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            done += answer.startswith(b"HTTP/1.1 200")
        wait = start + (i + 1) * gap - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    return done


def measure_calls(sup: Supervisor, workdir: Path, source: Path, config: Path, port: int,
                  args: argparse.Namespace, name: str) -> dict[str, float]:
    out = workdir / f"{name}.prof"
    cmd = [sys.executable, "-c", PROFILED, str(config), str(out)]
    proc = sup.start(name, cmd, CPU_PROXY, cwd=str(source))
    try:
        wait_port(port, 30, proc.popen, proc.log)
        paced(port, 50, args.rate)  # warm-up: children bound, caches filled
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)
        made = paced(port, args.connections, args.rate)
        os.kill(proc.pid, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # written whole
    finally:
        sup.stop(proc)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    per: dict[str, float] = {"all": 0.0, "balancer": 0.0, "prometheus_client": 0.0}
    for (path, _line, func), (_cc, calls, *_rest) in stats.items():
        per["all"] += calls / made
        if "/balancer/" in path:
            per["balancer"] += calls / made
            per[f"balancer:{Path(path).name}:{func}"] = calls / made
        elif "prometheus_client" in path:
            per["prometheus_client"] += calls / made
            per[f"prometheus:{Path(path).name}:{func}"] = calls / made
        elif path == "~":
            per[f"builtin:{func}"] = calls / made
    return per


def measure_instructions(sup: Supervisor, workdir: Path, source: Path, config: Path,
                         port: int, args: argparse.Namespace, name: str) -> dict[str, float]:
    out = workdir / f"{name}.callgrind"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
           f"--callgrind-out-file={out}", sys.executable, "-m", "balancer", "-c", str(config),
           "-v", "warning"]
    proc = sup.start(name, cmd, CPU_PROXY, cwd=str(source))
    try:
        wait_port(port, 120, proc.popen, proc.log)
        paced(port, 50, args.rate / 4)
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       capture_output=True)
        made = paced(port, args.connections, args.rate)
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       capture_output=True)
    finally:
        sup.stop(proc, grace=30)
    total = 0
    for path in workdir.glob(f"{name}.callgrind*"):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):  # ("summary:" comes first, and is 0 here)
                total += int(line.split()[1])
                break
    return {"instructions": total / made}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conncost")
    parser.add_argument("--variants", default="plain,metrics")
    parser.add_argument("--against", action="append", default=[], metavar="REV")
    parser.add_argument("--measure", default="calls,instructions")
    parser.add_argument("--connections", type=int, default=600)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="functions listed per row")
    conntrack.add_flag(parser)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    measures = [m for m in args.measure.split(",") if m]
    if bad := [v for v in variants if v not in VARIANTS] + [
            m for m in measures if m not in ("calls", "instructions")]:
        parser.error(f"unknown {bad}")
    workdir = Path(tempfile.mkdtemp(prefix="balancer-conncost-"))
    sup = Supervisor(workdir)
    sources = revisions(args.against, workdir)
    rows = [(rev, variant) for rev in sources for variant in variants]
    results: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with conntrack.loopback_untracked(args.notrack) as tracking:
        try:
            backends = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
            for round_ in range(args.rounds):
                for measure in measures:
                    for rev, variant in rows:
                        port = free_port()
                        name = f"{measure}-{variant}-{len(results)}-{round_}"
                        config = workdir / f"{name}.yaml"
                        config.write_text(config_for(variant, port, backends))
                        run = measure_calls if measure == "calls" else measure_instructions
                        load = float(Path("/proc/loadavg").read_text().split()[0])
                        figures = run(sup, workdir, sources[rev], config, port, args, name)
                        figures["loadavg"] = load
                        results.setdefault((measure, rev, variant), []).append(figures)
                        main_figure = figures.get("instructions", figures.get("all", 0.0))
                        print(f"round {round_ + 1} {measure:12s} {rev} {variant:8s} "
                              f"{main_figure:10.1f} per connection (load {load:.2f})",
                              flush=True)
        finally:
            sup.stop_all()
    print(f"\n{'; '.join(tracking)}")
    for (measure, rev, variant), runs in results.items():
        loads = ", ".join(f"{r['loadavg']:.1f}" for r in runs)
        if measure == "instructions":
            values = ", ".join(f"{r['instructions'] / 1000:.1f}k" for r in runs)
            print(f"\n{rev} {variant}: user instructions per connection {values} "
                  f"(load {loads})")
            continue
        print(f"\n{rev} {variant}: calls per connection (median of {len(runs)}; load {loads})")
        keys = {k for r in runs for k in r if k != "loadavg"}
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        for key in ("all", "balancer", "prometheus_client"):
            print(f"  {key:60s} {med[key]:7.2f}")
        listed = sorted((k for k in keys if ":" in k and med[k] >= 0.5),
                        key=lambda k: -med[k])[:args.top]
        for key in listed:
            print(f"  {key:60s} {med[key]:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

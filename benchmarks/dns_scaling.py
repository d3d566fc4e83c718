"""A DNS name scaled from 2 to 4 addresses and back to 2 under steady load: no client errors.

    python -m benchmarks.dns_scaling [--duration 40] [--workers 1] [--connections 32]
                                     [--keepalive]

dnsmasq (tests/dnsmasq.py) serves `app`; four nginx backends listen on 127.0.0.2-5, one port,
as replicas would; the balancer discovers `app:PORT` every second (hold 5 s). `wrk` runs for
the whole duration, by default with `Connection: close` (a new client and server connection
for every request, so new servers take traffic at once and leaving ones get none); the name
goes to four addresses at 25% of the run and back to two at 65%. Prints and writes
benchmarks/results/dns_scaling.md: requests, rate, p99, client errors (socket errors and
non-2xx answers), connections per server and the balancer's change lines with their times.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from tests.dnsmasq import Dnsmasq, available

from .load import WrkResult, parse_wrk
from .procs import CPU_LOAD, Supervisor, free_port, pinned, wait_port
from .proxies import nginx_http_backend

CPU_PROXY = 0
RESULTS = Path(__file__).parent / "results" / "dns_scaling.md"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def start_backend(sup: Supervisor, workdir: Path, host: str, port: int) -> None:
    """An nginx answering 200 "ok" on host:port, one process, on the load CPU."""
    cmd = nginx_http_backend(workdir / f"nginx-{host}", [f"{host}:{port} backlog=4096"])
    sup.start(f"nginx-{host}", cmd, CPU_LOAD)


def balancer_config(listen: int, admin: int, port: int, nameserver: str, workers: int) -> str:
    return yaml.safe_dump({
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{listen}", "upstream": "app"}],
        "upstreams": {"app": {"strategy": "round_robin",
                              "servers": [{"discover": f"app:{port}"}]}},
        "resolvers": {"nameservers": [nameserver], "interval": "1s", "timeout": "500ms",
                      "hold": "5s"},
        "metrics": {"bind": f"127.0.0.1:{admin}"},
        "workers": workers,
        "shutdown_timeout": "60s",
    })


async def session(args: argparse.Namespace, workdir: Path, sup: Supervisor) -> str:
    dns = Dnsmasq(workdir / "dns")
    try:
        port = free_port()
        for host in HOSTS:
            start_backend(sup, workdir, host, port)
        listen, admin = free_port(), free_port()
        config = workdir / "balancer.yaml"
        config.write_text(balancer_config(listen, admin, port, dns.nameserver, args.workers))
        await dns.set("app", HOSTS[:2])
        balancer = sup.start("balancer", [sys.executable, "-m", "balancer", "-c", str(config)],
                             CPU_PROXY)
        wait_port(listen, 20, balancer.popen, balancer.log)
        cmd = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "5s",
               "--latency", f"http://127.0.0.1:{listen}/"]
        if not args.keepalive:
            cmd[1:1] = ["-H", "Connection: close"]
        started = time.monotonic()
        wrk = await asyncio.create_subprocess_exec(*pinned(cmd, CPU_LOAD),
                                                   stdout=subprocess.PIPE)
        changes = []
        await asyncio.sleep(args.duration * 0.25)
        await dns.set("app", HOSTS)
        changes.append(f"{time.monotonic() - started:5.1f} s: app -> 4 addresses")
        await asyncio.sleep(args.duration * 0.40)
        await dns.set("app", HOSTS[:2])
        changes.append(f"{time.monotonic() - started:5.1f} s: app -> 2 addresses")
        out, _ = await wrk.communicate()
        result = parse_wrk(out.decode())
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read()
        logged = balancer.log.read_text()
        return report(args, result, metrics.decode(), logged, changes)
    finally:
        dns.stop()


def report(args: argparse.Namespace, result: WrkResult, metrics: str, logged: str,
           changes: list[str]) -> str:
    per_server = {}
    for line in metrics.splitlines():
        match = re.match(r'balancer_connections_total\{.*server="([^"]+)".*\} ([\d.e+]+)', line)
        if match:
            per_server[match.group(1)] = per_server.get(match.group(1), 0) + float(match.group(2))
    lines = [line.split(" INFO ", 1)[-1] for line in logged.splitlines() if "(dns app)" in line]
    problems = [line for line in logged.splitlines() if " ERROR " in line or "Traceback" in line]
    mode = "keep-alive" if args.keepalive else "Connection: close (one connection per request)"
    text = [
        "# DNS scaling under load: 2 -> 4 -> 2 addresses",
        "",
        f"`python -m benchmarks.dns_scaling --duration {args.duration} --workers {args.workers}"
        f" --connections {args.connections}{' --keepalive' if args.keepalive else ''}`: wrk -t1 "
        f"-c{args.connections}, {mode}; four nginx backends on 127.0.0.2-5; dnsmasq; the "
        "balancer re-resolves every 1 s (hold 5 s).",
        "",
        "| requests | seconds | requests/s | p99 ms | socket errors | non-2xx |",
        "|---|---|---|---|---|---|",
        f"| {result.requests} | {result.seconds:.1f} | {result.rate:.0f} | {result.p99_ms} | "
        f"{result.socket_errors} | {result.non_2xx} |",
        "",
        "DNS changes: " + "; ".join(changes),
        "",
        "Balancer's change lines:",
        "",
        *(f"    {line}" for line in lines),
        "",
        "Proxied connections per server (only servers still configured are shown):",
        "",
        *(f"    {server}: {count:.0f}" for server, count in sorted(per_server.items())),
        "",
        f"Errors in the balancer's log: {len(problems)}",
    ]
    return "\n".join(text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--keepalive", action="store_true")
    args = parser.parse_args()
    if not available():
        sys.exit("dnsmasq is not installed (apt-get install dnsmasq-base)")
    with tempfile.TemporaryDirectory(prefix="dns-scaling-") as tmp:
        sup = Supervisor(Path(tmp))
        try:
            text = asyncio.run(session(args, Path(tmp), sup))
        finally:
            sup.stop_all()
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()

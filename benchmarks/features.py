"""What a feature or a code change costs: balancer variants side by side, interleaved.

    python -m benchmarks.features [--variants plain,per_client,send_proxy,both]
                                  [--against REV] [--tests conn,keepalive]
                                  [--duration 8] [--runs 5] [--out results/features.md]

Each row is a (revision, config variant) pair: the working tree and every `--against REV`
(that revision's `balancer/` package unpacked from `git archive`), times each variant of the
benchmark config. Each run starts a fresh balancer on CPU 0 and drives it with wrk on CPU 1
(`-c64`, with `Connection: close` for `conn`: one client and one upstream connection per
request), after a 2 s warm-up; the figure is the balancer's CPU time per request (utime +
stime of its process, from /proc), and its user part alone (where a change to the
balancer's Python shows, apart from the kernel's share; /proc counts in 10 ms ticks, so
about 2% resolution at 8 s). Runs go round all rows in turn (run 1 of every row, then
run 2...) so that the load of the machine, which other work shares, spreads evenly; each run
records the 1-minute load average at its start. The table has the medians, every run, and
each row's ratio to the first row, both as the ratio of the medians and as the median
of the per-run ratios (run i of each row against run i of the first: less drift).

Variants: `plain` (the harness's config), `per_client` (limits far above the load: nothing
refused, only the gate is paid for), `send_proxy` (a PROXY v2 header on every server
connection; the nginx backends then require one), `both`, `defer_accept`
(TCP_DEFER_ACCEPT on the listener), `metrics` (the admin endpoint on, so every connection
feeds the Prometheus metrics; nothing scrapes them during the run), `nosplice`
(`splice_auto: false`: no connection moves to the splice pump).
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

import yaml

from . import conntrack, load
from .__main__ import _export
from .procs import CPU_PROXY, Supervisor, cpu_split, free_port, wait_port
from .proxies import REPO, balancer_conf, start_nginx_backend
from .setup_latency import publish

VARIANTS = ("plain", "per_client", "send_proxy", "both", "defer_accept", "metrics",
            "nosplice")


def config_for(variant: str, port: int, backends: list[int]) -> str:
    data: dict[str, Any] = yaml.safe_load(balancer_conf(port, backends))
    listener, upstream = data["listeners"][0], data["upstreams"]["app"]
    if variant in ("per_client", "both"):
        listener["per_client"] = {"max_conns": 1_000_000, "rate": "1000000/s"}
    if variant in ("send_proxy", "both"):
        upstream["send_proxy"] = "v2"
    if variant == "defer_accept":
        listener["defer_accept"] = True
    if variant == "metrics":
        data["metrics"] = {"bind": "127.0.0.1:0"}
    if variant == "nosplice":
        listener["splice_auto"] = False
    return yaml.safe_dump(data)


def balancer_cpu(sup: Supervisor, workdir: Path, name: str, config_text: str, port: int,
                 duration: float, close: bool = True,
                 source: Path | None = None) -> dict[str, float]:
    """One fresh balancer (config `config_text`, listening on `port`) on CPU_PROXY under
    wrk -c64 after a 2 s warm-up: its CPU µs per request (per connection with `close`), the
    user part, and the rate. Shared by this module, accept_limits and pick_e2e."""
    config = workdir / f"{name}.yaml"
    config.write_text(config_text)
    cmd = [sys.executable, "-m", "balancer", "-c", str(config), "-v", "warning"]
    proc = sup.start(f"balancer-{name}", cmd, CPU_PROXY,
                     cwd=str(source) if source is not None else None)
    try:
        wait_port(port, 30, proc.popen, proc.log)
        load.run_wrk(port, 2, 64, close=close)  # warm-up
        user0, sys0 = cpu_split(proc.pid)
        result = load.run_wrk(port, duration, 64, close=close)
        user1, sys1 = cpu_split(proc.pid)
        if not result.requests or result.errors:
            raise RuntimeError(f"{name}: {result.requests} requests, {result.errors} errors")
        if not proc.alive():
            raise RuntimeError(proc.death())
        return {"cpu_us": (user1 - user0 + sys1 - sys0) * 1e6 / result.requests,
                "user_us": (user1 - user0) * 1e6 / result.requests, "rate": result.rate}
    finally:
        sup.stop(proc)


def revisions(against: list[str], workdir: Path) -> dict[str, Path]:
    """Where each row's `balancer/` is: the working tree ("tree (git describe)"), then each
    `--against` revision's, unpacked into `workdir`."""
    head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                          capture_output=True, text=True, check=False).stdout.strip()
    return {f"tree ({head})": REPO, **{rev: _export(rev, workdir) for rev in against}}


def one_run(sup: Supervisor, workdir: Path, source: Path, variant: str, test: str,
            backends: list[int], duration: float, run_id: str) -> dict[str, float]:
    """The balancer's CPU µs per request of one fresh balancer, and the load average."""
    loadavg = float(Path("/proc/loadavg").read_text().split()[0])
    port = free_port()
    figures = balancer_cpu(sup, workdir, run_id, config_for(variant, port, backends), port,
                           duration, close=test == "conn", source=source)
    return {**figures, "loadavg": loadavg}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.features")
    parser.add_argument("--variants", default="plain,per_client,send_proxy,both")
    parser.add_argument("--against", action="append", default=[], metavar="REV")
    parser.add_argument("--tests", default="conn")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--title", default="CPU per request: balancer variants, interleaved")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "features.md"))
    conntrack.add_flag(parser)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    tests = [t for t in args.tests.split(",") if t]
    if bad := [v for v in variants if v not in VARIANTS] + [
            t for t in tests if t not in ("conn", "keepalive")]:
        parser.error(f"unknown {bad}; variants: {','.join(VARIANTS)}; tests: conn,keepalive")
    workdir = Path(tempfile.mkdtemp(prefix="balancer-features-"))
    sup = Supervisor(workdir)
    sources = revisions(args.against, workdir)
    rows = [(rev, variant) for rev in sources for variant in variants]
    figures: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    with conntrack.loopback_untracked(args.notrack) as tracking:
        try:
            plain = [start_nginx_backend(sup, workdir, i)[1] for i in range(2)]
            proxied = ([start_nginx_backend(sup, workdir, 10 + i, proxy_protocol=True)[1]
                        for i in range(2)] if {"send_proxy", "both"} & set(variants) else [])
            for run in range(args.runs):
                for test in tests:
                    for rev, variant in rows:
                        backends = proxied if variant in ("send_proxy", "both") else plain
                        r = one_run(sup, workdir, sources[rev], variant, test, backends,
                                    args.duration, f"{test}-{variant}-{len(figures)}-{run}")
                        figures.setdefault((test, rev, variant), []).append(r)
                        print(f"run {run + 1}/{args.runs} {test:9s} {rev} {variant:12s} "
                              f"{r['cpu_us']:6.1f} µs (user {r['user_us']:5.1f})  "
                              f"load {r['loadavg']:.2f}", flush=True)
        finally:
            sup.stop_all()
    lines = [
        f"# {args.title}",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}; wrk -t1 -c64 "
        f"({', '.join(tests)}), {args.duration:g} s x {args.runs} runs interleaved (median); "
        "balancer on CPU 0, wrk and the nginx backends on CPU 1",
        f"- {'; '.join(tracking)}",
        "",
    ]
    for test in tests:
        what = "new connection" if test == "conn" else "keep-alive request"
        lines += [f"CPU µs per {what}:", "",
                  "| revision | variant | median | ratio to first row | paired ratio | runs "
                  "| user µs (median, paired ratio) | load averages |",
                  "|---|---|---|---|---|---|---|---|"]
        first = figures[(test, *rows[0])]
        base = statistics.median(r["cpu_us"] for r in first)
        for rev, variant in rows:
            runs = figures[(test, rev, variant)]
            median = statistics.median(r["cpu_us"] for r in runs)
            # Run i of every row ran back to back: the median of the per-run ratios cancels
            # most of the drift that the ratio of medians keeps.
            paired = statistics.median(r["cpu_us"] / f["cpu_us"] for r, f in zip(runs, first,
                                                                                   strict=True))
            cpus = ", ".join(f"{r['cpu_us']:.1f}" for r in runs)
            loads = ", ".join(f"{r['loadavg']:.1f}" for r in runs)
            user = statistics.median(r["user_us"] for r in runs)
            user_paired = statistics.median(
                r["user_us"] / f["user_us"] for r, f in zip(runs, first, strict=True)
                if f["user_us"]) if any(f["user_us"] for f in first) else 0.0
            lines.append(f"| {rev} | {variant} | {median:.1f} | {median / base:.3f}x | "
                         f"{paired:.3f}x | {cpus} | {user:.1f}, {user_paired:.3f}x | "
                         f"{loads} |")
        lines.append("")
    publish(lines, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

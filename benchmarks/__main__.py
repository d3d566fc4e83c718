"""`python -m benchmarks`: the balancer against HAProxy and nginx stream on the same topology.

See benchmarks/README.md for what each figure means. The harness installs nothing: a
missing tool skips what needs it, with a message saying which package to install.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import conntrack, report
from .procs import CPU_LOAD, StartError, Supervisor
from .proxies import (
    PROXIES,
    REPO,
    make_certificate,
    nginx_has_stream,
    start_iperf_server,
    start_nginx_backend,
)
from .runner import (
    DEFAULT_TESTS,
    IDLE_CONNECTIONS,
    QUICK_TESTS,
    TESTS,
    BackendDied,
    Context,
    describe,
    log,
    run_once,
    variants_for,
)

RESULTS = Path(__file__).resolve().parent / "results"
APT = "apt-get install -y haproxy nginx libnginx-mod-stream wrk iperf3"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--proxies", default=None,
                   help=f"comma-separated subset of {','.join(PROXIES)} (default: all; "
                        "--quick: haproxy,balancer)")
    p.add_argument("--tests", default=None,
                   help=f"comma-separated subset of {','.join(TESTS)} (default: all but bulk8; "
                        f"--quick: {','.join(QUICK_TESTS)})")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (10; quick 8)")
    p.add_argument("--runs", type=int, default=None,
                   help="runs per figure; the median is kept (3)")
    p.add_argument("--quick", action="store_true",
                   help="about 2 minutes: CPU per keep-alive request and per new connection, "
                        "HAProxy and the balancer, 8 s x 3 runs; writes quick.md")
    p.add_argument("--smoke", action="store_true",
                   help="2 s x 1 run of whatever is selected: checks the harness, not data")
    p.add_argument("--against", metavar="REV", action="append", default=[],
                   help="also measure the balancer at git revision REV (a `balancer@REV` row, "
                        "interleaved with the others): before/after in one run; repeatable")
    p.add_argument("--balancer-cmd", metavar="CMD",
                   help="how to start the balancer; {config} is replaced by the config path, "
                        "else `-c CONFIG` is appended (default: this python -m balancer)")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="directory for latest.md and latest.json (benchmarks/results)")
    p.add_argument("--notrack", action="store_true",
                   help="exempt loopback from the host's conntrack table for the run (root, "
                        "iptables): a full table drops new connections (benchmarks/conntrack.py)")
    p.add_argument("--keep-temp", action="store_true",
                   help="keep the temp dir with generated configs and process logs")
    args = p.parse_args(argv)
    quick_proxies = "haproxy,balancer"
    if args.proxies is None:
        args.proxies = quick_proxies if args.quick else ",".join(PROXIES)
    if args.tests is None:
        args.tests = ",".join(QUICK_TESTS if args.quick else DEFAULT_TESTS)
    if args.duration is None:
        args.duration = 2.0 if args.smoke else 8.0 if args.quick else 10.0
    if args.runs is None:
        args.runs = 1 if args.smoke else 3
    args.proxies = _subset(p, args.proxies, PROXIES, "--proxies")
    args.tests = _subset(p, args.tests, TESTS, "--tests")
    if args.duration <= 0 or not 1 <= args.runs <= 20:
        p.error("--duration must be > 0 and --runs between 1 and 20")
    return args


def _subset(p: argparse.ArgumentParser, text: str, allowed: tuple[str, ...],
            flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{flag}: unknown {bad or 'empty'}; choose from {','.join(allowed)}")
    return [x for x in allowed if x in items]  # canonical order keeps tables comparable


def _first_line(cmd: list[str]) -> str:
    """First output line of a version command (nginx prints to stderr, wrk exits 1)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _version(cmd: list[str], pattern: str) -> str:
    """The version number out of a tool's banner, or the whole first line if it differs."""
    line = _first_line(cmd)
    m = re.search(pattern, line)
    return m.group(1) if m else line


def _loadavg() -> float:
    """1-minute load average: above ~1 before a run, other work competes with the proxies."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_and_versions() -> tuple[dict[str, Any], dict[str, str]]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    machine = {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
               "loadavg_start": _loadavg(), "conntrack_start": conntrack.fill()}
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    git = _first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    versions = {
        "haproxy": _version(["haproxy", "-v"], r"HAProxy version (\S+)"),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "iperf3": _version(["iperf3", "-v"], r"iperf (\S+)"),
        "python": platform.python_version(),
        "uvloop": uv,
        "balancer": git,
    }
    return machine, versions


def plan(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Drop the proxies and tests whose tools are missing, saying why."""
    skipped: list[str] = []
    have = {t: shutil.which(t) is not None for t in ("haproxy", "nginx", "wrk", "iperf3",
                                                     "taskset", "openssl")}
    proxies, tests = list(args.proxies), list(args.tests)
    if not have["nginx"]:
        skipped.append("everything: nginx (the backends) is not installed; " + APT)
        return [], [], skipped
    if "haproxy" in proxies and not have["haproxy"]:
        proxies.remove("haproxy")
        skipped.append("haproxy: not installed (apt-get install -y haproxy)")
    if "nginx" in proxies and not nginx_has_stream():
        proxies.remove("nginx")
        skipped.append("nginx stream: module not found (apt-get install -y libnginx-mod-stream)")
    for t in ("keepalive", "conn", "p99"):
        if t in tests and not have["wrk"]:
            tests.remove(t)
            skipped.append(f"test {t}: wrk is not installed (apt-get install -y wrk)")
    for t in ("bulk", "bulk8"):
        if t in tests and not have["iperf3"]:
            tests.remove(t)
            skipped.append(f"test {t}: iperf3 is not installed (apt-get install -y iperf3)")
    for t in ("tls_conn", "tls_keepalive"):
        if t in tests and not (have["openssl"] and have["wrk"]):
            tests.remove(t)
            skipped.append(f"test {t}: needs openssl and wrk (apt-get install -y openssl wrk)")
    if not have["taskset"]:
        skipped.append("CPU pinning: taskset not found, processes are not pinned")
    if (os.cpu_count() or 1) < 2:
        skipped.append("CPU pinning: fewer than 2 CPUs, proxy and load share a core")
    return proxies, tests, skipped


def raise_nofile() -> None:
    """Soft limit up to the hard one: 2,000 idle pairs and wrk -c1000 need the fds, and
    children (wrk, the balancer) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 3 * IDLE_CONNECTIONS:
        log(f"warning: hard RLIMIT_NOFILE is {hard}; the idle and p99 tests need ~6,000")


def _on_sigterm(_signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally in main() stops every child."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    raise_nofile()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {CPU_LOAD})  # the idle-connection client stays off CPU 0
    proxies, tests, skipped = plan(args)
    for s in skipped:
        log(f"skip: {s}")
    machine, versions = machine_and_versions()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "versions": versions,
        "settings": {"duration": args.duration, "runs": args.runs,
                     "quick": args.quick or args.smoke, "against": args.against,
                     "proxies": proxies, "tests": tests, "idle_connections": IDLE_CONNECTIONS,
                     "balancer_cmd": args.balancer_cmd},
        "skipped": skipped,
    }
    if not proxies or not tests:
        log("nothing to run")
        return 2
    if args.notrack:
        why = conntrack.untrack_loopback()
        meta["notrack"] = why is None
        log("loopback is not tracked by conntrack during the run" if why is None
            else f"--notrack: not applied: {why}")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="balancer-bench-"))
    sup = Supervisor(workdir)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    try:
        ctx = _setup(sup, workdir, args, tests)
        sources = {f"balancer@{rev}": _export(rev, workdir) for rev in args.against}
        rows = [*proxies, *sources]
        for test in tests:
            variants = [replace(v, source=sources.get(v.proxy))
                        for v in variants_for(test, rows)]
            for run_no in range(1, args.runs + 1):
                for v in variants:
                    r = run_once(ctx, test, v, run_no)
                    runs.setdefault(v.proxy, {}).setdefault(v.key(test), []).append(r)
                    log(f"[{test} {run_no}/{args.runs}] {v.label}: {describe(test, r)}")
    except StartError as exc:
        log(f"error: could not start the backends: {exc}")
        return 2
    except subprocess.CalledProcessError as exc:
        log(f"error: {' '.join(map(str, exc.cmd))} failed: {(exc.stderr or b'').decode()}")
        return 2
    except BackendDied as exc:
        # Keep what was measured so far, but say loudly that the run is incomplete.
        log(f"error: {exc}; stopping, the report is partial")
        meta["aborted"] = str(exc)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        sup.stop_all()
        if meta.get("notrack"):
            conntrack.restore_tracking()
        if args.keep_temp:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["machine"]["loadavg_end"] = _loadavg()
    meta["machine"]["conntrack_end"] = conntrack.fill()
    meta["elapsed_s"] = round(time.monotonic() - started)
    results = {p: {k: report.summarize(v) for k, v in runs[p].items()}
               for p in runs}
    name = "quick" if args.quick or args.smoke else "latest"
    md = report.write(args.out, meta, results, name)
    print(md)
    log(f"wrote {args.out / (name + '.md')} and {args.out / (name + '.json')}")
    if meta.get("aborted"):
        return 2
    failed = any(e["failures"] for t in results.values() for e in t.values())
    return 1 if failed else 0


def _setup(sup: Supervisor, workdir: Path, args: argparse.Namespace,
           tests: list[str]) -> Context:
    backends, ports = [], []
    for i in (1, 2):
        proc, port = start_nginx_backend(sup, workdir, i)
        backends.append(proc)
        ports.append(port)
    ctx = Context(sup, workdir, args.duration, backends, ports, args.balancer_cmd)
    if any(t.startswith("bulk") for t in tests):
        ctx.iperf = start_iperf_server(sup)
    if any(t.startswith("tls_") for t in tests):
        ctx.tls_files = make_certificate(workdir)
    return ctx


def _export(rev: str, workdir: Path) -> Path:
    """The `balancer/` package of git revision `rev`, unpacked into the temp dir."""
    dest = workdir / f"rev-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "balancer"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, capture_output=True,
                   check=True)
    return dest


if __name__ == "__main__":
    sys.exit(main())

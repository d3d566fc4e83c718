"""The five tests, each run as: fresh proxy, measure, check it survived, stop it.

Runs are interleaved (run 1 of every proxy, then run 2 ...) so that drift on the machine
spreads over all proxies instead of landing on whichever ran last.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import load
from .procs import (
    CPU_PROXY,
    Proc,
    StartError,
    Supervisor,
    cpu_seconds,
    cpu_ticks,
    rss_kib,
    tree_pids,
)
from .proxies import Variant, start_proxy

TESTS = ("keepalive", "conn", "bulk", "bulk8", "idle", "p99", "tls_conn", "tls_keepalive")
# A full run: everything but `bulk8` (eight iperf3 streams), asked for by name.
DEFAULT_TESTS = ("keepalive", "conn", "bulk", "idle", "p99", "tls_conn", "tls_keepalive")
# `--quick`: what a data-path change moves first, in about two minutes.
QUICK_TESTS = ("keepalive", "conn")
BULK_STREAMS = 8
IDLE_CONNECTIONS = 2000


class RunFailed(RuntimeError):
    """This run of this proxy failed; the message says why."""


class BackendDied(RuntimeError):
    """A backend (not the proxy under test) died: no later figure would mean anything."""


@dataclass
class Context:
    """What every run needs: where to put files, who owns processes, the upstreams."""

    sup: Supervisor
    workdir: Path
    duration: float
    backends: list[Proc]
    backend_ports: list[int]
    balancer_cmd: str | None
    iperf: tuple[Proc, int] | None = None
    tls_files: tuple[Path, Path, Path] | None = None  # cert, key, both (HAProxy's crt)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CpuWatch:
    """Proxy CPU seconds and CPU 0 busy share over a run.

    `proxy_cpu_pct` near 100 means the proxy was the limit; `cpu0_busy_pct` well above it
    means something else ran on the proxy's core and the run is noisy.
    """

    def __init__(self, proc: Proc | None) -> None:
        self.proc = proc
        self.t0 = time.monotonic()
        self.cpu0 = cpu_ticks(CPU_PROXY)
        self.proxy = cpu_seconds(proc.pid) if proc else 0.0

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy, total = (a - b for a, b in zip(cpu_ticks(CPU_PROXY), self.cpu0, strict=True))
        used = cpu_seconds(self.proc.pid) - self.proxy if self.proc else None
        return {
            "wall_s": wall,
            "proxy_cpu_s": used,
            "proxy_cpu_pct": 100 * used / wall if used is not None and wall else None,
            "cpu0_busy_pct": 100 * busy / total if total else None,
        }


def _wrk_test(ctx: Context, proc: Proc | None, port: int, connections: int, close: bool,
              latency: bool) -> dict[str, Any]:
    watch = CpuWatch(proc)
    res = load.run_wrk(port, ctx.duration, connections, close=close, latency=latency)
    cpu = watch.stop()
    count = res.requests
    out: dict[str, Any] = {
        **cpu,
        "requests": res.requests,
        "rate": res.rate,
        "cpu_us": cpu["proxy_cpu_s"] * 1e6 / count if proc and count else None,
        "errors": res.errors,
        "socket_errors": res.socket_errors,
        "non_2xx": res.non_2xx,
    }
    if latency:
        out["p99_ms"] = res.p99_ms
    if res.requests == 0:
        summary = " | ".join(line.strip() for line in res.raw.strip().splitlines()[-4:])
        raise RunFailed(f"no request completed through the proxy; wrk said: {summary}")
    return out


def t_keepalive(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    return _wrk_test(ctx, proc, port, 64, close=False, latency=False)


def t_conn(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    return _wrk_test(ctx, proc, port, 64, close=True, latency=False)


def t_p99(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    return _wrk_test(ctx, proc, port, 1000, close=False, latency=True)


def _bulk(ctx: Context, proc: Proc | None, port: int, streams: int) -> dict[str, Any]:
    watch = CpuWatch(proc)
    gbps = load.run_iperf(port, ctx.duration, streams)
    cpu = watch.stop()
    gib = gbps * 1e9 * ctx.duration / 8 / 2**30
    # CPU per GiB moved: on a shared machine steadier than Gbit/s, which other work cuts.
    per_gib = cpu["proxy_cpu_s"] * 1000 / gib if proc and gib else None
    return {"gbps": gbps, "cpu_ms_per_gib": per_gib, **cpu}


def t_bulk(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    return _bulk(ctx, proc, port, 1)


def t_bulk8(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    return _bulk(ctx, proc, port, BULK_STREAMS)


def t_tls_conn(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    """A full TLS handshake and one GET per connection (`openssl s_time -new`)."""
    watch = CpuWatch(proc)
    count = load.run_s_time(port, ctx.duration)
    cpu = watch.stop()
    return {**cpu, "requests": count, "rate": count / cpu["wall_s"],
            "cpu_us": cpu["proxy_cpu_s"] * 1e6 / count if proc else None}


def t_tls_keepalive(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    """`wrk -t1 -c64` over https: 64 handshakes, then requests on them."""
    watch = CpuWatch(proc)
    res = load.run_wrk(port, ctx.duration, 64, url=f"https://127.0.0.1:{port}/")
    cpu = watch.stop()
    if res.requests == 0:
        raise RunFailed("no request completed through the TLS proxy")
    return {**cpu, "requests": res.requests, "rate": res.rate, "errors": res.errors,
            "cpu_us": cpu["proxy_cpu_s"] * 1e6 / res.requests if proc else None}


def t_idle(ctx: Context, proc: Proc | None, port: int) -> dict[str, Any]:
    if proc is None:
        raise RunFailed("no proxy process to measure")
    load.hold_idle(port, 1, lambda _n: None)  # pay one-time lazy setup before the baseline
    time.sleep(0.2)
    before = rss_kib(proc.pid)
    seen: dict[str, int] = {}

    def measure(n_open: int) -> None:
        seen["after"] = rss_kib(proc.pid)

    n_open, errors = load.hold_idle(port, IDLE_CONNECTIONS, measure)
    if n_open == 0:
        raise RunFailed("no connection could be opened: " + "; ".join(errors[:3]))
    return {
        "rss_before_kib": before,
        "rss_after_kib": seen["after"],
        "kib_per_conn": (seen["after"] - before) / n_open,
        "open": n_open,
        "errors": IDLE_CONNECTIONS - n_open,
        "error_kinds": errors[:5],
    }


TEST_FUNCS: dict[str, Callable[[Context, Proc | None, int], dict[str, Any]]] = {
    "keepalive": t_keepalive,
    "conn": t_conn,
    "bulk": t_bulk,
    "bulk8": t_bulk8,
    "idle": t_idle,
    "p99": t_p99,
    "tls_conn": t_tls_conn,
    "tls_keepalive": t_tls_keepalive,
}


def variants_for(test: str, proxies: list[str]) -> list[Variant]:
    """Which setups a test covers.

    Bulk adds HAProxy with 256 KiB buffers and with `option splice-auto` (its best bulk
    setups, the balancer's real anchors) and nginx with 256 KiB buffers; idle skips
    `direct`, which has no process to measure; TLS is HAProxy and the balancer rows only.
    """
    out = []
    for p in proxies:
        kind = Variant(p).kind
        if test.startswith("tls_"):
            if kind in ("haproxy", "balancer"):
                out.append(Variant(p, "tls"))
            continue
        if test == "idle" and p == "direct":
            continue
        out.append(Variant(p))
        if test in ("bulk", "bulk8") and kind == "haproxy":
            if test == "bulk":
                out.append(Variant(p, "256k"))
            out.append(Variant(p, "splice"))
        if test == "bulk" and kind == "nginx":
            out.append(Variant(p, "256k"))
    return out


def _check_backends(ctx: Context, test: str) -> None:
    procs = [ctx.iperf[0]] if test.startswith("bulk") and ctx.iperf else ctx.backends
    for b in procs:
        if not b.alive():
            raise BackendDied(f"backend {b.death()}")


def run_once(ctx: Context, test: str, variant: Variant, run_no: int) -> dict[str, Any]:
    """One measurement with a fresh proxy; any failure becomes `ok: False` with the reason."""
    _check_backends(ctx, test)
    upstreams = [ctx.iperf[1]] if test.startswith("bulk") and ctx.iperf else ctx.backend_ports
    run_id = f"{variant.key(test)}-{run_no}"
    loadavg = float(Path("/proc/loadavg").read_text().split()[0])
    proc: Proc | None = None
    try:
        proc, port = start_proxy(ctx.sup, ctx.workdir, variant, upstreams, ctx.balancer_cmd,
                                 run_id, ctx.tls_files)
        pids = set(tree_pids(proc.pid)) if proc else set()
        result = TEST_FUNCS[test](ctx, proc, port)
        _check_backends(ctx, test)  # a backend lost mid-run voids this run, not just later
        if proc is not None:
            if not proc.alive():
                raise RunFailed(proc.death())
            lost = pids - set(tree_pids(proc.pid))
            if lost:
                raise RunFailed(f"{variant.proxy}: process(es) {sorted(lost)} of its tree "
                                "exited during the run")
        return {"ok": True, "loadavg": loadavg, **result}
    except (RunFailed, StartError, load.LoadError, OSError) as exc:
        msg = str(exc)
        if proc is not None and not proc.alive() and "died" not in msg:
            msg = f"{proc.death()} ({msg})"
        if isinstance(exc, StartError):
            msg = f"{variant.proxy} did not start: {msg}"
        return {"ok": False, "loadavg": loadavg, "error": msg}
    finally:
        if proc is not None:
            ctx.sup.stop(proc)


def describe(test: str, r: dict[str, Any]) -> str:
    """One progress line for stderr."""
    if not r["ok"]:
        return f"FAILED: {r['error']}"
    return _describe(test, r) + _cpu_note(r)


def _cpu_note(r: dict[str, Any]) -> str:
    parts = []
    if r.get("proxy_cpu_pct") is not None:
        parts.append(f"proxy {r['proxy_cpu_pct']:.0f}% CPU")
    if r.get("cpu0_busy_pct") is not None:
        parts.append(f"CPU 0 {r['cpu0_busy_pct']:.0f}% busy")
    if r.get("loadavg") is not None:
        parts.append(f"load {r['loadavg']:.2f}")
    return f" [{', '.join(parts)}]" if parts else ""


def _describe(test: str, r: dict[str, Any]) -> str:
    if test in ("keepalive", "conn", "tls_conn", "tls_keepalive"):
        cpu = f", {r['cpu_us']:.1f} CPU µs each" if r.get("cpu_us") is not None else ""
        return f"{r['rate']:,.0f}/s{cpu}, {r.get('errors', 0)} errors"
    if test == "p99":
        return f"p99 {r['p99_ms']:.2f} ms, {r['rate']:,.0f}/s, {r['errors']} errors"
    if test in ("bulk", "bulk8"):
        per_gib = r.get("cpu_ms_per_gib")
        return f"{r['gbps']:.2f} Gbit/s" + (f", {per_gib:.0f} CPU ms/GiB" if per_gib else "")
    return (f"{r['kib_per_conn']:.1f} KiB/conn ({r['rss_before_kib']} -> "
            f"{r['rss_after_kib']} KiB, {r['open']} open)")

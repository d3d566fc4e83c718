"""What /status says: listeners, upstreams, servers, workers and this process, as JSON data.

One balancer (a single process, or with workers the primary's `ClusterView`) is read; the
field names are a contract (README "/status"). Totals come from each server's `ServerStats`
in one process, or from the shared table summed over workers; rates and sparklines from the
`History` the admin endpoint samples every second (history.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .appsource import app_source
from .history import SPARK_EVERY, History, Reading
from .proc.shared import LISTENER_COUNTERS, SERVER_COUNTERS
from .sni import FALLBACK
from .stats import check_text

if TYPE_CHECKING:
    from .upstream import Server

REJECT_REASONS = LISTENER_COUNTERS[2:]
STARTED = time.monotonic()  # this process's start, near enough: when balancer was imported
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss(pid: int) -> int | None:
    """Resident memory of a process in bytes (None: gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def server_totals(server: Server) -> dict[str, int]:
    """Running totals: with workers, every worker's summed (the primary's cell); else ours."""
    values = server.cell.totals() if server.cell is not None else server.stats.totals()
    return dict(zip(SERVER_COUNTERS, values, strict=True))


def server_status(server: Server, history: History | None = None, now: float | None = None,
                  with_history: bool = False) -> dict[str, Any]:
    health = server.health
    state = "draining" if server.draining else health.display_state
    now = time.monotonic() if now is None else now
    totals = server_totals(server)
    connect_count, connect_us = totals.pop("connect_count"), totals.pop("connect_us")
    entry: dict[str, Any] = {
        "address": server.key,
        "state": state,
        "active": server.active,
        "peak": max(server.peak, server.active),
        "weight": server.config.weight,
        "effective_weight": round(server.weight, 3),
        "max_conns": server.config.max_conns,
        "backup": server.config.backup,
        "failures": server.failures,
        "last_change": health.changed_at,
        "reason": health.reason,
        "pool_idle": len(server.pool.idle) if server.pool is not None else None,
        "source": server.config.source,
        "state_for": round(now - server.state_clock.since, 1),
        "downtime": round(server.state_clock.downtime(now), 1),
        **totals,
        "connect_time_avg_ms": (round(connect_us / connect_count / 1000, 3)
                                if connect_count else None),
        "check": last_check(server),
    }
    if history is not None:
        key = f"s {server.upstream_name}/{server.key}"
        entry.update(history.rates(key))
        if with_history:
            entry["history"] = history.series(key)
    return entry


def last_check(server: Server) -> dict[str, Any] | None:
    """The last active check (with workers: a failing worker's if any, else the first's)."""
    if server.cell is not None:
        results = server.cell.lasts()
        failing = [r for r in results if r[0] <= 0 or r[0] >= 400]
        code, micros = (failing or results or [(0, 0)])[0]
    else:
        code, micros = server.stats.check_code, server.stats.check_us
    if not code:
        return None
    ok = 0 < code < 400
    return {"code": code, "ok": ok, "ms": round(micros / 1000, 2) if ok else None,
            "text": check_text(code, micros)}


def listener_status(lst: Any, balancer: Any = None, history: History | None = None
                    ) -> dict[str, Any]:
    """A listener's line in /status; an SNI listener adds its rules with the connections each
    routed (in this process: the primary of several workers shows the rules only)."""
    config = lst.config
    entry: dict[str, Any] = {"name": lst.name, "bind": lst.bound(), "upstream": config.upstream,
                             "active": lst.active_count(), "max_conns": config.max_conns}
    if balancer is not None:
        totals = dict(zip(LISTENER_COUNTERS, balancer.listener_totals(lst.name), strict=True))
        entry["connections"] = totals["connections"]
        entry["rejected"] = {reason: totals[reason] for reason in REJECT_REASONS}
        entry["tls_handshake_errors"] = (totals["tls_handshake_errors"]
                                         if config.tls is not None else None)
    if history is not None:
        rates = history.rates(f"l {lst.name}")
        entry["conn_rate"], entry["conn_rate_peak"] = rates["conn_rate"], rates["conn_rate_peak"]
    if config.tls is not None:
        entry["tls"] = {"certificates": [list(c.names) for c in config.tls.certificates],
                        "min_version": config.tls.min_version, "alpn": list(config.tls.alpn)}
    if config.sni:
        state = getattr(lst, "sni", None)
        matched = state.router.matched if state is not None else {}
        rules = [*config.sni, *([(FALLBACK, config.upstream)] if config.upstream else [])]
        entry["sni"] = [{"name": name, "upstream": upstream, "matched": matched.get(name)}
                        for name, upstream in rules]
        entry["sni_rejected"] = dict(state.rejected) if state is not None else None
    return entry


def upstream_status(up: Any, servers: list[dict[str, Any]]) -> dict[str, Any]:
    """An upstream's line: strategy, servers up of all, and one sentence on its health."""
    up_count = sum(1 for s in servers if s["state"] == "up")
    down = [s for s in servers if s["state"] == "down"]
    if not servers:
        summary = "no servers"
    elif up_count == len(servers):
        summary = f"all {len(servers)} up"
    elif not up_count:
        summary = "no server up"
    else:
        summary = f"{up_count} of {len(servers)} up"
    if down:
        first = down[0]
        more = f" and {len(down) - 1} more" if len(down) > 1 else ""
        summary += f"; {first['address']} down: {first['reason']}{more}"
    return {"strategy": up.config.strategy,
            "hash": up.config.hash if up.config.strategy == "ip_hash" else None,
            "up": up_count, "total": len(servers),
            "summary": summary, "servers": servers}


def worker_readings(balancer: Any) -> Iterator[tuple[str, Reading]]:
    """With workers: each worker's open connections and new-connection total (its column)."""
    workers = getattr(balancer, "worker_columns", None)
    if workers is None:
        return
    for pid, (active, connections) in workers().items():
        yield f"w {pid}", (active, connections, 0, 0)


def readings(balancer: Any) -> Iterator[tuple[str, Reading]]:
    """What History samples every second: every server, listener and worker."""
    for name, up in balancer.upstreams.items():
        for server in up.servers:
            totals = server.cell.totals() if server.cell is not None else server.stats.totals()
            yield f"s {name}/{server.key}", (server.active, totals[0], totals[1], totals[2])
    for lst in balancer.listeners:
        yield f"l {lst.name}", (lst.active_count(), balancer.listener_totals(lst.name)[0], 0, 0)
    yield from worker_readings(balancer)


def balancer_status(balancer: Any, history: History | None = None,
                    with_history: bool = False) -> dict[str, Any]:
    """Everything an operator looks at first, as plain JSON-able data."""
    now = time.monotonic()
    apps = app_source(balancer)  # managed instances: each upstream's, and its last rollout
    upstreams = {}
    for name, up in balancer.upstreams.items():
        servers = [server_status(s, history, now, with_history) for s in up.servers]
        upstreams[name] = upstream_status(up, servers)
        if apps is not None:
            upstreams[name].update(apps.status(name) or {})
    totals = getattr(balancer, "listener_totals", None)
    status: dict[str, Any] = {
        "time": time.time(),
        "process": {"pid": os.getpid(), "uptime": round(now - STARTED, 1),
                    "rss": rss(os.getpid())},
        "listeners": [listener_status(lst, balancer if totals else None, history)
                      for lst in balancer.listeners],
        "upstreams": upstreams,
    }
    if with_history:
        status["history_interval"] = SPARK_EVERY
    # With workers: the current config generation and each worker's line.
    cluster = getattr(balancer, "cluster_status", None)
    if cluster is not None:
        status.update(cluster())
        for worker in status.get("workers", []):
            worker["rss"] = rss(worker["pid"])
            if history is not None:
                worker["conn_rate"] = history.rates(f"w {worker['pid']}")["conn_rate"]
    return status

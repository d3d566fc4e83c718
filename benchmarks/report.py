"""Turn per-run results into the Markdown table and JSON, with ratios to HAProxy.

Ratios are taken from the same invocation only: numbers from different runs of the
harness (or different machines) are not comparable, ratios within one run are.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from . import conntrack

# (column title, result key, metric, show ratio to HAProxy, decimals). The key is the test,
# with the variant's flavor for HAProxy's and nginx's other bulk setups (`bulk_splice`).
COLUMNS: tuple[tuple[str, str, str, bool, int], ...] = (
    ("keep-alive req/s", "keepalive", "rate", False, 0),
    ("CPU µs/req", "keepalive", "cpu_us", True, 1),
    ("new conn/s", "conn", "rate", False, 0),
    ("CPU µs/conn", "conn", "cpu_us", True, 1),
    ("bulk Gbit/s", "bulk", "gbps", True, 2),
    ("bulk Gbit/s, 256 KiB buf", "bulk_256k", "gbps", True, 2),
    ("bulk Gbit/s, splice-auto", "bulk_splice", "gbps", True, 2),
    ("bulk -P 8 Gbit/s", "bulk8", "gbps", True, 2),
    ("bulk -P 8, splice-auto", "bulk8_splice", "gbps", True, 2),
    ("idle RSS KiB/conn", "idle", "kib_per_conn", True, 1),
    ("p99 ms @1000", "p99", "p99_ms", True, 2),
    ("errors @1000", "p99", "errors", False, 0),
    ("TLS CPU µs/handshake", "tls_conn", "cpu_us", True, 1),
    ("TLS CPU µs/req", "tls_keepalive", "cpu_us", True, 1),
)

# Issue 18's targets for each balancer row, as (what, balancer key, HAProxy key, metric,
# bound, lower is better): the ratio balancer / HAProxy in this same run.
TARGETS: tuple[tuple[str, str, str, str, float, bool], ...] = (
    ("CPU per new connection", "conn", "conn", "cpu_us", 1.1, True),
    ("CPU per keep-alive request", "keepalive", "keepalive", "cpu_us", 1.0, True),
    ("bulk vs HAProxy tune.bufsize 262144", "bulk", "bulk_256k", "gbps", 1.0, False),
    ("bulk vs HAProxy option splice-auto", "bulk", "bulk_splice", "gbps", 1.0, False),
)
P99_BOUND = 1.5  # p99 at 1,000 connections, in every run, with zero errors


# Points by which CPU 0 may be busier than the proxy itself (softirq, the kernel) before
# a run counts as noisy: quiet runs here show a gap of 1-6 points.
NOISE_GAP_PCT = 15.0


def noisy(run: dict[str, Any]) -> bool:
    """True when something other than the proxy ran on CPU 0 during this run."""
    busy, proxy = run.get("cpu0_busy_pct"), run.get("proxy_cpu_pct")
    if not run.get("ok") or busy is None or proxy is None:  # `direct` does not use CPU 0
        return False
    return busy - proxy > NOISE_GAP_PCT


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric metric over the successful runs, plus the failures."""
    ok = [r for r in runs if r.get("ok")]
    median: dict[str, float] = {}
    keys = {k for r in ok for k, v in r.items() if isinstance(v, int | float)
            and not isinstance(v, bool)}
    for key in sorted(keys):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            median[key] = statistics.median(values)
    return {
        "runs": runs,
        "runs_ok": len(ok),
        "median": median,
        "failures": [r["error"] for r in runs if not r.get("ok")],
        "noisy_runs": [i + 1 for i, r in enumerate(runs) if noisy(r)],
    }


def _cell(results: dict[str, Any], proxy: str, key: str, metric: str, ratio: bool,
          decimals: int) -> str:
    entry = results.get(proxy, {}).get(key)
    if entry is None:
        return "—"
    if entry["runs_ok"] == 0:
        return "FAIL"
    value = entry["median"].get(metric)
    if value is None:
        return "—"
    text = f"{value:,.{decimals}f}"
    if ratio and proxy != "haproxy":
        base = results.get("haproxy", {}).get(key, {}).get("median", {}).get(metric)
        if base:
            text += f" ({value / base:.2f}x)"
    if entry.get("noisy_runs"):
        text += " ~"
    if entry["runs_ok"] < len(entry["runs"]):
        text += f" [{entry['runs_ok']}/{len(entry['runs'])} ok]"
    return text


def ratios(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """value / HAProxy's value for each ratio column, for the JSON."""
    out: dict[str, dict[str, float]] = {}
    for proxy in results:
        for title, key, metric, show, _dec in COLUMNS:
            if not show:
                continue
            mine = results[proxy].get(key, {}).get("median", {}).get(metric)
            base = results.get("haproxy", {}).get(key, {}).get("median", {}).get(metric)
            if mine is not None and base:
                out.setdefault(proxy, {})[title] = round(mine / base, 3)
    return out


def _load_during(results: dict[str, Any]) -> str:
    """The 1-minute load average at the start of each run: the other work on the machine."""
    loads = [r["loadavg"] for tests in results.values() for e in tests.values()
             for r in e["runs"] if r.get("loadavg") is not None]
    if not loads:
        return ""
    return f", {statistics.median(loads):.2f} median and {max(loads):.2f} at most during runs"


def _median(results: dict[str, Any], proxy: str, key: str, metric: str) -> float | None:
    value = results.get(proxy, {}).get(key, {}).get("median", {}).get(metric)
    return float(value) if value is not None else None


def targets(results: dict[str, Any]) -> list[str]:
    """One line per target and balancer row: the ratio, the bound, met or not."""
    out = []
    for proxy in (p for p in results if p.startswith("balancer")):
        for what, key, base_key, metric, bound, lower in TARGETS:
            mine = _median(results, proxy, key, metric)
            base = _median(results, "haproxy", base_key, metric)
            if mine is None or not base:
                continue
            ratio = mine / base
            met = ratio <= bound if lower else ratio >= bound
            sign = "at most" if lower else "at least"
            out.append(f"{proxy}: {what} {ratio:.2f}x ({sign} {bound:.1f}x): "
                       f"{'met' if met else 'NOT met'}")
        mine_runs = results.get(proxy, {}).get("p99", {}).get("runs")
        base_runs = results.get("haproxy", {}).get("p99", {}).get("runs")
        if mine_runs and base_runs:
            # Runs are interleaved, so run i of each proxy saw the same machine.
            pairs = [(m, b) for m, b in zip(mine_runs, base_runs, strict=False)
                     if m.get("ok") and b.get("ok") and b.get("p99_ms")]
            worst = max((m["p99_ms"] / b["p99_ms"] for m, b in pairs), default=None)
            errors = sum(m.get("errors", 0) for m in mine_runs if m.get("ok"))
            failed = sum(1 for m in mine_runs if not m.get("ok"))
            if worst is not None:
                met = worst <= P99_BOUND and errors == 0 and failed == 0
                out.append(f"{proxy}: p99 at 1,000 connections, worst run {worst:.2f}x "
                           f"(at most {P99_BOUND}x in every run), {errors} errors, "
                           f"{failed} failed runs: {'met' if met else 'NOT met'}")
    return out


def _conntrack_line(meta: dict[str, Any]) -> str:
    """The host's conntrack table, whose filling up drops new connections (conntrack.py)."""
    start = meta["machine"].get("conntrack_start")
    end = meta["machine"].get("conntrack_end")
    if start is None and end is None:
        return "- conntrack: not loaded on this host (nothing tracks loopback connections)"
    if meta.get("notrack"):
        how = "loopback exempted for the run (--notrack)"
    elif conntrack.nearly_full(start) or conntrack.nearly_full(end):
        how = ("**nearly full: new connections may have been dropped; stalls and connect "
               "errors may be the host's** (rerun with --notrack)")
    else:
        how = "loopback tracked"
    return f"- conntrack table: {_entries(start)} entries at start, {_entries(end)} at end; {how}"


def _entries(reading: tuple[int, int] | None) -> str:
    return f"{reading[0]:,} of {reading[1]:,}" if reading else "unknown"


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    """The full report: header facts, the table, then every failure and client error."""
    lines = [
        "# balancer benchmarks",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['nproc']} CPUs, {meta['machine']['cpu_model']}, "
        f"Linux {meta['machine']['kernel']}, load average {meta['machine']['loadavg_start']:.2f}"
        f" at start, {meta['machine'].get('loadavg_end', 0):.2f} at end"
        + _load_during(results),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- settings: {meta['settings']['duration']:g} s x {meta['settings']['runs']} run(s) "
        f"per figure (median), proxy on CPU 0, wrk/iperf3/backends on CPU 1"
        + (" (--quick: before/after a data-path change, not figures to publish)"
           if meta["settings"].get("quick") else ""),
    ]
    lines.append(_conntrack_line(meta))
    if meta["settings"].get("balancer_cmd"):
        lines.append(f"- balancer started with --balancer-cmd `{meta['settings']['balancer_cmd']}`")
    lines += [
        "- (Nx) is the ratio to HAProxy from this same run; for CPU, RSS and p99 lower is "
        "better, for Gbit/s higher is better; `~` marks a figure with a noisy run (see "
        "the notes)",
        "",
    ]
    # Only the columns something was measured in (a --quick run has four).
    columns = [c for c in COLUMNS if any(c[1] in tests for tests in results.values())]
    header = ["proxy", *(c[0] for c in columns)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for proxy in results:
        cells = [_cell(results, proxy, key, metric, show, dec)
                 for _t, key, metric, show, dec in columns]
        lines.append("| " + " | ".join([proxy, *cells]) + " |")
    verdicts = targets(results)
    if verdicts:
        lines += ["", "## Targets (issue 18; ratios to HAProxy in this run)", "",
                  *(f"- {v}" for v in verdicts)]
    notes = []
    for proxy, tests in results.items():
        for test, entry in tests.items():
            for err in dict.fromkeys(entry["failures"]):
                notes.append(f"- {proxy} / {test}: FAILED run: {err}")
            errs = entry["median"].get("errors")
            if errs and test != "p99":
                notes.append(f"- {proxy} / {test}: {errs:g} client errors (median)")
            if entry["median"].get("open") is not None and entry["median"]["open"] < meta[
                    "settings"]["idle_connections"]:
                notes.append(f"- {proxy} / {test}: only {entry['median']['open']:g} of "
                             f"{meta['settings']['idle_connections']} connections opened")
            for i in entry.get("noisy_runs", []):
                r = entry["runs"][i - 1]
                notes.append(f"- {proxy} / {test} run {i}: noisy, CPU 0 was "
                             f"{r['cpu0_busy_pct']:.0f}% busy but the proxy used "
                             f"{r['proxy_cpu_pct']:.0f}%: other processes shared "
                             "its core")
    if meta.get("aborted"):
        notes.insert(0, f"- ABORTED, the table is partial: {meta['aborted']}")
    for skip in meta.get("skipped", []):
        notes.append(f"- skipped: {skip}")
    if notes:
        lines += ["", "## Failures, noise, errors and skips", "", *notes]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, meta: dict[str, Any], results: dict[str, Any],
          name: str = "latest") -> str:
    """Write NAME.md and NAME.json (`latest` for a full run, `quick` for --quick); return
    the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(meta, results)
    (out_dir / f"{name}.md").write_text(md)
    doc = {**meta, "results": results, "ratio_to_haproxy": ratios(results),
           "targets": targets(results)}
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return md

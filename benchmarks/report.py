"""Turn per-run results into the Markdown table and JSON, with ratios to HAProxy.

Ratios are taken from the same invocation only: numbers from different runs of the
harness (or different machines) are not comparable, ratios within one run are.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

# (column title, test, metric, show ratio to HAProxy, decimals, bulk variant with big buffers)
COLUMNS: tuple[tuple[str, str, str, bool, int, bool], ...] = (
    ("keep-alive req/s", "keepalive", "rate", False, 0, False),
    ("CPU µs/req", "keepalive", "cpu_us", True, 1, False),
    ("new conn/s", "conn", "rate", False, 0, False),
    ("CPU µs/conn", "conn", "cpu_us", True, 1, False),
    ("bulk Gbit/s", "bulk", "gbps", True, 2, False),
    ("bulk Gbit/s, 256 KiB buf", "bulk", "gbps", True, 2, True),
    ("idle RSS KiB/conn", "idle", "kib_per_conn", True, 1, False),
    ("p99 ms @1000", "p99", "p99_ms", True, 2, False),
    ("errors @1000", "p99", "errors", False, 0, False),
)


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


def _cell(results: dict[str, Any], proxy: str, test: str, metric: str, big: bool,
          ratio: bool, decimals: int) -> str:
    key = f"{test}_256k" if big else test
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
        for title, test, metric, show, _dec, big in COLUMNS:
            key = f"{test}_256k" if big else test
            if not show:
                continue
            mine = results[proxy].get(key, {}).get("median", {}).get(metric)
            base = results.get("haproxy", {}).get(key, {}).get("median", {}).get(metric)
            if mine is not None and base:
                out.setdefault(proxy, {})[title] = round(mine / base, 3)
    return out


def markdown(meta: dict[str, Any], results: dict[str, Any]) -> str:
    """The full report: header facts, the table, then every failure and client error."""
    lines = [
        "# balancer benchmarks",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']['nproc']} CPUs, {meta['machine']['cpu_model']}, "
        f"Linux {meta['machine']['kernel']}, load average {meta['machine']['loadavg_start']:.2f}"
        f" at start, {meta['machine'].get('loadavg_end', 0):.2f} at end",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- settings: {meta['settings']['duration']:g} s x {meta['settings']['runs']} run(s) "
        f"per figure (median), proxy on CPU 0, wrk/iperf3/backends on CPU 1",
    ]
    if meta["settings"].get("balancer_cmd"):
        lines.append(f"- balancer started with --balancer-cmd `{meta['settings']['balancer_cmd']}`")
    lines += [
        "- (Nx) is the ratio to HAProxy from this same run; for CPU, RSS and p99 lower is "
        "better, for Gbit/s higher is better; `~` marks a figure with a noisy run (see "
        "the notes)",
        "",
    ]
    header = ["proxy", *(c[0] for c in COLUMNS)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for proxy in results:
        cells = [_cell(results, proxy, test, metric, big, show, dec)
                 for _t, test, metric, show, dec, big in COLUMNS]
        lines.append("| " + " | ".join([proxy, *cells]) + " |")
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


def write(out_dir: Path, meta: dict[str, Any], results: dict[str, Any]) -> str:
    """Write latest.md and latest.json; return the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(meta, results)
    (out_dir / "latest.md").write_text(md)
    doc = {**meta, "results": results, "ratio_to_haproxy": ratios(results)}
    (out_dir / "latest.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return md

"""Fast checks of the harness's parsing and reporting (no processes, no network).

Run with `.venv/bin/pytest benchmarks/test_harness.py`; a wrong parse would silently put
wrong numbers in the table, which is worse than a crash.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.load import LoadError, parse_wrk
from benchmarks.proxies import balancer_command
from benchmarks.tls import parse_s_time

WRK_LATENCY = """\
Running 10s test @ http://127.0.0.1:40001/
  1 threads and 1000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    19.52ms    3.10ms  60.01ms   88.00%
    Req/Sec    50.12k     2.00k   55.00k    70.00%
  Latency Distribution
     50%   19.00ms
     75%   20.50ms
     90%   22.00ms
     99%    1.25s
  501234 requests in 10.01s, 70.12MB read
  Socket errors: connect 3, read 1, write 0, timeout 7
  Non-2xx or 3xx responses: 2
Requests/sec:  50073.33
Transfer/sec:      7.01MB
"""

WRK_PLAIN = """\
Running 3s test @ http://127.0.0.1:40001/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   900.00us  100.00us   5.00ms   90.00%
    Req/Sec    70.00k     1.00k   72.00k    80.00%
  210000 requests in 3.00s, 29.00MB read
Requests/sec:  70000.00
Transfer/sec:      9.67MB
"""


def test_parse_wrk_latency_and_errors() -> None:
    r = parse_wrk(WRK_LATENCY)
    assert r.requests == 501234
    assert r.seconds == pytest.approx(10.01)
    assert r.rate == pytest.approx(50073.33)
    assert r.p99_ms == pytest.approx(1250.0)
    assert (r.socket_errors, r.non_2xx, r.errors) == (11, 2, 13)


def test_tail_reads_percentiles_and_the_maximum() -> None:
    from benchmarks.tail import latency_ms
    assert latency_ms(WRK_LATENCY) == {"max": 60.01, "p50": 19.0, "p90": 22.0, "p99": 1250.0}
    assert latency_ms(WRK_PLAIN) == {"max": 5.0}


def test_parse_wrk_without_latency_or_errors() -> None:
    r = parse_wrk(WRK_PLAIN)
    assert (r.requests, r.p99_ms, r.errors) == (210000, None, 0)


def test_parse_wrk_refuses_garbage() -> None:
    with pytest.raises(LoadError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_summary_is_median_of_successful_runs() -> None:
    s = report.summarize([
        {"ok": True, "rate": 10.0, "cpu_us": 3.0},
        {"ok": False, "error": "balancer died during the run (killed by signal 11)"},
        {"ok": True, "rate": 30.0, "cpu_us": 1.0},
        {"ok": True, "rate": 20.0, "cpu_us": None},
    ])
    assert s["runs_ok"] == 3
    assert s["median"] == {"rate": 20.0, "cpu_us": 2.0}
    assert s["failures"] == ["balancer died during the run (killed by signal 11)"]


def test_table_shows_ratio_and_failure() -> None:
    results = {
        "haproxy": {"keepalive": report.summarize([{"ok": True, "rate": 100.0, "cpu_us": 10.0}])},
        "balancer": {"keepalive": report.summarize([{"ok": False, "error": "boom"}])},
        "nginx": {"keepalive": report.summarize([{"ok": True, "rate": 90.0, "cpu_us": 12.5}])},
    }
    meta = {"date": "d", "machine": {"nproc": 2, "cpu_model": "x", "kernel": "k",
                                     "loadavg_start": 0.1},
            "versions": {}, "settings": {"duration": 1.0, "runs": 1, "idle_connections": 2000}}
    md = report.markdown(meta, results)
    assert "| balancer | FAIL | FAIL |" in md
    assert "12.5 (1.25x)" in md
    assert "balancer / keepalive: FAILED run: boom" in md
    assert report.ratios(results)["nginx"]["CPU µs/req"] == 1.25


def test_balancer_command_template() -> None:
    cfg = Path("/tmp/a b.yaml")
    assert balancer_command("bal --x", cfg) == ["bal", "--x", "-c", str(cfg)]
    assert balancer_command("bal -c {config} -v debug", cfg) == ["bal", "-c", str(cfg), "-v",
                                                               "debug"]
    assert balancer_command(None, cfg)[1:5] == ["-m", "balancer", "-c", str(cfg)]


def test_noisy_run_is_flagged() -> None:
    quiet = {"ok": True, "rate": 1.0, "proxy_cpu_pct": 90.0, "cpu0_busy_pct": 93.0}
    loud = {"ok": True, "rate": 1.0, "proxy_cpu_pct": 40.0, "cpu0_busy_pct": 96.0}
    direct = {"ok": True, "rate": 1.0, "proxy_cpu_pct": None, "cpu0_busy_pct": 96.0}
    assert report.summarize([quiet, loud, direct])["noisy_runs"] == [2]


S_TIME = """\
Collecting connection statistics for 10 seconds
***********************************************

648 connections in 0.43s; 1506.98 connections/user sec, bytes read 439992
648 connections in 11 real seconds, 679 bytes read per connection
"""


def test_parse_s_time() -> None:
    assert parse_s_time(S_TIME) == 648
    with pytest.raises(LoadError):
        parse_s_time("0 connections in 0.00s; 0.00 connections/user sec, bytes read 0\n")
    with pytest.raises(LoadError):
        parse_s_time("connect: Connection refused\n")


def test_bulk_and_tls_variants() -> None:
    from benchmarks.runner import variants_for

    bulk = [(v.proxy, v.flavor, v.key("bulk")) for v in variants_for(
        "bulk", ["direct", "haproxy", "nginx", "balancer"])]
    assert ("haproxy", "splice", "bulk_splice") in bulk
    assert ("haproxy", "256k", "bulk_256k") in bulk
    assert ("balancer", "", "bulk") in bulk
    tls = [(v.proxy, v.flavor, v.key("tls_conn")) for v in variants_for(
        "tls_conn", ["direct", "haproxy", "nginx", "balancer", "balancer@main"])]
    assert tls == [("haproxy", "tls", "tls_conn"), ("balancer", "tls", "tls_conn"),
                   ("balancer@main", "tls", "tls_conn")]


def test_targets_compare_each_p99_run_with_haproxys() -> None:
    def runs(values: list[float], errors: int = 0) -> dict[str, object]:
        return report.summarize([{"ok": True, "p99_ms": v, "errors": errors} for v in values])

    results = {
        "haproxy": {"p99": runs([10.0, 10.0, 30.0]),
                    "conn": report.summarize([{"ok": True, "cpu_us": 60.0}]),
                    "bulk_splice": report.summarize([{"ok": True, "gbps": 20.0}])},
        # The median ratio is 1.0x but run 1 is 1.6x: not met.
        "balancer": {"p99": runs([16.0, 10.0, 30.0]),
                     "conn": report.summarize([{"ok": True, "cpu_us": 63.0}]),
                     "bulk": report.summarize([{"ok": True, "gbps": 19.0}])},
    }
    lines = report.targets(results)
    assert "balancer: CPU per new connection 1.05x (at most 1.1x): met" in lines
    assert "balancer: bulk vs HAProxy option splice-auto 0.95x (at least 1.0x): NOT met" in lines
    assert any("worst run 1.60x" in line and line.endswith("NOT met") for line in lines)


@pytest.mark.parametrize(("start", "end", "notrack", "says"), [
    (None, None, False, "conntrack: not loaded"),
    ((1_000, 262_144), (2_000, 262_144), False, "1,000 of 262,144 entries at start"),
    ((1_000, 262_144), (250_000, 262_144), False, "nearly full: new connections may have"),
    ((1_000, 262_144), (250_000, 262_144), True, "loopback exempted for the run"),
])
def test_report_says_how_full_the_conntrack_table_was(start, end, notrack, says) -> None:
    meta = {"date": "d", "machine": {"nproc": 2, "cpu_model": "x", "kernel": "k",
                                     "loadavg_start": 0.1, "conntrack_start": start,
                                     "conntrack_end": end},
            "versions": {}, "settings": {"duration": 1.0, "runs": 1, "idle_connections": 2000},
            "notrack": notrack}
    md = report.markdown(meta, {})
    assert says in md
    assert ("nearly full" in md) == (says.startswith("nearly full"))


def test_notrack_rules_come_and_go() -> None:
    """Real iptables: the run's two raw-table rules are added, and all removed after."""
    import os
    import shutil
    import subprocess

    from benchmarks import conntrack

    if shutil.which("iptables") is None or os.geteuid() != 0:
        pytest.skip("needs root and iptables")

    def ours() -> list[str]:
        listed = subprocess.run(["iptables", "-t", "raw", "-S"], capture_output=True,
                                text=True, check=True).stdout
        return [line for line in listed.splitlines() if "balancer-bench-notrack" in line]

    why = conntrack.untrack_loopback()
    if why is not None and "iptables failed" in why:
        pytest.skip(f"iptables cannot change the raw table here: {why}")
    try:
        assert why is None
        rules = ours()
        assert len(rules) == 2 and all("--notrack" in r for r in rules)
        assert {r.split()[1] for r in rules} == {"PREROUTING", "OUTPUT"}
        assert conntrack.untrack_loopback() is None and len(ours()) == 2  # stale ones go
    finally:
        conntrack.restore_tracking()
    assert ours() == []

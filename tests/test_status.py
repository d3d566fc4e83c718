"""/status totals, rates and history, the status page in headless Chromium (issue 17)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from balancer.history import SPARK_EVERY, SPARK_POINTS, History, Track
from balancer.proc.cluster import render_cluster_metrics
from balancer.proc.shared import COUNTERS, SharedTable
from balancer.stats import check_code, check_text

from .utils import admin_port, free_port, http, make_config, start, wait_until, with_metrics

pytestmark = [pytest.mark.timeout(150), pytest.mark.both_loops]
ROOT = Path(__file__).parent.parent
ARTIFACTS = Path(__file__).parent / "artifacts"
KIB10 = 10 * 1024
needs_chromium = pytest.mark.skipif(not shutil.which("chromium"),
                                    reason="chromium not installed (see .ci/run)")


async def status(port: int, history: bool = False) -> dict:
    code, body = await http(port, path="/status?history=1" if history else "/status")
    assert code == 200
    return json.loads(body)


async def send_10k(port: int, payload: bytes) -> None:
    """One client: 10 KiB to an echo server and all of it back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


def servers_of(state: dict) -> dict[str, dict]:
    return {s["address"]: s for up in state["upstreams"].values() for s in up["servers"]}


@pytest.mark.parametrize("workers", [1, 2])
async def test_totals_match_known_traffic(start_backend, start_balancer, workers):
    backends = [start_backend("echo", f"e{i}") for i in range(2)]
    balancer = start(start_balancer, with_metrics(make_config([b.address for b in backends])),
                     workers)
    port = admin_port(balancer)
    payload = os.urandom(KIB10)
    for _ in range(10):  # 100 connections, 10 at a time
        await asyncio.gather(*(send_10k(balancer.port, payload) for _ in range(10)))

    def settled(state: dict) -> bool:  # bytes come with the once-a-second flush (and copy),
        # rates with the once-a-second sample
        return (sum(s["bytes_out"] for s in servers_of(state).values()) == 100 * KIB10
                and state["listeners"][0]["conn_rate_peak"] > 0)

    state = await wait_until(lambda: status(port), settled, timeout=10)
    servers = servers_of(state).values()
    assert sum(s["connections"] for s in servers) == 100
    assert sum(s["bytes_in"] for s in servers) == 100 * KIB10
    assert all(s["connections"] * KIB10 == s["bytes_in"] == s["bytes_out"] for s in servers)
    assert all(s["connect_errors"] == 0 and s["retries"] == 0 for s in servers)
    assert all(s["connect_time_avg_ms"] > 0 and s["peak"] >= 1 for s in servers)
    assert all(s["source"] == "static" and s["state"] == "up" for s in servers)
    (listener,) = state["listeners"]
    assert listener["connections"] == 100
    assert 0 < listener["conn_rate_peak"] <= 100
    up = state["upstreams"]["app"]
    assert (up["up"], up["total"], up["summary"]) == (2, 2, "all 2 up")
    assert state["process"]["pid"] == balancer.pid and state["process"]["rss"] > 0
    if workers > 1:
        assert state["primary"]["pid"] == balancer.pid
        lines = state["workers"]
        assert len(lines) == 2 and sum(w["connections"] for w in lines) == 100
        for w in lines:
            assert w["state"] == "serving" and w["generation"] == 1 and w["restarts"] == 0
            assert w["rss"] > 1 << 20 and 0 <= w["heartbeat_age"] < 1 and w["uptime"] > 0
            assert w["active"] == 0 and w["last_exit"] is None
    else:
        assert "workers" not in state


async def test_a_replaced_worker_keeps_the_totals_and_counts_its_restart(start_backend,
                                                                          start_balancer):
    echo = start_backend("echo", "e")
    config = with_metrics(make_config([echo.address]))
    config["workers"] = 2
    balancer = start_balancer(config, expect_log=[r"worker \d \(pid \d+\) was killed by SIGKILL"])
    for slot in range(2):
        balancer.wait_for_line(rf"worker {slot} started", timeout=20)
    port = admin_port(balancer)
    payload = os.urandom(KIB10)
    for _ in range(20):
        await send_10k(balancer.port, payload)
    # A worker's own count and the server's bytes are flushed separately: wait for both.
    state = await wait_until(lambda: status(port),
                             lambda s: servers_of(s)[echo.address]["bytes_out"] == 20 * KIB10
                             and any(w["connections"] > 0 for w in s["workers"]),
                             timeout=10)
    victim = next(w for w in state["workers"] if w["connections"] > 0)
    os.kill(victim["pid"], signal.SIGKILL)

    def slot_line(state: dict) -> dict | None:
        """The victim's slot (absent for a moment between the death and the new worker)."""
        return next((w for w in state["workers"] if w["slot"] == victim["slot"]), None)

    def replaced(state: dict) -> bool:
        line = slot_line(state)
        return line is not None and line["pid"] != victim["pid"] and line["state"] == "serving"

    state = await wait_until(lambda: status(port), replaced, timeout=20)
    line = slot_line(state)
    assert line is not None and line["restarts"] == 1
    assert line["last_exit"].startswith("was killed by SIGKILL")
    assert line["connections"] == 0  # the new worker's own
    server = servers_of(state)[echo.address]
    assert server["connections"] == 20 and server["bytes_in"] == 20 * KIB10


@pytest.mark.parametrize("workers", [1, 2])
async def test_last_active_check_and_its_latency(start_backend, start_balancer, workers):
    web = start_backend("http", "w")
    dead = f"127.0.0.1:{free_port()}"
    health = {"check": {"type": "http", "path": "/", "interval": "200ms", "fall": 1}}
    balancer = start(start_balancer, with_metrics(make_config([web.address, dead],
                                                               health=health)), workers)
    port = admin_port(balancer)

    def checked(state: dict) -> bool:
        return all(s["check"] is not None for s in servers_of(state).values())

    servers = servers_of(await wait_until(lambda: status(port), checked, timeout=10))
    assert re.fullmatch(r"http 200 in [\d.]+ ms", servers[web.address]["check"]["text"])
    assert servers[web.address]["check"]["ok"] and servers[web.address]["check"]["ms"] > 0
    assert servers[dead]["check"] == {"code": -1, "ok": False, "ms": None, "text": "tcp refused"}
    state = await wait_until(lambda: status(port),
                             lambda s: servers_of(s)[dead]["state"] == "down", timeout=10)
    up = state["upstreams"]["app"]
    assert up["up"] == 1 and up["summary"].startswith(f"1 of 2 up; {dead} down: ")
    await wait_until(lambda: status(port), lambda s: servers_of(s)[dead]["downtime"] >= 0.5,
                     timeout=5)


async def test_history_gives_sparkline_points(start_backend, start_balancer):
    echo = start_backend("echo", "e")
    balancer = start_balancer(with_metrics(make_config([echo.address])))
    port = admin_port(balancer)
    payload = os.urandom(KIB10)
    await send_10k(balancer.port, payload)
    state = await wait_until(
        lambda: status(port, history=True),
        lambda s: len(servers_of(s)[echo.address]["history"]["open"]) >= 2,
        timeout=3 * SPARK_EVERY, interval=0.5)
    assert state["history_interval"] == SPARK_EVERY
    history = servers_of(state)[echo.address]["history"]
    assert len(history["conn_rate"]) == len(history["open"])
    assert sum(history["conn_rate"]) * SPARK_EVERY == pytest.approx(1, abs=0.01)
    assert "history" not in servers_of(await status(port))[echo.address]


@pytest.mark.parametrize("hash_name", ["maglev", "ring", None])
async def test_an_ip_hash_upstream_says_which_table(start_backend, start_balancer, hash_name):
    echo = start_backend("echo", "e")
    config = with_metrics(make_config([echo.address], "ip_hash"))
    if hash_name is not None:
        config["upstreams"]["app"]["hash"] = hash_name
    upstream = (await status(admin_port(start_balancer(config))))["upstreams"]["app"]
    assert (upstream["strategy"], upstream["hash"]) == ("ip_hash", hash_name or "maglev")


# -- the page in headless Chromium -----------------------------------------------------------


def chromium(tmp_path: Path, *args: str, size: str = "1280,720") -> list[str]:
    return ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000", f"--window-size={size}", *args]


async def dump_dom(tmp_path: Path, port: int) -> str:
    done = await asyncio.to_thread(
        subprocess.run, chromium(tmp_path, "--dump-dom", f"http://127.0.0.1:{port}/"),
        capture_output=True, text=True, timeout=60)
    return done.stdout


def server_rows(dom: str, upstream: str = "app") -> list[tuple[str, str, str]]:
    """(address, state, row html) of an upstream's server rows, in page order."""
    section = dom.split(f'<section data-upstream="{upstream}">', 1)[1].split("</section>", 1)[0]
    return re.findall(r'<tr data-server="([^"]+)" data-state="([^"]+)">(.*?)</tr>', section,
                      re.S)


def cells(row: str) -> dict[str, str]:
    return {col: re.sub(r"<[^>]+>", "", text).strip()
            for col, text in re.findall(r'<td data-col="([^"]+)"[^>]*>(.*?)</td>', row, re.S)}


async def keep_loading(port: int, stop: asyncio.Event, clients: int = 6) -> int:
    """Clients sending 10 KiB each, one after another, until `stop`: load for a screenshot."""
    payload = os.urandom(KIB10)
    sent = 0

    async def client() -> None:
        nonlocal sent
        while not stop.is_set():
            await send_10k(port, payload)
            sent += 1
            await asyncio.sleep(0.02)

    await asyncio.gather(*(client() for _ in range(clients)))
    return sent


@needs_chromium
async def test_page_shows_down_first_sparklines_and_workers(start_backend, start_balancer,
                                                           tmp_path):
    backends = [start_backend("echo", f"e{i}") for i in range(4)]
    dead = f"127.0.0.1:{free_port()}"
    servers = [*(b.address for b in backends[:2]), dead, *(b.address for b in backends[2:])]
    health = {"max_fails": 1, "fail_timeout": "60s",
              "check": {"type": "tcp", "interval": "1s"}}
    config = with_metrics(make_config(servers, "least_conn", retries={"tries": 3},
                                      health=health))
    balancer = start(start_balancer, config, 2)
    port = admin_port(balancer)
    stop = asyncio.Event()
    load = asyncio.create_task(keep_loading(balancer.port, stop))
    try:
        await wait_until(lambda: status(port, history=True),
                         lambda s: servers_of(s)[dead]["state"] == "down" and len(
                             servers_of(s)[backends[0].address]["history"]["open"]) >= 3,
                         timeout=5 * SPARK_EVERY, interval=0.5)
        dom = await dump_dom(tmp_path, port)
        rows = server_rows(dom)
        assert len(rows) == 5, dom[-3000:]
        assert rows[0][:2] == (dead, "down")  # down first, whatever the config order
        assert {state for _, state, _ in rows[1:]} == {"up"}
        first_up = cells(rows[1][2])
        assert int(first_up["total"]) > 0 and "source" not in first_up
        assert cells(rows[0][2])["check"] == "tcp refused"
        assert "all servers static" in dom  # the column says nothing then: one line instead
        points = re.findall(r'<svg class="spark open"[^>]*>.*?<polyline points="([^"]+)"',
                            rows[1][2], re.S)
        assert points and len(points[0].split()) >= 3, rows[1][2]
        assert re.search(r'<svg class="spark rate"', rows[1][2])
        workers = re.findall(r'<tr data-worker="(\d)">', dom)
        assert workers == ["0", "1"], dom[-3000:]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "status-load.png"
        await asyncio.to_thread(
            subprocess.run, chromium(tmp_path, f"--screenshot={shot}",
                                     f"http://127.0.0.1:{port}/"),
            capture_output=True, timeout=60)
        assert shot.exists() and shot.stat().st_size > 20_000
        if os.environ.get("BALANCER_UPDATE_DOCS"):  # the README's picture, taken here
            shutil.copy(shot, ROOT / "docs" / "status.png")
    finally:
        stop.set()
        sent = await asyncio.wait_for(load, 30)
    assert sent > 0


@needs_chromium
async def test_page_at_100_servers_one_row_each(start_backend, start_balancer, tmp_path):
    echo = start_backend("echo", "e")
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    # 96 more on addresses nobody listens on and no client is sent to (backups, never used).
    spare = [{"address": f"127.0.0.2:{40000 + i}", "backup": True} for i in range(96)]
    config = with_metrics(make_config([echo.address, *dead, *spare], retries={"tries": 5},
                                      health={"max_fails": 1, "fail_timeout": "60s"}))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    for _ in range(8):  # round robin: the dead ones are tried and go down
        await send_10k(balancer.port, b"x" * 100)
    await wait_until(lambda: status(port),
                     lambda s: all(servers_of(s)[d]["state"] == "down" for d in dead))
    rows = server_rows(await dump_dom(tmp_path, port))
    assert len(rows) == 100
    assert {address for address, _, _ in rows[:3]} == set(dead)
    assert all(state == "up" for _, state, _ in rows[3:])


# -- pure parts: history arrays, check codes, the shared table ------------------------------


def test_track_rates_and_sparkline_points():
    track = Track()
    for second in range(12):
        track.sample((3, 10 * second, 100 * second, 200 * second))
    assert track.rates == (10.0, 100.0, 200.0)
    assert track.peak_rate == 10
    series = track.series()
    assert series["open"] == [3.0, 3.0] and series["conn_rate"] == [10.0, 10.0]
    for second in range(12, 12 + SPARK_EVERY * (SPARK_POINTS + 5)):
        track.sample((1, 10 * second, 0, 0))
    assert len(track.series()["open"]) == SPARK_POINTS  # a ring: the oldest points go


def test_history_drops_what_is_no_longer_shown():
    shown = {"s app/a": (0, 0, 0, 0), "s app/b": (0, 0, 0, 0)}
    history = History(lambda: shown.items())
    history.sample()
    del shown["s app/b"]
    history.sample()
    assert set(history.tracks) == {"s app/a"}


def test_history_of_1000_servers_stays_small():
    """The figure README quotes: the tracks of 1,000 servers after more than 5 minutes."""
    readings = {f"s app/10.0.{i // 250}.{i % 250}:80": (i % 7, i, i, i) for i in range(1000)}
    history = History(lambda: readings.items())
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(SPARK_EVERY * SPARK_POINTS + 10):
        history.sample()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    used = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"history of 1000 servers: {used / 1024:.0f} KiB")
    assert used < 1.5 * 1024 * 1024


def test_check_codes_read_as_the_operator_expects():
    assert check_text(check_code("HTTP 200"), 3200) == "http 200 in 3 ms"
    assert check_text(check_code("connected"), 400) == "tcp ok in 0.4 ms"
    assert check_text(check_code("refused"), 0) == "tcp refused"
    assert check_text(check_code("probe error (ValueError)"), 0) == "probe error"


def test_totals_survive_a_worker_leaving_the_table(tmp_path):
    table = SharedTable(tmp_path / "shared", 4, 2, create=True)
    try:
        first, second = table.cell(1, 0), table.cell(1, 1)
        first.publish([5, 50, 500, 1, 0, 10, 5])
        second.publish([2, 20, 200, 0, 1, 4, 2])
        assert table.cell(1, None).totals() == [7, 70, 700, 1, 1, 14, 7]
        table.clear_column(0)
        assert table.cell(1, None).totals() == [7, 70, 700, 1, 1, 14, 7]
        table.cell(1, 0).publish([1, 10, 100, 0, 0, 1, 1])  # the replacement, from zero
        assert table.cell(1, None).totals() == [8, 80, 800, 1, 1, 15, 8]
        assert table.cell(0, None).totals() == [0] * COUNTERS
        table.reset_row(1)  # a new server in that row starts from nothing
        assert table.cell(1, None).totals() == [0] * COUNTERS
    finally:
        table.close()


def test_cluster_metrics_skip_a_file_a_worker_is_creating(tmp_path):
    """A worker opens a new metrics file before sizing it: read then, it is empty, and
    prometheus-client's own collector raised struct.error for the whole /metrics answer."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    written = MmapedDict(str(tmp_path / "counter_101.db"))
    written.write_value(mmap_key("balancer_retries", "balancer_retries_total", ["upstream"],
                                 ["app"], "Connects retried."), 3.0, 0.0)
    written.close()
    (tmp_path / "histogram_102.db").touch()  # the other worker, between open and truncate
    text = render_cluster_metrics(str(tmp_path)).decode()
    assert 'balancer_retries_total{upstream="app"} 3.0' in text
    plain = CollectorRegistry()
    multiprocess.MultiProcessCollector(plain, str(tmp_path))
    with pytest.raises(struct.error):  # what prometheus-client's own collector does with it
        generate_latest(plain)

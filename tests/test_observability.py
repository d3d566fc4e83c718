"""Metrics, health and status endpoints, the status page and the access log."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from balancer.status import REJECT_REASONS

from .utils import (
    admin_port,
    admin_status,
    blackhole,
    converged,
    eventually,
    free_port,
    hold_echo_connections,
    http,
    make_config,
    reload,
    scrape,
    start_with_a_refusing_pooled_server,
    start_workers,
    total,
    wait_until,
    who_answers,
    with_metrics,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]
ARTIFACTS = Path(__file__).parent / "artifacts"


async def echo_once(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_counters_match_the_traffic_sent(start_backend, start_balancer):
    backends = [start_backend("echo", f"e{i}") for i in range(2)]
    balancer = start_balancer(with_metrics(make_config([b.address for b in backends])))
    port = admin_port(balancer)
    for i in range(10):
        assert await echo_once(balancer.port, bytes([i]) * 1000) == bytes([i]) * 1000
    samples = await scrape(port)
    for backend in backends:
        assert total(samples, "balancer_connections_total", listener="test", upstream="app",
                     server=backend.address) == 5
    assert total(samples, "balancer_bytes_total", direction="upstream") == 10_000
    assert total(samples, "balancer_bytes_total", direction="downstream") == 10_000
    assert total(samples, "balancer_upstream_connect_seconds_count") == 10
    assert total(samples, "balancer_connection_duration_seconds_count", upstream="app") == 10
    assert total(samples, "balancer_server_up", server=backends[0].address) == 1
    assert total(samples, "balancer_config_reloads_total", result="failure") == 0
    assert total(samples, "process_resident_memory_bytes") > 0


async def test_active_gauge_rises_and_returns_to_zero(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(with_metrics(make_config([echo.address])))
    port = admin_port(balancer)
    held = await hold_echo_connections(balancer.port, 3)
    assert total(await scrape(port), "balancer_active_connections") == 3
    for writer in held:
        writer.close()
    last: list[float] = []

    async def active_now() -> float:
        last.append(total(await scrape(port), "balancer_active_connections"))
        return last[-1]

    deadline = time.monotonic() + 5
    while await active_now() != 0:
        assert time.monotonic() < deadline, last
        await asyncio.sleep(0.05)


async def test_errors_by_reason(start_balancer):
    refused = f"127.0.0.1:{free_port()}"
    hole = blackhole()  # accept queue full: connects to it time out
    timeout = f"127.0.0.1:{hole[0].getsockname()[1]}"
    try:
        config = with_metrics(make_config(
            [refused, timeout], "round_robin", health={"max_fails": 0},
            timeouts={"connect": "200ms"}, retries={"tries": 2, "timeout": "2s"}))
        balancer = start_balancer(config)
        port = admin_port(balancer)
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
        samples = await scrape(port)
        errors = "balancer_connection_errors_total"
        assert total(samples, errors, server=refused, reason="refused") == 2
        assert total(samples, errors, server=timeout, reason="timeout") == 2
        assert total(samples, errors, server="", reason="no_server") == 2
        assert total(samples, "balancer_retries_total", upstream="app") == 2
    finally:
        for sock in hole:
            sock.close()


async def test_healthz_flips_when_all_servers_are_down_and_back(start_backend, start_balancer):
    backend = start_backend("name", "only")
    check = {"interval": "100ms", "timeout": "200ms", "rise": 1, "fall": 1}
    config = with_metrics(make_config([backend.address], health={"check": check}))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    assert await http(port, path="/healthz") == (200, b"ok\n")
    backend_port = backend.port
    backend.stop()
    balancer.wait_for_line("down: 1 active checks failed")
    status, body = await http(port, path="/healthz")
    assert status == 503 and body == b"listener test: no server up in upstream app\n"
    start_backend("name", "only", port=backend_port)
    balancer.wait_for_line("up: 1 active checks passed")
    assert await http(port, path="/healthz") == (200, b"ok\n")


async def test_status_json(start_backend, start_balancer):
    a = start_backend("echo", "a")
    dead = f"127.0.0.1:{free_port()}"
    servers = [{"address": a.address, "weight": 3}, {"address": dead, "backup": True}]
    config = with_metrics(make_config(servers, "weighted", health={"max_fails": 1}))
    config["upstreams"]["app"]["pool"] = {"size": 1}
    balancer = start_balancer(config)
    port = admin_port(balancer)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    # The backup's pool tried to connect and failed once: down by passive check.
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down")
    status, body = await http(port, path="/status")
    writer.close()
    assert status == 200
    data = json.loads(body)
    (listener,) = data["listeners"]
    assert {k: listener[k] for k in ("name", "bind", "upstream", "active")} == {
        "name": "test", "bind": f"127.0.0.1:{balancer.port}", "upstream": "app", "active": 1}
    assert listener["connections"] == 1 and listener["max_conns"] == 0
    assert listener["rejected"] == dict.fromkeys(REJECT_REASONS, 0)
    assert listener["tls_handshake_errors"] is None
    upstream = data["upstreams"]["app"]
    assert upstream["strategy"] == "weighted" and upstream["hash"] is None
    first, second = upstream["servers"]
    assert first["address"] == a.address and first["state"] == "up"
    assert first["active"] == 1 and first["weight"] == 3 and first["effective_weight"] == 3
    assert second["state"] == "down" and second["backup"] is True and second["failures"] >= 1
    assert "connect failures" in second["reason"]
    assert set(first) >= {"max_conns", "last_change", "reason", "pool_idle", "failures"}


async def test_drain_and_enable_with_token(start_backend, start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    config = with_metrics(make_config([a.address, b.address]), admin_token="s3cret")
    balancer = start_balancer(config)
    port = admin_port(balancer)
    path = f"/servers/app/{a.address}/drain"
    assert (await http(port, "POST", path))[0] == 401
    assert (await http(port, "POST", path, {"Authorization": "Bearer nope"}))[0] == 401
    status, body = await http(port, "POST", path, {"Authorization": "Bearer s3cret"})
    assert status == 200 and json.loads(body)["state"] == "draining"

    assert {await who_answers(balancer.port) for _ in range(6)} == {"b"}
    status, _ = await http(port, "POST", f"/servers/app/{a.address}/enable",
                           {"Authorization": "Bearer s3cret"})
    assert status == 200
    assert {await who_answers(balancer.port) for _ in range(6)} == {"a", "b"}


async def test_access_log_outcomes(start_backend, start_balancer, tmp_path):
    echo = start_backend("echo")
    log_path = tmp_path / "access.log"
    config = make_config([echo.address])
    config["listeners"].append({"name": "nowhere", "bind": "127.0.0.1:0", "upstream": "dead"})
    config["upstreams"]["dead"] = {"servers": [f"127.0.0.1:{free_port()}"],
                                   "retries": {"tries": 1}}
    config["log"] = {"access": str(log_path), "format": "json"}
    balancer = start_balancer(config)
    assert await echo_once(balancer.ports["test"], b"hello") == b"hello"
    aborter = socket.create_connection(("127.0.0.1", balancer.ports["test"]))
    aborter.sendall(b"abc")
    assert aborter.recv(3) == b"abc"
    aborter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    aborter.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.ports["nowhere"])
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()

    def lines() -> list[dict]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(x) for x in text.splitlines()]

    await eventually(lambda: len(lines()) == 3)
    by_outcome = {line["outcome"]: line for line in lines()}
    assert set(by_outcome) == {"ok", "client_abort", "no_server"}
    ok = by_outcome["ok"]
    assert ok["bytes_up"] == 5 and ok["bytes_down"] == 5 and ok["server"] == echo.address
    assert ok["listener"] == "test" and ok["client"].startswith("127.0.0.1:")
    assert by_outcome["no_server"]["server"] == "-"
    assert by_outcome["client_abort"]["bytes_up"] == 3


async def test_scrape_during_bulk_transfer_is_fast(start_backend, start_balancer):
    source = start_backend("source", "src", "--bytes", str(2 << 30))
    balancer = start_balancer(with_metrics(make_config([source.address])))
    port = admin_port(balancer)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    received = 0

    async def until_in_full_flow() -> None:
        nonlocal received
        while received < 64 << 20:
            chunk = await reader.read(1 << 20)
            assert chunk, f"the transfer ended after {received} bytes"
            received += len(chunk)

    await asyncio.wait_for(until_in_full_flow(), 30)  # the transfer is in full flow
    stop = asyncio.Event()

    async def keep_reading() -> None:
        nonlocal received
        while not stop.is_set() and (chunk := await reader.read(1 << 20)):
            received += len(chunk)

    pump = asyncio.create_task(keep_reading())
    timings = []
    for _ in range(5):
        started = time.monotonic()
        await scrape(port)
        timings.append(time.monotonic() - started)
    stop.set()
    await asyncio.wait_for(pump, 30)
    writer.close()
    assert max(timings) < 0.1, timings


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (see .ci/run)")
async def test_status_page_in_headless_chromium(start_backend, start_balancer, tmp_path):
    a = start_backend("name", "a")
    dead = f"127.0.0.1:{free_port()}"
    servers = [{"address": a.address, "max_conns": 50}, dead]
    config = with_metrics(make_config(servers, health={"max_fails": 1}, pool={"size": 2}))
    balancer = start_balancer(config)
    port = admin_port(balancer)

    for _ in range(2):  # the dead one is down by its pool's failed connects, if not by these
        await who_answers(balancer.port)
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down")
    expected = await wait_until(lambda: status_servers(port),
                                lambda s: s[a.address]["pool_idle"] == 2)
    ARTIFACTS.mkdir(exist_ok=True)
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
              "--virtual-time-budget=5000", "--window-size=1280,800"]
    url = f"http://127.0.0.1:{port}/"
    dom = await asyncio.to_thread(
        subprocess.run, [*common, "--dump-dom", url], capture_output=True, text=True,
        timeout=60)
    rendered = dom.stdout.split('<main id="upstreams">', 1)[-1].split("</main>", 1)[0]
    rows = dict(re.findall(r'<tr data-server="([^"]+)" data-state="([^"]+)"', rendered))
    assert rows == {a.address: "up", dead: "down"}, dom.stdout[-2000:]
    # The counters per server: active (of max_conns), failures and idle pooled connections.
    cells = {}
    for address, row in re.findall(r'<tr data-server="([^"]+)"[^>]*>(.*?)</tr>', rendered, re.S):
        cells[address] = {col: re.sub(r"<[^>]+>", "", cell).strip() for col, cell in
                          re.findall(r'<td data-col="([^"]+)"[^>]*>(.*?)</td>', row, re.S)}
    assert cells[a.address]["open"] == "0 / 50" and cells[dead]["open"] == "0", cells
    for address in (a.address, dead):
        assert cells[address]["failures"] == str(expected[address]["failures"]), cells
        assert cells[address]["pool"] == str(expected[address]["pool_idle"]), cells
    assert int(cells[dead]["failures"]) >= 1 and cells[a.address]["pool"] == "2", cells
    shot = ARTIFACTS / "status.png"
    await asyncio.to_thread(
        subprocess.run, [*common, f"--screenshot={shot}", url], capture_output=True,
        timeout=60)
    assert shot.exists() and shot.stat().st_size > 5000


async def status_servers(port: int) -> dict[str, dict]:
    """/status servers of every upstream, by address."""
    status, body = await http(port, path="/status")
    assert status == 200
    upstreams = json.loads(body)["upstreams"].values()
    return {server["address"]: server for up in upstreams for server in up["servers"]}


async def test_pool_hits_and_misses_are_counted(start_backend, start_balancer):
    echo = start_backend("echo", "e")
    size = 3
    balancer = start_balancer(with_metrics(make_config([echo.address], pool={"size": size})))
    port = admin_port(balancer)
    requests = "balancer_pool_requests_total"

    async def pool_idle() -> int:
        return (await status_servers(port))[echo.address]["pool_idle"]

    await wait_until(pool_idle, lambda n: n == size)
    for i in range(size):  # one by one, through the warm pool
        assert await echo_once(balancer.port, b"x%d" % i) == b"x%d" % i
    samples = await scrape(port)
    assert total(samples, requests, upstream="app", server=echo.address, result="hit") == size
    assert total(samples, requests, result="miss") == 0
    assert total(samples, "balancer_upstream_connect_seconds_count") == 0  # all pooled
    await wait_until(pool_idle, lambda n: n == size)
    # More clients than idle connections at once: stopped, the balancer cannot accept, so
    # they are all accepted in one loop pass after SIGCONT, before any refill can land. The
    # first `size` take the idle connections; the others find the pool empty.
    extra = 2
    balancer.proc.send_signal(signal.SIGSTOP)
    try:
        burst = [socket.create_connection(("127.0.0.1", balancer.port))
                 for _ in range(size + extra)]
    finally:
        balancer.proc.send_signal(signal.SIGCONT)

    def exchange(sock: socket.socket) -> bytes:
        sock.settimeout(10)
        sock.sendall(b"burst")
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()

    try:
        answers = await asyncio.gather(*(asyncio.to_thread(exchange, s) for s in burst))
    finally:
        for sock in burst:
            sock.close()
    assert answers == [b"burst"] * (size + extra)
    samples = await scrape(port)
    assert total(samples, requests, result="hit") == 2 * size
    assert total(samples, requests, server=echo.address, result="miss") == extra
    assert total(samples, "balancer_upstream_connect_seconds_count") == extra
    await wait_until(pool_idle, lambda n: n == size)


async def test_pool_connect_failures_are_counted_as_errors(start_backend, start_balancer):
    """/status `failures` counts every failed connect to a server, the pool's included; the
    error counter agrees, so a server refusing before any client arrives shows in both."""
    _, dead, port = start_with_a_refusing_pooled_server(start_backend, start_balancer)

    async def failures() -> int:
        return (await status_servers(port))[dead]["failures"]

    assert await wait_until(failures, lambda n: n >= 2) == 2  # the pool's two connects
    samples = await scrape(port)
    errors = "balancer_connection_errors_total"
    assert total(samples, errors, upstream="app", server=dead, reason="refused") == 2
    assert total(samples, errors) == 2
    assert total(samples, "balancer_connections_total") == 0  # no client was involved
    assert total(samples, "balancer_server_up", server=dead) == 0


async def test_pool_idle_gauge_drops_and_refills(start_backend, start_balancer):
    backend = start_backend("echo", "e")
    config = with_metrics(make_config([backend.address], pool={"size": 3},
                                      health={"max_fails": 1, "fail_timeout": "1s"}))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    address = backend.address

    async def gauge() -> float:
        return total(await scrape(port), "balancer_pool_idle_connections", upstream="app",
                     server=address)

    assert await wait_until(gauge, lambda n: n == 3) == 3
    backend_port = backend.port
    backend.stop()  # the idle connections are closed, and refills are refused
    balancer.wait_for_line(rf"server app/{re.escape(address)} down")
    assert await wait_until(gauge, lambda n: n == 0) == 0
    start_backend("echo", "e", port=backend_port)
    # The ejection (fail_timeout, 1 s) must elapse before the server is tried again.
    await asyncio.sleep(1.1)
    assert await echo_once(balancer.port, b"trial") == b"trial"  # the half-open trial
    balancer.wait_for_line(rf"server app/{re.escape(address)} up: trial connection succeeded")
    # Refilled as the server comes back, not at the next sweep (5 s away at most).
    assert await wait_until(gauge, lambda n: n == 3, timeout=2.5) == 3
    assert (await status_servers(port))[address]["pool_idle"] == 3


# Every balancer_* family and its exact label names (issue 4: names are the interface).
FAMILY_LABELS = {
    "balancer_connections": {"listener", "upstream", "server"},
    "balancer_active_connections": {"listener", "upstream", "server"},
    "balancer_connection_errors": {"upstream", "server", "reason"},
    "balancer_retries": {"upstream"},
    "balancer_bytes": {"upstream", "server", "direction"},
    "balancer_upstream_connect_seconds": {"upstream", "server"},
    "balancer_connection_duration_seconds": {"upstream"},
    "balancer_server_up": {"upstream", "server"},
    "balancer_server_info": {"upstream", "server", "source"},
    "balancer_pool_idle_connections": {"upstream", "server"},
    "balancer_pool_requests": {"upstream", "server", "result"},
    "balancer_config_reloads": {"result"},
    "balancer_tls_handshake_errors": {"listener"},
    "balancer_tls_handshake_seconds": {"listener"},
    "balancer_sni_rejected": {"listener", "reason"},
    "balancer_rejected_connections": {"listener", "reason"},
}
# Shown only with a TLS or SNI listener (tests/test_tls.py reads them).
LISTENER_TLS_FAMILIES = {"balancer_tls_handshake_errors", "balancer_tls_handshake_seconds",
                         "balancer_sni_rejected"}
LABEL_VALUES = {"reason": {"refused", "timeout", "reset", "local", "internal", "tls",
                           "no_server", "max_conns", "client_conns", "client_rate", "denied",
                           "bad_proxy_header"},
                "direction": {"upstream", "downstream"}}


async def test_metric_families_have_exactly_their_label_sets(start_backend, start_balancer):
    echo = start_backend("echo", "e")
    dead = f"127.0.0.1:{free_port()}"
    config = with_metrics(make_config([dead, echo.address], "round_robin", pool={"size": 1},
                                      health={"max_fails": 0}))
    config["listeners"][0]["max_conns"] = 1000  # a listener with limits exports rejections
    balancer = start_balancer(config)
    port = admin_port(balancer)
    for i in range(4):  # through the pool, a direct connect, and a retry off the dead one
        assert await echo_once(balancer.port, b"%d" % i) == b"%d" % i
    status, body = await http(port, path="/metrics")
    assert status == 200
    seen: dict[str, int] = {}
    for family in text_string_to_metric_families(body.decode()):
        if not family.name.startswith("balancer_"):
            continue
        base = family.name.removesuffix("_created")
        assert base in FAMILY_LABELS, f"unexpected family {family.name}"
        for sample in family.samples:
            labels = set(sample.labels)
            if sample.name.endswith("_bucket"):
                assert labels == FAMILY_LABELS[base] | {"le"}, sample
            else:
                assert labels == FAMILY_LABELS[base], sample
            for label, allowed in LABEL_VALUES.items():
                if label in sample.labels:
                    assert sample.labels[label] in allowed, sample
            if base == "balancer_pool_requests":
                assert sample.labels["result"] in {"hit", "miss"}, sample
            if base == "balancer_config_reloads":
                assert sample.labels["result"] in {"success", "failure"}, sample
            if sample.name == "balancer_server_up":
                assert sample.value in (0, 1), sample
            if sample.labels.get("reason") == "no_server":
                assert sample.labels["server"] == "", sample
            seen[base] = seen.get(base, 0) + 1
    expected = set(FAMILY_LABELS) - LISTENER_TLS_FAMILIES
    assert set(seen) == expected, expected ^ set(seen)
    assert "process_resident_memory_bytes" in body.decode()


async def test_access_log_text_lines_to_a_file(start_backend, start_balancer, tmp_path):
    echo = start_backend("echo")
    log_path = tmp_path / "access.log"
    config = make_config([echo.address])
    config["log"] = {"access": str(log_path), "format": "text"}
    balancer = start_balancer(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(b"hello")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 10) == b"hello"
    writer.close()

    def lines() -> list[str]:
        return log_path.read_text().splitlines() if log_path.exists() else []

    await eventually(lambda: len(lines()) == 1)
    match = re.fullmatch(
        r"(\S+) test 127\.0\.0\.1:(\d+) -> app/(\S+) up=5 down=5 (\d+(?:\.\d+)?)ms ok",
        lines()[0])
    assert match, lines()
    stamp, port, server, duration = match.groups()
    time.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z")
    assert int(port) == client_port and server == echo.address
    assert 0 <= float(duration) < 10_000
    assert not any(" -> app/" in line for line in balancer.lines)  # the file only


@pytest.mark.parametrize("off", ["off", False])  # False: a bare `off` in YAML 1.1
async def test_access_log_off_writes_nothing(start_backend, start_balancer, tmp_path,
                                             monkeypatch, off):
    echo = start_backend("echo")
    monkeypatch.chdir(tmp_path)  # the balancer's cwd: an `off` taken as a path lands here
    config = with_metrics(make_config([echo.address]))
    dead = f"127.0.0.1:{free_port()}"
    config["listeners"].append({"name": "nowhere", "bind": "127.0.0.1:0", "upstream": "dead"})
    config["upstreams"]["dead"] = {"servers": [dead], "retries": {"tries": 1},
                                   "health": {"max_fails": 0}}
    config["log"] = {"access": off, "format": "text"}
    balancer = start_balancer(config, "-v", "debug")
    port = admin_port(balancer)
    assert await echo_once(balancer.ports["test"], b"hello") == b"hello"

    async def closed() -> float:
        samples = await scrape(port)
        return total(samples, "balancer_connection_duration_seconds_count", upstream="app")

    await wait_until(closed, lambda n: n == 1)  # the access log would have had its line
    # Two failed clients: each logs a debug line before it closes, so once the second
    # line is in, every line an access log could have written before it is in too.
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.ports["nowhere"])
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    balancer.wait_for_log(
        lambda: sum(f"connect to dead/{dead} failed" in x for x in balancer.lines) == 2, 10)
    assert not [line for line in balancer.lines if re.search(r" -> (app|dead)/", line)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [balancer.config_path.name]


async def test_status_shows_half_open_during_a_trial_and_slow_start_weight(
    start_backend, start_balancer
):
    good = start_backend("name", "good")
    flaky_port = free_port()
    flaky = f"127.0.0.1:{flaky_port}"
    servers = [{"address": flaky, "weight": 4}, {"address": good.address, "weight": 4}]
    config = with_metrics(make_config(
        servers, "round_robin", slow_start="20s", health={"max_fails": 1, "fail_timeout": "1s"},
        timeouts={"connect": "30s"}, retries={"timeout": "60s"}))
    balancer = start_balancer(config)
    port = admin_port(balancer)

    assert (await status_servers(port))[flaky]["effective_weight"] == 4  # no ramp at start
    assert await who_answers(balancer.port) == "good"  # refused, retried on the other
    balancer.wait_for_line(rf"server app/{re.escape(flaky)} down")
    hole = blackhole(flaky_port)  # from now on a connect to it hangs (timeout 30 s)
    clients: list[socket.socket] = []
    try:
        # The ejection (fail_timeout, 1 s) must elapse before a trial.
        await asyncio.sleep(1.1)
        for _ in range(3):  # round robin: one of the next clients is the trial
            clients.append(socket.create_connection(("127.0.0.1", balancer.port)))
            state = await wait_until(lambda: status_servers(port),
                                     lambda s: s[flaky]["active"] + s[good.address]["active"]
                                     == len(clients))
            if state[flaky]["active"]:
                break
        # The trial connect hangs: the server is half-open for as long as it does.
        assert state[flaky]["state"] == "half_open" and state[flaky]["active"] == 1, state
        await asyncio.sleep(0.3)  # still hanging a moment later (the connect timeout is 30 s)
        assert (await status_servers(port))[flaky]["state"] == "half_open"
        for client in clients:  # the trial's client leaves: the trial is free again
            client.close()
        clients = []
    finally:
        for sock in [*clients, *hole]:
            sock.close()
    start_backend("name", "back", port=flaky_port)

    async def served() -> dict[str, dict]:
        await who_answers(balancer.port)
        return await status_servers(port)

    state = await wait_until(served, lambda s: s[flaky]["state"] == "up", timeout=10)
    assert state[flaky]["reason"] == "trial connection succeeded"
    # Slow start: the weight ramps from 5% to full over 20 s; well under half just after.
    assert 0 < state[flaky]["effective_weight"] < 2, state[flaky]
    assert state[good.address]["effective_weight"] == 4


def servers_in(samples: dict) -> set[str]:
    """Every `server` label value the scrape shows."""
    return {dict(labels)["server"] for _, labels in samples if dict(labels).get("server")}


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_removed_servers_label_sets_go_once_its_connections_have_ended(
        start_backend, start_balancer, workers):
    """Servers that come and go (reloads, DNS discovery) leave no label sets behind: every
    one of them used to stay for good (19k made /metrics take over 10 s)."""
    a, b = start_backend("echo", "a"), start_backend("echo", "b")
    idle = f"127.0.0.1:{free_port()}"  # a backup: never sent a connection
    # least_conn: the second connection goes to the other server, whichever worker takes it.
    config = with_metrics(make_config([a.address, b.address, {"address": idle, "backup": True}],
                                      "least_conn"))
    balancer = start_workers(start_balancer, config, workers) if workers > 1 else \
        start_balancer(config)
    port = admin_port(balancer)
    held = await hold_echo_connections(balancer.port, 2)  # one on each server
    try:
        samples = await scrape(port)
        assert servers_in(samples) == {a.address, b.address, idle}
        assert total(samples, "balancer_server_info", server=a.address, source="static") == 1
        config["upstreams"]["app"]["servers"] = [a.address]
        reload(balancer, config)
        if workers > 1:
            await wait_until(lambda: admin_status(port), converged(2, workers), timeout=15)
        # The idle server goes at once; b while its connection lasts.
        samples = await wait_until(lambda: scrape(port),
                                   lambda s: servers_in(s) == {a.address, b.address})
        assert total(samples, "balancer_active_connections", server=b.address) == 1
    finally:
        for writer in held:
            writer.close()
    await wait_until(lambda: scrape(port), lambda s: servers_in(s) == {a.address})


async def test_a_server_back_before_its_last_connection_ends_keeps_that_connections_counts(
        start_backend, start_balancer):
    """Removed by a reload, then back (a new server for the same address) while a
    connection to the old one still runs: when that connection ends, the old server's label
    sets stay (the new one shows under them), and so must what it counted last: its close
    (active back to 0) and its bytes, kept as plain counts until the next flush."""
    a, b = start_backend("echo", "a"), start_backend("echo", "b")
    config = with_metrics(make_config([a.address, b.address], "least_conn"))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    held = await hold_echo_connections(balancer.port, 2)  # one on each server
    samples = await scrape(port)
    assert total(samples, "balancer_active_connections", server=a.address) == 1
    config["upstreams"]["app"]["servers"] = [b.address]
    reload(balancer, config)
    config["upstreams"]["app"]["servers"] = [a.address, b.address]
    reload(balancer, config)
    for writer in held:
        writer.close()
    # Both closes seen (the duration histogram is the upstream's: it stays whatever goes).
    samples = await wait_until(lambda: scrape(port), lambda s: total(
        s, "balancer_connection_duration_seconds_count") == 2)
    assert total(samples, "balancer_active_connections", server=a.address) == 0
    assert total(samples, "balancer_connections_total", server=a.address) == 1
    assert total(samples, "balancer_bytes_total", server=a.address, direction="upstream") == 1

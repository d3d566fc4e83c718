"""Metrics, health and status endpoints, the status page and the access log."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .utils import eventually, free_port, make_config

pytestmark = pytest.mark.timeout(120)
ARTIFACTS = Path(__file__).parent / "artifacts"


def with_metrics(config: dict, **metrics: object) -> dict:
    config["metrics"] = {"bind": "127.0.0.1:0", **metrics}
    return config


def admin_port(balancer) -> int:
    line = balancer.wait_for_line(r"admin endpoint on http://")
    return int(re.search(r":(\d+)/", line).group(1))


async def http(port: int, method: str = "GET", path: str = "/",
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """All samples, keyed by (name, sorted labels)."""
    status, body = await http(port, path="/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (n, lbls), value in samples.items()
               if n == name and all(dict(lbls).get(k) == v for k, v in labels.items()))


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
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        held.append(writer)
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
    blackhole = socket.socket()  # accept queue full: connects to it time out
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
    timeout = f"127.0.0.1:{blackhole.getsockname()[1]}"
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
        for sock in [blackhole, *fillers]:
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
    assert data["listeners"] == [{"name": "test", "bind": f"127.0.0.1:{balancer.port}",
                                  "upstream": "app", "active": 1}]
    upstream = data["upstreams"]["app"]
    assert upstream["strategy"] == "weighted"
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
    from .test_distribution import who_answers

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
    config = with_metrics(make_config([a.address, dead], health={"max_fails": 1}))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    from .test_distribution import who_answers

    for _ in range(2):  # one of these hits the dead server: it goes down
        await who_answers(balancer.port)
    balancer.wait_for_line(rf"server app/{re.escape(dead)} down")
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
    shot = ARTIFACTS / "status.png"
    await asyncio.to_thread(
        subprocess.run, [*common, f"--screenshot={shot}", url], capture_output=True,
        timeout=60)
    assert shot.exists() and shot.stat().st_size > 5000

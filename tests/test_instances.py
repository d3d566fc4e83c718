"""Managed app instances (`run:`): started, gated on readiness, restarted, rolled, stopped.

Every test runs the real `balancer` with real app processes: tests/instance_app.py (greets
each connection with "hello INSTANCE PID VERSION", then echoes) and, for HTTP, the demo's
Node app. Timeouts in these configs are short so the suite stays fast; waits follow the
balancer's log or /status, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from .utils import (
    HERE,
    admin_port,
    admin_status,
    free_port,
    http,
    reload,
    scrape,
    start_workers,
    total,
    with_metrics,
)

APP = HERE / "instance_app.py"
NODE_APP = HERE.parent / "balancer" / "demo" / "app.js"
HAS_NODE = shutil.which("node") is not None
GREETING = re.compile(r"^hello (\d+) (\d+) (\S+)$")
READY = re.compile(r"(\w+)#(\d+) pid (\d+) ready on port (\d+)")


def app_config(*args: str, instances: int = 2, upstream: dict[str, Any] | None = None,
               **run: Any) -> dict[str, Any]:
    """One listener in front of `instances` of instance_app.py (with `args`), admin on."""
    section = {"command": [sys.executable, str(APP), *args], "instances": instances,
               "ready_timeout": "5s", "kill_timeout": "2s", **run}
    return with_metrics({
        "listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {"strategy": "round_robin", "run": section, **(upstream or {})}},
        "shutdown_timeout": "5s",
    })


async def greet(port: int, payload: bytes = b"ping\n") -> tuple[int, int, str]:
    """A full conversation through the balancer: the greeting, then `payload` echoed.
    Returns (instance index, pid, version) of who answered; raises on any failure."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        line = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
        match = GREETING.match(line)
        assert match, f"no greeting: {line!r}"
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 5) == payload
        return int(match.group(1)), int(match.group(2)), match.group(3)
    finally:
        writer.close()


def instances(state: dict[str, Any], upstream: str = "app") -> list[dict[str, Any]]:
    return state["upstreams"][upstream]["instances"]


def ready_pids(state: dict[str, Any]) -> set[int]:
    return {i["pid"] for i in instances(state) if i["state"] == "ready"}


def gone(pid: int) -> bool:
    """No such process (or only its zombie, waiting for a parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def all_gone(pids: set[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, [p for p in pids if not gone(p)]
        await asyncio.sleep(0.05)


@pytest.mark.both_loops
async def test_instances_start_with_their_port_and_number_and_take_traffic(
        start_balancer: Any) -> None:
    balancer = start_balancer(app_config(instances=2, env={"VERSION": "v1"}))
    port = admin_port(balancer)
    state = await admin_status(port)
    listed = instances(state)
    assert [i["index"] for i in listed] == [0, 1]
    assert all(i["state"] == "ready" and i["restarts"] == 0 and i["last_exit"] is None
               for i in listed)
    assert all(i["rss"] > 0 and i["uptime"] >= 0 for i in listed)
    servers = state["upstreams"]["app"]["servers"]
    assert {s["address"] for s in servers} == {f"127.0.0.1:{i['port']}" for i in listed}
    assert {s["source"] for s in servers} == {f"app#{i['index']} pid {i['pid']}"
                                             for i in listed}
    assert state["upstreams"]["app"]["rollout"] == {"state": "none"}
    # Each instance got its own PORT and INSTANCE; round robin reaches both.
    answers = {await greet(balancer.port) for _ in range(4)}
    assert {(index, pid) for index, pid, _ in answers} == {(i["index"], i["pid"])
                                                          for i in listed}
    assert {version for _, _, version in answers} == {"v1"}
    # Their output reaches the balancer's log, each line prefixed.
    for inst in listed:
        balancer.wait_for_line(rf"^\[app#{inst['index']} pid {inst['pid']}\] listening "
                               rf"{inst['port']}$")
    samples = await scrape(port)
    assert total(samples, "balancer_instances", upstream="app", state="ready") == 2
    assert total(samples, "balancer_instances", upstream="app", state="starting") == 0
    assert total(samples, "balancer_instance_restarts_total", upstream="app") == 0


async def test_an_instance_gets_traffic_only_once_it_passes_the_health_check(
        start_balancer: Any) -> None:
    """The app accepts at once but answers 503 (health check included) for its first 1.5 s:
    a new instance must not be put in before its check passes, so no client ever sees a
    503, neither at start nor during a rollout."""
    config = app_config("--http", "1.5", instances=1, upstream={
        "health": {"check": {"type": "http", "path": "/health", "interval": "5s"}}})
    balancer = start_balancer(config)
    port = admin_port(balancer)
    first = ready_pids(await admin_status(port))
    balancer.wait_for_line(r"\] health 503$")  # it was probed while it was not healthy
    assert (await get(balancer.port))[0] == 200

    code, _ = await http(port, "POST", "/upstreams/app/rollout")
    assert code == 202
    statuses: list[int] = []
    state: dict[str, Any] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        statuses.append((await get(balancer.port))[0])
        state = await admin_status(port)
        if state["upstreams"]["app"]["rollout"]["state"] != "running":
            break
    assert state["upstreams"]["app"]["rollout"]["state"] == "done", state
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    assert ready_pids(state).isdisjoint(first)


async def get(port: int) -> tuple[int, str]:
    """GET / over HTTP/1.0 through the balancer: status and body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        response = (await asyncio.wait_for(reader.read(), 5)).decode()
    finally:
        writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_a_killed_instance_leaves_the_set_at_once_and_restarts_on_its_port(
        start_balancer: Any) -> None:
    balancer = start_balancer(app_config(instances=2))
    port = admin_port(balancer)
    victim = instances(await admin_status(port))[0]
    os.kill(victim["pid"], signal.SIGKILL)
    # Out at once, without any client having to fail a connect to it first.
    balancer.wait_for_line(rf"upstream app: -127\.0\.0\.1:{victim['port']} \(run app\)")
    balancer.wait_for_line(rf"app#0 pid {victim['pid']} killed by SIGKILL \(out of "
                           r"memory\?\); restarting in 1s")
    line = balancer.wait_for_line(rf"app#0 pid (?!{victim['pid']})\d+ ready on port "
                                  rf"{victim['port']}$")
    new_pid = int(READY.search(line).group(3))
    state = await admin_status(port)
    again = instances(state)[0]
    assert (again["pid"], again["port"], again["state"]) == (new_pid, victim["port"], "ready")
    assert again["restarts"] == 1
    assert again["last_exit"] == "killed by SIGKILL (out of memory?)"
    assert len(state["upstreams"]["app"]["servers"]) == 2
    samples = await scrape(port)
    assert total(samples, "balancer_instance_restarts_total", upstream="app") == 1


async def test_a_crashing_app_backs_off_doubling_and_the_balancer_keeps_serving(
        start_balancer: Any, start_backend: Any) -> None:
    """An app that can never start is retried 1 s, then 2 s later (not in a tight loop),
    while the balancer and its other servers keep serving."""
    other = start_backend("name", "static")
    config = app_config("--crash", instances=1, upstream={"servers": [other.address]})
    balancer = start_balancer(config)
    port = admin_port(balancer)
    balancer.wait_for_line(r"app#0 pid \d+ exited 1; restarting in 1s")
    balancer.wait_for_line(r"app#0 pid \d+ exited 1; restarting in 2s", timeout=10)
    state = await admin_status(port)
    inst = instances(state)[0]
    assert inst["restarts"] >= 1 and inst["last_exit"] == "exited 1"
    assert inst["state"] in ("backoff", "starting")
    spawned = [line for line in balancer.lines if "crashing on purpose" in line]
    stamps = [line[:23] for line in balancer.lines if "; restarting in" in line]
    assert len(spawned) <= 3, "no tight restart loop"
    assert len(stamps) >= 2
    # The static server still serves.
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert (await asyncio.wait_for(reader.readline(), 5)).strip() == b"static"
    writer.close()
    assert balancer.alive()


async def test_max_memory_replaces_an_instance_gracefully(start_balancer: Any) -> None:
    balancer = start_balancer(app_config("--grow", "80", instances=1, max_memory="60M"))
    port = admin_port(balancer)
    first = instances(await admin_status(port))[0]
    balancer.wait_for_line(rf"app#0 pid {first['pid']}: RSS [\d.]+M over max_memory 60\.0M: "
                           "replacing it")
    balancer.wait_for_line(rf"app#0 pid \d+ replaces app#0 pid {first['pid']} \(max_memory\)")
    await all_gone({first["pid"]})
    balancer.wait_for_line(rf"\[app#0 pid {first['pid']}\] stopped on SIGTERM")  # graceful
    samples = await scrape(port)
    assert total(samples, "balancer_instance_restarts_total", upstream="app") >= 1


@pytest.mark.both_loops
async def test_rollout_under_continuous_load_drops_no_connection(
        start_balancer: Any, tmp_path: Path) -> None:
    """Every connection made during `balancer rollout app` gets its greeting and its echo,
    also those held open across an old instance's drain (the app drops whatever is open
    when it gets SIGTERM: the balancer must wait for them to end first)."""
    config = app_config("--abrupt", instances=2)
    config["metrics"]["bind"] = f"127.0.0.1:{free_port()}"  # the rollout command reads it
    config["metrics"]["admin_token"] = "s3cret"  # ... and sends it, as drain needs it
    balancer = start_balancer(config)
    port = admin_port(balancer)
    old = ready_pids(await admin_status(port))
    assert (await http(port, "POST", "/upstreams/app/rollout"))[0] == 401
    wrong = await http(port, "POST", "/upstreams/nope/rollout",
                       {"Authorization": "Bearer s3cret"})
    assert wrong == (404, b'{"error": "upstream \'nope\' runs no instances (no run section)"}')
    stop = asyncio.Event()
    results: list[tuple[int, int, str] | BaseException] = []

    async def client() -> None:
        while not stop.is_set():
            try:
                results.append(await greet(balancer.port))
            except Exception as exc:
                results.append(exc)

    async def held() -> None:
        # Opened on an old instance before the rollout; still open while that instance
        # drains (0.5 s after it left the set), then finished with an echo.
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        try:
            match = GREETING.match((await reader.readline()).decode().strip())
            assert match
            await asyncio.to_thread(balancer.wait_for_line,
                                    rf"replaces app#\d+ pid {match.group(2)} ", 30)
            await asyncio.sleep(0.5)
            writer.write(b"late\n")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"late\n"
            results.append((0, 0, "held"))
        except Exception as exc:
            results.append(exc)
        finally:
            writer.close()

    clients = [asyncio.create_task(client()) for _ in range(4)]
    holders = [asyncio.create_task(held()) for _ in range(4)]
    await asyncio.sleep(0.2)  # load is running when the rollout begins
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "balancer", "rollout", "app", "-c", str(balancer.config_path),
        stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(command.communicate(), 60)
    stop.set()
    await asyncio.gather(*clients, *holders)
    assert command.returncode == 0, out
    assert b"rollout of app done: 2 instance(s) replaced" in out
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:5]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert len(served) > 50
    pids = {pid for _, pid, _ in served}
    state = await admin_status(port)
    new = ready_pids(state)
    assert new.isdisjoint(old) and len(new) == 2
    assert old & pids and new & pids, "load reached old and new instances"
    assert sum(r == (0, 0, "held") for r in served) == 4
    await all_gone(old)
    rollout = state["upstreams"]["app"]["rollout"]
    assert (rollout["state"], rollout["done"], rollout["total"]) == ("done", 2, 2)


async def test_a_rollout_whose_new_instance_never_gets_ready_stops_and_old_ones_serve(
        start_balancer: Any) -> None:
    """A reload that changes `run` rolls out; a new instance that never gets ready stops
    the rollout (logged, in /status), the old instances keep serving, the new one is
    stopped, and a second rollout is refused while one runs."""
    config = app_config(instances=2, ready_timeout="1s")
    balancer = start_balancer(config, expect_log=[r"rollout stopped"])
    port = admin_port(balancer)
    old = ready_pids(await admin_status(port))
    broken = app_config("--never-ready", instances=2, ready_timeout="1s")
    broken["metrics"] = config["metrics"]
    reload(balancer, broken)
    balancer.wait_for_line(r"rollout of 2 instance\(s\) begins \(the run section changed\)")
    code, body = await http(port, "POST", "/upstreams/app/rollout")
    assert code == 409 and b"already running" in body
    line = balancer.wait_for_line(r"upstream app: rollout stopped: new instance #0: not "
                                  r"ready within 1s")
    assert "the old instances keep serving" in line
    state = await admin_status(port)
    rollout = state["upstreams"]["app"]["rollout"]
    assert rollout["state"] == "failed" and "not ready within 1s" in rollout["error"]
    assert ready_pids(state) == old
    assert len(instances(state)) == 2
    assert {pid for _, pid, _ in [await greet(balancer.port) for _ in range(4)]} == old
    attempt = next(m for line in balancer.lines
                   if (m := re.search(r"\[app#0 pid (\d+)\] starting", line))
                   and int(m.group(1)) not in old)
    await all_gone({int(attempt.group(1))})


@pytest.mark.parametrize("workers", [1, 2])
async def test_stop_drains_then_stops_every_instance_even_one_ignoring_sigterm(
        start_balancer: Any, workers: int) -> None:
    config = app_config("--ignore-term", instances=2, kill_timeout="500ms")
    balancer = (start_workers(start_balancer, config, workers) if workers > 1
                else start_balancer(config))
    pids = ready_pids(await admin_status(admin_port(balancer)))
    assert len(pids) == 2
    assert all(pid not in _children_of_workers(balancer) for pid in pids)  # the primary's
    balancer.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(balancer.proc.wait, 20) == 0
    await all_gone(pids, timeout=1)
    balancer.wait_for_line(r"did not stop within kill_timeout 0\.5s: SIGKILL")
    assert any("stopped (killed by SIGKILL (kill_timeout 0.5s))" in x for x in balancer.lines)


def _children_of_workers(balancer: Any) -> set[int]:
    found: set[int] = set()
    children = Path(f"/proc/{balancer.pid}/task/{balancer.pid}/children").read_text().split()
    for worker in children:
        with open(f"/proc/{worker}/task/{worker}/children") as handle:
            found.update(int(pid) for pid in handle.read().split())
    return found


@pytest.mark.parametrize("workers", [1, 2])
async def test_nothing_is_left_running_after_sigkill_of_the_balancer(
        start_balancer: Any, workers: int) -> None:
    config = app_config(instances=2)
    balancer = (start_workers(start_balancer, config, workers) if workers > 1
                else start_balancer(config))
    pids = ready_pids(await admin_status(admin_port(balancer)))
    assert len(pids) == 2
    balancer.send_signal(signal.SIGKILL)
    await all_gone(pids)


async def test_instance_output_goes_to_a_log_folder(start_balancer: Any,
                                                    tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    balancer = start_balancer(app_config(instances=2, log=str(folder)))
    pids = sorted(ready_pids(await admin_status(admin_port(balancer))))
    balancer.stop()
    for index in (0, 1):
        text = (folder / f"app-{index}.log").read_text()
        assert f"starting instance {index}" in text and "stopped on SIGTERM" in text
    assert not any(line.startswith("[app#") for line in balancer.lines), pids


@pytest.mark.skipif(not HAS_NODE, reason="node is not installed")
async def test_the_node_demo_app_rolls_out_with_every_request_answered(
        start_balancer: Any) -> None:
    config = with_metrics({
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "upstream": "app"}],
        "upstreams": {"app": {
            "strategy": "least_conn",
            "health": {"check": {"type": "http", "path": "/health", "interval": "5s"}},
            "run": {"command": ["node", str(NODE_APP)], "instances": 2,
                    "ready_timeout": "10s", "kill_timeout": "3s"}}},
        "shutdown_timeout": "5s",
    })
    balancer = start_balancer(config)
    port = admin_port(balancer)
    old = ready_pids(await admin_status(port))
    assert len(old) == 2
    code, _ = await http(port, "POST", "/upstreams/app/rollout")
    assert code == 202
    answers: list[tuple[int, str]] = []
    state: dict[str, Any] = {}
    for _ in range(2000):
        answers.append(await get(balancer.port))
        state = await admin_status(port)
        if state["upstreams"]["app"]["rollout"]["state"] != "running":
            break
    assert state["upstreams"]["app"]["rollout"]["state"] == "done", state
    assert {status for status, _ in answers} == {200}
    assert all(body.startswith("hello from app-") for _, body in answers)
    assert ready_pids(state).isdisjoint(old)
    await all_gone(old)


def test_rollout_command_explains_a_config_without_admin_endpoint(tmp_path: Path) -> None:
    config = app_config()
    del config["metrics"]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "balancer", "rollout", "app", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "rollout needs the admin endpoint: set metrics.bind" in done.stdout


async def test_a_reload_that_removes_run_drains_the_instances_then_stops_them(
        start_balancer: Any, start_backend: Any) -> None:
    config = app_config("--abrupt", instances=1)
    balancer = start_balancer(config)
    pids = ready_pids(await admin_status(admin_port(balancer)))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert GREETING.match((await reader.readline()).decode().strip())
    static = start_backend("name", "static")
    replaced = app_config()
    del replaced["upstreams"]["app"]["run"]
    replaced["upstreams"]["app"]["servers"] = [static.address]
    replaced["metrics"] = config["metrics"]
    reload(balancer, replaced)
    balancer.wait_for_line(r"upstream app: run section removed: stopping 1 instance\(s\) "
                           "once drained")
    # The instance is out (new clients reach the static server) but not stopped while our
    # connection to it is open: it still echoes.
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert (await asyncio.wait_for(reader2.readline(), 5)).strip() == b"static"
    writer2.close()
    assert not any(gone(pid) for pid in pids)
    writer.write(b"still\n")
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"still\n"
    writer.close()
    await all_gone(pids)

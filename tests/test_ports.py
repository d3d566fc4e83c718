"""A listener's address already taken: at start and on reload, in one process and with workers.

SO_REUSEPORT lets any socket of the same user join a listening group, so without a check a
second balancer on the same port would start and silently take part of the traffic.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

import pytest
import yaml

from .utils import free_port, make_config, who_answers

pytestmark = pytest.mark.timeout(90)


def on_port(config: dict, port: int, **listener: object) -> dict:
    config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    config["listeners"][0].update(listener)
    return config


def with_workers(config: dict, workers: int) -> dict:
    config["workers"] = workers
    return config


def start(start_balancer, config: dict, workers: int):
    balancer = start_balancer(with_workers(config, workers))
    for slot in range(workers if workers > 1 else 0):
        balancer.wait_for_line(rf"worker {slot} started", timeout=20)
    return balancer


def run_balancer(tmp_path, config: dict, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run `balancer -c FILE` to its end (killed at `timeout`: it should exit by itself)."""
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "balancer", "-c", str(path)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_second_balancer_on_the_same_port_exits_1(start_backend, start_balancer,
                                                          tmp_path, workers):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    port = free_port()
    first = start(start_balancer, on_port(make_config([a.address]), port), workers)
    second = run_balancer(tmp_path, with_workers(on_port(make_config([b.address]), port),
                                                 workers))
    assert second.returncode == 1, second.stderr
    assert (f"cannot start: listener test: 127.0.0.1:{port}: address already in use by "
            "another process (set `reuse_port: true` on the listener to share it)"
            ) in second.stderr
    assert "Traceback" not in second.stderr
    assert {await who_answers(port) for _ in range(12)} == {"a"}
    assert first.alive()


async def test_reuse_port_shares_the_port_on_purpose(start_backend, start_balancer):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    port = free_port()
    start_balancer(on_port(make_config([a.address]), port, reuse_port=True))
    start_balancer(on_port(make_config([b.address]), port, reuse_port=True))
    answers: set[str] = set()
    for _ in range(200):  # the kernel spreads connections by a hash of their addresses
        answers.add(await who_answers(port))
        if answers == {"a", "b"}:
            break
    assert answers == {"a", "b"}


def holder(port: int) -> socket.socket:
    """Another program's SO_REUSEPORT listener on `port`, as nginx's `reuseport` would be."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def reload(balancer, config: dict, outcome: str) -> str:
    """Rewrite the config file, SIGHUP, and wait for the line saying `outcome`."""
    before = sum(outcome in line for line in balancer.lines)
    balancer.config_path.write_text(yaml.safe_dump(config))
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_log(lambda: sum(outcome in line for line in balancer.lines) > before, 15)
    return [line for line in balancer.lines if outcome in line][-1]


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_adding_a_listener_on_a_taken_port_is_rejected(
    start_backend, start_balancer, workers
):
    a = start_backend("name", "a")
    config = make_config([a.address])
    balancer = start(start_balancer, config, workers)
    taken = free_port()
    other = holder(taken)
    try:
        added = with_workers(dict(config, listeners=[
            *config["listeners"], {"name": "extra", "bind": f"127.0.0.1:{taken}",
                                   "upstream": "app"}]), workers)
        line = reload(balancer, added, "reload rejected")
        assert (f"reload rejected: cannot open a new listener: listener extra: "
                f"127.0.0.1:{taken}: address already in use by another process") in line
        assert await who_answers(balancer.port) == "a"  # the old config keeps serving
        # Nothing of the balancer joined the other program's port: it gets every client.
        for _ in range(16):
            with socket.create_connection(("127.0.0.1", taken), timeout=5):
                other.settimeout(5)
                accepted, _ = other.accept()
                accepted.close()
        assert balancer.alive()
    finally:
        other.close()


@pytest.mark.parametrize("workers", [1, 2])
async def test_reload_renaming_a_listener_keeps_its_own_port(start_backend, start_balancer,
                                                             workers):
    a = start_backend("name", "a")
    port = free_port()
    config = on_port(make_config([a.address]), port)
    balancer = start(start_balancer, config, workers)
    renamed = with_workers(on_port(make_config([a.address]), port, name="renamed"), workers)
    # The primary's line comes after every worker applied it.
    line = reload(balancer, renamed, "configuration reloaded from" if workers > 1
                  else "configuration reloaded")
    assert "rejected" not in "\n".join(balancer.lines), line
    balancer.wait_for_line(r"listening on .*\(renamed -> upstream app")
    assert await asyncio.wait_for(who_answers(port), 10) == "a"

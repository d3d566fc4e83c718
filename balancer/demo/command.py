"""`balancer demo`: three sample app instances and a balancer in front of them, in one command.

The point is to show the balancer working before anyone writes a config: it runs three
instances of a small HTTP app (Node.js ``app.js`` when ``node`` is on PATH, else the
pure-Python ``backend``) the way a config's `run:` section does, so the balancer starts,
supervises and rolls them itself. It puts a round-robin listener on an ephemeral port in
front, sends a few requests to show who answered, prints the status page's address and how
to see a crash restart (`kill -9`) and a rollout, and serves until Ctrl-C. Every instance is
stopped on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    Address,
    CheckConfig,
    Config,
    HealthConfig,
    ListenerConfig,
    LoopName,
    MetricsConfig,
    RunConfig,
    UpstreamConfig,
)
from ..loops import new_event_loop
from ..signals import handle_stop_signals, remove_stop_signals

if TYPE_CHECKING:
    from ..server import Balancer

APP_JS = Path(__file__).parent / "app.js"
INSTANCES = 3
START_TIMEOUT = 10.0  # for an instance to be ready
STOP_TIMEOUT = 5.0  # for instances to exit after SIGTERM, before SIGKILL
REQUEST_TIMEOUT = 5.0  # per demo request, connect to last byte
SHUTDOWN_TIMEOUT = 3.0  # open client connections get this long to finish on Ctrl-C
MAX_RESPONSE = 64 * 1024
ANSWER = re.compile(r"hello from (\S+) \(pid (\d+)")


def say(text: str = "") -> None:
    """Print to stdout at once: a piped stdout (tests, `| tee`) must see lines as they happen."""
    print(text, flush=True)


def app_command() -> tuple[list[str], str]:
    """The sample app's argv (Node.js if available, else the Python twin) and its kind."""
    node = shutil.which("node") if APP_JS.is_file() else None
    if node is not None:
        return [node, str(APP_JS)], "node"
    return [sys.executable, "-m", "balancer.demo.backend"], "python"


def read_listening_port(proc: subprocess.Popen[bytes], name: str, deadline: float) -> int:
    """Read a child's `listening <port>` line, giving up at `deadline` (time.monotonic)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in data and len(data) <= 4096:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"backend {name} did not print 'listening <port>' in time")
            if not selector.select(remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"backend {name} exited before listening "
                                   f"(exit code {proc.poll()})")
            data += chunk
    line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
    word, _, port = line.partition(" ")
    if word != "listening" or not port.isdigit():
        raise RuntimeError(f"backend {name} printed {line!r}, not 'listening <port>'")
    return int(port)


def demo_config(command: list[str], loop: LoopName = "auto") -> Config:
    """One listener on an ephemeral local port, round robin over INSTANCES managed instances
    of the sample app (ready once GET /health answers), and the admin endpoint (status page)
    on another ephemeral local port."""
    run = RunConfig(command=tuple(command), cwd=str(Path.cwd()), instances=INSTANCES,
                    ready_timeout=START_TIMEOUT, kill_timeout=STOP_TIMEOUT)
    health = HealthConfig(check=CheckConfig(type="http", path="/health"))
    upstream = UpstreamConfig(name="app", servers=(), strategy="round_robin", health=health,
                              run=run)
    listener = ListenerConfig(name="demo", bind=Address("127.0.0.1", 0), upstream="app")
    return Config(listeners=(listener,), upstreams={"app": upstream}, loop=loop,
                  shutdown_timeout=SHUTDOWN_TIMEOUT,
                  metrics=MetricsConfig(bind=Address("127.0.0.1", 0)))


async def fetch(host: str, port: int) -> str:
    """GET / through the balancer, one connection per request, and say who answered."""
    async with asyncio.timeout(REQUEST_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
                         "\r\n".encode())
            await writer.drain()
            response = b""
            while len(response) < MAX_RESPONSE and (chunk := await reader.read(4096)):
                response += chunk
        finally:
            writer.close()
    text = response.decode(errors="replace")
    match = ANSWER.search(text)
    if match:
        return f"{match.group(1)} (pid {match.group(2)})"
    status = text.split("\r\n", 1)[0]
    return f"unexpected answer {status or 'empty'!r}"


async def serve_demo(config: Config, requests: int, kind: str) -> int:
    """Start the instances and the balancer, show a few requests, then serve until
    SIGINT/SIGTERM; the instances stop after the clients have drained."""
    # Imported late: `balancer --help` need not load the core.
    from ..appsource import app_source
    from ..membership import Membership
    from ..server import Balancer, applier

    loop = asyncio.get_running_loop()
    balancer = Balancer(config)
    membership = Membership(config, applier(balancer), balancer.server_active)
    balancer.membership = membership
    stop = asyncio.Event()

    def drain() -> None:
        stop.set()
        balancer.request_stop()

    handle_stop_signals(loop, drain, balancer.close_all)
    try:
        await membership.start()
        source = app_source(balancer)
        listed = (source.status("app") if source is not None else None) or {}
        ready = [i for i in listed.get("instances", []) if i["state"] == "ready"]
        what = "Node.js app.js" if kind == "node" else "Python demo backend, node not found"
        say(f"started {len(ready)} sample backends ({what}), run by the balancer:")
        for inst in ready:
            say(f"backend app-{inst['index']} pid {inst['pid']} port {inst['port']}")
        if not ready:
            raise RuntimeError("no sample backend became ready")
        balancer.config = membership.effective()
        await balancer.start()
        membership.go_live()
        try:
            await _show(balancer, ready, requests, stop)
            await balancer.wait_stopped()
            say("stopping")
        finally:
            await balancer.shutdown(SHUTDOWN_TIMEOUT)
    finally:
        await membership.stop()
        remove_stop_signals(loop)
    return 0


async def _show(balancer: Balancer, ready: list[dict[str, Any]],
                requests: int, stop: asyncio.Event) -> None:
    host, port = next(iter(balancer.bound_addresses().values()))
    where = Address(host, port)
    say(f"balancer listening on {where} (round robin over {len(ready)} backends)")
    for number in range(1, requests + 1):
        if stop.is_set():
            return
        try:
            answer = await fetch(host, port)
        except (OSError, TimeoutError) as exc:
            answer = f"failed: {exc or type(exc).__name__}"
        say(f"request {number} -> {answer}")
    if stop.is_set():
        return
    admin = Address(*balancer.admin.address()) if balancer.admin is not None else None
    say()
    say(f"The balancer is at {where}. Try it:")
    say(f"  curl http://{where}/")
    if admin is not None:
        say(f"Status page: http://{admin}/")
        say(f"  kill -9 {ready[0]['pid']}    # a crashed instance is restarted at once")
        say(f"  curl -X POST http://{admin}/upstreams/app/rollout"
            "    # replace them one by one, no connection dropped")
    say("Press Ctrl-C to stop.")


def run_demo(loop: LoopName = "auto", requests: int = 6) -> int:
    """Run the sample instances and a balancer; serve until Ctrl-C; stop everything.

    Returns 0 after a signal-driven stop, 1 when something could not start.
    """
    try:
        event_loop = new_event_loop(loop)
    except RuntimeError as exc:  # loop: uvloop asked for but not installed
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    command, kind = app_command()
    config = demo_config(command, loop)
    try:
        asyncio.set_event_loop(event_loop)
        return event_loop.run_until_complete(serve_demo(config, max(0, requests), kind))
    except (OSError, RuntimeError) as exc:
        print(f"demo: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handlers were installed
        return 130
    finally:
        asyncio.set_event_loop(None)
        event_loop.close()
        say("sample backends stopped")

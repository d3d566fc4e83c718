"""`balancer demo`: three sample backends and a balancer in front of them, in one command.

The point is to show the balancer working before anyone writes a config: it starts three
small HTTP apps (Node.js ``app.js`` when ``node`` is on PATH, else the pure-Python
``backend``), puts a round-robin balancer on an ephemeral port in front of them, sends
a few requests to show who answered, and keeps serving until Ctrl-C. Every process it starts
is stopped on the way out, whatever happened.
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
from dataclasses import dataclass
from pathlib import Path

from ..config import Address, Config, ListenerConfig, LoopName, ServerConfig, UpstreamConfig
from ..loops import new_event_loop
from ..signals import handle_stop_signals, remove_stop_signals

APP_JS = Path(__file__).parent / "app.js"
BACKEND_NAMES = ("app-1", "app-2", "app-3")
START_TIMEOUT = 10.0  # for a backend to print `listening <port>`
STOP_TIMEOUT = 5.0  # for backends to exit after SIGTERM, before SIGKILL
REQUEST_TIMEOUT = 5.0  # per demo request, connect to last byte
SHUTDOWN_TIMEOUT = 3.0  # open client connections get this long to finish on Ctrl-C
MAX_RESPONSE = 64 * 1024
ANSWER = re.compile(r"hello from (\S+) \(pid (\d+)")


@dataclass
class DemoBackend:
    """One started sample backend process and the port it reported."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


def say(text: str = "") -> None:
    """Print to stdout at once: a piped stdout (tests, `| tee`) must see lines as they happen."""
    print(text, flush=True)


def backend_command(name: str, node: str | None) -> list[str]:
    """The command for one sample backend: Node.js if available, else the Python twin."""
    if node is not None:
        return [node, str(APP_JS), "--port", "0", "--name", name]
    return [sys.executable, "-m", "balancer.demo.backend", "--port", "0", "--name", name]


def start_backends(started: list[DemoBackend], names: tuple[str, ...] = BACKEND_NAMES) -> str:
    """Start one backend per name, appending each to `started` as soon as it exists.

    Appending before waiting means the caller can stop every process even if a later one
    fails to start. Returns what kind of backend ran ("node" or "python").
    """
    node = shutil.which("node") if APP_JS.is_file() else None
    for name in names:
        proc = subprocess.Popen(backend_command(name, node), stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        started.append(DemoBackend(name, proc))
    deadline = time.monotonic() + START_TIMEOUT
    for backend in started:
        backend.port = read_listening_port(backend.proc, backend.name, deadline)
    return "node" if node else "python"


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


def stop_backends(backends: list[DemoBackend]) -> None:
    """SIGTERM all at once, wait (bounded), SIGKILL stragglers: nothing is left behind."""
    for backend in backends:
        if backend.proc.poll() is None:
            backend.proc.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for backend in backends:
        try:
            backend.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            backend.proc.kill()
            backend.proc.wait(STOP_TIMEOUT)
        if backend.proc.stdout is not None:
            backend.proc.stdout.close()


def demo_config(ports: list[int], loop: LoopName = "auto") -> Config:
    """One listener on an ephemeral local port, round robin over the sample backends."""
    servers = tuple(ServerConfig(Address("127.0.0.1", port)) for port in ports)
    upstream = UpstreamConfig(name="app", servers=servers, strategy="round_robin")
    listener = ListenerConfig(name="demo", bind=Address("127.0.0.1", 0), upstream="app")
    return Config(listeners=(listener,), upstreams={"app": upstream}, loop=loop,
                  shutdown_timeout=SHUTDOWN_TIMEOUT)


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


async def serve_demo(config: Config, requests: int) -> int:
    """Run the balancer, show a few requests, then serve until SIGINT/SIGTERM."""
    from ..server import Balancer  # imported late: `balancer --help` need not load the core

    loop = asyncio.get_running_loop()
    balancer = Balancer(config)
    stop = asyncio.Event()

    def drain() -> None:
        stop.set()
        balancer.request_stop()

    handle_stop_signals(loop, drain, balancer.close_all)
    try:
        await balancer.start()
        try:
            host, port = next(iter(balancer.bound_addresses().values()))
            where = Address(host, port)
            say(f"balancer listening on {where} (round robin over "
                f"{len(config.upstreams['app'].servers)} backends)")
            for number in range(1, requests + 1):
                if stop.is_set():
                    break
                try:
                    answer = await fetch(host, port)
                except (OSError, TimeoutError) as exc:
                    answer = f"failed: {exc or type(exc).__name__}"
                say(f"request {number} -> {answer}")
            if not stop.is_set():
                say()
                say(f"The balancer is at {where}. Try it:")
                say(f"  curl http://{where}/")
                say("Press Ctrl-C to stop.")
            await balancer.wait_stopped()
            say("stopping")
        finally:
            await balancer.shutdown(SHUTDOWN_TIMEOUT)
    finally:
        remove_stop_signals(loop)
    return 0


def run_demo(loop: LoopName = "auto", requests: int = 6) -> int:
    """Start the sample backends and a balancer; serve until Ctrl-C; stop everything.

    Returns 0 after a signal-driven stop, 1 when something could not start.
    """
    try:
        event_loop = new_event_loop(loop)
    except RuntimeError as exc:  # loop: uvloop asked for but not installed
        print(f"demo: {exc}", file=sys.stderr, flush=True)
        return 1
    backends: list[DemoBackend] = []
    try:
        kind = start_backends(backends)
        what = "Node.js app.js" if kind == "node" else "Python demo backend, node not found"
        say(f"started {len(backends)} sample backends ({what}):")
        for backend in backends:
            say(f"backend {backend.name} pid {backend.pid} port {backend.port}")
        config = demo_config([backend.port for backend in backends], loop)
        asyncio.set_event_loop(event_loop)
        return event_loop.run_until_complete(serve_demo(config, max(0, requests)))
    except (OSError, RuntimeError) as exc:
        print(f"demo: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the loop's own handlers were installed
        return 130
    finally:
        asyncio.set_event_loop(None)
        event_loop.close()
        stop_backends(backends)
        if backends:
            say("sample backends stopped")

"""`balancer demo` and its sample backends, run as the real processes a user would start."""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balancer.demo.command import read_listening_port

REPO = Path(__file__).resolve().parent.parent
APP_JS = REPO / "balancer" / "demo" / "app.js"
HAS_NODE = shutil.which("node") is not None
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
BACKEND_LINE = re.compile(r"^backend (\S+) pid (\d+) port (\d+)$")
REQUEST_LINE = re.compile(r"^request (\d+) -> (\S+) \(pid (\d+)\)$")
CURL_LINE = re.compile(r"curl http://([\d.]+):(\d+)/")

SAMPLE_APPS = [
    pytest.param(["node", str(APP_JS)], id="app.js",
                 marks=pytest.mark.skipif(not HAS_NODE, reason="node is not installed")),
    pytest.param([sys.executable, "-m", "balancer.demo.backend"], id="demo_backend.py"),
]


def stop(proc: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> int | None:
    """Signal, wait (bounded), kill if need be; returns the exit code after the signal."""
    code = None
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            code = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
    return code


def get(port: int, path: str, conn: http.client.HTTPConnection | None = None) -> tuple[int, str]:
    """Status and body of GET `path`, on `conn` (kept open) or a new connection (closed)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        if own:
            conn.close()


@pytest.mark.parametrize("command", SAMPLE_APPS)
def test_sample_app_names_itself_answers_health_and_stops_on_sigterm(command: list[str]) -> None:
    proc = subprocess.Popen([*command, "--port", "0", "--name", "app-x"],
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        port = read_listening_port(proc, "sample app", time.monotonic() + START_TIMEOUT)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            # Three requests on one keep-alive connection: it must stay open between them.
            status, body = get(port, "/", conn)
            assert status == 200
            assert body.startswith(f"hello from app-x (pid {proc.pid}, host ")
            assert get(port, "/health", conn) == (200, "ok\n")
            assert get(port, "/anything?x=1", conn)[0] == 200
        finally:
            conn.close()
    finally:
        code = stop(proc)
    assert code == 0


class DemoRun:
    """A started `balancer demo` and the lines it prints, fed by a reader thread."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balancer", "demo"], stdout=subprocess.PIPE,
            start_new_session=True, cwd=REPO, env=env,
        )
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode(errors="replace").rstrip("\n"))
        self._lines.put(None)

    def matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        return [m for line in self.seen if (m := pattern.search(line))]

    def read_until(self, done: Callable[[], bool], timeout: float) -> None:
        """Collect lines until `done()` holds; fail after `timeout` or at end of output."""
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out; demo printed:\n" + "\n".join(self.seen))
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError("demo exited early; it printed:\n" + "\n".join(self.seen))
            self.seen.append(line)

    def close(self) -> None:
        """Kill whatever is left of the demo's session (it, or backends it failed to stop)."""
        # The process group outlives its leader while any member lives, so this also reaches
        # backends a broken demo left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self._reader.join(5)  # the pipe hits EOF once every writer is gone
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process has this pid (checked repeatedly, for at most `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def start_demo() -> Iterator[Callable[[dict[str, str]], DemoRun]]:
    """Factory for `balancer demo` runs; whatever a test leaves running is killed."""
    runs: list[DemoRun] = []

    def start(env: dict[str, str]) -> DemoRun:
        runs.append(DemoRun(env))
        return runs[-1]

    yield start
    for run in runs:
        run.close()


@pytest.mark.parametrize("backends", [
    pytest.param("node", marks=pytest.mark.skipif(not HAS_NODE, reason="node is not installed")),
    "python",
])
def test_demo_spreads_requests_over_three_backends_and_stops_them_all(
    backends: str, tmp_path: Path, start_demo: Callable[[dict[str, str]], DemoRun]
) -> None:
    env = dict(os.environ)
    if backends == "python":
        env["PATH"] = str(tmp_path)  # no node here: the demo must fall back to Python
    demo = start_demo(env)
    demo.read_until(
        lambda: len(demo.matches(REQUEST_LINE)) >= 6 and bool(demo.matches(CURL_LINE)),
        START_TIMEOUT,
    )

    started = {m.group(1): int(m.group(2)) for m in demo.matches(BACKEND_LINE)}
    assert sorted(started) == ["app-0", "app-1", "app-2"]  # app-$INSTANCE
    answers = demo.matches(REQUEST_LINE)
    assert [int(m.group(1)) for m in answers] == [1, 2, 3, 4, 5, 6]
    assert {m.group(2) for m in answers} == set(started), "round robin reaches every backend"
    assert {int(m.group(3)) for m in answers} == set(started.values())
    kind = "Node.js" if backends == "node" else "Python"
    assert any(line.startswith("started ") and kind in line for line in demo.seen), demo.seen

    # It keeps serving at the address it advertises.
    curl = demo.matches(CURL_LINE)[0]
    status, body = get(int(curl.group(2)), "/")
    assert status == 200 and body.startswith("hello from app-")

    demo.proc.send_signal(signal.SIGINT)
    assert demo.proc.wait(STOP_TIMEOUT) == 0
    still_running = [name for name, pid in started.items() if not gone(pid)]
    assert not still_running, f"backends left running: {still_running}"


def test_demo_second_ctrl_c_closes_open_connections_at_once(
    tmp_path: Path, start_demo: Callable[[dict[str, str]], DemoRun]
) -> None:
    """Ctrl-C drains open connections for up to the demo's shutdown timeout, as the balancer
    does; a second Ctrl-C closes them at once instead of waiting that out."""
    import socket

    from balancer.demo.command import SHUTDOWN_TIMEOUT

    env = dict(os.environ)
    env["PATH"] = str(tmp_path)  # the Python backends: no node needed
    demo = start_demo(env)
    demo.read_until(lambda: bool(demo.matches(CURL_LINE)), START_TIMEOUT)
    port = int(demo.matches(CURL_LINE)[0].group(2))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 200")  # proxied, and kept alive
        demo.proc.send_signal(signal.SIGINT)
        demo.read_until(lambda: "stopping" in demo.seen, STOP_TIMEOUT)  # draining now
        started = time.monotonic()
        demo.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(ConnectionResetError):  # closed by an abort
            while client.recv(4096):
                pass
        assert time.monotonic() - started < SHUTDOWN_TIMEOUT / 2
    assert demo.proc.wait(STOP_TIMEOUT) == 0

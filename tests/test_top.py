"""`balancer top` under a pseudo-terminal: one refresh, Ctrl-C, and a closed endpoint."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest

from .utils import admin_port, balancer, free_port, make_config, who_answers, with_metrics, write

pytestmark = pytest.mark.timeout(60)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """`balancer top ARGS` on a pseudo-terminal of 40 x 160, as a person would run it."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal
            os.environ["COLUMNS"], os.environ["LINES"] = "160", "40"
            os.execv(sys.executable, [sys.executable, "-m", "balancer", "top", *args])
        self.output = b""

    def read_until(self, pattern: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text()):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} on the terminal; got:\n{self.text()[-2000:]}"
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if ready and not self._read():
                break
        return self.text()

    def _read(self) -> bool:
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        self.output += chunk
        return bool(chunk)

    def text(self) -> str:
        return ANSI.sub("", self.output.decode(errors="replace"))

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self._read():  # what it wrote last (the screen restored, a message)
                    pass
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            select.select([self.fd], [], [], 0.1)
            self._read()
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        raise AssertionError("balancer top did not exit")


def test_top_refreshes_and_quits_on_ctrl_c(start_backend, start_balancer, tmp_path):
    a, b = start_backend("name", "a"), start_backend("name", "b")
    dead = f"127.0.0.1:{free_port()}"
    config = with_metrics(make_config([a.address, b.address, dead], health={"max_fails": 1}),
                          bind=f"127.0.0.1:{free_port()}")  # a port -c FILE can name
    running = start_balancer(config)
    admin_port(running)  # the endpoint is up
    for _ in range(4):
        assert await_sync(who_answers(running.port)) in ("a", "b")
    term = Terminal("-c", str(running.config_path))
    # The whole first frame: its header and its three server rows (a read may end between).
    row = r".*?\n  127\.0\.0\.1:\d+"
    screen = term.read_until(r"(?s)\(Ctrl-C to quit\)" + row * 3)
    first = term.output
    term.read_until(r"(?s)Ctrl-C to quit.*Ctrl-C to quit")  # a second frame: it refreshes
    assert term.output != first
    assert "upstream app (round_robin)" in screen
    lines = [line for line in screen.splitlines() if line.startswith("  127.0.0.1:")]
    addresses = [re.search(r"127\.0\.0\.1:\d+", line).group(0) for line in lines[:3]]
    assert addresses[0] == dead  # down first
    assert set(addresses) == {a.address, b.address, dead}, screen
    assert all(len(line) <= 160 for line in screen.splitlines())  # cut, never wrapped
    assert term.output.startswith(b"\x1b[?1049h")  # the alternate screen
    os.write(term.fd, b"\x03")  # Ctrl-C, through the terminal's line discipline
    assert term.wait() == 0
    assert term.output.endswith(b"\x1b[?25h\x1b[?1049l")  # the screen given back
    assert "Traceback" not in term.text()


def test_top_ends_with_one_line_when_the_endpoint_closes(start_backend, start_balancer,
                                                           tmp_path):
    a = start_backend("name", "a")
    running = start_balancer(with_metrics(make_config([a.address])))
    port = admin_port(running)
    term = Terminal("--url", f"http://127.0.0.1:{port}")
    term.read_until(r"upstream app")
    running.stop()
    assert term.wait() == 1
    # Back on the normal screen, one line.
    after = term.output.rsplit(b"\x1b[?25h\x1b[?1049l", 1)[1].decode()
    assert after == (f"balancer top: cannot reach http://127.0.0.1:{port}/status: "
                     "Connection refused\r\n")
    assert "Traceback" not in term.text()


def test_top_needs_an_endpoint(tmp_path):
    config = write(tmp_path, make_config(["127.0.0.1:1"]))
    done = balancer("top", "-c", config)
    assert done.returncode == 2
    assert done.stderr == ("balancer top: the config has no metrics.bind: top reads /status "
                           "from the admin endpoint\n")


def await_sync(coro):
    import asyncio

    return asyncio.run(coro)


def test_top_renders_managed_instances_and_sources():
    """The `instances` list another part adds to /status, and `source`, when present."""
    from balancer.top import render

    server = {"address": "127.0.0.1:3001", "state": "up", "state_for": 5, "active": 1,
              "max_conns": 0, "peak": 1, "conn_rate": 0.5, "connections": 3, "bytes_in": 10,
              "bytes_out": 20, "bytes_in_rate": 0, "bytes_out_rate": 0, "failures": 0,
              "connect_errors": 0, "retries": 0, "connect_time_avg_ms": 0.2, "downtime": 0,
              "check": None, "source": "app#2 pid 4242", "reason": "initial"}
    status = {"time": 0, "process": {"pid": 1, "uptime": 9, "rss": None}, "listeners": [],
              "upstreams": {"app": {"strategy": "round_robin", "up": 1, "total": 1,
                                    "summary": "all 1 up", "servers": [server],
                                    "instances": [{"index": 2, "pid": 4242, "port": 3001,
                                                   "state": "running", "restarts": 1,
                                                   "uptime": 65, "rss": 50 << 20,
                                                   "last_exit": "exited with status 1"}]}}}
    text = "\n".join(render(status))
    assert "FOUND BY" in text and "app#2 pid 4242" in text
    instance = next(line for line in text.splitlines() if line.strip().startswith("#2"))
    assert instance.split()[:6] == ["#2", "4242", "3001", "running", "1", "1m"]
    assert "50M" in instance and "exited with status 1" in instance

"""The experiment's prototypes (benchmarks/accept_proxies.py) really are proxies: each one,
on both loops, run as its own process between real sockets, forwards bytes both ways, passes
each half-close on while the other direction keeps flowing, keeps a slow reader's bytes
whole, and closes both of its sockets when a connection ends. Figures from a proxy that
dropped or held bytes would be figures about nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.accept_proxies import LOOPS, VARIANTS

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def read_all(sock: socket.socket) -> bytes:
    """Everything until the peer's EOF (a socket timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def listening(port: int) -> bool:
    """Whether 127.0.0.1:port is in LISTEN (/proc/net/tcp), without connecting to it."""
    wanted = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in lines))


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Upstream:
    """A listening socket whose connections are served one at a time by `serve(conn)` in a
    thread; what `serve` returns (or raises) is kept for the test to check."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: list[object] = []
        self.thread: threading.Thread | None = None

    def serve_one(self, serve: Callable[[socket.socket], object]) -> None:
        def run() -> None:
            self.sock.settimeout(TIMEOUT)
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                self.results.append(exc)
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    self.results.append(serve(conn))
                except OSError as exc:
                    self.results.append(exc)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> object:
        assert self.thread is not None
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the upstream never finished"
        return self.results.pop()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    try:
        yield up
    finally:
        up.sock.close()


@pytest.fixture(params=[(v, lp) for v in VARIANTS for lp in LOOPS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def proxy(request: pytest.FixtureRequest, upstream: Upstream) -> Iterator[tuple[int, int]]:
    """(port, pid) of a running prototype in front of `upstream`."""
    variant, loop = request.param
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.accept_proxies", variant, loop, str(port),
         str(upstream.port)], cwd=REPO, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, "the proxy to listen")
        assert proc.poll() is None, "the proxy exited"
        yield port, proc.pid
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
        # A callback that raised shows on the proxy's stderr (the loop logs it).
        assert b"Traceback" not in err and b"Exception" not in err, err.decode()


def open_fds(pid: int) -> int:
    """The process's open sockets (uvloop opens other descriptors lazily, once)."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(FileNotFoundError):  # closed since the listing
            count += os.readlink(f"{fd_dir}/{fd}").startswith("socket:")
    return count


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    return sock


def test_client_speaks_first_and_half_closes(proxy: tuple[int, int],
                                              upstream: Upstream) -> None:
    """The client's FIN reaches the server, whose answer still comes back in full."""
    port, pid = proxy
    idle_fds = open_fds(pid)
    request = os.urandom(5000)
    answer = os.urandom(7000)

    def serve(conn: socket.socket) -> bytes:
        got = read_all(conn)  # ends only if the client's FIN was passed on
        conn.sendall(answer)
        return got

    upstream.serve_one(serve)
    with connect(port) as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        assert read_all(client) == answer  # ends only if the server's FIN was passed on
    assert upstream.result() == request
    wait_for(lambda: open_fds(pid) == idle_fds, "the proxy to close both sockets")


def test_server_speaks_first_and_half_closes(proxy: tuple[int, int],
                                              upstream: Upstream) -> None:
    """The server's FIN reaches the client, which can still send afterwards."""
    port, pid = proxy
    idle_fds = open_fds(pid)
    banner = os.urandom(6000)
    request = os.urandom(3000)

    def serve(conn: socket.socket) -> bytes:
        conn.sendall(banner)
        conn.shutdown(socket.SHUT_WR)
        return read_all(conn)

    upstream.serve_one(serve)
    with connect(port) as client:
        assert read_all(client) == banner
        client.sendall(request)  # after the server's FIN: this direction still flows
        client.shutdown(socket.SHUT_WR)
    assert upstream.result() == request
    wait_for(lambda: open_fds(pid) == idle_fds, "the proxy to close both sockets")


def test_slow_reader_gets_every_byte(proxy: tuple[int, int], upstream: Upstream) -> None:
    """32 MiB to a client with a tiny receive buffer, more than the proxy's socket buffer
    holds (tcp_wmem tops out at 4 MiB): its sends come back short, so it must keep the rest
    and stop reading the server until the client drains, losing nothing."""
    port, pid = proxy
    idle_fds = open_fds(pid)
    payload = os.urandom(32 * 1024 * 1024)

    def serve(conn: socket.socket) -> int:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        return len(read_all(conn))

    upstream.serve_one(serve)
    with connect(port, rcvbuf=4096) as client:
        got = bytearray()
        while chunk := client.recv(4096):
            got += chunk
        client.shutdown(socket.SHUT_WR)
    assert bytes(got) == payload
    assert upstream.result() == 0
    wait_for(lambda: open_fds(pid) == idle_fds, "the proxy to close both sockets")

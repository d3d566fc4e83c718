"""systemd's `Type=notify` protocol, received on a datagram socket of the test's own, as
systemd would: READY=1 once serving, RELOADING=1 then READY=1 around a reload, STOPPING=1 on
stop; only the main process speaks (systemd's default `NotifyAccess=main`)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .utils import make_config, start_workers, worker_pids

CREDENTIALS = struct.calcsize("3i")  # pid, uid, gid


class NotifySocket:
    """A unix datagram socket that records each message with the pid that sent it."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(10)
        self.address = address

    def receive(self) -> tuple[int, list[str]]:
        """The next message: (sender pid, its lines)."""
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDENTIALS))
        pid = next(struct.unpack("3i", body)[0] for level, kind, body in ancillary
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        return pid, data.decode().split("\n")

    def expect(self, pid: int, first: str) -> list[str]:
        sender, lines = self.receive()
        assert (sender, lines[0]) == (pid, first), lines
        return lines

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    # A short folder of our own: a unix socket path must fit in 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    address = (str(folder / "notify") if request.param == "path"
               else f"@balancer-test-{os.getpid()}-{folder.name}")
    sock = NotifySocket(address)
    yield sock
    sock.close()
    (folder / "notify").unlink(missing_ok=True)
    folder.rmdir()


def test_ready_reloading_and_stopping_in_one_process(notify_socket, start_backend,
                                                     start_balancer) -> None:
    backend = start_backend("echo")
    balancer = start_balancer(make_config([backend.address]),
                              env={"NOTIFY_SOCKET": notify_socket.address})
    assert "STATUS=serving" in notify_socket.expect(balancer.pid, "READY=1")
    balancer.send_signal(signal.SIGHUP)
    lines = notify_socket.expect(balancer.pid, "RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in lines)
    notify_socket.expect(balancer.pid, "READY=1")
    balancer.wait_for_line("configuration reloaded")
    balancer.send_signal(signal.SIGTERM)
    notify_socket.expect(balancer.pid, "STOPPING=1")
    assert balancer.proc.wait(10) == 0


def test_with_workers_only_the_primary_notifies_and_workers_never_see_the_socket(
        notify_socket, start_backend, start_balancer) -> None:
    backend = start_backend("echo")
    balancer = start_workers(start_balancer, make_config([backend.address]), 2,
                             env={"NOTIFY_SOCKET": notify_socket.address})
    notify_socket.expect(balancer.pid, "READY=1")
    for pid in worker_pids(balancer):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [item for item in environ if item.startswith(b"NOTIFY_SOCKET=")]
    balancer.send_signal(signal.SIGHUP)
    notify_socket.expect(balancer.pid, "RELOADING=1")
    notify_socket.expect(balancer.pid, "READY=1")
    assert balancer.wait_for_line(r"configuration reloaded from .* \(generation 2\)")
    balancer.send_signal(signal.SIGTERM)
    notify_socket.expect(balancer.pid, "STOPPING=1")
    assert balancer.proc.wait(20) == 0


def test_a_rejected_reload_still_ends_with_ready(notify_socket, start_backend,
                                                 start_balancer) -> None:
    backend = start_backend("echo")
    balancer = start_balancer(make_config([backend.address]),
                              env={"NOTIFY_SOCKET": notify_socket.address},
                              expect_log=[r"reload rejected"])
    notify_socket.expect(balancer.pid, "READY=1")
    balancer.config_path.write_text("listeners: [")
    balancer.send_signal(signal.SIGHUP)
    notify_socket.expect(balancer.pid, "RELOADING=1")
    notify_socket.expect(balancer.pid, "READY=1")  # still serving, on the old config
    balancer.wait_for_line("reload rejected")


def test_an_unreachable_notify_socket_warns_once_and_the_balancer_serves(start_backend,
                                                                        start_balancer) -> None:
    backend = start_backend("echo")
    balancer = start_balancer(make_config([backend.address]),
                              env={"NOTIFY_SOCKET": "/nonexistent/notify"},
                              expect_log=[r"cannot notify systemd"])
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line("configuration reloaded")
    # One warning for the whole run, not one per message.
    assert sum("cannot notify systemd" in line for line in balancer.lines) == 1

"""systemd's readiness protocol (`Type=notify`), without libsystemd: a datagram of a few bytes
to the unix socket named by `$NOTIFY_SOCKET`.

The primary process (the single process, or the supervisor with `workers: N`) says
`READY=1` once it serves, `RELOADING=1` then `READY=1` around a reload, and `STOPPING=1` when
a stop begins. The variable is taken out of the environment when read, as sd_notify's
`unset_environment` does, so that workers and app instances never speak for the service
(systemd accepts only the main pid's messages by default anyway). Outside systemd the
variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("balancer")


class Notifier:
    """Sends state lines to systemd's notify socket, if there is one."""

    def __init__(self, address: str | None) -> None:
        self.name = address
        # A leading `@` is an abstract socket: its name starts with a NUL byte instead.
        self.address = None if not address else (
            "\0" + address[1:] if address.startswith("@") else address)
        self._warned = False

    @classmethod
    def from_environment(cls) -> Notifier:
        """The socket systemd gave this process, removed from the environment it hands on."""
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *lines: str) -> None:
        """One datagram of `KEY=VALUE` lines. Never blocks and never raises: systemd being
        slow or gone must not stop a balancer from serving."""
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError as exc:  # a full queue (EAGAIN) or a socket that went away
                if not self._warned:
                    self._warned = True
                    log.warning("cannot notify systemd at %s: %s", self.name, exc)

    def ready(self, status: str = "serving") -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets a `Type=notify-reload` systemd (253+) match the reload to its
        # request; older ones ignore it.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining connections")

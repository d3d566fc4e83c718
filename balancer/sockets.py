"""Listening sockets: each listener is a group of SO_REUSEPORT sockets on one address.

Why several sockets in one process: the libuv under uvloop accepts *one* connection per
readiness event of a listening socket. While the loop is busy moving bytes for a thousand
connections, each iteration is long, so new clients trickle in at one per iteration and wait
seconds in the accept queue (measured: 1,000 connections opened at once through a loaded
balancer were accepted over 4 s; p99 latency 840 ms). With `ACCEPT_SOCKETS` sockets the kernel
spreads new connections over the group and every iteration accepts up to that many, as
HAProxy's `tune.maxaccept` does; nothing is added per connection.

SO_REUSEPORT admits only sockets of the same user into the group, but it admits *any* of
them: a second balancer started on the same port would silently join the group and take half
of the traffic. So a group is exclusive unless asked otherwise: before binding it, a probe
socket without SO_REUSEPORT is bound to the address, which fails while anything listens there
(a listener's `reuse_port: true` skips the probe, to share the port on purpose).

Every listening socket is a `ListenSocket`: see there for what it does once the process runs
out of file descriptors.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

from .config import Address
from .ratelog import Throttle

ACCEPT_SOCKETS = 16
LISTEN_BACKLOG = 1024
# TCP_DEFER_ACCEPT's value, in seconds, as nginx's `deferred` sets it: a client that has sent
# nothing by then is handed over anyway, after the kernel's next SYN-ACK retransmission.
DEFER_ACCEPT_SECONDS = 1


log = logging.getLogger(__name__)
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


class ListenSocket(socket.socket):
    """A listening socket that, out of file descriptors, closes the clients queued on it.

    At the open files limit `accept()` fails with EMFILE while the kernel keeps the socket
    readable. The stdlib loop then stops accepting for a second, but only after trying every
    slot of its batch of 100, each scheduling its own retry: the retries pile up and it spins,
    a third of a core on a process that is already struggling, while the queue it cannot take
    holds clients that wait for nothing. libuv (under uvloop) does what is done here: a spare
    descriptor kept open for the purpose is closed, which lets each queued client be accepted
    and closed at once (it sees its connection end, as with a full HAProxy), then the spare is
    opened again. The loop is told the queue is empty and waits for the next client; open
    connections are served throughout. uvloop takes only the descriptor from this object, so
    there this class changes nothing.
    """

    def accept(self) -> tuple[socket.socket, Any]:
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_DESCRIPTORS:
                raise
            shed = _SPARE.shed(self)
            if shed is None:  # no spare descriptor to do it with: the loop's own pause
                raise
            _SPARE.report(exc, shed)
            raise BlockingIOError(errno.EAGAIN, "queued clients closed") from None


class _Spare:
    """The one descriptor per process held back to shed clients with (see ListenSocket)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.throttle = Throttle()

    def hold(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None  # at the limit already: the next shed tries again

    def shed(self, sock: socket.socket) -> int | None:
        """Accept and close what is queued on `sock`; how many, or None without a spare."""
        self.hold()
        if self.fd is None:
            return None
        os.close(self.fd)
        self.fd = None
        shed = 0
        try:
            for _ in range(LISTEN_BACKLOG):
                try:
                    client, _ = socket.socket.accept(sock)  # not ours: it would shed again
                except ConnectionAbortedError:
                    continue
                except OSError:  # BlockingIOError: the queue is empty; EMFILE: not ours to take
                    break
                client.close()
                shed += 1
        finally:
            self.hold()
        return shed

    def report(self, exc: OSError, shed: int) -> None:
        """One warning a second at most: a storm of clients is one event, not thousands."""
        count = self.throttle.due(shed)
        if count is not None:
            log.warning("cannot accept: %s; closed %d queued client(s) since the last report, "
                        "open connections are still served (raise the open files limit: "
                        "ulimit -n, LimitNOFILE=)", exc.strerror or exc, count)


_SPARE = _Spare()


def listen_socket(fileno: int) -> ListenSocket:
    """A ListenSocket for a descriptor inherited from the supervisor (a worker's listeners)."""
    _SPARE.hold()
    return ListenSocket(fileno=fileno)


class BindError(OSError):
    """An address cannot be listened on; the message names it and says why."""


def bind_group(host: str, port: int, count: int = ACCEPT_SOCKETS, *,
               exclusive: bool = True) -> list[socket.socket]:
    """Bind `count` listening sockets to one address (port 0: the first one picks it).

    `exclusive`: fail if another socket already listens there (see the module docstring);
    False to join a group on purpose (our own, or one the operator wants to share)."""
    where = str(Address(host, port))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise BindError(f"{where}: {exc}") from exc
    family, _, _, _, address = infos[0]
    if exclusive and port != 0:
        _check_unused(family, address, where)
    group: list[socket.socket] = []
    _SPARE.hold()
    try:
        for _ in range(count):
            sock = ListenSocket(family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            elif count > 1:
                raise OSError("SO_REUSEPORT is not available on this system")
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            address = sock.getsockname()  # port 0: the rest join the port just chosen
    except OSError as exc:
        for bound in group:
            bound.close()
        raise BindError(f"{where}: {exc.strerror or exc}") from exc
    return group


def set_defer_accept(group: list[socket.socket], on: bool) -> bool:
    """Turn TCP_DEFER_ACCEPT on or off for a listening group (a listener's `defer_accept`).

    With it, the kernel completes the handshake but queues the connection for accept only
    once the client's first bytes are in: one wake-up less per connection, and a client that
    connects and says nothing costs no descriptor. Only for protocols where the client speaks
    first. Returns False where the option does not exist (not Linux): a plain accept then.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return not on
    for sock in group:
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS if on else 0)
    return True


def _check_unused(family: socket.AddressFamily, address: Any, where: str) -> None:
    """Raise BindError if a socket listens on `address` (a bind without SO_REUSEPORT fails)."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR, so that connections in TIME_WAIT (a balancer just restarted) do not
        # count: only a listening socket makes the probe fail.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BindError(f"{where}: address already in use by another process (set "
                            "`reuse_port: true` on the listener to share it)") from None
        raise BindError(f"{where}: {exc.strerror or exc}") from exc
    finally:
        probe.close()

"""Listening sockets: each listener is a group of SO_REUSEPORT sockets on one address.

Why several sockets in one process: the libuv under uvloop accepts *one* connection per
readiness event of a listening socket. While the loop is busy moving bytes for a thousand
connections, each iteration is long, so new clients trickle in at one per iteration and wait
seconds in the accept queue (measured: 1,000 connections opened at once through a loaded
balancer were accepted over 4 s; p99 latency 840 ms). With `ACCEPT_SOCKETS` sockets the kernel
spreads new connections over the group and every iteration accepts up to that many, as
HAProxy's `tune.maxaccept` does; nothing is added per connection.

SO_REUSEPORT admits only sockets of the same user into the group.
"""

from __future__ import annotations

import socket

ACCEPT_SOCKETS = 16
LISTEN_BACKLOG = 1024


def bind_group(host: str, port: int, count: int = ACCEPT_SOCKETS) -> list[socket.socket]:
    """Bind `count` listening sockets to one address (port 0: the first one picks it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
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
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group

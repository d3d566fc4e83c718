"""The channel between the primary and a worker: message framing and the exit codes.

Messages are pickled dicts sent over a SOCK_SEQPACKET socket pair, with file descriptors
(listening sockets) attached; `worker.py` documents the message kinds.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any

# A worker that exits with this could not boot: the primary stops instead of restarting it.
EXIT_BOOT_ERROR = 3
MAX_MESSAGE = 1 << 20
MAX_FDS = 256

def send_message(sock: socket.socket, message: dict[str, Any],
                 fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [pickle.dumps(message)], fds or [])


def receive_message(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and its fds; (None, []) when the other side has gone."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        return None, fds
    return pickle.loads(data), fds

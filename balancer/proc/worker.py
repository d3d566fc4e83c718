"""A worker process of a multi-worker balancer: `python -m balancer.proc.worker --control-fd N`.

The primary (supervisor.py) starts it with one end of a SOCK_SEQPACKET socket pair. Over it
the worker receives, as pickled dicts with file descriptors attached:

    {"kind": "start",  "config": Config, "listeners": [(name, n)], "rows": {key: row}, ...}
    {"kind": "reload", "config": Config, "listeners": [(name, n)], "rows": {key: row}}

with its share of each listener's sockets (SO_REUSEPORT, bound by the primary), and answers
`{"kind": "ready"}` / `{"kind": "reloaded", "ok": bool, "error": str}`. The worker creates its
own event loop: nothing of the primary's is inherited (it is a fresh interpreter).

Exit codes: 0 after a stop, 3 when it could not boot (the primary then gives up instead of
restarting it for ever).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from .control import EXIT_BOOT_ERROR, receive_message, send_message


def listener_sockets(layout: list[tuple[str, int]], fds: list[int]
                     ) -> dict[str, list[socket.socket]]:
    """Rebuild {listener: its sockets} from [(name, how many fds)] and the fds received."""
    sockets: dict[str, list[socket.socket]] = {}
    position = 0
    for name, count in layout:
        sockets[name] = [socket.socket(fileno=fd) for fd in fds[position : position + count]]
        position += count
    return sockets


log = logging.getLogger("balancer.worker")


class Worker:
    """Runs one Balancer on the primary's sockets and answers the primary's messages."""

    def __init__(self, control: socket.socket, start: dict[str, Any],
                 fds: list[int]) -> None:
        from .shared import SharedTable

        self.control = control
        self.config = start["config"]
        self.rows: dict[str, int] = dict(start["rows"])
        self.column: int = start["column"]
        self.table = SharedTable(start["shm"], start["capacity"], start["columns"])
        self.sockets = listener_sockets(start["listeners"], fds)
        self.stops = 0

    def cell_for(self, key: str) -> Any:
        row = self.rows.get(key)
        if row is None:
            return None
        cell = self.table.cell(row, self.column)
        # A new Server starts up: forget the verdict of one a reload removed from this row.
        cell.set_checked_down(False, "")
        return cell

    async def run(self) -> int:
        from ..server import Balancer

        loop = asyncio.get_running_loop()
        self.balancer = Balancer(self.config, sockets=self.sockets, cell_for=self.cell_for,
                                 serve_admin=False)
        try:
            await self.balancer.start()
        except OSError as exc:
            log.error("worker could not start: %s", exc)
            return EXIT_BOOT_ERROR
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop)
        self.control.setblocking(False)
        loop.add_reader(self.control.fileno(), self._on_control)
        send_message(self.control, {"kind": "ready", "pid": os.getpid()})
        await self.balancer.wait_stopped()
        loop.remove_reader(self.control.fileno())
        await self.balancer.shutdown()
        self.table.close()
        return 0

    def _on_stop(self) -> None:
        self.stops += 1
        if self.stops == 1:
            self.balancer.request_stop()
        else:
            self.balancer.close_all()

    def _on_control(self) -> None:
        try:
            message, fds = receive_message(self.control)
        except BlockingIOError:
            return
        except OSError:
            message, fds = None, []
        if message is None:  # the primary is gone: finish what we have and leave
            log.warning("primary went away; stopping")
            asyncio.get_running_loop().remove_reader(self.control.fileno())
            self.balancer.request_stop()
            return
        if message["kind"] == "reload":
            asyncio.get_running_loop().create_task(self._reload(message, fds))

    async def _reload(self, message: dict[str, Any], fds: list[int]) -> None:
        """Apply a config the primary validated; `fds` are the sockets of listeners that are
        new to us (kept listeners keep the sockets they have)."""
        self.rows.update(message["rows"])
        config = message["config"]
        self.sockets.update(listener_sockets(message["listeners"], fds))
        wanted = {listener.name for listener in config.listeners}
        self.sockets = {name: sock for name, sock in self.sockets.items() if name in wanted}
        try:
            await self.balancer.reload(config, self.sockets)
        except OSError as exc:
            send_message(self.control, {"kind": "reloaded", "ok": False, "error": str(exc)})
            return
        send_message(self.control, {"kind": "reloaded", "ok": True, "error": ""})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balancer.proc.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [worker {os.getpid()}] %(name)s: %(message)s",
    )
    control = socket.socket(fileno=args.control_fd)
    start, fds = receive_message(control)
    if start is None or start.get("kind") != "start":
        log.error("no start message from the primary")
        return EXIT_BOOT_ERROR
    from ..loops import new_event_loop

    worker = Worker(control, start, fds)
    loop = new_event_loop(worker.config.loop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(worker.run())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


if __name__ == "__main__":
    sys.exit(main())

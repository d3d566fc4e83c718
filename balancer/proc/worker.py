"""A worker process of a multi-worker balancer: `python -m balancer.proc.worker --control-fd N`.

The primary (supervisor.py) starts it with one end of a stream socket pair (control.py frames
it). Over it the worker receives pickled dicts, with file descriptors attached:

    {"kind": "start",  "generation": n, "config": Config, "listeners": [(name, k)],
     "rows": {key: row}, ...}
    {"kind": "reload", "generation": n, "config": Config, "listeners": [(name, k)],
     "rows": {key: row}}

with its share of the sockets of the listeners named (SO_REUSEPORT, bound by the primary: for
a reload, those it does not hold yet), and answers `{"kind": "ready", "generation": n}` /
`{"kind": "reloaded", "generation": n, "ok": bool, "error": str}`. The generation numbers the
primary's configs: an answer says which one it is about, so a late answer is never taken for
the answer to a later reload. The worker creates its own event loop: nothing of the primary's
is inherited (it is a fresh interpreter).

Exit codes: 0 after a stop, 3 when it could not boot (the primary then gives up instead of
restarting it for ever).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from typing import Any

from ..signals import handle_stop_signals
from ..sockets import listen_socket
from .control import EXIT_BOOT_ERROR, Channel, ChannelClosed, Message
from .shared import HEARTBEAT_INTERVAL


def listener_sockets(layout: list[tuple[str, int]], fds: list[int]
                     ) -> dict[str, list[socket.socket]]:
    """Rebuild {listener: its sockets} from [(name, how many fds)] and the fds received."""
    expected = sum(count for _, count in layout)
    if len(fds) != expected:
        for fd in fds:
            os.close(fd)
        raise OSError(f"received {len(fds)} of {expected} listening sockets")
    sockets: dict[str, list[socket.socket]] = {}
    position = 0
    for name, count in layout:
        sockets[name] = [listen_socket(fd) for fd in fds[position : position + count]]
        position += count
    return sockets


log = logging.getLogger("balancer.worker")


class Worker:
    """Runs one Balancer on the primary's sockets and answers the primary's messages."""

    def __init__(self, control: Channel, start: Message, fds: list[int]) -> None:
        from .shared import SharedTable

        self.control = control
        self.config = start["config"]
        self.generation: int = start["generation"]
        self.rows: dict[str, int] = dict(start["rows"])
        self.column: int = start["column"]
        self.table = SharedTable(start["shm"], start["capacity"], start["columns"])
        self.sockets = listener_sockets(start["listeners"], fds)
        self._reloads: asyncio.Queue[tuple[Message, list[int]]] = asyncio.Queue()
        self._heartbeat: asyncio.TimerHandle | None = None
        self._answers: set[asyncio.Task[None]] = set()  # "flushed" on its way to the primary

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
        handle_stop_signals(loop, self.balancer.request_stop, self.balancer.close_all)
        self._beat()
        self.control.sock.setblocking(False)
        loop.add_reader(self.control.fileno(), self._on_control)
        applier = loop.create_task(self._apply_reloads())
        try:
            await self.control.send({"kind": "ready", "pid": os.getpid(),
                                     "generation": self.generation})
        except ChannelClosed as exc:
            self._primary_gone(exc)
        await self.balancer.wait_stopped()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.control.fileno())
        applier.cancel()
        await self.balancer.shutdown()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.table.close()
        return 0

    def _beat(self) -> None:
        """Tell the primary this loop still runs; one that stops beating is killed (hung)."""
        self.table.beat(self.column, time.monotonic())
        self._heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._beat)

    def _on_control(self) -> None:
        try:
            frames = self.control.read()
        except ChannelClosed as exc:
            self._primary_gone(exc)
            return
        for message, fds in frames:
            if message["kind"] == "reload":
                self._reloads.put_nowait((message, fds))
            elif message["kind"] == "flush":  # a scrape is about to read our metrics files
                self.balancer.flush_metrics()
                task = asyncio.get_running_loop().create_task(self._flushed(message["id"]))
                self._answers.add(task)
                task.add_done_callback(self._answers.discard)
            else:
                for fd in fds:
                    os.close(fd)

    async def _flushed(self, number: int) -> None:
        try:
            await self.control.send({"kind": "flushed", "id": number})
        except ChannelClosed as exc:
            self._primary_gone(exc)

    def _primary_gone(self, why: ChannelClosed) -> None:
        """The channel to the primary is gone (or broken): finish what we have and leave;
        the primary starts a replacement if it is still there."""
        log.warning("channel to the primary: %s; stopping", why)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.control.fileno())
        self.balancer.request_stop()

    async def _apply_reloads(self) -> None:
        """Apply reloads one at a time, in the order the primary sent them."""
        while True:
            message, fds = await self._reloads.get()
            error = await self._reload(message, fds)
            try:
                await self.control.send({"kind": "reloaded", "generation": message["generation"],
                                         "ok": not error, "error": error})
            except ChannelClosed as exc:
                self._primary_gone(exc)
                return

    async def _reload(self, message: Message, fds: list[int]) -> str:
        """Apply a config the primary validated ("" when done, else why not); `fds` are the
        sockets of listeners new to us (kept listeners keep the sockets they have)."""
        try:
            fresh = listener_sockets(message["listeners"], fds)
        except OSError as exc:
            return str(exc)
        config = message["config"]
        wanted = {listener.name for listener in config.listeners}
        # A new dict: the balancer compares it with the one it has to see which are fresh.
        sockets = {name: socks for name, socks in {**self.sockets, **fresh}.items()
                   if name in wanted}
        self.rows = dict(message["rows"])
        from ..config import ConfigError

        try:
            await self.balancer.reload(config, sockets)
        except (OSError, ConfigError) as exc:
            for socks in fresh.values():
                for sock in socks:
                    sock.close()
            return str(exc)
        self.sockets = sockets
        self.generation = message["generation"]
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="balancer.proc.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s [worker {os.getpid()}] %(name)s: %(message)s",
    )
    control = Channel(socket.socket(fileno=args.control_fd))
    try:
        start, fds = control.read_blocking()
    except ChannelClosed as exc:
        log.error("no start message from the primary: %s", exc)
        return EXIT_BOOT_ERROR
    if start.get("kind") != "start":
        log.error("no start message from the primary")
        return EXIT_BOOT_ERROR
    from ..loops import new_event_loop

    try:
        worker = Worker(control, start, fds)
    except OSError as exc:
        log.error("worker could not start: %s", exc)
        return EXIT_BOOT_ERROR
    loop = new_event_loop(worker.config.loop)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(worker.run())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


if __name__ == "__main__":
    sys.exit(main())

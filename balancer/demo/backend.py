"""The demo's sample HTTP app in pure Python, for machines without Node.js.

Behaves like ``app.js``: every request gets 200 and a line naming the app and its
pid, ``GET /health`` gets ``ok``, connections stay open (HTTP/1.1 keep-alive) until the
client closes or asks ``Connection: close``. Run it as::

    python -m balancer.demo.backend --port 0 --name app-1

It prints exactly one line ``listening <port>`` once bound (so a parent learns an ephemeral
port) and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence

MAX_HEADER_BYTES = 16 * 1024  # a request head bigger than this is not one we want to parse
MAX_BODY_BYTES = 1024 * 1024
IDLE_TIMEOUT = 65.0  # like app.js's keepAliveTimeout: an idle keep-alive connection is closed
STOP_GRACE = 2.0  # seconds open connections get after a stop signal


def response_body(name: str, path: str, accept: str) -> tuple[str, bytes]:
    """Content type and body for a request path: who answered, or `ok` for health checks."""
    if path.split("?", 1)[0] == "/health":
        return "text/plain; charset=utf-8", b"ok\n"
    host = socket.gethostname()
    if "application/json" in accept:
        doc = {"name": name, "pid": os.getpid(), "host": host, "url": path}
        return "application/json", (json.dumps(doc) + "\n").encode()
    text = f"hello from {name} (pid {os.getpid()}, host {host})\n"
    return "text/plain; charset=utf-8", text.encode()


class DemoApp:
    """A minimal HTTP/1.1 server: enough for curl, browsers and load tools, no more."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError):
            pass  # a client that went away or spoke nonsense: just close
        finally:
            self.tasks.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True when the connection should stay open for another."""
        async with asyncio.timeout(IDLE_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEADER_BYTES:
            return False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            return False
        _method, path, version = parts
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or "0")
        if not 0 <= length <= MAX_BODY_BYTES:
            return False
        if length:
            await reader.readexactly(length)  # the body is read and ignored
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else (
            "keep-alive" in connection)
        content_type, body = response_body(self.name, path, headers.get("accept", ""))
        head_out = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nX-Backend: {self.name}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        writer.write(head_out.encode("latin-1") + body)
        await writer.drain()
        return keep_alive


async def serve(host: str, port: int, name: str) -> int:
    """Serve until SIGTERM/SIGINT, then give open connections a moment and stop."""
    app = DemoApp(name)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await asyncio.start_server(app.handle, host, port, limit=MAX_HEADER_BYTES)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening {bound}", flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        if app.tasks:
            _done, pending = await asyncio.wait(set(app.tasks), timeout=STOP_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=STOP_GRACE)
        await server.wait_closed()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The demo's sample HTTP app (pure Python).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0") or 0),
                        help="port to listen on; 0 = ephemeral (env PORT)")
    parser.add_argument("--host", default=os.environ.get("HOST") or "127.0.0.1",
                        help="address to bind (env HOST; default 127.0.0.1)")
    instance = os.environ.get("INSTANCE")  # set when the balancer runs it (`run:`)
    parser.add_argument("--name", default=os.environ.get("APP_NAME") or (
                            f"app-{instance}" if instance else socket.gethostname()),
                        help="name shown in answers (env APP_NAME; default app-$INSTANCE "
                             "when run as a balancer's instance, else the hostname)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(serve(args.host, args.port, args.name))
    except OSError as exc:
        print(f"{args.name}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""A small app for the managed-instance tests, run by the balancer as `run.command`.

Listens on 127.0.0.1:$PORT; each connection gets "hello <INSTANCE> <pid> <VERSION>\\n" and
then an echo until EOF. On SIGTERM it stops listening, lets open connections finish (up to
10 s) and exits 0. Options make it misbehave the way real apps do:

  --delay S          wait S seconds before listening (a slow start)
  --never-ready      never listen
  --crash            exit 1 at once (a crash loop)
  --crash-once FILE  exit 1 if FILE does not exist yet (creating it), else run normally
  --grow MB          once listening, allocate MB MiB (an RSS leak)
  --ignore-term      ignore SIGTERM (only SIGKILL ends it)
  --abrupt           exit at once on SIGTERM, dropping open connections (many apps do)
  --http S           speak HTTP/1.0 instead (one request per connection), and answer 503
                     to everything, GET /health too, for the first S seconds after listening
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path


async def main(args: argparse.Namespace) -> int:
    port = int(os.environ["PORT"])
    index = os.environ["INSTANCE"]
    version = os.environ.get("VERSION", "-")
    print(f"starting instance {index} on port {port}", file=sys.stderr, flush=True)
    if args.crash:
        print("crashing on purpose", file=sys.stderr, flush=True)
        return 1
    if args.crash_once and not Path(args.crash_once).exists():
        Path(args.crash_once).write_text("crashed\n")
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.abrupt:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    if args.never_ready:
        await stop.wait()
        return 0
    await asyncio.sleep(args.delay)
    open_connections: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_connections.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            writer.write(f"hello {index} {os.getpid()} {version}\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            open_connections.discard(asyncio.current_task())  # type: ignore[arg-type]

    healthy_at = loop.time() + (args.http or 0.0)

    async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ")[1].decode()
            healthy = loop.time() >= healthy_at
            body = (f"hello {index} {os.getpid()} {version}\n" if healthy else "not yet\n")
            status = "200 OK" if healthy else "503 Service Unavailable"
            if path == "/health":
                print(f"health {status[:3]}", file=sys.stderr, flush=True)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                         .encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve_http if args.http is not None else serve,
                                        "127.0.0.1", port)
    print(f"listening {port}", flush=True)
    hoard = bytearray(args.grow << 20) if args.grow else None
    if hoard is not None:
        hoard[::4096] = b"x" * len(hoard[::4096])  # touch every page: it counts in RSS
    await stop.wait()
    server.close()
    if open_connections:
        await asyncio.wait(open_connections, timeout=10)
    print("stopped on SIGTERM", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)  # not asyncio.run's cancelling of a connection just accepted: its noise


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--crash-once")
    parser.add_argument("--grow", type=int, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--http", type=float)
    parser.add_argument("--abrupt", action="store_true")
    sys.exit(asyncio.run(main(parser.parse_args())))

"""Test backends, run as real processes: `python tests/backend.py MODE --port 0 [--name N]`.

Prints `listening <port>` once bound, then serves until SIGTERM. Modes:

- name:   sends "<name>\\n" on connect, then echoes until EOF (who answered?)
- echo:   echoes everything; forwards EOF after the last byte (half-close aware)
- sink:   reads and counts; on EOF answers "<count> <sha256>\\n" and closes. With
          `--slow-seconds S` it reads only ~1 MiB/s for the first S seconds (a slow reader);
          with `--pause-after N --pause-seconds S`, once it has N bytes it reads nothing for S s
- source: sends `--bytes N` bytes at full speed, then "closes first"
- reply:  reads one line, answers "<name>:<line>" and closes first (churn, upstream closes)
- abort:  resets the connection (RST) as soon as it accepts (SO_LINGER 0)
- hang:   accepts and never reads nor writes
- banner: sends "banner <name>\n" at once, then echoes (a server that speaks first)
- resetafter: sends "hello", then resets the connection when the client's EOF arrives (a
          client that reads "hello" before its FIN knows the reset comes after the bytes)
- idleclose: echoes, but closes a connection that stays quiet for `--idle-close` seconds
- http:   a minimal HTTP/1.0 server: any request gets 200 and "<name>\n", then close
- halfclose: sends "bye\n" and its FIN at once, keeps reading; at EOF prints
          "received <count>" on its stdout (the client's bytes after our FIN still arrive)
- drain:  reads until EOF, then prints "received <count>" on its stdout and closes

With `--tls-cert FILE --tls-key FILE` every mode is served over TLS (a TLS server).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import socket
import struct
import sys

CHUNK = 256 * 1024
MODES = ["name", "echo", "sink", "source", "reply", "abort", "hang", "halfclose", "banner",
         "resetafter", "idleclose", "http", "drain"]


async def serve_name(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    writer.write(f"{name}\n".encode())
    await writer.drain()
    await echo_until_eof(reader, writer)


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    await writer.drain()


async def serve_sink(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow_seconds: float,
    pause_after: int = 0, pause_seconds: float = 0.0,
) -> None:
    loop = asyncio.get_running_loop()
    slow_until = loop.time() + slow_seconds
    digest = hashlib.sha256()
    count = 0
    while True:
        slow = loop.time() < slow_until
        data = await reader.read(16 * 1024 if slow else CHUNK)
        if not data:
            break
        count += len(data)
        digest.update(data)
        if slow:
            await asyncio.sleep(0.016)  # ~1 MiB/s: this backend *is* a slow reader
        if pause_after and count >= pause_after:
            pause_after = 0
            await asyncio.sleep(pause_seconds)  # a reader that stalls once, mid-transfer
    writer.write(f"{count} {digest.hexdigest()}\n".encode())
    await writer.drain()


async def serve_source(writer: asyncio.StreamWriter, total: int) -> None:
    block = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    while sent < total:
        piece = block[: min(CHUNK, total - sent)]
        writer.write(piece)
        sent += len(piece)
        await writer.drain()


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def echo_with_idle_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, idle: float
) -> None:
    while True:
        try:
            async with asyncio.timeout(idle):
                data = await reader.read(CHUNK)
        except TimeoutError:
            return  # quiet too long: close it, as servers with keep-alive timeouts do
        if not data:
            return
        writer.write(data)
        await writer.drain()


async def handle(args: argparse.Namespace, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
    if args.report:
        print("open", flush=True)
    try:
        if args.mode == "name":
            await serve_name(reader, writer, args.name)
        elif args.mode == "echo":
            await echo_until_eof(reader, writer)
        elif args.mode == "sink":
            await serve_sink(reader, writer, args.slow_seconds, args.pause_after,
                             args.pause_seconds)
        elif args.mode == "source":
            await serve_source(writer, args.bytes)
        elif args.mode == "reply":
            line = await reader.readline()
            writer.write(f"{args.name}:".encode() + line)
            await writer.drain()
        elif args.mode == "abort":
            reset(writer)
            return
        elif args.mode == "banner":
            writer.write(f"banner {args.name}\n".encode())
            await echo_until_eof(reader, writer)
        elif args.mode == "resetafter":
            writer.write(b"hello")
            await writer.drain()
            while await reader.read(CHUNK):  # the client's EOF: it has read "hello" by now
                pass
            reset(writer)
            return
        elif args.mode == "http":
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass
            body = f"{args.name}\n".encode()
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        elif args.mode == "idleclose":
            await echo_with_idle_close(reader, writer, args.idle_close)
        elif args.mode == "halfclose":
            writer.write(b"bye\n")
            writer.write_eof()
            count = 0
            while data := await reader.read(CHUNK):
                count += len(data)
            print(f"received {count}", flush=True)
        elif args.mode == "drain":
            count = 0
            while data := await reader.read(CHUNK):
                count += len(data)
            print(f"received {count}", flush=True)
        elif args.mode == "hang":
            await asyncio.Event().wait()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        if args.report:
            print("closed", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="backend")
    parser.add_argument("--bytes", type=int, default=1 << 20)
    parser.add_argument("--slow-seconds", type=float, default=0.0)
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--pause-seconds", type=float, default=0.0)
    parser.add_argument("--idle-close", type=float, default=0.5)
    parser.add_argument("--report", action="store_true", help='print "open"/"closed" lines')
    parser.add_argument("--tls-cert", help="serve over TLS with this certificate chain")
    parser.add_argument("--tls-key", help="the key of --tls-cert")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    server = await asyncio.start_server(
        lambda r, w: handle(args, r, w), args.host, args.port, backlog=1024, ssl=context
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)

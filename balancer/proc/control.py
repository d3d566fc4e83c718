"""The channel between the primary and a worker: message framing and the exit codes.

A SOCK_STREAM Unix socket pair carries frames: an 8-byte header (payload length, number of
file descriptors) and a pickled dict. A stream has no message size limit (a SOCK_SEQPACKET
message is capped by the send buffer, ~212 KB: a config of ~2,700 servers). The frame's
descriptors (listening sockets) ride on its first bytes with SCM_RIGHTS, at most `FDS_PER_SEND`
per byte, so they arrive no later than the frame itself; the reader keeps them in order.
`worker.py` documents the message kinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import struct
from collections import deque
from typing import Any

# A worker that exits with this could not boot: the primary stops instead of restarting it.
EXIT_BOOT_ERROR = 3
HEADER = struct.Struct("!II")  # payload bytes, descriptors
FDS_PER_SEND = 250  # the kernel takes at most 253 (SCM_MAX_FD) in one sendmsg
READ_SIZE = 256 * 1024
MAX_FRAME = 1 << 30  # a sanity bound on a corrupted header, not a limit any config reaches

Message = dict[str, Any]


class ChannelClosed(Exception):
    """The other side closed the channel, or it can no longer be used."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


class Channel:
    """One end of the channel: frames out (awaitable, any size), frames in (parsed from what
    has arrived)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: deque[int] = deque()  # received, not yet claimed by a frame
        self._broken = False  # a send was cut short: the stream is out of step
        self._eof = False
        # One frame at a time: a send may wait half-way (a big config, fds), and another
        # task's frame (a metrics flush) must not land inside it.
        self._sending = asyncio.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    async def send(self, message: Message, fds: list[int] | None = None) -> None:
        """Send one frame. Raises ChannelClosed if the other side is gone; a send that is
        cancelled half-way leaves the channel unusable (every later send raises)."""
        async with self._sending:
            await self._send(message, fds)

    async def _send(self, message: Message, fds: list[int] | None) -> None:
        if self._broken:
            raise ChannelClosed("the channel broke during an earlier send")
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        fds = fds or []
        data = memoryview(HEADER.pack(len(payload), len(fds)) + payload)
        loop = asyncio.get_running_loop()
        self._broken = True
        try:
            position = 0
            for start in range(0, len(fds), FDS_PER_SEND):  # each batch on its own byte
                position += await self._send_fds(loop, data[position : position + 1],
                                                 fds[start : start + FDS_PER_SEND])
            await loop.sock_sendall(self.sock, data[position:])
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        self._broken = False

    async def _send_fds(self, loop: asyncio.AbstractEventLoop, data: memoryview,
                        fds: list[int]) -> int:
        while True:
            try:
                return socket.send_fds(self.sock, [data], fds)
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self.sock.fileno(), writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(self.sock.fileno())

    def read(self) -> list[tuple[Message, list[int]]]:
        """Read what has arrived (the socket is non-blocking) and return the complete frames.
        Raises ChannelClosed at end of stream (after the frames that came before it)."""
        while not self._eof:
            try:
                self._receive()
            except (BlockingIOError, InterruptedError):
                break
        frames = self._frames()
        if self._eof and not frames:
            raise ChannelClosed("closed by the other side")
        return frames

    def read_blocking(self) -> tuple[Message, list[int]]:
        """One frame, waiting for it (a worker's start message, before it has a loop)."""
        while True:
            frames = self._frames()
            if frames:
                (frame,) = frames  # the primary sends nothing else before "ready"
                return frame
            if self._eof:
                raise ChannelClosed("closed by the other side")
            self._receive()

    def _receive(self) -> None:
        try:
            data, fds, flags, _ = socket.recv_fds(self.sock, READ_SIZE, FDS_PER_SEND + 3)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ChannelClosed("file descriptors were lost in transit (out of fds?)")
        if not data:
            self._eof = True
        self._buffer += data

    def _frames(self) -> list[tuple[Message, list[int]]]:
        frames = []
        while len(self._buffer) >= HEADER.size:
            size, count = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise ChannelClosed(f"bad frame header: {size} bytes")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            if count > len(self._fds):  # they ride on the frame's bytes: all are here by now
                raise ChannelClosed(f"a frame's {count} fds did not arrive")
            message = pickle.loads(self._buffer[HEADER.size : end])
            del self._buffer[:end]
            frames.append((message, [self._fds.popleft() for _ in range(count)]))
        return frames

    def close(self) -> None:
        """Close the socket and any descriptors received but not handed out."""
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        self.sock.close()

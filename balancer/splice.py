"""Kernel splice(2) for bulk: past `SPLICE_AFTER` bytes one way, a connection's bytes in that
direction go socket -> pipe -> socket inside the kernel, never copied through Python.

Why: a bulk stream through the loop's transports costs two copies per chunk (into a Python
`bytes`, out of it) and a Python call; `splice` moves page references instead (HAProxy's
`option splice-auto`). Short exchanges never reach the threshold, so they pay nothing but a
comparison per chunk; long exchanges of small messages pass it but never bring a chunk of
`SPLICE_MIN_CHUNK`, so they stay too (for them splice would cost more than it saves).

How, for one direction (src -> dst):
- only between two plain TCP transports of the loop (a TLS transport's socket carries
  ciphertext) on Linux, where `os.splice` exists; anything else stays on the normal path;
- only once dst's transport buffer is empty (bytes already queued there go first), then
  src's transport stops reading for good and a `SplicePump` owns that direction, on
  duplicated descriptors (the loops refuse readers on a transport's own descriptor);
- backpressure as on the normal path: while dst cannot take what sits in the pipe, src is
  not read (writer callback on dst, reader callback on src, never both), so at most one
  pipe's worth (`PIPE_SIZE`) is in flight;
- a readable event moves pipe loads until src would block (or ends, or fails): uvloop
  reports an error on a descriptor only once, so a reset queued behind unread bytes must be
  met by reading on, not by waiting for another event (`SplicePump._readable`);
- EOF from src and errors are handed back to the connection, which forwards the FIN or
  closes both sides exactly as it does for the transports; byte counters count what is read.
The pump closes its four descriptors in `stop()`, which the connection calls when it ends,
before it closes its transports.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sys
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

SPLICE_AFTER = 1 << 20  # bytes one way before that direction moves to splice
# ... and only on a chunk at least this large (HAProxy's default buffer, 16 KiB): a bulk flow
# reads that much or more at a time, request/response traffic mostly reads its messages one
# by one. A long-lived connection of small messages (a redis or keep-alive HTTP client's)
# passes 1 MiB in time too, and in the pump each message would cost a third syscall (the
# read on until EAGAIN) and a Python callback: 27.4 against 25.3 µs per request under wrk -c4.
SPLICE_MIN_CHUNK = 16 * 1024
NEVER = sys.maxsize  # a threshold no connection reaches: splice off
PIPE_SIZE = 1 << 18  # asked of the kernel (F_SETPIPE_SZ); the default is 64 KiB
BURST = 16  # pipe loads per readable event (4 MiB) before yielding to other connections

_splice: Callable[..., int] | None = getattr(os, "splice", None)
AVAILABLE = _splice is not None and sys.platform.startswith("linux")
FLAGS = (getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2))


def threshold(enabled: bool) -> int:
    """A connection's bytes one way before that direction moves to splice: a listener's
    `splice_auto` (on by default), where splice exists."""
    return SPLICE_AFTER if enabled and AVAILABLE else NEVER

def _plain_transport_types() -> tuple[type, ...]:
    """The loops' plain TCP transport classes: the only ones whose socket carries the
    connection's own bytes (not TLS records) and that pause reading cleanly."""
    from asyncio import selector_events

    # Private names of both loops, looked up rather than imported: a loop that renames its
    # class only loses splice, never the data path.
    types: list[type] = [getattr(selector_events, "_SelectorSocketTransport", type(None))]
    with contextlib.suppress(ImportError):
        import uvloop.loop

        types.append(getattr(uvloop.loop, "TCPTransport", type(None)))
    return tuple(types)


PLAIN_TRANSPORTS = _plain_transport_types()


def can_splice(a: asyncio.BaseTransport, b: asyncio.BaseTransport) -> bool:
    """True if bytes may be spliced between these two transports."""
    return AVAILABLE and type(a) in PLAIN_TRANSPORTS and type(b) in PLAIN_TRANSPORTS


class PumpOwner(Protocol):
    """What a pump reports to (the ClientConnection)."""

    bytes_up: int
    bytes_down: int
    moved: bool

    def splice_eof(self, up: bool) -> None: ...

    def splice_failed(self, up: bool, read_side: bool) -> None: ...


class SplicePump:
    """One direction of one connection, moved by splice(2) through a pipe."""

    __slots__ = ("dst", "loop", "owner", "pending", "pipe_r", "pipe_w", "reading", "src", "up",
                 "writing")

    def __init__(self, owner: PumpOwner, up: bool, loop: asyncio.AbstractEventLoop,
                 src: asyncio.BaseTransport, dst: asyncio.BaseTransport) -> None:
        """Raises OSError (out of descriptors, say) with nothing left open."""
        self.owner = owner
        self.up = up
        self.loop = loop
        self.pending = 0  # bytes in the pipe, not yet written to dst
        self.reading = self.writing = False
        fds: list[int] = []
        try:
            fds.append(os.dup(src.get_extra_info("socket").fileno()))
            fds.append(os.dup(dst.get_extra_info("socket").fileno()))
            fds.extend(os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self.src, self.dst, self.pipe_r, self.pipe_w = fds
        with contextlib.suppress(OSError, AttributeError):  # a smaller pipe works too
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src, self._readable)

    def _readable(self) -> None:
        """Move pipe loads until src would block, dst is full, or src ended or failed.

        Until then, not one load per event: on uvloop an error on src (the client's reset:
        EPOLLERR) is reported once, by libuv's poll handle stopping itself and uvloop running
        this callback a last time and dropping the registration unsaid. The bytes the peer
        sent before its reset are read first, so a single read returned data and the reset
        behind it was never seen (only the idle timeout ended the connection). Reading on
        until EAGAIN meets the error itself: with one pending, splice never says EAGAIN.
        After `BURST` loads it yields to other connections and carries on in the next loop
        pass (call_soon) rather than trusting the registration to call again.
        """
        assert _splice is not None
        owner = self.owner
        up = self.up
        for _ in range(BURST):
            if not self.reading:  # stopped, or waiting for dst to drain the pipe
                return
            try:
                n = _splice(self.src, self.pipe_w, PIPE_SIZE, flags=FLAGS)
            except BlockingIOError:  # nothing to read and no error: the registration holds
                return
            except OSError:  # reset by src's peer
                owner.splice_failed(up, True)
                return
            if n == 0:  # src's FIN; the pipe is empty (we read only then): pass it on
                self._stop_reading()
                owner.splice_eof(up)
                return
            if up:
                owner.bytes_up += n
            else:
                owner.bytes_down += n
            owner.moved = True
            self.pending = n
            self._drain()
        if self.reading:
            self.loop.call_soon(self._readable)

    def _drain(self) -> None:
        """Write the pipe to dst; if dst is full, wait for it (writer on dst, src not read)."""
        assert _splice is not None
        while self.pending and self.src >= 0:
            try:
                self.pending -= _splice(self.pipe_r, self.dst, self.pending, flags=FLAGS)
            except BlockingIOError:  # dst is full: stop reading src until it drains
                if self.reading:
                    self._stop_reading()
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.dst, self._writable)
                return
            except OSError:  # reset by dst's peer
                self.owner.splice_failed(self.up, False)
                return

    def _writable(self) -> None:
        """dst took bytes again: finish the pipe, then read src again.

        An error on dst (its peer's reset) comes here too, a last time on uvloop (see
        `_readable`): the write then fails, which ends the connection."""
        self._drain()
        if self.pending or self.src < 0:
            return
        self.writing = False
        self.loop.remove_writer(self.dst)
        self.reading = True
        # Re-registered rather than read at once: a pending error on src is reported on
        # registering (uvloop: the one last callback), which `_readable` then meets.
        self.loop.add_reader(self.src, self._readable)

    def _stop_reading(self) -> None:
        self.reading = False
        self.loop.remove_reader(self.src)

    def stop(self) -> None:
        """Unregister the four descriptors and close them on the next loop pass (idempotent).

        Not at once: uvloop closes a reader's poll handle at the end of this pass, and that
        close removes the descriptor's *number* from epoll; closed now, the number could be
        reused meanwhile (a new client accepted in this pass) and its registration dropped.
        """
        if self.src < 0:
            return
        if self.reading:
            self._stop_reading()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
        self.loop.call_soon(_close_all, (self.src, self.dst, self.pipe_r, self.pipe_w))
        self.src = self.dst = self.pipe_r = self.pipe_w = -1


def _close_all(fds: tuple[int, ...]) -> None:
    for fd in fds:
        os.close(fd)

"""A TLS transport of our own, over a plain TCP transport, that can half-close.

The loops' TLS transports (asyncio's and uvloop's, both from the same design) have no
`write_eof()`, and a received close_notify makes them finish the TLS shutdown at once. Neither
fits a proxy: a client that sends its request and then its close_notify (TLS's FIN) must still
get the answer, as over plain TCP. OpenSSL allows exactly that: after `SSL_shutdown` has sent
our close_notify the connection still reads, and after the peer's close_notify it still writes.

`TlsTransport` is both things at once: the protocol of the TCP transport (it receives the
records) and the transport its own protocol sees (it delivers plaintext). It drives an
`ssl.SSLObject` over two memory BIOs:

- handshake: started in `connection_made`, bounded by a timer; its end is reported to `done`
  (which attaches the protocol), and any bytes that came with the last flight are delivered;
- reading: each TCP chunk is decrypted record by record and delivered as one `data_received`;
  `pause_reading()` pauses the TCP transport and stops delivering what is already decrypted;
- writing: `write()` encrypts and writes to the TCP transport at once, so flow control and
  the buffer size are the TCP transport's (its `pause_writing` is passed on);
- ending: the peer's close_notify, or a FIN without one, is `eof_received`; `write_eof()` sends our
  close_notify then a FIN and keeps reading; `close()` sends a close_notify if not sent yet and
  closes the TCP transport after its buffer is flushed; `abort()` resets at once.

A TLS error from the peer (a bad record, a failed verification) aborts the connection: its
`connection_lost` gets the `ssl.SSLError`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

# The most plaintext taken from the SSLObject per read; a record holds at most 16 KiB.
READ_SIZE = 64 * 1024

HandshakeDone = Callable[["TlsTransport", BaseException | None], None]
P = TypeVar("P", bound=asyncio.Protocol)


class TlsTransport(asyncio.Transport, asyncio.Protocol):
    """TLS over the TCP transport this protocol is given (see the module docstring)."""

    __slots__ = ("done", "eof_read", "error", "handshake_timer", "handshaking", "incoming",
                 "loop", "outgoing", "paused", "protocol", "raw", "raw_eof", "shut", "sslobj",
                 "started", "timeout", "wrote_eof")

    def __init__(self, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext, *,
                 server_side: bool, server_hostname: str | None = None,
                 timeout: float, done: HandshakeDone) -> None:
        super().__init__()
        self.loop = loop
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=server_hostname)
        self.timeout = timeout
        self.done: HandshakeDone | None = done
        self.raw: asyncio.Transport = None  # type: ignore[assignment]
        self.protocol: asyncio.BaseProtocol | None = None
        self.handshaking = True
        self.handshake_timer: asyncio.TimerHandle | None = None
        self.started = 0.0
        self.paused = False  # reading paused by our protocol
        self.raw_eof = False  # the TCP FIN has arrived
        self.eof_read = False  # our protocol has had its eof_received
        self.wrote_eof = False  # our close_notify is sent
        self.shut = False  # close() or abort() was called
        self.error: BaseException | None = None

    # -- the TCP transport's protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.raw = transport  # type: ignore[assignment]
        if self.shut:  # aborted between the accept and this call (a listener going away)
            self.raw.abort()
            return
        self.started = self.loop.time()
        self.handshake_timer = self.loop.call_later(self.timeout, self._handshake_timed_out)
        self._handshake()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.handshaking:
            self._handshake()
        else:
            self._deliver()

    def eof_received(self) -> bool:
        self.raw_eof = True
        if self.handshaking:
            self._handshake_failed(ConnectionResetError("closed during the TLS handshake"))
            return False
        # Not passed to OpenSSL: a FIN without a close_notify is an error to it, one that
        # forbids writing after. To a proxy it is the end of the stream (a TCP FIN), as for
        # HAProxy, and the other direction keeps flowing.
        self._deliver()
        return True  # our write side stays open: the peer may still be reading

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshaking:
            self._handshake_failed(exc or ConnectionResetError("closed during the TLS handshake"))
            return
        protocol = self.protocol
        self.protocol = None
        if protocol is not None:
            error = exc or self.error
            protocol.connection_lost(error)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        if self.protocol is not None:
            self.protocol.pause_writing()

    def resume_writing(self) -> None:
        if self.protocol is not None:
            self.protocol.resume_writing()

    # -- the handshake --------------------------------------------------------------------------

    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self._flush()  # the alert saying why, if OpenSSL made one
            self._handshake_failed(exc)
            return
        self.handshaking = False
        self._cancel_timer()
        self._flush()
        done, self.done = self.done, None
        assert done is not None
        done(self, None)  # attaches our protocol (or closes us)
        self._deliver()  # bytes that came with the peer's last flight

    def _handshake_timed_out(self) -> None:
        self.handshake_timer = None
        if self.handshaking:
            self._handshake_failed(TimeoutError("TLS handshake timed out"))

    def _handshake_failed(self, exc: BaseException) -> None:
        self.handshaking = False
        self._cancel_timer()
        self.shut = True
        self.raw.abort()
        done, self.done = self.done, None
        if done is not None:
            done(self, exc)

    def _cancel_timer(self) -> None:
        if self.handshake_timer is not None:
            self.handshake_timer.cancel()
            self.handshake_timer = None

    # -- reading --------------------------------------------------------------------------------

    def _deliver(self) -> None:
        """Every whole record that has arrived, as one chunk (a TCP read of 256 KiB is
        sixteen records), then the end of the stream if it came with them; nothing while
        paused, closed, unattached or past the end. Never re-entered: a resume delivers one
        loop pass later."""
        if self.paused or self.shut or self.eof_read or self.protocol is None:
            return
        sslobj = self.sslobj
        incoming = self.incoming
        chunks = []
        ended = False
        try:
            while True:
                chunk = sslobj.read(READ_SIZE)
                if not chunk:
                    ended = True  # an empty read: the peer's close_notify
                    break
                chunks.append(chunk)
                if not incoming.pending and not sslobj.pending():
                    # Nothing left to decrypt: skip the read that would only raise (the
                    # common case, one record per TCP read, costs one read, not two).
                    ended = self.raw_eof
                    break
        except ssl.SSLWantReadError:
            ended = self.raw_eof  # all that came before the FIN (a partial record is lost)
        except ssl.SSLZeroReturnError:
            ended = True  # a close_notify
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        if self.outgoing.pending:  # e.g. the answer to a key update
            self._flush()
        if chunks:
            self.protocol.data_received(  # type: ignore[attr-defined]
                chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if ended and not (self.paused or self.shut or self.protocol is None):
            self._end_of_stream()

    def _end_of_stream(self) -> None:
        self.eof_read = True
        keep_open = self.protocol.eof_received()  # type: ignore[union-attr]
        if not keep_open:
            self.close()

    def _fatal(self, exc: BaseException) -> None:
        self.error = exc
        self.abort()

    # -- the transport our protocol sees ----------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.shut or self.wrote_eof or not data:
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and not self.raw.is_closing():
            self.raw.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Our close_notify, then a FIN; what the peer still sends is delivered."""
        if self.shut or self.wrote_eof:
            return
        self._send_close_notify()
        if self.raw.can_write_eof():
            self.raw.write_eof()

    def _send_close_notify(self) -> None:
        self.wrote_eof = True
        try:
            self.sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's own close_notify is not waited for
        except (ssl.SSLError, ValueError):
            return  # the connection is already broken: nothing to send
        self._flush()

    def is_closing(self) -> bool:
        return self.shut

    def close(self) -> None:
        """A close_notify (unless sent), then the TCP close once its buffer is flushed."""
        if self.shut:
            return
        self.shut = True
        self._cancel_timer()
        if self.raw is None:
            return
        if not self.handshaking and not self.wrote_eof:
            self._send_close_notify()
        self.raw.close()

    def abort(self) -> None:
        self.shut = True
        self._cancel_timer()
        if self.raw is not None:
            self.raw.abort()

    def pause_reading(self) -> None:
        if not self.paused:
            self.paused = True
            self.raw.pause_reading()

    def resume_reading(self) -> None:
        """Read again; what is already decrypted waits one loop pass, so a caller that
        resumes before it writes (proxy.py) never sees the next bytes overtake its own."""
        if self.paused:
            self.paused = False
            if not self.raw_eof:
                self.raw.resume_reading()
            self.loop.call_soon(self._deliver)  # records, or an end, kept back

    def is_reading(self) -> bool:
        return not self.paused and not self.shut

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol  # type: ignore[return-value]

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sslobj = self.sslobj
        if name == "ssl_object":
            return sslobj
        if name == "sslcontext":
            return sslobj.context
        if name == "peercert":
            return sslobj.getpeercert()
        if name == "cipher":
            return sslobj.cipher()
        return self.raw.get_extra_info(name, default)


async def open_tls(loop: asyncio.AbstractEventLoop, factory: Callable[[], P], host: str,
                   port: int, context: ssl.SSLContext, server_hostname: str,
                   timeout: float) -> tuple[TlsTransport, P]:
    """`loop.create_connection(factory, host, port, ssl=...)` on a TlsTransport: connect,
    then the handshake within `timeout`; the protocol is attached once it has succeeded.

    Written to be stepped without a Task (proxy.py): it awaits only futures, and a
    CancelledError thrown in while it waits closes what it opened.
    """
    waiter: asyncio.Future[None] = loop.create_future()
    protocol = factory()

    def done(tls: TlsTransport, exc: BaseException | None) -> None:
        if waiter.done():  # abandoned meanwhile
            if exc is None:
                tls.abort()
        elif exc is not None:
            waiter.set_exception(exc)
        else:
            tls.set_protocol(protocol)
            protocol.connection_made(tls)
            waiter.set_result(None)

    tls = TlsTransport(loop, context, server_side=False, server_hostname=server_hostname,
                       timeout=timeout, done=done)
    try:
        await loop.create_connection(lambda: tls, host, port)
        await waiter
    except BaseException:
        # Abandoned or failed, maybe while the handshake had begun: a cancelled waiter keeps
        # a late failure from becoming a "Future exception was never retrieved".
        waiter.cancel()
        if tls.raw is not None:
            tls.abort()
        raise
    return tls, protocol

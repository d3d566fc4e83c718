"""The PROXY protocol (HAProxy's doc/proxy-protocol.txt), versions 1 and 2: who the client is.

- `parse(buf)` reads one header from the start of what a peer sent: it returns None while
  more bytes are needed, raises `HeaderError` for anything malformed, and otherwise the
  addresses it carries (None for v2 LOCAL / v1 UNKNOWN: use the socket's own) and how many
  bytes it used. Every length is checked before it is used; a v1 line ends within 107 bytes
  and a v2 header over 4 KiB is refused, so a peer can make us hold at most 4 KiB.
- `encode_v1` / `encode_v2` build the header we send to servers, once per upstream connect;
  `V1_UNKNOWN` / `V2_LOCAL` are what active health checks send.

Written here rather than taken from a package: it runs once per connection on the accept
path, must not copy what it reads more than once, and is small enough to fuzz completely.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import NamedTuple, Protocol

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest legal v1 line, CRLF included
V2_MAX = 4096  # the spec allows 16 + 65535 bytes; nothing we accept needs more than this
V2_HEADER = 16  # signature, version/command, family/protocol, length

V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"

_V2_LOCAL_CMD = 0x20
_V2_PROXY_CMD = 0x21
_TCP4 = 0x11
_TCP6 = 0x21


class HeaderError(ValueError):
    """What a peer sent is not a PROXY header we accept; the message says why."""


class Addresses(NamedTuple):
    """The two ends of the client's original connection, as a PROXY header states them."""

    source: str
    source_port: int
    dest: str
    dest_port: int


Parsed = tuple[Addresses | None, int]


def parse(buf: bytes | bytearray) -> Parsed | None:
    """One header at the start of `buf`: (addresses or None, bytes used), None if incomplete.

    v1 and v2 are told apart by their first bytes, as the spec requires of a receiver that
    accepts both; anything else is refused at once rather than waited on.
    """
    size = len(buf)
    if size == 0:
        return None
    if buf[0] == 0x50:  # "P"
        if buf[:6] != V1_PREFIX[:size]:
            raise HeaderError("not a PROXY protocol header")
        return _parse_v1(buf, size)
    if buf[:12] != V2_SIGNATURE[:size]:
        raise HeaderError("not a PROXY protocol header")
    return _parse_v2(buf, size)


def _parse_v1(buf: bytes | bytearray, size: int) -> Parsed | None:
    end = buf.find(b"\n", 0, V1_MAX)
    if end < 0:
        if size >= V1_MAX:
            raise HeaderError(f"v1 header longer than {V1_MAX} bytes")
        return None
    if end == 0 or buf[end - 1] != 0x0D:
        raise HeaderError("v1 header does not end in CRLF")
    fields = bytes(buf[6:end - 1]).split(b" ")
    used = end + 1
    if fields[0] == b"UNKNOWN":  # whatever follows is to be ignored
        return None, used
    if len(fields) != 5:
        raise HeaderError("v1 header needs protocol, two addresses and two ports")
    proto, source, dest, source_port, dest_port = fields
    if proto == b"TCP4":
        family = socket.AF_INET
    elif proto == b"TCP6":
        family = socket.AF_INET6
    else:
        raise HeaderError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, got {proto[:8]!r}")
    return Addresses(
        _v1_address(family, source), _v1_port(source_port),
        _v1_address(family, dest), _v1_port(dest_port),
    ), used


def _v1_address(family: int, text: bytes) -> str:
    try:
        # Round trip: one spelling per address (per-client limits key on it).
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except (OSError, UnicodeDecodeError, ValueError):
        raise HeaderError(f"v1 header has an invalid address {text[:40]!r}") from None


def _v1_port(text: bytes) -> int:
    # Decimal, no sign, no leading zero: the spec's form, and what int() alone would not check.
    if not (0 < len(text) <= 5 and text.isdigit() and (text[0] != 0x30 or len(text) == 1)):
        raise HeaderError(f"v1 header has an invalid port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise HeaderError(f"v1 header has an invalid port {text[:8]!r}")
    return port


def _parse_v2(buf: bytes | bytearray, size: int) -> Parsed | None:
    if size < V2_HEADER:
        return None
    command = buf[12]
    if command >> 4 != 2:
        raise HeaderError(f"v2 header has version {command >> 4}, not 2")
    length = buf[14] << 8 | buf[15]
    used = V2_HEADER + length
    if used > V2_MAX:
        raise HeaderError(f"v2 header of {used} bytes is over the {V2_MAX}-byte limit")
    if command == _V2_LOCAL_CMD:  # the sender's own connection (a health check): no client
        return (None, used) if size >= used else None
    if command != _V2_PROXY_CMD:
        raise HeaderError(f"v2 header has unknown command {command & 0x0F}")
    family = buf[13]
    needed = 12 if family == _TCP4 else 36 if family == _TCP6 else 0
    if length < needed:
        raise HeaderError(f"v2 header too short for its address family ({length} bytes)")
    if size < used:
        return None
    if family == _TCP4:
        return Addresses(
            socket.inet_ntop(socket.AF_INET, bytes(buf[16:20])), buf[24] << 8 | buf[25],
            socket.inet_ntop(socket.AF_INET, bytes(buf[20:24])), buf[26] << 8 | buf[27],
        ), used
    if family == _TCP6:
        return Addresses(
            socket.inet_ntop(socket.AF_INET6, bytes(buf[16:32])), buf[48] << 8 | buf[49],
            socket.inet_ntop(socket.AF_INET6, bytes(buf[32:48])), buf[50] << 8 | buf[51],
        ), used
    # UNSPEC, UNIX or datagram: nothing a TCP balancer can use, so keep the socket's
    # addresses (as HAProxy does); the TLVs after the addresses are skipped in every case.
    return None, used


# -- encoding -------------------------------------------------------------------------------


def _same_family(source: str, dest: str) -> tuple[str, str, bool]:
    """Both ends in one family, as both versions require: IPv4 is mapped into IPv6 if the
    other end is IPv6. Returns (source, dest, is_ipv6)."""
    six_s, six_d = ":" in source, ":" in dest
    if six_s == six_d:
        return source, dest, six_s
    return (source if six_s else "::ffff:" + source), (dest if six_d else "::ffff:" + dest), True


def encode_v1(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    """The text header for a TCP connection from `source` to `dest`."""
    source, dest, six = _same_family(source, dest)
    proto = "TCP6" if six else "TCP4"
    return f"PROXY {proto} {source} {dest} {source_port} {dest_port}\r\n".encode("ascii")


_V2_TCP4 = V2_SIGNATURE + b"\x21\x11\x00\x0c"
_pack_v2_tcp4 = struct.Struct("!16s4s4sHH").pack
_pton, AF_INET = socket.inet_pton, socket.AF_INET


def encode_v2(source: str, source_port: int, dest: str, dest_port: int) -> bytes:
    """The binary header for a TCP connection from `source` to `dest` (no TLVs)."""
    if ":" not in source and ":" not in dest:  # IPv4 both ends, the common case: one pack
        return _pack_v2_tcp4(_V2_TCP4, _pton(AF_INET, source), _pton(AF_INET, dest),
                             source_port, dest_port)
    source, dest, six = _same_family(source, dest)
    if six:
        family, head = socket.AF_INET6, b"\x21\x21\x00\x24"
    else:
        family, head = socket.AF_INET, b"\x21\x11\x00\x0c"
    return b"".join((
        V2_SIGNATURE, head, socket.inet_pton(family, source), socket.inet_pton(family, dest),
        source_port.to_bytes(2, "big"), dest_port.to_bytes(2, "big"),
    ))


ENCODERS = {"v1": encode_v1, "v2": encode_v2}
LOCAL_HEADERS = {"v1": V1_UNKNOWN, "v2": V2_LOCAL}


# -- accepting ------------------------------------------------------------------------------


class Admission(Protocol):
    """What a HeaderReader needs from its listener (limits.Gate provides it)."""

    loop: asyncio.AbstractEventLoop
    header_timeout: float

    def accepted(self, transport: asyncio.Transport) -> bool: ...
    def released(self) -> None: ...
    def reject(self, transport: asyncio.BaseTransport, reason: str, detail: str) -> None: ...
    def admit_proxied(self, transport: asyncio.Transport, addresses: Addresses | None,
                      rest: bytes) -> None: ...
    def header_started(self, reader: HeaderReader) -> None: ...
    def header_ended(self, reader: HeaderReader) -> None: ...


class HeaderReader(asyncio.Protocol):
    """The first phase of a connection on an `accept_proxy` listener: its PROXY header.

    No server is chosen before the header is complete and valid. A malformed, oversize or
    late header (`timeouts.proxy_header`) closes this connection only. Once read, the
    transport is handed to a client connection (`Admission.admit_proxied`) together with
    whatever the client sent after the header.
    """

    __slots__ = ("buffer", "gate", "timer", "transport")

    def __init__(self, gate: Admission) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.buffer: bytearray | None = None  # only when a header arrives in pieces
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self.gate
        if not gate.accepted(transport):  # type: ignore[arg-type]
            return
        self.transport = transport  # type: ignore[assignment]
        self.timer = gate.loop.call_later(gate.header_timeout, self._late)
        gate.header_started(self)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        buffer = self.buffer
        chunk: bytes | bytearray = data
        if buffer is not None:
            buffer += data
            chunk = buffer
        try:
            parsed = parse(chunk)
        except HeaderError as exc:
            self.fail(str(exc))
            return
        if parsed is None:  # parse() waits for at most 4 KiB, so this stays bounded
            if buffer is None:
                self.buffer = bytearray(data)
            return
        addresses, used = parsed
        transport = self.transport
        self._end()
        self.gate.admit_proxied(transport, addresses, bytes(chunk[used:]))

    def eof_received(self) -> bool:
        if self.buffer:  # a connect-and-close without a byte is a probe, not an attack
            self.fail("connection closed inside the PROXY header")
        else:
            self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self._end()
            self.gate.released()

    def _late(self) -> None:
        self.timer = None
        self.fail(f"no complete PROXY header within {self.gate.header_timeout:g}s")

    def fail(self, why: str) -> None:
        transport = self.transport
        if transport is None:
            return
        self._end()
        self.gate.reject(transport, "bad_proxy_header", why)
        self.gate.released()

    def close(self) -> None:
        """Close quietly (shutdown, or a client that left before sending anything)."""
        transport = self.transport
        if transport is not None:
            self._end()
            transport.close()
            self.gate.released()

    def _end(self) -> None:
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buffer = None
        self.gate.header_ended(self)

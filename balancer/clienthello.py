"""A TLS ClientHello reader for routing by server name without decrypting (SNI passthrough).

The bytes come from an untrusted peer, so every length is checked against what is really
there before it is used, and the whole hello is capped at `MAX_HELLO`. The reader is
incremental in the simplest way: `parse()` is given everything received so far and answers
"need more" (None), a `ClientHello`, or raises `NotTls`. A hello may span several TCP segments
and several TLS records (RFC 8446 5.1 allows a handshake message to be fragmented); records are
joined before the handshake message is read. Only what routing needs is extracted: the server
name (RFC 6066 3) and the ALPN list (RFC 7301 3.1).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HELLO = 16 * 1024  # bytes of records we read before giving up on a hello
MAX_RECORD = 1 << 14  # RFC 8446 5.1: a plaintext fragment is at most 2^14 bytes

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
NAME_TYPE_HOST = 0

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class NotTls(ValueError):
    """The bytes are not (the start of) a well-formed TLS ClientHello: close, never forward."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What a ClientHello says about where the client wants to go."""

    server_name: str | None  # lower case, no trailing dot; None when absent
    alpn: tuple[str, ...]
    size: int  # bytes of records the hello took (all of them are forwarded unchanged)


def parse(data: bytes) -> ClientHello | None:
    """The ClientHello at the start of `data`, or None while more bytes are needed."""
    body, size = _handshake_message(data)
    if body is None:
        if len(data) >= MAX_HELLO:
            raise NotTls(f"no complete ClientHello in the first {MAX_HELLO} bytes")
        return None
    name, alpn = _client_hello(body)
    return ClientHello(name, alpn, size)


def _handshake_message(data: bytes) -> tuple[bytes | None, int]:
    """Join handshake records until the first handshake message is whole.

    Returns (message body, bytes of records used) or (None, 0) when more bytes are needed.
    """
    fragments = bytearray()
    offset = 0
    end = len(data)
    while True:
        if end - offset < 5:
            return None, 0
        content_type = data[offset]
        major = data[offset + 1]
        length = (data[offset + 3] << 8) | data[offset + 4]
        if content_type != RECORD_HANDSHAKE:
            raise NotTls(f"record type {content_type}, not a handshake")
        if major != 3:
            raise NotTls(f"record version {major}.{data[offset + 2]}, not TLS")
        if length == 0 or length > MAX_RECORD:
            raise NotTls(f"record length {length} out of range")
        if offset + 5 + length > MAX_HELLO:
            raise NotTls(f"ClientHello larger than {MAX_HELLO} bytes")
        if end - offset - 5 < length:
            return None, 0
        fragments += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(fragments) >= 4:
            if fragments[0] != HANDSHAKE_CLIENT_HELLO:
                raise NotTls(f"handshake type {fragments[0]}, not a ClientHello")
            size = (fragments[1] << 16) | (fragments[2] << 8) | fragments[3]
            if size + 4 > MAX_HELLO:
                raise NotTls(f"ClientHello of {size} bytes, over the {MAX_HELLO} cap")
            if len(fragments) >= 4 + size:
                if len(fragments) > 4 + size:
                    # RFC 8446 5.1: nothing may follow the ClientHello before the server's
                    # answer; a record carrying more is not a first flight.
                    raise NotTls("bytes after the ClientHello in its record")
                return bytes(fragments[4:]), offset


class _Reader:
    """Bounds-checked reads from one byte string: every read checks what is left first."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.left():
            raise NotTls(f"{what}: {count} bytes announced, {self.left()} left")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        """A length-prefixed sub-range, as its own reader (the length is checked)."""
        length = self.uint(length_size, what)
        if length > self.left():
            raise NotTls(f"{what}: {length} bytes announced, {self.left()} left")
        sub = _Reader(self.data, self.pos, self.pos + length)
        self.pos += length
        return sub


def _client_hello(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    """(server name, ALPN protocols) from a ClientHello body (RFC 8446 4.1.2)."""
    hello = _Reader(body)
    version = hello.take(2, "client version")
    if version[0] != 3:
        raise NotTls(f"client version {version[0]}.{version[1]}, not TLS")
    hello.take(32, "random")
    if hello.vector(1, "session id").left() > 32:
        raise NotTls("session id longer than 32 bytes")
    suites = hello.vector(2, "cipher suites").left()
    if suites < 2 or suites % 2:
        raise NotTls(f"cipher suites list of {suites} bytes")
    if hello.vector(1, "compression methods").left() < 1:
        raise NotTls("no compression method")
    if not hello.left():
        return None, ()  # no extensions at all (old clients): no name
    extensions = hello.vector(2, "extensions")
    if hello.left():
        raise NotTls("bytes after the extensions")
    name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while extensions.left():
        kind = extensions.uint(2, "extension type")
        data = extensions.vector(2, "extension")
        if kind in seen:
            raise NotTls(f"extension {kind} repeated")
        seen.add(kind)
        if kind == EXT_SERVER_NAME:
            name = _server_name(data)
        elif kind == EXT_ALPN:
            alpn = _alpn(data)
    return name, alpn


def _server_name(ext: _Reader) -> str | None:
    names = ext.vector(2, "server name list")
    if ext.left():
        raise NotTls("bytes after the server name list")
    found: str | None = None
    while names.left():
        kind = names.uint(1, "server name type")
        raw = names.vector(2, "server name")
        value = raw.take(raw.left(), "server name")
        if kind == NAME_TYPE_HOST and found is None:
            found = _host_name(value)
    return found


def _host_name(raw: bytes) -> str:
    """A DNS host name as sent (RFC 6066: ASCII, no trailing dot), normalised to lower case."""
    try:
        name = raw.decode("ascii").lower()
    except UnicodeDecodeError:
        raise NotTls("server name is not ASCII") from None
    name = name.removesuffix(".")
    if not name or len(name) > 253 or not _NAME_CHARS.issuperset(name):
        raise NotTls(f"server name {name[:64]!r} is not a host name")
    return name


def _alpn(ext: _Reader) -> tuple[str, ...]:
    protocols = ext.vector(2, "ALPN list")
    if ext.left():
        raise NotTls("bytes after the ALPN list")
    found = []
    while protocols.left():
        protocol = protocols.vector(1, "ALPN protocol")
        if not protocol.left():
            raise NotTls("empty ALPN protocol name")
        found.append(protocol.take(protocol.left(), "ALPN protocol").decode("latin-1"))
    return tuple(found)

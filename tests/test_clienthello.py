"""The ClientHello reader: real hellos from Python ssl, openssl s_client and curl, split every
way TLS and TCP allow, and fuzzed (random and mutated input never raises anything but NotTls)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.clienthello import MAX_HELLO, ClientHello, NotTls, parse

from .utils import refragment


def python_hello(name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of Python's ssl client, captured in memory."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def feed(data: bytes, cuts: list[int]) -> ClientHello | None:
    """Parse `data` as it would arrive in TCP segments cut at `cuts`."""
    received = b""
    for cut in sorted({*cuts, len(data)}):
        received = data[: min(cut, len(data))]
        result = parse(received)
        if result is not None:
            return result
    return parse(received)


HELLO = python_hello("api.example.com", ["h2", "http/1.1"])


def test_python_hello_gives_name_alpn_and_size() -> None:
    result = parse(HELLO)
    assert result == ClientHello("api.example.com", ("h2", "http/1.1"), len(HELLO))


def test_name_is_lower_cased_and_loses_its_trailing_dot() -> None:
    result = parse(python_hello("WWW.Example.COM."))
    assert result is not None and result.server_name == "www.example.com"


def test_no_server_name() -> None:
    result = parse(python_hello(None))
    assert result is not None and result.server_name is None


def test_every_prefix_needs_more() -> None:
    for end in range(len(HELLO)):
        assert parse(HELLO[:end]) is None, end


def test_hello_split_over_many_records() -> None:
    data = refragment(HELLO, [1, 3, 7, 100, 2])
    assert data != HELLO
    result = parse(data)
    assert result is not None
    assert (result.server_name, result.size) == ("api.example.com", len(data))


def test_bytes_after_the_hello_are_not_consumed() -> None:
    result = parse(HELLO + b"\x17\x03\x03\x00\x05hello")
    assert result is not None and result.size == len(HELLO)


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x15\x03\x01\x00\x02\x02\x28",  # an alert record
    b"\x16\x02\x00\x00\x04\x01\x00\x00\x00",  # SSL 2 version
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\x40\x01" + b"\x01" * 10,  # record over 2^14
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello
    b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",  # a hello of 16 MiB announced
    b"\x80\x2e\x01\x00\x02",  # SSLv2-style hello
])
def test_not_tls_is_refused_early(garbage: bytes) -> None:
    with pytest.raises(NotTls):
        parse(garbage)


def test_lengths_that_overrun_their_container_are_refused() -> None:
    # Announce a session id of 200 bytes inside a small hello.
    body = b"\x03\x03" + b"\x00" * 32 + b"\xc8" + b"\x00" * 10
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    with pytest.raises(NotTls):
        parse(b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message)


def test_size_cap_without_a_complete_hello() -> None:
    # Records that keep announcing a hello just under the cap but never complete it.
    message = b"\x01" + (MAX_HELLO - 8).to_bytes(3, "big")
    data = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
    chunk = b"\x00" * 4000
    while len(data) < MAX_HELLO + 10:
        data += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    with pytest.raises(NotTls):
        parse(data)


# -- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=MAX_HELLO + 64))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse(data)
    except NotTls:
        return
    assert result is None or result.size <= len(data)


@FUZZ
@given(st.binary(max_size=400).map(lambda b: b"\x16\x03\x01" + b))
def test_random_handshake_records_never_crash(data: bytes) -> None:
    with contextlib.suppress(NotTls):
        parse(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(HELLO)))
def test_mutated_real_hello_never_crashes(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(HELLO)
    for position, value in flips:
        data[position] = value
    try:
        result = parse(bytes(data[:cut]) + bytes(data[cut + 1:]))
    except NotTls:
        return
    assert result is None or result.size <= len(data)


@FUZZ
@given(st.lists(st.integers(1, 600), max_size=10), st.lists(st.integers(0, 2000), max_size=12))
def test_any_record_and_segment_split_reads_the_same(sizes: list[int], cuts: list[int]) -> None:
    data = refragment(HELLO, sizes)
    result = feed(data, cuts)
    assert result is not None
    assert (result.server_name, result.alpn, result.size) == (
        "api.example.com", ("h2", "http/1.1"), len(data))


# -- real clients ---------------------------------------------------------------------------


def capture_hello(command: list[str], port_holder: socket.socket) -> bytes:
    """Run a TLS client against a plain listener and keep the bytes it sends first."""
    received = b""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        port_holder.settimeout(10)
        conn, _ = port_holder.accept()
        with conn:
            conn.settimeout(5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and parse(received) is None:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += chunk
    finally:
        proc.kill()
        proc.wait(5)
    return received


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield sock
    sock.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl command not installed")
def test_openssl_s_client_hello(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    data = capture_hello(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                          "-servername", "shop.example.org", "-alpn", "h2,http/1.1"], listener)
    result = parse(data)
    assert result == ClientHello("shop.example.org", ("h2", "http/1.1"), len(data))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_hello(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    data = capture_hello(["curl", "-s", "-k", "--max-time", "5", "--resolve",
                          f"web.example.net:{port}:127.0.0.1",
                          f"https://web.example.net:{port}/"], listener)
    result = parse(data)
    assert result is not None
    assert result.server_name == "web.example.net"
    assert "http/1.1" in result.alpn


def test_python_hello_over_a_socket(listener: socket.socket) -> None:
    port = listener.getsockname()[1]

    def client() -> None:
        ctx = ssl.create_default_context()
        with (socket.create_connection(("127.0.0.1", port)) as raw,
              contextlib.suppress(OSError, ssl.SSLError)):
            ctx.wrap_socket(raw, server_hostname="py.example.com")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    listener.settimeout(10)
    conn, _ = listener.accept()
    received = b""
    with conn:
        conn.settimeout(5)
        while parse(received) is None:
            chunk = conn.recv(65536)
            assert chunk
            received += chunk
    thread.join(10)
    result = parse(received)
    assert result is not None and result.server_name == "py.example.com"

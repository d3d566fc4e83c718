"""The PROXY protocol parser and encoder (balancer/proxyproto.py): the spec's examples, its
limits, and a fuzz test. The data path that uses them is tested in test_proxyproto.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.proxyproto import (
    V1_MAX,
    V1_UNKNOWN,
    V2_LOCAL,
    V2_MAX,
    V2_SIGNATURE,
    Addresses,
    HeaderError,
    encode_v1,
    encode_v2,
    parse,
)

# The spec's v1 examples: the longest TCP4 and TCP6 lines, the short and the worst-case
# UNKNOWN forms (107 bytes, the limit).
TCP4_LONGEST = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
FFFF = ":".join(["ffff"] * 8)
TCP6_LONGEST = f"PROXY TCP6 {FFFF} {FFFF} 65535 65535\r\n".encode()
UNKNOWN_LONGEST = f"PROXY UNKNOWN {FFFF} {FFFF} 65535 65535\r\n".encode()
# A v2 header as HAProxy's `send-proxy-v2` writes it (TCP over IPv4, 172.19.0.1:42578 to
# 172.19.0.3:80), followed by the client's first bytes.
HAPROXY_V2 = bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")


def test_spec_v1_lengths() -> None:
    assert len(TCP4_LONGEST) == 56
    assert len(TCP6_LONGEST) == 104
    assert len(UNKNOWN_LONGEST) == V1_MAX == 107


def test_v1_tcp4() -> None:
    assert parse(TCP4_LONGEST) == (
        Addresses("255.255.255.255", 65535, "255.255.255.255", 65535), 56)
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    assert parse(line) == (Addresses("192.168.0.1", 56324, "192.168.0.11", 443), 47)


def test_v1_tcp6_is_normalised() -> None:
    assert parse(TCP6_LONGEST) == (Addresses(FFFF, 65535, FFFF, 65535), 104)
    parsed = parse(b"PROXY TCP6 2001:db8:0:0:0:0:0:1 ::1 1 2\r\n")
    assert parsed == (Addresses("2001:db8::1", 1, "::1", 2), 41)


def test_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == (None, 15)
    assert parse(UNKNOWN_LONGEST) == (None, 107)


def test_v1_incomplete_until_crlf() -> None:
    for end in range(len(TCP4_LONGEST)):
        assert parse(TCP4_LONGEST[:end]) is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",  # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # a field too many
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # leading zero
    b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # a non-ASCII digit
    b"PROXY \r\n",
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"GET / HTTP/1.1\r\n",
    b"PROXYTCP4",
])
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(HeaderError):
        parse(line)


def test_v1_over_107_bytes_is_refused_without_a_crlf() -> None:
    long = b"PROXY UNKNOWN " + b"x" * 93  # 107 bytes and still no end of line
    assert len(long) == V1_MAX
    assert parse(long[:-1]) is None
    with pytest.raises(HeaderError, match="longer than 107"):
        parse(long)
    with pytest.raises(HeaderError):
        parse(long + b"\r\n")


def test_v2_as_haproxy_sends_it() -> None:
    data = HAPROXY_V2 + b"GET / HTTP/1.1\r\n"
    assert parse(data) == (Addresses("172.19.0.1", 42578, "172.19.0.3", 80), 28)
    for end in range(28):
        assert parse(data[:end]) is None


def test_v2_tcp6_and_tlvs_skipped() -> None:
    header = encode_v2("2001:db8::1", 1234, "2001:db8::2", 443)
    assert len(header) == 16 + 36
    assert parse(header) == (Addresses("2001:db8::1", 1234, "2001:db8::2", 443), 52)
    # The same addresses with a 7-byte TLV (type 0x01 ALPN "http/1") after them.
    with_tlv = bytearray(header)
    with_tlv[15] += 9
    with_tlv += b"\x01\x00\x06http/1"
    assert parse(bytes(with_tlv)) == (
        Addresses("2001:db8::1", 1234, "2001:db8::2", 443), 61)


def test_v2_local_and_unspec_keep_the_socket_addresses() -> None:
    assert parse(V2_LOCAL) == (None, 16)
    # LOCAL may still carry addresses (they are to be ignored).
    local_with_addresses = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(local_with_addresses) == (None, 28)
    unspec = V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert parse(unspec) == (None, 16)
    unix = V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216)
    assert parse(unix) == (None, 232)


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in the binary form
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8),  # too short for IPv4 addresses
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # too short for IPv6 addresses
    b"\r\n\r\n\x00\r\nQUIT!",  # a broken signature
])
def test_v2_malformed(header: bytes) -> None:
    with pytest.raises(HeaderError):
        parse(header)


def test_v2_over_4_kib_is_refused_from_its_length_alone() -> None:
    fits = V2_SIGNATURE + b"\x21\x11" + (V2_MAX - 16).to_bytes(2, "big")
    assert parse(fits) is None  # waits for the rest
    over = V2_SIGNATURE + b"\x21\x11" + (V2_MAX - 15).to_bytes(2, "big")
    with pytest.raises(HeaderError, match="over the 4096-byte limit"):
        parse(over)
    largest = V2_SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(HeaderError):
        parse(largest)


def test_encode_v1() -> None:
    assert encode_v1("192.168.0.1", 56324, "192.168.0.11", 443) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert encode_v1("::1", 1, "::1", 2) == b"PROXY TCP6 ::1 ::1 1 2\r\n"
    # Mixed families: both sides are sent as IPv6, IPv4 mapped.
    assert encode_v1("10.0.0.1", 1, "::1", 2) == b"PROXY TCP6 ::ffff:10.0.0.1 ::1 1 2\r\n"
    assert V1_UNKNOWN == b"PROXY UNKNOWN\r\n"


def test_encode_v2_matches_haproxy() -> None:
    assert encode_v2("172.19.0.1", 42578, "172.19.0.3", 80) == HAPROXY_V2
    assert V2_LOCAL == V2_SIGNATURE + b"\x20\x00\x00\x00"


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(st.one_of(st.tuples(ipv4, ports, ipv4, ports), st.tuples(ipv6, ports, ipv6, ports)),
       st.sampled_from([encode_v1, encode_v2]), st.binary(max_size=64))
def test_round_trip(addresses: tuple[str, int, str, int], encode: object,
                    payload: bytes) -> None:
    import ipaddress

    header = encode(*addresses)  # type: ignore[operator]
    result = parse(header + payload)
    assert result is not None
    parsed, used = result
    assert used == len(header)
    assert parsed is not None
    assert ipaddress.ip_address(parsed.source) == ipaddress.ip_address(addresses[0])
    assert ipaddress.ip_address(parsed.dest) == ipaddress.ip_address(addresses[2])
    assert (parsed.source_port, parsed.dest_port) == (addresses[1], addresses[3])


def _check_bounded(data: bytes) -> None:
    """The parser's contract on any input: an answer, never an exception but HeaderError,
    never more than the limits consumed, and never 'incomplete' past them."""
    try:
        result = parse(data)
    except HeaderError:
        return
    if result is None:
        assert len(data) < V2_MAX
        if data[:1] == b"P":
            assert len(data) < V1_MAX
        return
    _, used = result
    assert 0 < used <= min(len(data), V2_MAX)
    if data[:1] == b"P":
        assert used <= V1_MAX


REAL = [TCP4_LONGEST, TCP6_LONGEST, UNKNOWN_LONGEST, HAPROXY_V2, V2_LOCAL,
        encode_v2("2001:db8::1", 1, "::1", 2)]


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _check_bounded(data)
    _check_bounded(V2_SIGNATURE + data)
    _check_bounded(b"PROXY " + data)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(REAL), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                       max_size=6),
       st.integers(0, 120), st.binary(max_size=40))
def test_fuzz_mutated_real_headers(header: bytes, flips: list[tuple[int, int]], cut: int,
                                   tail: bytes) -> None:
    data = bytearray(header)
    for position, value in flips:
        if data:
            data[position % len(data)] = value
    _check_bounded(bytes(data[:max(0, len(data) - cut)]) + tail)
    _check_bounded(bytes(data) + tail)

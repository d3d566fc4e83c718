"""PROXY protocol on the data path: accepted on listeners (`accept_proxy`), sent to servers
(`send_proxy`, also on pooled connections and by active checks), over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import socketserver
import sys
import threading

import pytest

from balancer.proxyproto import V1_UNKNOWN, V2_LOCAL, encode_v1, encode_v2

from .utils import admin_port, eventually, make_config, scrape, total, with_metrics

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]


class Recorder:
    """A server that speaks first ("hi\\n"), then records everything each connection sends
    (and answers nothing more): what the balancer put in front of the client's bytes is
    visible. Its own threads, so a test blocked on the balancer never blocks it."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        # Per connection, the TCP segments with data it had received (Linux), read before
        # the bytes are recorded: once `received` shows them, this counts their segments.
        self.segments: list[int] = []
        received, segments = self.received, self.segments

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                got = bytearray()
                received.append(got)
                segments.append(0)
                index = len(segments) - 1
                self.request.settimeout(60)
                with contextlib.suppress(OSError):
                    self.request.sendall(b"hi\n")
                    while data := self.request.recv(65536):
                        segments[index] = data_segments_in(self.request)
                        got += data

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def data_segments_in(sock: socket.socket) -> int:
    """tcp_info's tcpi_data_segs_in (Linux 4.6+): segments received that carried data."""
    if not sys.platform.startswith("linux"):
        return 0
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int.from_bytes(info[152:156], sys.byteorder)


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.stop()


async def connect(port: int, source: str = "127.0.0.1"):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def finish(writer: asyncio.StreamWriter) -> None:
    """Close a client connection and let the loop actually close it before teardown."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def closed_without_reply(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(reader.read(), 10) == b""
    return True


def proxied(config: dict, **listener: object) -> dict:
    config["listeners"][0].update(listener)
    return config


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_header_is_sent_at_connect_with_the_socket_peer(recorder, start_balancer, version):
    balancer = start_balancer(make_config([recorder.address], send_proxy=version))
    reader, writer = await connect(balancer.port, "127.0.0.7")
    local_port = writer.get_extra_info("sockname")[1]
    # The client says nothing: a server that speaks first still gets the header and answers.
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    encode = encode_v1 if version == "v1" else encode_v2
    header = encode("127.0.0.7", local_port, "127.0.0.1", balancer.port)
    await eventually(lambda: bytes(recorder.received[0]) == header)
    writer.write(b"hello")
    await eventually(lambda: bytes(recorder.received[0]) == header + b"hello")
    await finish(writer)


async def test_a_server_may_turn_it_off(recorder, start_balancer):
    config = make_config([{"address": recorder.address, "send_proxy": "off"}], send_proxy="v2")
    balancer = start_balancer(config)
    reader, writer = await connect(balancer.port)
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    writer.write(b"hello")
    await eventually(lambda: bytes(recorder.received[0]) == b"hello")
    await finish(writer)


async def test_accepted_v1_address_is_sent_on_as_v2(recorder, start_balancer):
    balancer = start_balancer(proxied(make_config([recorder.address], send_proxy="v2"),
                                      accept_proxy=True))
    reader, writer = await connect(balancer.port)
    writer.write(b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nhello")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    header = encode_v2("192.0.2.7", 40000, "198.51.100.1", 443)
    await eventually(lambda: bytes(recorder.received[0]) == header + b"hello")
    if sys.platform.startswith("linux"):  # tcp_info's segment count is Linux's
        # What follows an accepted header is held until the server connect completes (it
        # is handed over before the connect can finish), so the PROXY header sent on and
        # those bytes leave in one write: one segment, one syscall, not two.
        assert recorder.segments[0] == 1
    await finish(writer)


async def test_v2_header_in_single_bytes_and_ipv6(recorder, start_balancer):
    balancer = start_balancer(proxied(make_config([recorder.address], send_proxy="v1"),
                                      accept_proxy=True))
    reader, writer = await connect(balancer.port)
    for byte in encode_v2("2001:db8::7", 1234, "2001:db8::1", 80):
        writer.write(bytes([byte]))
        await writer.drain()
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    header = b"PROXY TCP6 2001:db8::7 2001:db8::1 1234 80\r\n"
    await eventually(lambda: bytes(recorder.received[0]) == header)
    await finish(writer)


async def test_local_header_keeps_the_socket_address(recorder, start_balancer):
    balancer = start_balancer(proxied(make_config([recorder.address], send_proxy="v1"),
                                      accept_proxy=True))
    reader, writer = await connect(balancer.port, "127.0.0.8")
    writer.write(V2_LOCAL + b"x")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    local_port = writer.get_extra_info("sockname")[1]
    header = encode_v1("127.0.0.8", local_port, "127.0.0.1", balancer.port)
    await eventually(lambda: bytes(recorder.received[0]) == header + b"x")
    await finish(writer)


@pytest.mark.parametrize(("send", "why"), [
    (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "invalid port"),
    (b"PROXY UNKNOWN " + b"x" * 120, "longer than 107"),
    (encode_v2("1.2.3.4", 1, "5.6.7.8", 2)[:14] + b"\x13\x88", "over the 4096-byte limit"),
])
async def test_bad_header_closes_before_any_server_is_chosen(recorder, start_balancer, send,
                                                             why):
    config = with_metrics(proxied(make_config([recorder.address]), accept_proxy=True))
    balancer = start_balancer(config)
    reader, writer = await connect(balancer.port)
    writer.write(send)
    assert await closed_without_reply(reader)
    await finish(writer)
    await asyncio.to_thread(balancer.wait_for_line, rf"rejected \(bad_proxy_header: .*{why}")
    samples = await scrape(admin_port(balancer))
    assert total(samples, "balancer_rejected_connections_total", reason="bad_proxy_header") == 1
    assert recorder.received == []  # no upstream connect at all
    # The listener itself is fine: the next client with a header gets through.
    reader, writer = await connect(balancer.port)
    writer.write(b"PROXY UNKNOWN\r\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    await finish(writer)


async def test_late_header_is_closed_after_the_timeout(recorder, start_balancer):
    config = with_metrics(proxied(make_config([recorder.address]), accept_proxy=True,
                                  timeouts={"proxy_header": "300ms"}))
    balancer = start_balancer(config)
    reader, writer = await connect(balancer.port)
    writer.write(b"PROXY TCP4 1.2.3.4")  # and then nothing
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await closed_without_reply(reader)
    assert 0.25 < loop.time() - began < 5
    await finish(writer)
    await asyncio.to_thread(balancer.wait_for_line,
                            r"bad_proxy_header: no complete PROXY header within 0.3s")
    samples = await scrape(admin_port(balancer))
    assert total(samples, "balancer_rejected_connections_total", reason="bad_proxy_header") == 1
    assert recorder.received == []


async def test_pooled_connection_gets_the_header_when_a_client_takes_it(recorder,
                                                                        start_balancer):
    balancer = start_balancer(make_config([recorder.address], send_proxy="v2",
                                          pool={"size": 1}))
    await eventually(lambda: len(recorder.received) == 1)  # the pool's idle connection
    await asyncio.sleep(0.2)  # nothing written on it while idle (a short look, not a sync)
    assert bytes(recorder.received[0]) == b""
    reader, writer = await connect(balancer.port, "127.0.0.9")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"  # the pooled banner
    local_port = writer.get_extra_info("sockname")[1]
    header = encode_v2("127.0.0.9", local_port, "127.0.0.1", balancer.port)
    await eventually(lambda: bytes(recorder.received[0]) == header)
    await finish(writer)


@pytest.mark.parametrize(("version", "header"), [("v1", V1_UNKNOWN), ("v2", V2_LOCAL)])
async def test_active_checks_send_a_local_header(recorder, start_balancer, version, header):
    config = make_config([recorder.address], send_proxy=version,
                         health={"check": {"interval": "100ms", "type": "tcp"}})
    start_balancer(config)
    await eventually(lambda: len(recorder.received) >= 2)
    await eventually(lambda: all(bytes(got) == header for got in recorder.received[:2]))


async def test_access_log_and_ip_hash_use_the_accepted_address(recorder, start_balancer):
    config = proxied(make_config([recorder.address], "ip_hash"), accept_proxy=True)
    config["log"] = {"access": "stderr"}
    balancer = start_balancer(config)
    reader, writer = await connect(balancer.port)
    writer.write(b"PROXY TCP4 203.0.113.5 198.51.100.1 4711 443\r\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"hi\n"
    await finish(writer)
    await asyncio.to_thread(balancer.wait_for_line, r"test 203\.0\.113\.5:4711 -> app/")

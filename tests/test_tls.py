"""TLS over real sockets with real TLS clients: termination with two certificates, reload of
renewed files, refused old versions, garbage and timeouts on TLS and SNI listeners, SNI
routing to three upstreams (fallback included), and TLS to servers, verified or not.
Certificates are made here with trustme."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from balancer.config import ConfigError, load_config

from .utils import Backend, make_config, read_backend_line, refragment, wait_until

pytestmark = pytest.mark.both_loops


class Certs:
    """A CA and the certificate files the tests use, written under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.other_ca = trustme.CA()  # signs what must not verify

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path

    def issue(self, stem: str, *names: str, ca: trustme.CA | None = None) -> tuple[Path, Path]:
        cert = (ca or self.ca).issue_cert(*names)
        chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
        return (self.write(f"{stem}.pem", chain),
                self.write(f"{stem}.key", cert.private_key_pem.bytes()))

    def client(self, **kw: Any) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        for key, value in kw.items():
            setattr(context, key, value)
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def tls_backend(start_backend: Any, certs: Certs, mode: str, name: str, *hosts: str,
                ca: trustme.CA | None = None) -> Backend:
    cert, key = certs.issue(f"backend-{name}", *(hosts or ("127.0.0.1",)), ca=ca)
    return start_backend(mode, name, "--tls-cert", str(cert), "--tls-key", str(key))


def terminating(servers: list[str], certificates: list[tuple[Path, Path]], **tls: Any) -> dict:
    config = make_config(servers)
    config["listeners"][0]["tls"] = {
        "certificates": [{"cert": str(c), "key": str(k)} for c, k in certificates], **tls}
    return config


def with_admin(config: dict) -> dict:
    config["metrics"] = {"bind": "127.0.0.1:0"}
    return config


def admin_port(balancer: Any) -> int:
    line = balancer.wait_for_line(r"admin endpoint on http://")
    return int(line.rsplit(":", 1)[1].split("/")[0])


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
    body = await asyncio.wait_for(reader.read(), 10)
    await shut(writer)
    return body.decode().split("\r\n\r\n", 1)[1]


async def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = await http_get(port, "/metrics")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def tls_open(port: int, context: ssl.SSLContext, name: str | None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=name), 10)


def peer_names(writer: asyncio.StreamWriter) -> set[str]:
    cert = writer.get_extra_info("peercert")
    return {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}


async def closed_without_answer(reader: asyncio.StreamReader) -> bool:
    """The balancer closed (FIN or reset) without sending a byte."""
    try:
        data = await asyncio.wait_for(reader.read(100), 10)
    except (ConnectionResetError, ssl.SSLError):
        return True
    return data == b""


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a client and wait for it (a TLS close waits for the peer's answer, bounded)."""
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 5)


def no_tracebacks(balancer: Any) -> None:
    """No traceback and no complaint from asyncio itself (e.g. its TLS transport's warning
    that eof_received() returning True has no effect)."""
    bad = ("Traceback", "ERROR asyncio", "WARNING asyncio", "never retrieved")
    assert not [line for line in balancer.lines if any(b in line for b in bad)], \
        balancer.lines[-20:]


# -- termination ------------------------------------------------------------------------------


async def test_terminates_with_the_certificate_the_client_names(
        start_backend, start_balancer, certs) -> None:
    backend = start_backend("name", "app")
    a = certs.issue("a", "a.example.com")
    b = certs.issue("b", "b.example.com", "*.b.example.com")
    config = terminating([backend.address], [a, b])
    config["log"] = {"access": "stderr"}
    balancer = start_balancer(config)
    context = certs.client()
    for name, expected in [("a.example.com", "a.example.com"), ("b.example.com", "b.example.com"),
                           ("x.b.example.com", "b.example.com")]:
        reader, writer = await tls_open(balancer.port, context, name)
        assert expected in peer_names(writer)
        assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"ping\n"
        await shut(writer)
    # No SNI, or a name no certificate has: the first certificate is the default.
    loose = certs.client(check_hostname=False)
    for name in (None, "unknown.example.net"):
        reader, writer = await tls_open(balancer.port, loose, name)
        assert peer_names(writer) == {"a.example.com"}
        assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
        await shut(writer)
    balancer.wait_for_line(r"sni=x\.b\.example\.com alpn=-")
    no_tracebacks(balancer)


async def test_alpn_is_negotiated_and_logged(start_backend, start_balancer, certs) -> None:
    backend = start_backend("name", "app")
    config = terminating([backend.address], [certs.issue("a", "a.example.com")],
                         alpn=["h2", "http/1.1"])
    config["log"] = {"access": "stderr", "format": "json"}
    balancer = start_balancer(config)
    context = certs.client()
    context.set_alpn_protocols(["http/1.1"])
    reader, writer = await tls_open(balancer.port, context, "a.example.com")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
    await shut(writer)
    line = balancer.wait_for_line(r'"alpn":')
    fields = json.loads(line)
    assert (fields["sni"], fields["alpn"], fields["upstream"]) == ("a.example.com", "http/1.1",
                                                                  "app")


async def test_old_versions_refused_and_counted(start_backend, start_balancer, certs) -> None:
    backend = start_backend("name", "app")
    config = with_admin(terminating([backend.address], [certs.issue("a", "a.example.com")],
                                    min_version="1.3"))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    old = certs.client(maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        await tls_open(balancer.port, old, "a.example.com")
    await wait_until(lambda: metric(port, "balancer_tls_handshake_errors_total", listener="test"),
                     lambda value: value == 1)
    reader, writer = await tls_open(balancer.port, certs.client(), "a.example.com")
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
    await shut(writer)
    assert await metric(port, "balancer_tls_handshake_seconds_count", listener="test") == 1
    assert await metric(port, "balancer_connections_total") == 1
    no_tracebacks(balancer)


async def test_garbage_and_silence_on_a_tls_listener(start_backend, start_balancer, certs) -> None:
    backend = start_backend("name", "app")
    config = with_admin(terminating([backend.address], [certs.issue("a", "a.example.com")],
                                    handshake_timeout="300ms"))
    balancer = start_balancer(config)
    port = admin_port(balancer)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")  # plain text on a TLS port
    data = b""
    with pytest.raises((ConnectionResetError, AssertionError)):
        data = await asyncio.wait_for(reader.read(), 10)
        assert b"app" not in data and data.startswith(b"\x15")  # at most a TLS alert
        raise AssertionError("closed")
    await shut(writer)
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await closed_without_answer(silent_reader)  # the 300 ms handshake timeout
    await shut(silent)
    await wait_until(lambda: metric(port, "balancer_tls_handshake_errors_total", listener="test"),
                     lambda value: value == 2)
    # Neither reached the server, and the listener still serves.
    assert await metric(port, "balancer_connections_total") == 0
    reader, writer = await tls_open(balancer.port, certs.client(), "a.example.com")
    assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
    await shut(writer)
    no_tracebacks(balancer)


def _blocking_tls_client(port: int, context: ssl.SSLContext, payload: bytes) -> None:
    """Send `payload`, then a close_notify, from a real blocking ssl socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="a.example.com") as tls:
        tls.sendall(payload)
        with contextlib.suppress(OSError, ssl.SSLError):
            tls.unwrap()


async def test_close_notify_is_the_clients_eof(start_backend, start_balancer, certs) -> None:
    backend = start_backend("drain", "app")
    config = terminating([backend.address], [certs.issue("a", "a.example.com")])
    balancer = start_balancer(config)
    payload = b"x" * (3 * 1024 * 1024)
    thread = threading.Thread(target=_blocking_tls_client,
                              args=(balancer.port, certs.client(), payload), daemon=True)
    thread.start()
    assert await read_backend_line(backend) == f"received {len(payload)}"
    thread.join(10)
    no_tracebacks(balancer)


async def test_backpressure_through_tls(start_backend, start_balancer, certs) -> None:
    total = 48 * 1024 * 1024
    backend = start_backend("source", "app", "--bytes", str(total))
    config = terminating([backend.address], [certs.issue("a", "a.example.com")])
    balancer = start_balancer(config)
    before = balancer.status_kib("VmRSS")
    reader, writer = await tls_open(balancer.port, certs.client(), "a.example.com")
    first = await asyncio.wait_for(reader.readexactly(1024), 10)
    assert first
    # A client that stops reading: the server must be paused, not buffered in the balancer.
    await asyncio.sleep(1.0)
    grown = balancer.status_kib("VmRSS") - before
    assert grown < 16 * 1024, f"balancer grew {grown} KiB while its client did not read"
    received = len(first)
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 20):
        received += len(chunk)
    assert received == total  # the server's FIN ends it with a close_notify, after all bytes
    await shut(writer)
    no_tracebacks(balancer)


# -- accept-time rules on a TLS listener ------------------------------------------------------


def _tls_client(port: int, context: ssl.SSLContext, header: bytes = b"",
                first: bytes = b"") -> ssl.SSLSocket:
    """A blocking TLS client: `header` (a PROXY line) in the clear first, then the handshake;
    `first` instead of a handshake sends bytes that are not TLS."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if header or first:
        raw.sendall(header or first)
    if first:
        return raw  # type: ignore[return-value]
    try:
        return context.wrap_socket(raw, server_hostname="a.example.com")
    except BaseException:
        raw.close()
        raise


def _refused(port: int, context: ssl.SSLContext, header: bytes = b"") -> bool:
    """The balancer closed the connection instead of completing a handshake."""
    try:
        _tls_client(port, context, header).close()
    except (ssl.SSLError, ConnectionError):
        return True
    return False


async def test_a_tls_listener_reads_the_proxy_header_and_screens_before_the_handshake(
        start_backend, start_balancer, certs) -> None:
    """accept_proxy and deny on a TLS listener: the header comes in the clear before the
    ClientHello (as in front of HAProxy's `accept-proxy ssl`), and the address it gives is
    the one the rules see."""
    backend = start_backend("name", "app")
    config = with_admin(terminating([backend.address], [certs.issue("a", "a.example.com")]))
    config["listeners"][0].update(accept_proxy=True, deny=["203.0.113.0/24"])
    balancer = start_balancer(config)
    context = certs.client()
    allowed = await asyncio.to_thread(_tls_client, balancer.port, context,
                                      b"PROXY TCP4 198.51.100.7 127.0.0.1 5555 443\r\n")
    try:
        allowed.settimeout(10)
        assert allowed.recv(100) == b"app\n"
        allowed.sendall(b"through\n")
        assert allowed.recv(100) == b"through\n"
    finally:
        allowed.close()
    assert await asyncio.to_thread(_refused, balancer.port, context,
                                   b"PROXY TCP4 203.0.113.9 127.0.0.1 5555 443\r\n")
    port = admin_port(balancer)
    assert await metric(port, "balancer_rejected_connections_total", reason="denied") == 1
    assert await metric(port, "balancer_tls_handshake_errors_total") == 0
    no_tracebacks(balancer)


async def test_per_client_limits_on_a_tls_listener_and_a_failed_handshake_gives_its_slot_back(
        start_backend, start_balancer, certs) -> None:
    """per_client.max_conns on a TLS listener: a second connection is closed at accept, and
    a client whose handshake fails holds no slot afterwards."""
    backend = start_backend("name", "app")
    config = with_admin(terminating([backend.address], [certs.issue("a", "a.example.com")]))
    config["listeners"][0]["per_client"] = {"max_conns": 1}
    balancer = start_balancer(config)
    context = certs.client()
    port = admin_port(balancer)
    garbage = await asyncio.to_thread(_tls_client, balancer.port, context, b"",
                                      b"GET / HTTP/1.0\r\n\r\n")
    try:
        garbage.settimeout(10)
        assert await asyncio.to_thread(garbage.recv, 100) == b""  # closed: not TLS
    finally:
        garbage.close()
    await wait_until(lambda: metric(port, "balancer_tls_handshake_errors_total"),
                     lambda n: n == 1)
    for _ in range(2):  # the slot is free again after each
        held = await asyncio.to_thread(_tls_client, balancer.port, context)
        try:
            held.settimeout(10)
            assert held.recv(100) == b"app\n"
            assert await asyncio.to_thread(_refused, balancer.port, context)
        finally:
            held.close()
        await wait_until(lambda: metric(port, "balancer_active_connections"),
                         lambda n: n == 0)
    assert await metric(port, "balancer_rejected_connections_total",
                        reason="client_conns") == 2
    no_tracebacks(balancer)


# -- certificates on reload -------------------------------------------------------------------


async def test_reload_serves_renewed_files_and_refuses_a_bad_pair(
        start_backend, start_balancer, certs) -> None:
    import signal

    backend = start_backend("name", "app")
    cert, key = certs.issue("a", "a.example.com")
    balancer = start_balancer(terminating([backend.address], [(cert, key)]))
    context = certs.client()

    async def serial() -> str:
        reader, writer = await tls_open(balancer.port, context, "a.example.com")
        assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
        number = writer.get_extra_info("peercert")["serialNumber"]
        await shut(writer)
        return number

    first = await serial()
    open_reader, open_writer = await tls_open(balancer.port, context, "a.example.com")
    assert await open_reader.readline() == b"app\n"
    # Renew: same names, new files; the YAML does not change.
    certs.issue("a", "a.example.com")
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line(r"configuration reloaded")
    renewed = await serial()
    assert renewed != first
    # The connection opened before carries on with its certificate.
    open_writer.write(b"still\n")
    assert await asyncio.wait_for(open_reader.readline(), 10) == b"still\n"
    await shut(open_writer)
    # A key that does not match: the reload is refused, the renewed certificate keeps serving.
    _other_cert, other_key = certs.issue("other", "a.example.com")
    key.write_bytes(other_key.read_bytes())
    balancer.send_signal(signal.SIGHUP)
    balancer.wait_for_line(
        r"reload rejected: listeners\[0\]\.tls\.certificates\[0\]\.key: "
        r"does not match the certificate")
    assert await serial() == renewed


# -- config -----------------------------------------------------------------------------------


def _problems(tmp_path: Path, config: dict) -> list[str]:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_config_errors_name_the_file_at_fault(tmp_path: Path, certs: Certs) -> None:
    a = certs.issue("a", "a.example.com")
    b = certs.issue("b", "b.example.com")
    config = terminating(["127.0.0.1:1"], [a, (b[0], a[1])], min_version="1.1")
    problems = _problems(tmp_path, config)
    assert "listeners[0].tls.certificates[1].key: does not match the certificate" in problems
    assert any(p.startswith("listeners[0].tls.min_version: must be one of 1.2, 1.3")
               for p in problems)
    missing = terminating(["127.0.0.1:1"], [(tmp_path / "nope.pem", a[1])])
    assert any(p.startswith("listeners[0].tls.certificates[0].cert: cannot read")
               for p in _problems(tmp_path, missing))
    garbage = certs.write("garbage.pem", b"not a certificate")
    bad = terminating(["127.0.0.1:1"], [(garbage, a[1])])
    assert _problems(tmp_path, bad) == [
        "listeners[0].tls.certificates[0].cert: not a PEM certificate"]


def test_config_sni_and_upstream_tls_rules(tmp_path: Path, certs: Certs) -> None:
    config = make_config(["127.0.0.1:1"])
    config["listeners"][0]["sni"] = {"api.example.com": "app", "*.x.com": "nope", "b c": "app"}
    config["upstreams"]["app"]["tls"] = {"cert": str(certs.issue("c", "c")[0]), "verify": "yes"}
    problems = _problems(tmp_path, config)
    assert "listeners[0].sni.*.x.com: unknown upstream 'nope' (known: app)" in problems
    assert "listeners[0].sni.b c: must be a host name or *.domain" in problems
    assert "upstreams.app.tls.key: required" in problems
    assert "upstreams.app.tls.verify: must be a boolean, got 'yes'" in problems
    both = make_config(["127.0.0.1:1"])
    both["listeners"][0]["sni"] = {"a.com": "app"}
    both["listeners"][0]["tls"] = {"certificates": [
        {"cert": str(c), "key": str(k)} for c, k in [certs.issue("a", "a.com")]]}
    assert any("cannot be combined with tls" in p for p in _problems(tmp_path, both))
    # An SNI listener needs no fallback upstream.
    fine = make_config(["127.0.0.1:1"])
    del fine["listeners"][0]["upstream"]
    fine["listeners"][0]["sni"] = {"API.example.com.": "app"}
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(fine))
    loaded = load_config(path)
    assert loaded.listeners[0].sni == (("api.example.com", "app"),)
    assert loaded.listeners[0].upstream is None
    # The accept-time rules: on a TLS listener, not (yet) on an SNI one.
    fine["listeners"][0]["accept_proxy"] = True
    assert _problems(tmp_path, fine) == [
        "listeners[0].accept_proxy: cannot be combined with sni (not supported yet)"]
    tls = terminating(["127.0.0.1:1"], [certs.issue("a", "a.com")])
    tls["listeners"][0].update(accept_proxy=True, max_conns=5, per_client={"max_conns": 2})
    path.write_text(yaml.safe_dump(tls))
    assert load_config(path).listeners[0].accept_proxy


# -- SNI passthrough --------------------------------------------------------------------------


def sni_config(routes: dict[str, Backend], fallback: Backend | None) -> dict:
    upstreams = {name: {"servers": [b.address]} for name, b in
                 {**{b.name: b for b in routes.values()},
                  **({fallback.name: fallback} if fallback else {})}.items()}
    listener: dict[str, Any] = {"name": "sni", "bind": "127.0.0.1:0",
                                "sni": {name: b.name for name, b in routes.items()}}
    if fallback is not None:
        listener["upstream"] = fallback.name
    return {"listeners": [listener], "upstreams": upstreams, "log": {"access": "stderr"},
            "metrics": {"bind": "127.0.0.1:0"}}


@pytest.fixture
def three(start_backend: Any, certs: Certs) -> dict[str, Backend]:
    return {
        "api": tls_backend(start_backend, certs, "name", "api", "api.example.com"),
        "web": tls_backend(start_backend, certs, "name", "web", "*.example.com",
                           "a.b.example.com"),
        "fallback": tls_backend(start_backend, certs, "name", "fallback", "other.test",
                                "fallback.local"),
    }


async def test_sni_routes_to_three_upstreams_unread(start_balancer, certs, three) -> None:
    config = sni_config({"api.example.com": three["api"], "*.example.com": three["web"]},
                        three["fallback"])
    balancer = start_balancer(config)
    port = admin_port(balancer)
    context = certs.client()
    cases = [("api.example.com", "api"), ("www.example.com", "web"), ("a.b.example.com", "web"),
             ("other.test", "fallback")]
    for name, expected in cases:
        reader, writer = await tls_open(balancer.port, context, name)
        # End to end TLS: the certificate is the backend's own, not ours.
        assert await asyncio.wait_for(reader.readline(), 10) == f"{expected}\n".encode()
        await shut(writer)
    # No SNI at all goes to the fallback too.
    loose = certs.client(check_hostname=False)
    reader, writer = await tls_open(balancer.port, loose, None)
    assert await asyncio.wait_for(reader.readline(), 10) == b"fallback\n"
    await shut(writer)
    balancer.wait_for_line(r"-> web/\S+ .* sni=a\.b\.example\.com")
    status = json.loads(await http_get(port, "/status"))
    rules = {rule["name"]: (rule["upstream"], rule["matched"])
             for rule in status["listeners"][0]["sni"]}
    assert rules == {"api.example.com": ("api", 1), "*.example.com": ("web", 2),
                     "(fallback)": ("fallback", 2)}
    no_tracebacks(balancer)


async def test_sni_hello_in_pieces_and_many_records(start_balancer, certs, three) -> None:
    config = sni_config({"api.example.com": three["api"]}, three["fallback"])
    balancer = start_balancer(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP,
                                                         socket.TCP_NODELAY, 1)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = certs.client().wrap_bio(incoming, outgoing, server_hostname="api.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = refragment(outgoing.read(), [60, 1, 200])  # three+ records
    for start in range(0, len(hello), 100):  # and many segments, each sent on its own
        writer.write(hello[start:start + 100])
        await writer.drain()
        await asyncio.sleep(0.01)
    for _ in range(20):  # the rest of the handshake, by hand
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                writer.write(outgoing.read())
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "closed during the handshake"
            incoming.write(data)
    if outgoing.pending:
        writer.write(outgoing.read())
    received = b""
    for _ in range(20):
        try:
            received += tls.read(100)
        except ssl.SSLWantReadError:
            incoming.write(await asyncio.wait_for(reader.read(65536), 10))
        if received.endswith(b"\n"):
            break
    assert received == b"api\n"
    await shut(writer)


async def test_sni_garbage_silence_and_no_route_are_closed(start_balancer, certs, three) -> None:
    config = sni_config({"api.example.com": three["api"]}, None)
    balancer = start_balancer(config)
    port = admin_port(balancer)
    # Half a hello, then silence: closed by the 5 s cap (awaited at the end).
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", balancer.port)
    silent.write(b"\x16\x03\x01\x02\x00\x01")
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    assert await closed_without_answer(reader)
    await shut(writer)
    # A name nobody serves, with no fallback: closed too.
    with pytest.raises((ssl.SSLError, ConnectionResetError, ConnectionAbortedError)):
        await tls_open(balancer.port, certs.client(check_hostname=False), "nobody.example.org")
    assert await closed_without_answer(silent_reader)
    await shut(silent)
    await wait_until(lambda: metric(port, "balancer_sni_rejected_total", listener="sni"),
                     lambda value: value == 3)
    for reason in ("not_tls", "no_route", "timeout"):
        assert await metric(port, "balancer_sni_rejected_total", reason=reason) == 1, reason
    assert await metric(port, "balancer_connections_total") == 0  # nothing was forwarded
    status = json.loads(await http_get(port, "/status"))
    assert status["listeners"][0]["sni_rejected"] == {"not_tls": 1, "timeout": 1, "no_route": 1}
    no_tracebacks(balancer)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_through_sni_and_termination(start_backend, start_balancer, certs) -> None:
    api = tls_backend(start_backend, certs, "http", "api", "api.example.com")
    plain = start_backend("http", "plain")
    config = sni_config({"api.example.com": api}, None)
    config["listeners"].append({"name": "tls", "bind": "127.0.0.1:0", "upstream": "plain",
                                "tls": {"certificates": [
                                    {"cert": str(c), "key": str(k)}
                                    for c, k in [certs.issue("t", "t.example.com")]]}})
    config["upstreams"]["plain"] = {"servers": [plain.address]}
    balancer = start_balancer(config)
    for name, port, body in [("api.example.com", balancer.ports["sni"], "api"),
                             ("t.example.com", balancer.ports["tls"], "plain")]:
        result = await asyncio.to_thread(subprocess.run, [
            "curl", "-sS", "--max-time", "10", "--cacert", str(certs.ca_file), "--resolve",
            f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
            capture_output=True, text=True, timeout=20)
        assert result.stdout == f"{body}\n", result.stderr


# -- TLS to the servers -----------------------------------------------------------------------


def tls_upstream(servers: list[str], certs: Certs, **tls: Any) -> dict:
    config = with_admin(make_config(servers))
    config["upstreams"]["app"]["tls"] = {"ca": str(certs.ca_file), **tls}
    return config


async def test_tls_to_servers_with_a_failing_verification(start_backend, start_balancer,
                                                          certs) -> None:
    bad = tls_backend(start_backend, certs, "name", "bad", ca=certs.other_ca)
    good = tls_backend(start_backend, certs, "name", "good")
    config = tls_upstream([bad.address, good.address], certs)
    config["upstreams"]["app"]["health"] = {"max_fails": 1, "fail_timeout": "30s"}
    balancer = start_balancer(config)
    port = admin_port(balancer)
    for _ in range(3):  # round robin starts on the bad one: retried like a refused connect
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        assert await asyncio.wait_for(reader.readline(), 10) == b"good\n"
        await shut(writer)
    assert await metric(port, "balancer_connection_errors_total", reason="tls",
                        server=bad.address) == 1
    status = json.loads(await http_get(port, "/status"))
    states = {s["address"]: s["state"] for s in status["upstreams"]["app"]["servers"]}
    assert states == {bad.address: "down", good.address: "up"}
    no_tracebacks(balancer)


async def test_tls_to_servers_verify_false_and_sni(start_backend, start_balancer, certs) -> None:
    untrusted = tls_backend(start_backend, certs, "name", "untrusted", ca=certs.other_ca)
    named = tls_backend(start_backend, certs, "name", "named", "app.internal")
    balancer = start_balancer(tls_upstream([untrusted.address], certs, verify=False))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await asyncio.wait_for(reader.readline(), 10) == b"untrusted\n"
    writer.write(b"over tls\n")
    assert await asyncio.wait_for(reader.readline(), 10) == b"over tls\n"
    writer.write_eof()  # reaches the TLS server as its close_notify: it ends, and so do we
    assert await asyncio.wait_for(reader.read(), 10) == b""
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await asyncio.wait_for(reader2.readline(), 10) == b"untrusted\n"
    await shut(writer2)
    await shut(writer)
    no_tracebacks(balancer)
    balancer = start_balancer(tls_upstream([named.address], certs, sni="app.internal"))
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    assert await asyncio.wait_for(reader.readline(), 10) == b"named\n"
    await shut(writer)


async def test_tls_server_closing_first(start_backend, start_balancer, certs) -> None:
    backend = tls_backend(start_backend, certs, "reply", "app")
    balancer = start_balancer(tls_upstream([backend.address], certs))
    for i in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"line %d\n" % i)
        assert await asyncio.wait_for(reader.read(), 10) == b"app:line %d\n" % i
        await shut(writer)
    no_tracebacks(balancer)


async def test_pools_hold_handshaken_tls_connections(start_backend, start_balancer, certs) -> None:
    backend = tls_backend(start_backend, certs, "echo", "app")
    config = tls_upstream([backend.address], certs)
    config["upstreams"]["app"]["pool"] = {"size": 2}
    balancer = start_balancer(config)
    port = admin_port(balancer)

    async def idle() -> int:
        status = json.loads(await http_get(port, "/status"))
        return status["upstreams"]["app"]["servers"][0]["pool_idle"]

    await wait_until(idle, lambda n: n == 2)
    for i in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
        writer.write(b"hello %d\n" % i)
        assert await asyncio.wait_for(reader.readline(), 10) == b"hello %d\n" % i
        await shut(writer)
        await wait_until(idle, lambda n: n == 2)
    assert await metric(port, "balancer_pool_requests_total", result="hit") == 3
    no_tracebacks(balancer)


async def test_active_checks_of_a_tls_upstream_do_the_handshake(
        start_backend, start_balancer, certs) -> None:
    good = tls_backend(start_backend, certs, "http", "good")
    bad = tls_backend(start_backend, certs, "http", "bad", ca=certs.other_ca)
    config = tls_upstream([good.address, bad.address], certs)
    config["upstreams"]["app"]["health"] = {
        "max_fails": 0, "check": {"type": "http", "interval": "100ms", "rise": 1, "fall": 1}}
    balancer = start_balancer(config)
    port = admin_port(balancer)

    async def servers() -> dict[str, tuple[str, str]]:
        status = json.loads(await http_get(port, "/status"))
        return {s["address"]: (s["state"], s["reason"])
                for s in status["upstreams"]["app"]["servers"]}

    result = await wait_until(servers, lambda s: s[bad.address][0] == "down")
    assert "tls" in result[bad.address][1]
    # The good one passed as many HTTP checks: they went through its TLS.
    assert result[good.address][0] == "up"



async def test_tls_and_sni_listeners_in_workers(start_backend, start_balancer, certs) -> None:
    """Workers get the certificates inside the config the primary read (not from disk)."""
    backend = start_backend("name", "app")
    api = tls_backend(start_backend, certs, "name", "api", "api.example.com")
    config = terminating([backend.address], [certs.issue("a", "a.example.com")])
    config["listeners"].append({"name": "sni", "bind": "127.0.0.1:0",
                                "sni": {"api.example.com": "api"}})
    config["upstreams"]["api"] = {"servers": [api.address]}
    config["workers"] = 2
    balancer = start_balancer(config)
    balancer.wait_for_line(r"worker 1 started")
    for _ in range(4):
        reader, writer = await tls_open(balancer.ports["test"], certs.client(), "a.example.com")
        assert await asyncio.wait_for(reader.readline(), 10) == b"app\n"
        await shut(writer)
        reader, writer = await tls_open(balancer.ports["sni"], certs.client(), "api.example.com")
        assert await asyncio.wait_for(reader.readline(), 10) == b"api\n"
        await shut(writer)
    no_tracebacks(balancer)

"""PROXY protocol against independent implementations: real nginx behind the balancer reads
what `send_proxy` writes (v1 and v2), and real HAProxy in front writes what `accept_proxy`
reads (`send-proxy-v2`). Skipped, with the reason, where nginx or HAProxy is not installed
(.ci/run installs both)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .utils import free_port, make_config, stop_process

pytestmark = [pytest.mark.timeout(120), pytest.mark.both_loops]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_nginx = pytest.mark.skipif(not Path(NGINX).exists(),
                                 reason="nginx is not installed (apt-get install nginx)")
needs_haproxy = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                   reason="haproxy is not installed (apt-get install haproxy)")


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), __import__("socket").create_connection(
                ("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[int]:
    """nginx answering every request with the client address the PROXY header named."""
    port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "$proxy_protocol_addr:$proxy_protocol_port"; }}
    }}
}}
""")
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, "nginx")
        yield port
    finally:
        stop_process(proc)


@pytest.fixture
def haproxy_in_front(tmp_path: Path) -> Iterator[object]:
    """Start HAProxy (mode tcp) sending `send-proxy-v2` to the balancer on `port`."""
    started: list[subprocess.Popen[bytes]] = []

    def start(balancer_port: int) -> int:
        port = free_port()
        conf = tmp_path / "haproxy.cfg"
        conf.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server lb 127.0.0.1:{balancer_port} send-proxy-v2
""")
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        wait_listening(port, proc, "haproxy")
        return port

    yield start
    for proc in started:
        stop_process(proc)


async def get(port: int, source: str) -> tuple[bytes, int]:
    """GET / from `source`; the response body and our own port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    own_port = writer.get_extra_info("sockname")[1]
    writer.write(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), response
    return body, own_port


@needs_nginx
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_behind_reads_the_client_address(nginx, start_balancer, version):
    balancer = start_balancer(make_config([f"127.0.0.1:{nginx}"], send_proxy=version))
    for source in ("127.0.0.7", "127.0.0.8"):
        body, own_port = await get(balancer.port, source)
        assert body == f"{source}:{own_port}".encode()


@needs_nginx
async def test_nginx_behind_a_pooled_connection(nginx, start_balancer):
    balancer = start_balancer(make_config([f"127.0.0.1:{nginx}"], send_proxy="v2",
                                          pool={"size": 2}))
    for _ in range(3):
        body, own_port = await get(balancer.port, "127.0.0.9")
        assert body == f"127.0.0.9:{own_port}".encode()


@needs_haproxy
@needs_nginx
async def test_haproxy_in_front_names_the_client_all_the_way(nginx, haproxy_in_front,
                                                             start_balancer):
    config = make_config([f"127.0.0.1:{nginx}"], send_proxy="v1")
    config["listeners"][0]["accept_proxy"] = True
    balancer = start_balancer(config)
    front = haproxy_in_front(balancer.port)  # type: ignore[operator]
    body, own_port = await get(front, "127.0.0.7")
    # client (127.0.0.7) -> HAProxy -v2-> balancer -v1-> nginx: nginx sees the client.
    assert body == f"127.0.0.7:{own_port}".encode()

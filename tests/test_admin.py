"""The admin surface against web pages and odd requests, over real HTTP to a real balancer:
cross-origin POSTs, DNS rebinding (foreign Host), a reachable endpoint without a token,
HEAD, URL-encoded paths and the request-head limit."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest

from .utils import (
    admin_port,
    balancer,
    free_port,
    http,
    make_config,
    reload,
    start,
    with_metrics,
    write,
)

pytestmark = pytest.mark.timeout(60)


async def raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is; (status, headers, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


async def state_of(port: int, address: str, upstream: str = "app") -> str:
    status, body = await http(port, path="/status")
    assert status == 200
    servers = json.loads(body)["upstreams"][upstream]["servers"]
    return next(s["state"] for s in servers if s["address"] == address)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_cross_origin_post_does_not_drain(start_backend, start_balancer, workers):
    """Without a token, any page the operator visited could drain a server with a
    `text/plain` form POST (no preflight): the Origin says where it came from."""
    a = start_backend("name", "a")
    balancer = start(start_balancer, with_metrics(make_config([a.address])), workers)
    port = admin_port(balancer)
    drain = f"/servers/app/{a.address}/drain"
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, body = await http(port, "POST", drain, evil)
    assert status == 403 and b"cross-origin POST refused" in body
    for origin in ("null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}",
                   f"http://127.0.0.1.evil.example:{port}"):
        assert (await http(port, "POST", drain, {"Origin": origin}))[0] == 403, origin
    assert await state_of(port, a.address) == "up"

    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        assert (await http(port, "POST", drain, {"Origin": origin}))[0] == 200, origin
    assert (await http(port, "POST", f"/servers/app/{a.address}/enable"))[0] == 200  # curl
    assert await state_of(port, a.address) == "up"


async def test_a_foreign_host_is_refused(start_backend, start_balancer):
    """DNS rebinding: a page on evil.example re-pointed at 127.0.0.1 reads /status with
    `Host: evil.example`; only the endpoint's own addresses and listed names are served."""
    a = start_backend("name", "a")
    balancer = start_balancer(with_metrics(make_config([a.address])))
    port = admin_port(balancer)
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.2:{port}",
                 f"127.0.0.1:{port + 1}", "127.0.0.1:x"):
        status, body = await http(port, path="/status", headers={"Host": host})
        assert status == 403 and b"not this admin endpoint" in body, host
        assert (await http(port, "POST", f"/servers/app/{a.address}/drain",
                           {"Host": host}))[0] == 403, host
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST"):
        assert (await http(port, path="/status", headers={"Host": host}))[0] == 200, host
    # HTTP/1.0 probes send no Host: a browser always does, so this is no rebinding.
    status, _, body = await raw(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert (status, body) == (200, b"ok\n")
    status, _, _ = await raw(port, f"POST /servers/app/{a.address}/drain HTTP/1.0\r\n\r\n"
                             .encode())
    assert status == 403


async def test_allowed_hosts_name_the_endpoint_and_reload(start_backend, start_balancer):
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]), allowed_hosts=["lb.internal", "[::1]"])
    balancer = start_balancer(config)
    port = admin_port(balancer)
    assert (await http(port, path="/metrics", headers={"Host": f"lb.internal:{port}"}))[0] == 200
    assert (await http(port, path="/metrics", headers={"Host": f"[::1]:{port}"}))[0] == 200
    assert (await http(port, path="/metrics", headers={"Host": f"lb2.internal:{port}"}))[0] \
        == 403
    drain = f"/servers/app/{a.address}/drain"
    assert (await http(port, "POST", drain, {"Host": f"lb.internal:{port}",
                                             "Origin": f"http://lb.internal:{port}"}))[0] == 200

    config["metrics"]["allowed_hosts"] = ["lb2.internal"]
    reload(balancer, config)
    assert (await http(port, path="/metrics", headers={"Host": f"lb2.internal:{port}"}))[0] \
        == 200
    assert (await http(port, path="/metrics", headers={"Host": f"lb.internal:{port}"}))[0] \
        == 403


async def test_a_reachable_endpoint_without_a_token_serves_no_posts(start_backend,
                                                                    start_balancer):
    """`metrics.bind: 0.0.0.0` and no token: anyone on the network could drain servers."""
    a = start_backend("name", "a")
    balancer = start_balancer(with_metrics(make_config([a.address]), bind="0.0.0.0:0"))
    port = admin_port(balancer)
    balancer.wait_for_line(r"WARNING .*metrics\.bind: 0\.0\.0\.0:0 is reachable beyond this "
                           r"machine and no metrics\.admin_token is set: the drain/enable "
                           r"POST endpoints are disabled")
    status, body = await http(port, "POST", f"/servers/app/{a.address}/drain")
    assert status == 403 and b"admin POSTs are disabled" in body
    assert await state_of(port, a.address) == "up"
    assert (await http(port, path="/healthz"))[0] == 200  # reads still work


async def test_a_reachable_endpoint_with_a_token_serves_posts(start_backend, start_balancer):
    a = start_backend("name", "a")
    config = with_metrics(make_config([a.address]), bind="0.0.0.0:0", admin_token="t")
    balancer = start_balancer(config)
    port = admin_port(balancer)
    status, _ = await http(port, "POST", f"/servers/app/{a.address}/drain",
                           {"Authorization": "Bearer t"})
    assert status == 200
    assert not [line for line in balancer.lines if "reachable beyond" in line]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/status", "/", "/nope"])
async def test_head_answers_as_get_without_a_body(start_backend, start_balancer, path):
    a = start_backend("name", "a")
    balancer = start_balancer(with_metrics(make_config([a.address])))
    port = admin_port(balancer)
    request = f"{{}} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
    get_status, get_headers, get_body = await raw(port, request.format("GET").encode())
    status, headers, body = await raw(port, request.format("HEAD").encode())
    assert (status, body) == (get_status, b"")
    assert headers["content-type"] == get_headers["content-type"]
    if path not in ("/metrics", "/status"):  # these change between two requests
        assert headers["content-length"] == str(len(get_body))
    else:
        assert int(headers["content-length"]) > 0


async def test_paths_are_url_decoded(start_backend, start_balancer):
    """An IPv6 server and an upstream name with a space, a slash and a non-ASCII letter can
    be drained: browsers and curl encode them."""
    a = start_backend("name", "a")
    name = "web v2/ü"
    config = with_metrics(make_config([a.address, "[::1]:9"]))
    config["upstreams"] = {name: config["upstreams"]["app"]}
    config["listeners"][0]["upstream"] = name
    balancer = start_balancer(config)
    port = admin_port(balancer)
    encoded = quote(name, safe="")
    assert encoded == "web%20v2%2F%C3%BC"
    status, body = await http(port, "POST", f"/servers/{encoded}/%5B%3A%3A1%5D%3A9/drain")
    assert status == 200 and json.loads(body)["state"] == "draining", body
    status, body = await http(port, "POST", f"/servers/{encoded}/[::1]:9/enable")
    assert status == 200 and json.loads(body)["state"] == "up", body
    status, body = await http(port, "POST", f"/servers/{encoded}/{quote(a.address)}/drain/")
    assert status == 200, body
    assert await state_of(port, a.address, name) == "draining"
    assert (await http(port, path="/st%61tus"))[0] == 200


async def test_a_request_head_over_16_kib_is_refused(start_backend, start_balancer):
    a = start_backend("name", "a")
    balancer = start_balancer(with_metrics(make_config([a.address])))
    port = admin_port(balancer)
    filler = "X-Filler: " + "f" * (20 * 1024) + "\r\n"
    status, _, body = await raw(
        port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{filler}\r\n".encode())
    assert status == 431 and b"over 16384 bytes" in body
    assert (await http(port, path="/healthz"))[0] == 200


def test_check_warns_about_a_reachable_endpoint_without_a_token(tmp_path):

    config = with_metrics(make_config(["127.0.0.1:3001"]), bind=f"0.0.0.0:{free_port()}")
    result = balancer("check", "-c", write(tmp_path, config))
    assert result.returncode == 0 and result.stdout == "configuration ok\n"
    assert result.stderr.startswith("warning: metrics.bind: 0.0.0.0:")
    assert "the drain/enable POST endpoints are disabled" in result.stderr
    config["metrics"]["admin_token"] = "t"
    result = balancer("check", "-c", write(tmp_path, config))
    assert result.returncode == 0 and result.stderr == ""

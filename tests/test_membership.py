"""Servers found at run time join and leave a running balancer as a reload would have them.

The balancer runs in this test's own process (a `Balancer` with the `Membership` the CLI gives
it), against real backend processes and real client sockets: the sources that feed it (DNS
discovery, managed instances) have tests of their own, end to end.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from balancer.config import Address, ServerConfig, parse_config
from balancer.membership import Membership
from balancer.server import Balancer, applier

from .utils import eventually, make_config, who_answers

pytestmark = pytest.mark.filterwarnings("error")


def found(backend, source: str = "test") -> ServerConfig:
    host, port = backend.address.rsplit(":", 1)
    return ServerConfig(Address(host, int(port)), source=source)


@pytest.fixture
async def running(start_backend):
    """A one-process balancer with one static server `a`, and its membership, live."""
    static = start_backend("name", "a")
    raw = make_config([static.address])
    raw["shutdown_timeout"] = "30s"
    config = parse_config(raw)
    balancer = Balancer(config)
    membership = Membership(config, applier(balancer), balancer.server_active)
    await membership.start()
    balancer.config = membership.effective()
    await balancer.start()
    membership.go_live()
    try:
        yield balancer, membership
    finally:
        await balancer.shutdown(timeout=1)
        await membership.stop()


def keys(balancer: Balancer) -> list[str]:
    return [server.key for server in balancer.upstreams["app"].servers]


async def test_found_servers_join_and_leave_keeping_the_ones_that_stay(
        running, start_backend, caplog):
    balancer, membership = running
    port = balancer.listeners[0].address()[1]
    b, c = start_backend("name", "b"), start_backend("name", "c")
    static = balancer.upstreams["app"].servers[0]
    caplog.set_level(logging.INFO, "balancer.membership")

    membership.update("app", "dns test", [found(b), found(c)])
    await eventually(lambda: len(keys(balancer)) == 3)
    assert f"upstream app: +{found(b).key} +{found(c).key} (dns test)" in caplog.text
    assert {await who_answers(port) for _ in range(6)} == {"a", "b", "c"}
    assert balancer.upstreams["app"].servers[0] is static  # the file's server was kept as is
    assert [s.config.source for s in balancer.upstreams["app"].servers] == [
        "static", "test", "test"]

    # c leaves while a client is connected through it: that client goes on, nobody new
    # reaches c, and the membership counts the connection until it ends.
    held = []
    for _ in range(6):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        name = (await reader.readline()).decode().strip()
        if name == "c":
            held = [reader, writer]
            break
        writer.close()
    assert held, "round robin never reached c"
    kept_b = balancer.upstreams["app"].servers[1]
    membership.update("app", "dns test", [found(b)])
    await eventually(lambda: len(keys(balancer)) == 2)
    assert f"upstream app: -{found(c).key} (dns test)" in caplog.text
    assert balancer.upstreams["app"].servers[1] is kept_b
    assert membership.active("app", found(c).key) == 1
    assert {await who_answers(port) for _ in range(6)} == {"a", "b"}
    reader, writer = held
    writer.write(b"still here\n")
    assert await reader.readline() == b"still here\n"
    writer.close()
    await eventually(lambda: membership.active("app", found(c).key) == 0)


async def test_a_burst_of_updates_is_applied_once_from_the_latest_state(
        running, start_backend, caplog):
    balancer, membership = running
    b, c = start_backend("name", "b"), start_backend("name", "c")
    caplog.set_level(logging.INFO, "balancer.server")
    for servers in ([found(b)], [found(b), found(c)], [found(c)]):
        membership.update("app", "dns test", servers)
    await membership.settled()
    assert keys(balancer)[1:] == [found(c).key]
    assert caplog.text.count("configuration reloaded") == 1


async def test_a_found_address_the_file_names_is_left_to_the_file(
        running, start_backend, caplog):
    balancer, membership = running
    static = balancer.upstreams["app"].servers[0]
    duplicate = ServerConfig(static.config.address, weight=7, source="test")
    b = start_backend("name", "b")
    caplog.set_level(logging.INFO, "balancer.membership")
    membership.update("app", "dns test", [duplicate, found(b)])
    await eventually(lambda: len(keys(balancer)) == 2)
    assert balancer.upstreams["app"].servers[0].config.weight == 1
    # The log tells what changed: the file's server neither joined nor, below, left.
    membership.update("app", "dns test", [found(b)])
    membership.update("app", "dns test", [])
    await membership.settled()
    lines = [r.getMessage() for r in caplog.records if r.name == "balancer.membership"]
    assert lines == [f"upstream app: +{found(b).key} (dns test)",
                     f"upstream app: -{found(b).key} (dns test)"]
    assert keys(balancer) == [static.key]


async def test_a_file_reload_keeps_what_was_found(running, start_backend, tmp_path):
    balancer, membership = running
    b, d = start_backend("name", "b"), start_backend("name", "d")
    membership.update("app", "dns test", [found(b)])
    await eventually(lambda: len(keys(balancer)) == 2)
    raw = make_config([d.address])
    raw["shutdown_timeout"] = "30s"
    assert await membership.reload(parse_config(raw))
    assert keys(balancer) == [found(d).key, found(b).key]
    assert membership.config.upstreams["app"].servers[0].key == found(d).key

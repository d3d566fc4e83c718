"""Listener socket options: `defer_accept` (TCP_DEFER_ACCEPT)."""

from __future__ import annotations

import asyncio

import pytest

from .utils import make_config

pytestmark = [pytest.mark.both_loops, pytest.mark.timeout(60)]


async def first_line(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    try:
        return await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return None


@pytest.mark.parametrize("defer", [False, True])
async def test_defer_accept_waits_for_the_clients_first_bytes(start_backend, start_balancer,
                                                              defer: bool) -> None:
    # A "name" backend speaks first, as soon as the balancer connects to it, which the
    # balancer does once it has accepted the client. With defer_accept the kernel keeps the
    # silent client from the balancer (for about a second: DEFER_ACCEPT_SECONDS), so nothing
    # comes back until the client has spoken; without it the name arrives at once.
    backend = start_backend("name", "a")
    config = make_config([backend.address])
    config["listeners"][0]["defer_accept"] = defer
    balancer = start_balancer(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", balancer.port)
    try:
        early = await first_line(reader, 0.5 if defer else 5.0)
        if defer:
            assert early is None
            writer.write(b"hello\n")
            assert await first_line(reader, 5.0) == b"a\n"
        else:
            assert early == b"a\n"
            writer.write(b"hello\n")
        assert await first_line(reader, 5.0) == b"hello\n"  # and the bytes flow both ways
    finally:
        writer.close()
        await writer.wait_closed()


def test_defer_accept_must_be_a_boolean(tmp_path) -> None:
    from balancer.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("listeners: [{bind: '127.0.0.1:0', upstream: app, defer_accept: 3}]\n"
                    "upstreams: {app: {servers: ['127.0.0.1:1']}}\n")
    with pytest.raises(ConfigError, match=r"listeners\[0\]\.defer_accept"):
        load_config(path)

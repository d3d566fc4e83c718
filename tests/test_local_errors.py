"""Errors that are ours, not the server's: running out of descriptors, abandoned connects.

A balancer out of file descriptors must not blame (and eject) a healthy server; a connect it
gives up on must leave nothing behind on either event loop.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from .utils import admin_port, blackhole, eventually, http, make_config, scrape, total, with_metrics

pytestmark = [pytest.mark.timeout(180), pytest.mark.both_loops]

# The stdlib loop reports a failed accept() itself (the listener side of the same storm), and
# its retry one second later fails once more if the listener was closed meanwhile (at stop).
ACCEPT_OUT_OF_FDS = [r"socket.accept\(\) out of system resource",
                     r"Exception in callback BaseSelectorEventLoop._start_serving"]


async def echo_once(port: int, payload: bytes) -> bytes:
    """Send `payload` and our FIN; what came back (b"" when the balancer closed on us)."""
    # No timeout around the connect itself: the kernel completes it from the listen backlog
    # at once, and a wait_for() that fires just as it completes would drop the open socket.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except OSError:  # reset, or not connected any more
        return b""
    finally:
        writer.close()


async def _hold_one(port: int, held: list[asyncio.StreamWriter]) -> bool:
    """Connect, send a line, keep the connection open: True if it was echoed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    held.append(writer)
    writer.write(b"ping\n")
    try:
        return await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
    except (OSError, TimeoutError):
        return False


async def test_running_out_of_descriptors_never_ejects_a_healthy_server(
    start_backend, start_balancer
):
    """Under a low fd limit a storm of held connections makes the upstream `socket()` fail
    with EMFILE. That is counted as reason `local`, closes only those clients, and leaves
    the server up: right after the storm every client is served again."""
    backend = start_backend("echo", "e")
    # Generous connect timeouts: on a failed accept() the stdlib loop logs a traceback for
    # each remaining slot of its accept batch (the accept side is the listener's business),
    # which can stall its loop for seconds on a loaded machine; a connect timing out then
    # would be a real failure of the server's, and this test is about local ones.
    config = with_metrics(make_config(
        [backend.address], health={"max_fails": 1, "fail_timeout": "60s"},
        timeouts={"connect": "20s"}, retries={"tries": 2, "timeout": "30s"}))
    balancer = start_balancer(config, nofile=48, expect_log=ACCEPT_OUT_OF_FDS)
    port = admin_port(balancer)
    baseline = balancer.fd_count()
    # Each held client costs two descriptors, so whether an accept takes the very last one
    # (and the upstream socket() then fails) depends on the parity of what else is open: a
    # second storm with one more descriptor held (an admin connection) covers both parities.
    _, parity = await asyncio.open_connection("127.0.0.1", port)
    for storm in range(2):
        held: list[asyncio.StreamWriter] = []
        try:
            results = await asyncio.gather(*(_hold_one(balancer.port, held) for _ in range(60)))
            served = sum(results)
            assert served < 60, served  # the limit was reached
        finally:
            for writer in held:
                writer.close()
        if storm == 0:
            parity.close()
        await eventually(lambda: balancer.fd_count() <= baseline, timeout=30)
        served_after = 0
        for i in range(20):  # right after the storm: no ejection, no "no server"
            payload = b"after %d\n" % i
            served_after += await echo_once(balancer.port, payload) == payload
        assert served_after == 20
    samples = await scrape(port)
    errors = "balancer_connection_errors_total"
    assert total(samples, errors, server=backend.address, reason="local") > 0
    for reason in ("refused", "timeout", "reset", "no_server"):
        assert total(samples, errors, reason=reason) == 0, reason
    status, body = await http(port, path="/status")
    assert status == 200
    server = json.loads(body)["upstreams"]["app"]["servers"][0]
    assert server["state"] == "up"
    assert server["failures"] == 0


async def test_abandoned_connects_leave_nothing_behind(start_backend, start_balancer):
    """Hundreds of connects timed out against a server that never accepts: none may log a
    never-retrieved exception (uvloop) or leave its descriptor in the selector, where a later
    connect reusing the number would never hear back (the stdlib loop). Afterwards a good
    server answers at once and the descriptor count is back to where it was."""
    hole = blackhole()
    good = start_backend("echo", "good")
    try:
        hole_address = f"127.0.0.1:{hole[0].getsockname()[1]}"
        config = make_config([hole_address, good.address], "round_robin",
                             health={"max_fails": 0}, timeouts={"connect": "50ms"},
                             retries={"tries": 1, "timeout": "1s"})
        balancer = start_balancer(config)
        baseline = balancer.fd_count()
        for _ in range(10):  # 10 rounds x 30 clients: half time out on the hole
            replies = await asyncio.gather(
                *(echo_once(balancer.port, b"x%d" % i) for i in range(30)),
                return_exceptions=True)
            good_ones = [r for r in replies if isinstance(r, bytes) and r.startswith(b"x")]
            assert len(good_ones) >= 10
        answered = 0
        for i in range(20):  # round robin: every other client goes to the good server...
            payload = b"late %d" % i
            answered += await asyncio.wait_for(echo_once(balancer.port, payload), 2) == payload
        assert answered == 10  # ...and each of those connects completes (none hangs)
        await eventually(lambda: balancer.fd_count() <= baseline, timeout=10)
        assert balancer.alive()
    finally:
        for sock in hole:
            sock.close()


@pytest.mark.parametrize("reason", ["local", "internal"])
def test_our_own_failures_never_count_against_a_server(reason):
    """`local` (out of descriptors or ports) and `internal` (a bug on our connect path) say
    nothing about the server: with max_fails 1 a single such failure must not eject it, where
    one `refused` does."""
    from balancer.config import Address, HealthConfig, ServerConfig
    from balancer.upstream import Server

    server = Server(ServerConfig(Address("127.0.0.1", 1)), "app", HealthConfig(max_fails=1))
    server.connect_failed(reason)
    assert server.health.state == "up" and server.failures == 0
    server.connect_failed("refused")
    assert server.health.state == "down"


def test_local_resource_errnos_are_classified_local():
    import errno

    from balancer.health import failure_reason

    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL):
        assert failure_reason(OSError(code, "x")) == "local"
    assert failure_reason(ConnectionRefusedError()) == "refused"
    assert failure_reason(ConnectionResetError()) == "reset"

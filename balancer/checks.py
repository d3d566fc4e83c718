"""Active health checks: probe every server on its own schedule, independent of traffic.

Each server gets one task that probes it every `interval` (with +-10% jitter so checks of
many servers, or many workers, do not arrive in lock step). `rise` consecutive passes mark it
up and `fall` consecutive failures mark it down, through `ServerHealth.set_active`. Probes are
off the data path: they share the loop but never block it, and a slow server only delays
its own check (bounded by `timeout`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from .config import Address, CheckConfig
from .health import failure_reason
from .proxyproto import LOCAL_HEADERS

if TYPE_CHECKING:
    from .upstream import Server

log = logging.getLogger("balancer.checks")

MAX_STATUS_LINE = 1024


class ActiveChecker:
    """The active checks of one upstream's servers."""

    def __init__(self, servers: list[Server], check: CheckConfig) -> None:
        self.servers = servers
        self.check = check
        self._tasks: list[asyncio.Task[None]] = []
        self._random = random.Random()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(server)) for server in self.servers]

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    async def _run(self, server: Server) -> None:
        check = self.check
        passes = fails = 0
        failing = False  # the last round raised: its error was logged, do not repeat it
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self._random.uniform(0, check.interval))  # spread the first round
        while True:
            try:
                began = loop.time()
                ok, detail = await self.probe(server)
                server.stats.note_check(detail, loop.time() - began)  # for /status
                if detail == "local":
                    pass  # we ran out of descriptors or ports: no verdict on the server
                elif ok:
                    passes, fails = passes + 1, 0
                    if passes >= check.rise:
                        server.health.set_active(True, f"{passes} active checks passed")
                else:
                    passes, fails = 0, fails + 1
                    if fails >= check.fall:
                        server.health.set_active(
                            False, f"{fails} active checks failed (last: {detail})"
                        )
                failing = False
            except Exception:
                # A bug must not end this server's checks for good and freeze it in its last
                # state: log it once, then keep checking on schedule.
                if not failing:
                    log.exception("active check of %s/%s raised; checks continue",
                                  server.upstream_name, server.key)
                failing = True
            await asyncio.sleep(check.interval * self._random.uniform(0.9, 1.1))

    async def probe(self, server: Server) -> tuple[bool, str]:
        """One check: a TCP connect, or an HTTP GET expecting a 2xx or 3xx status."""
        try:
            return await probe_address(server.config.address, self.check, server.tls,
                                       server.proxy_version)
        except Exception as exc:
            # Anything else the server provoked (e.g. ValueError from readline() on a line
            # longer than the StreamReader limit) is a failed check too, not a dead checker.
            log.debug("active check of %s/%s failed: %r", server.upstream_name, server.key, exc)
            return False, f"probe error ({type(exc).__name__})"


async def probe_address(address: Address, check: CheckConfig, tls: Any = None,
                        proxy_version: str | None = None) -> tuple[bool, str]:
    """One check of `address` (also an app instance's readiness check, apps.py)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            # A TLS upstream's check includes the handshake.
            reader, writer = await asyncio.open_connection(
                address.host, address.port, ssl=tls.context if tls else None,
                server_hostname=tls.server_hostname if tls else None)
            if proxy_version is not None:  # a server that requires the header
                writer.write(LOCAL_HEADERS[proxy_version])
            if check.type == "tcp":
                return True, "connected"
            request = (
                f"GET {check.path} HTTP/1.0\r\nHost: {address}\r\n"
                "User-Agent: balancer-health-check\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode())
            status_line = await reader.readline()
    except (OSError, TimeoutError) as exc:
        return False, failure_reason(exc)
    finally:
        if writer is not None:
            writer.close()
    return _status_ok(status_line[:MAX_STATUS_LINE])


def _status_ok(status_line: bytes) -> tuple[bool, str]:
    """Parse `HTTP/1.x NNN reason`: 2xx and 3xx pass."""
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    return 200 <= status < 400, f"HTTP {status}"

"""The admin endpoint on `metrics.bind`: metrics, health, status, and server drain/enable.

A deliberately small HTTP/1.1 server (one request per connection) on its own listener: it is
off the data path, and a scrape only reads state the data path already keeps.

    GET  /metrics                         Prometheus text format (prometheus-client)
    GET  /healthz                         200 "ok", or 503 naming the listener with no server
    GET  /status[?history=1]              JSON: listeners, upstreams, servers, workers, with
                                          totals and rates (status.py); history=1 adds the
                                          5-minute samples of every server
    GET  /                                the HTML status page (refreshes from /status)
    POST /servers/{upstream}/{address}/drain | enable
                                          no new connections for a server / back in rotation
    POST /upstreams/{upstream}/rollout    replace the upstream's app instances one at a time
                                          (202; 409 when one is running; see apps.py)

POST endpoints need `Authorization: Bearer <metrics.admin_token>` when a token is set, and
are off when the endpoint is reachable beyond this machine without one. HEAD works wherever
GET does; path segments are URL-decoded (`%5B%3A%3A1%5D%3A80` is `[::1]:80`).

Web pages the operator visits must not be able to use it: a request whose `Host` is not an
address of the endpoint (or a name in `metrics.allowed_hosts`) is refused, which defeats DNS
rebinding, and a POST must come from the endpoint itself (its `Origin`, or without one its
`Host`), so a cross-origin form cannot drain a server.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .appsource import app_source
from .config import Address, MetricsConfig, is_loopback, metrics_warnings
from .history import History
from .status import balancer_status, readings, server_status

if TYPE_CHECKING:
    from .server import Balancer

__all__ = ["AdminServer", "balancer_status", "health_problems", "server_status"]

log = logging.getLogger("balancer.admin")

MAX_REQUEST_HEAD = 16 * 1024  # the request line and headers; longer gets 431
REQUEST_TIMEOUT = 5.0
REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}
Response = tuple[int, str, bytes]  # status, content type, body


def health_problems(balancer: Balancer) -> list[str]:
    """Listeners that have no server able to take a connection now."""
    problems = []
    for listener in balancer.listeners:
        for name in listener.config.upstreams:
            upstream = balancer.upstreams[name]
            if not any(s.up and not s.draining for s in upstream.servers):
                problems.append(
                    f"listener {listener.name}: no server up in upstream {upstream.name}")
    return problems


class AdminBindError(OSError):
    """The admin endpoint cannot listen on `metrics.bind` (at start, or for a reload)."""


class AdminServer:
    """Serves the admin endpoints for one balancer (or, with workers, for the primary)."""

    def __init__(
        self,
        balancer: Balancer,
        settings: MetricsConfig,
        render_metrics: Callable[[], bytes] | None = None,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.balancer = balancer
        self.settings = settings
        self.token = settings.admin_token
        self.render_metrics = render_metrics or generate_latest
        # Awaited before a /metrics answer is rendered (the primary: the workers' flushes).
        self.before_scrape = before_scrape
        self.server: asyncio.Server | None = None
        # The last minutes of every server, sampled each second while this endpoint runs.
        self.history = History(lambda: readings(self.balancer))

    async def start(self) -> None:
        bind = self.settings.bind
        try:
            self.server = await asyncio.start_server(self._handle, bind.host, bind.port,
                                                     limit=MAX_REQUEST_HEAD)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise AdminBindError(f"metrics.bind: cannot listen on {bind}: {reason}") from None
        bound = Address(*self.server.sockets[0].getsockname()[:2])
        log.info("admin endpoint on http://%s/ (metrics, status)", bound)
        self._warn()
        self.history.start()

    def configure(self, settings: MetricsConfig) -> None:
        """Apply reloaded settings that need no new socket (the token: at once)."""
        warned = self.settings.posts_disabled
        self.settings = settings
        self.token = settings.admin_token
        if settings.posts_disabled and not warned:
            self._warn()

    def _warn(self) -> None:
        for warning in metrics_warnings(self.settings):
            log.warning("%s", warning)

    async def rebound(self, settings: MetricsConfig) -> AdminServer:
        """The admin server a reload to `settings` needs: this one when the bind stays, else
        a new one, already listening (AdminBindError: this one keeps serving, untouched)."""
        if settings.bind == self.settings.bind:
            return self
        new = AdminServer(self.balancer, settings, self.render_metrics, self.before_scrape)
        await new.start()
        return new

    async def replace_by(self, new: AdminServer, settings: MetricsConfig) -> None:
        """Commit a reload: `new` (from `rebound`) takes over and this one closes if it is
        not the same."""
        new.configure(settings)
        if new is not self:
            new.history.stop()  # the samples stay with the balancer, not with the socket
            new.history = self.history
            await self.stop(keep_history=True)
            log.info("admin endpoint moved from %s to %s", self.settings.bind, settings.bind)

    def address(self) -> tuple[str, int]:
        assert self.server is not None
        sockname = self.server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def stop(self, keep_history: bool = False) -> None:
        if not keep_history:
            self.history.stop()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            head_only = head.startswith(b"HEAD ")
            if self.before_scrape is not None and _target(head) == b"/metrics":
                await self.before_scrape()
            status, content_type, body = self.respond(head, writer.get_extra_info("sockname"))
        except asyncio.LimitOverrunError:
            status, content_type, body = _text(431, f"request head over {MAX_REQUEST_HEAD} "
                                                    "bytes\n")
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            writer.close()
            return
        header = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'OK')}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(header.encode() + (b"" if head_only else body))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def respond(self, head: bytes, local: tuple[Any, ...]) -> Response:
        """Route one request head, received on the socket address `local`, to its answer.
        HEAD is answered as GET (the caller leaves the body out)."""
        try:
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
        except ValueError:
            return _text(400, "bad request\n")
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(":") for line in header_lines if line)
        )
        endpoint = Endpoint(self.settings, local)
        host = headers.get("host")
        if host is not None and not endpoint.names(host):
            return _text(403, f"host {host[:100]!r} is not this admin endpoint (list the names "
                              "it is reached by in metrics.allowed_hosts)\n")
        path, _, query = target.partition("?")
        if method in ("GET", "HEAD"):
            return self._get(unquote(path), "history=1" in query.split("&"))
        if method == "POST":
            refused = endpoint.refuse_post(headers.get("origin"), host)
            if refused:
                return _text(403, refused + "\n")
            return self._post(path, headers.get("authorization", ""))
        return _text(405, "method not allowed\n")

    def _get(self, path: str, with_history: bool = False) -> Response:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.render_metrics()
        if path == "/healthz":
            problems = health_problems(self.balancer)
            return _text(503, "\n".join(problems) + "\n") if problems else _text(200, "ok\n")
        if path == "/status":
            status = balancer_status(self.balancer, self.history, with_history)
            body = json.dumps(status, indent=None if with_history else 1).encode()
            return 200, "application/json", body
        if path in ("/", "/index.html"):
            page = resources.files("balancer").joinpath("static/status.html").read_bytes()
            return 200, "text/html; charset=utf-8", page
        return _text(404, "not found\n")

    def _post(self, path: str, authorization: str) -> Response:
        if self.settings.posts_disabled:
            return _text(403, "admin POSTs are disabled: metrics.bind is reachable beyond this "
                              "machine and no metrics.admin_token is set\n")
        if self.token is not None:
            expected = f"Bearer {self.token}"
            if not hmac.compare_digest(authorization.encode(), expected.encode()):
                return _text(401, "missing or wrong bearer token\n")
        # Split before decoding: an upstream name may hold an encoded "/" (%2F).
        parts = [unquote(part) for part in path.split("/")[1:]]
        if parts and not parts[-1]:
            parts.pop()  # a trailing slash
        if len(parts) == 3 and parts[0] == "upstreams" and parts[2] == "rollout":
            return self._rollout(parts[1])
        if len(parts) != 4 or parts[0] != "servers" or parts[3] not in ("drain", "enable"):
            return _text(404, "not found: use POST /servers/{upstream}/{address}/drain|enable "
                              "or /upstreams/{upstream}/rollout\n")
        _, upstream_name, address, action = parts
        upstream = self.balancer.upstreams.get(upstream_name)
        server = None
        if upstream is not None:
            server = next((s for s in upstream.servers if s.key == address), None)
        if server is None:
            return _text(404, f"no server {upstream_name}/{address}\n")
        self.balancer.set_draining(upstream_name, address, action == "drain")
        return 200, "application/json", json.dumps(server_status(server)).encode()


    def _rollout(self, upstream: str) -> Response:
        apps = app_source(self.balancer)
        if apps is None:
            code, body = 404, {"error": f"upstream {upstream!r} runs no instances (no run "
                                        "section)"}
        else:
            code, body = apps.rollout(upstream)
        return code, "application/json", json.dumps(body).encode()


def _target(head: bytes) -> bytes:
    """The path a request head asks for (undecoded, without the query)."""
    parts = head.split(b" ", 2)
    return parts[1].partition(b"?")[0] if len(parts) > 2 else b""


def _text(status: int, text: str) -> Response:
    return status, "text/plain; charset=utf-8", text.encode()


class Endpoint:
    """Who this admin endpoint is, for one connection: the address it was reached on (a
    wildcard bind answers on every address of the machine), its configured host, `localhost`
    when that address is loopback, and the operator's `metrics.allowed_hosts`."""

    def __init__(self, settings: MetricsConfig, local: tuple[Any, ...]) -> None:
        address = ipaddress.ip_address(local[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        self.port: int = local[1]
        self.hosts = {address.compressed, settings.bind.host.lower(), *settings.allowed_hosts}
        if address.is_loopback or is_loopback(settings.bind.host):
            self.hosts.add("localhost")

    def names(self, host: str) -> bool:
        """Whether a Host header (``name``, ``name:port``, ``[v6]:port``) is this endpoint."""
        name, port = _split_host(host)
        return name in self.hosts and port in (None, self.port)

    def refuse_post(self, origin: str | None, host: str | None) -> str | None:
        """Why a POST is refused, or None: it must come from the endpoint's own pages."""
        if origin is None:
            return None if host is not None else "a POST needs an Origin or Host header"
        if not self._is_origin(origin):
            return f"cross-origin POST refused: {origin[:100]!r} is not this admin endpoint"
        return None

    def _is_origin(self, origin: str) -> bool:
        try:
            parts = urlsplit(origin)
            port = parts.port if parts.port is not None else 80
        except ValueError:  # a malformed URL or port ("null" parses, and fails below)
            return False
        name = parts.hostname
        if parts.scheme != "http" or not name or port != self.port:
            return False
        return self.names(f"[{name}]" if ":" in name else name)


def _split_host(host: str) -> tuple[str, int | None]:
    """(lowercase name without brackets or trailing dot, port or None) of a Host value."""
    host = host.strip().lower()
    port: int | None = None
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii():
            port = int(rest[1:])
        elif rest:
            return "", -1
        try:
            return ipaddress.IPv6Address(name).compressed, port
        except ValueError:
            return "", -1
    name, sep, port_text = host.rpartition(":")
    if not sep:
        return host.rstrip("."), None
    if not (port_text.isdigit() and port_text.isascii()):
        return "", -1
    return name.rstrip("."), int(port_text)

"""The access log: one line per finished client connection, as text or JSON.

Installed only when `log.access` is on, so a balancer without it formats nothing. Lines go
through the `balancer.access` logger at INFO, to stderr or to a file of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING

from .config import Address, LogConfig
from .events import ConnectionEvents

if TYPE_CHECKING:
    from .proxy import ClientConnection

ACCESS_LOGGER = "balancer.access"


class AccessLog(ConnectionEvents):
    """Writes one line per closed connection."""

    def __init__(self, config: LogConfig) -> None:
        self.json = config.format == "json"
        self.logger = logging.getLogger(ACCESS_LOGGER)
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        for old in list(self.logger.handlers):
            self.logger.removeHandler(old)
            old.close()
        handler: logging.Handler
        if config.access in (None, "stderr"):
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.FileHandler(config.access)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self.logger.addHandler(handler)

    def closed(self, conn: ClientConnection) -> None:
        self.logger.info(format_line(conn, self.json))

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            self.logger.removeHandler(handler)
            handler.close()


def format_line(conn: ClientConnection, as_json: bool) -> str:
    """The fields an operator needs to find one connection again."""
    source = conn.source  # the client a PROXY header named, else the socket's peer
    peer = (source[:2] if source is not None
            else conn.transport.get_extra_info("peername") if conn.transport else None)
    fields = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "listener": conn.route.listener_name,
        "client": str(Address(peer[0], peer[1])) if peer else conn.client_ip,
        "upstream": conn.route.upstream.name,
        "server": conn.server.key if conn.server is not None else "-",
        "bytes_up": conn.bytes_up,
        "bytes_down": conn.bytes_down,
        "duration_ms": round((conn.clock() - conn.started) * 1000, 1),
        "outcome": conn.outcome,
    }
    # Connections of TLS and SNI listeners say what the client asked for.
    sni = getattr(conn, "sni", False)
    if sni is not False:
        fields["sni"] = sni or "-"
        alpn = getattr(conn, "alpn", False)
        if alpn is not False:
            fields["alpn"] = alpn or "-"
    if as_json:
        return json.dumps(fields, separators=(",", ":"))
    line = (
        "{time} {listener} {client} -> {upstream}/{server} up={bytes_up} "
        "down={bytes_down} {duration_ms}ms {outcome}".format(**fields)
    )
    if "sni" in fields:
        line += f" sni={fields['sni']}"
        if "alpn" in fields:
            line += f" alpn={fields['alpn']}"
    return line

"""The DNS discovery parts of the configuration: the top-level `resolvers` section and the
`discover:` server items of an upstream.

Part of config.py (which re-exports the dataclasses), kept apart to keep each module small.
Nothing here resolves a name: `balancer check` validates the syntax only, and discovery.py
does the lookups at run time.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ._validate import Section, as_list, describe, host_name, item, shown, split_host_port

RESOLVERS_KEYS = ("nameservers", "interval", "timeout", "hold")
DNS_PORT = 53
MAX_NAMESERVERS = 8  # more is a mistake (resolv.conf allows 3); each costs a query when down


@dataclass(frozen=True)
class ResolversConfig:
    """Where and how often discovered names are looked up."""

    nameservers: tuple[tuple[str, int], ...] = ()  # (host, port); empty: /etc/resolv.conf
    interval: float = 5.0  # every discovered name is re-resolved this often
    timeout: float = 1.0  # per query
    hold: float = 30.0  # while lookups fail (or answer nothing), keep the last good answer


@dataclass(frozen=True)
class DiscoverConfig:
    """One `discover:` item: a name whose answer becomes servers of its upstream.

    A name that starts with ``_`` is an SRV name (HAProxy's rule): its records give target,
    port and weight. Any other is looked up as A and AAAA, each address a server on `port`.
    The other keys are those of a static server and apply to every server found."""

    name: str  # lowercase, without the trailing dot
    port: int | None  # None for an SRV name
    weight: int = 1  # A/AAAA only: SRV records carry their own
    max_conns: int = 0
    backup: bool = False
    send_proxy: str | None = None

    @property
    def srv(self) -> bool:
        return self.port is None

    @property
    def source(self) -> str:
        """How the servers it finds were found: `dns NAME`, in logs and /status."""
        return f"dns {self.name}"


def resolvers(top: Section) -> ResolversConfig:
    """The `resolvers` section; absent means the defaults and the system's resolv.conf."""
    default = ResolversConfig()
    section = top.sub("resolvers", RESOLVERS_KEYS)
    return ResolversConfig(
        nameservers=_nameservers(section),
        interval=section.duration("interval", default.interval, positive=True),
        timeout=section.duration("timeout", default.timeout, positive=True),
        hold=section.duration("hold", default.hold),
    )


def _nameservers(section: Section) -> tuple[tuple[str, int], ...]:
    value = section.get("nameservers")
    if value is None:
        return ()
    items = as_list(value, section.at("nameservers"), section.problems)
    if items is None:
        return ()
    if not items:
        section.fail("nameservers", "must not be empty (omit it to use /etc/resolv.conf)")
    if len(items) > MAX_NAMESERVERS:
        section.fail("nameservers", f"at most {MAX_NAMESERVERS} nameservers, got {len(items)}")
    found: list[tuple[str, int]] = []
    for index, raw in enumerate(items[:MAX_NAMESERVERS]):
        path = item(section.at("nameservers"), index)
        try:
            found.append(nameserver(raw))
        except ValueError as exc:
            section.problems.add(path, str(exc))
    return tuple(found)


def nameserver(text: object) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare address (port 53); ValueError says why not.
    Only addresses: a nameserver's own name would need a nameserver to find it."""
    if isinstance(text, str) and text.strip() and not _has_port(text.strip()):
        host, port = text.strip().strip("[]"), DNS_PORT
    else:
        host, port = split_host_port(text, min_port=1)
    try:
        return ipaddress.ip_address(host).compressed, port
    except ValueError:
        raise ValueError(f"must be an IP address with an optional port, like 10.96.0.10:53 "
                         f"or [fd00::10]:53, got {describe(text)}") from None


def _has_port(text: str) -> bool:
    if text.startswith("["):
        return "]:" in text
    return text.count(":") == 1  # one colon: v4 or name with a port; more: a bare v6


def discover(section: Section, key: str = "discover") -> DiscoverConfig | None:
    """A `discover:` server item (a mapping already known to have the key); None and a
    problem when the name cannot be used."""
    name_port = _name_port(section, key)
    weight = section.integer("weight", 1, minimum=1, maximum=(256, "as in HAProxy"))
    max_conns = section.integer("max_conns", 0, minimum=0)
    backup = section.boolean("backup", False)
    if name_port is None:
        return None
    name, port = name_port
    if port is None and section.get("weight") is not None:
        section.fail("weight", "an SRV name's records carry their weights (omit weight)")
    return DiscoverConfig(name, port, weight, max_conns, backup)


def _name_port(section: Section, key: str) -> tuple[str, int | None] | None:
    value = section.get(key)
    if not isinstance(value, str) or not value.strip():
        section.fail(key, f"must be NAME:PORT or an SRV name (_service._tcp.NAME), got "
                          f"{describe(value)}")
        return None
    text = value.strip()
    srv = text.startswith("_")
    try:
        if srv:
            if ":" in text:
                raise ValueError(f"an SRV name carries its ports in its records: drop the port "
                                 f"from {shown(text)}")
            host, port = host_name(text), None
        else:
            if ":" not in text:
                raise ValueError(f"missing port in {shown(text)} (NAME:PORT for A/AAAA "
                                 "records; SRV names start with _)")
            host, number = split_host_port(text, min_port=1)
            host, port = host_name(host), number
    except ValueError as exc:
        section.fail(key, str(exc))
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host, port
    section.fail(key, f"{shown(text)} is an address, not a name: list it as a server instead")
    return None

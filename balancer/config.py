"""Configuration: the YAML schema, parsed and validated once into frozen dataclasses.

Raw YAML never travels past this module. `load_config(path)` returns a `Config` or raises
`ConfigError` carrying *every* problem found, each as ``path: reason`` so an operator can fix
the whole file in one go. Only the CLI turns a `ConfigError` into an exit code.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from ._validate import (
    Problems,
    Section,
    as_list,
    as_mapping,
    child,
    describe,
    host_name,
    item,
    read_yaml,
    split_host_port,
)
from ._validate import parse_duration as parse_duration  # re-exported: part of the public API
from .dnsconfig import RESOLVERS_KEYS as RESOLVERS_KEYS  # re-exported: the schema
from .dnsconfig import DiscoverConfig as DiscoverConfig
from .dnsconfig import ResolversConfig as ResolversConfig
from .dnsconfig import discover as parse_discover
from .dnsconfig import resolvers as parse_resolvers
from .runconfig import RUN_KEYS as RUN_KEYS  # re-exported: the schema
from .runconfig import RunConfig as RunConfig
from .runconfig import upstream_run
from .tlsconfig import CERTIFICATE_KEYS as CERTIFICATE_KEYS  # re-exported: the schema
from .tlsconfig import LISTENER_TLS_KEYS as LISTENER_TLS_KEYS
from .tlsconfig import UPSTREAM_TLS_KEYS as UPSTREAM_TLS_KEYS
from .tlsconfig import CertificateConfig as CertificateConfig
from .tlsconfig import (
    ListenerTlsConfig,
    UpstreamTlsConfig,
    listener_sni,
    listener_tls,
    upstream_tls,
)

# The closed sets of names a config may choose from, each spelled once: the Literal types the
# rest of the package uses, and the tuples the loader checks against.
StrategyName = Literal["round_robin", "weighted", "least_conn", "ip_hash", "random_two"]
HashName = Literal["ring", "maglev"]  # ip_hash's table: consistent-hash ring or Maglev
LoopName = Literal["auto", "uvloop", "asyncio"]
CheckType = Literal["tcp", "http"]
LogFormat = Literal["text", "json"]
STRATEGIES: tuple[StrategyName, ...] = get_args(StrategyName)
HASHES: tuple[HashName, ...] = get_args(HashName)
LOOPS: tuple[LoopName, ...] = get_args(LoopName)
CHECK_TYPES: tuple[CheckType, ...] = get_args(CheckType)
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
MIN_WORKER_TIMEOUT = 1.0
SEND_PROXY = ("v1", "v2")  # PROXY protocol versions we can send (see proxyproto.py)
RATE_UNITS = {"s": 1.0, "m": 60.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m)\s*$")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
METRICS_HOST = "127.0.0.1"  # where `metrics.bind: PORT` listens: loopback only
# Weights size memory (ip_hash places 160 points per unit of weight on its ring): one server's
# is capped as HAProxy caps it, and a ring's total so it stays ~100 MB (and its build, 4.4 s
# at the cap, bounded); Maglev's table is 65,537 slots whatever the weights, so no cap there.
MAX_WEIGHT = 256
MAX_IP_HASH_WEIGHT = 4096


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` lists each one as ``path: reason``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Address:
    """A host and port. `host` keeps IPv6 literals without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerConfig:
    address: Address
    weight: int = 1
    max_conns: int = 0  # 0 = unlimited
    backup: bool = False
    send_proxy: str | None = None  # v1 | v2 | off; None = as the upstream says
    source: str = "static"  # how it was found: the file, `dns NAME`, a managed instance

    @property
    def key(self) -> str:
        """Stable identity of a server inside its upstream (used in logs, metrics, reload)."""
        return str(self.address)


@dataclass(frozen=True)
class CheckConfig:
    """Active health checks (resilience issue)."""

    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    type: CheckType = "tcp"
    path: str = "/health"


@dataclass(frozen=True)
class HealthConfig:
    max_fails: int = 3  # 0 disables passive checks
    fail_timeout: float = 10.0
    check: CheckConfig | None = None


@dataclass(frozen=True)
class RetriesConfig:
    tries: int = 3
    timeout: float = 5.0


@dataclass(frozen=True)
class PoolConfig:
    size: int = 0
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: float = 1.0
    idle: float = 600.0


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    strategy: StrategyName = "round_robin"
    # ip_hash only. Maglev by default: the busiest server's share is 1.00x the average
    # against the ring's 1.15-1.18x, its build costs ~60 ms whatever the weights (the ring's
    # 4.4 s at its cap) and a pick 0.7 µs (2-4); the price is that a server leaving also
    # moves ~0.2-0.5% of the others' clients (benchmarks/results/hashing.md).
    hash: HashName = "maglev"
    health: HealthConfig = field(default_factory=HealthConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    slow_start: float = 0.0  # seconds; 0 = off
    tls: UpstreamTlsConfig | None = None  # connect to the servers over TLS
    send_proxy: str | None = None  # v1 | v2: a PROXY header first on every server connection
    run: RunConfig | None = None  # app instances the balancer starts (their servers are found)
    discover: tuple[DiscoverConfig, ...] = ()  # names whose answers add servers at run time


@dataclass(frozen=True)
class PerClientConfig:
    """Limits per client address (the PROXY one on an accept_proxy listener)."""

    max_conns: int = 0  # open connections; 0 = unlimited
    rate: float = 0.0  # new connections per second; 0 = unlimited


@dataclass(frozen=True)
class ListenerTimeoutsConfig:
    proxy_header: float = 3.0  # an accept_proxy client must have sent its header by then


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    upstream: str | None  # None only for an SNI listener without a fallback
    reuse_port: bool = False  # share the address with other processes (SO_REUSEPORT) on purpose
    # TCP_DEFER_ACCEPT: accept a client only once it has sent data (client-speaks-first only)
    defer_accept: bool = False
    # Past 1 MiB one way, a plain TCP direction goes through splice(2) (splice.py)
    splice_auto: bool = True
    tls: ListenerTlsConfig | None = None  # terminate TLS here
    sni: tuple[tuple[str, str], ...] = ()  # (server name, upstream): route by SNI, unread
    accept_proxy: bool = False  # every connection must begin with a PROXY v1 or v2 header
    max_conns: int = 0  # open client connections; past it, accepting pauses; 0 = unlimited
    per_client: PerClientConfig | None = None
    allow: tuple[Network, ...] = ()  # if given, only these sources
    deny: tuple[Network, ...] = ()  # never these (checked first)
    timeouts: ListenerTimeoutsConfig = field(default_factory=ListenerTimeoutsConfig)

    @property
    def mode(self) -> str:
        """How accepted connections start: `plain`, `tls` (terminated) or `sni` (routed)."""
        return "sni" if self.sni else "tls" if self.tls is not None else "plain"

    @property
    def upstreams(self) -> tuple[str, ...]:
        """Every upstream this listener may send a connection to."""
        names = [up for _, up in self.sni]
        if self.upstream is not None:
            names.append(self.upstream)
        return tuple(dict.fromkeys(names))

    @property
    def limited(self) -> bool:
        """Does any accept-time rule apply (a plain listener pays for none of them)?"""
        return bool(self.max_conns or self.per_client or self.allow or self.deny)


@dataclass(frozen=True)
class MetricsConfig:
    bind: Address
    admin_token: str | None = None
    # Host names (lowercase, IPv6 without brackets) the admin endpoint also answers to, besides
    # its own addresses: what operators and Prometheus put in the URL (DNS rebinding defence).
    allowed_hosts: tuple[str, ...] = ()

    @property
    def posts_disabled(self) -> bool:
        """Drain/enable are off when anyone on the network could reach them without a token."""
        return self.admin_token is None and not is_loopback(self.bind.host)


def is_loopback(host: str) -> bool:
    """Whether `host` (a bind address) is reachable from this machine only. A host name
    other than localhost could resolve to anything, so it is not."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def config_warnings(config: Config) -> list[str]:
    """What is allowed but probably not meant, as ``key: reason`` (`balancer check` prints
    these; the admin endpoint logs its own when it starts)."""
    return metrics_warnings(config.metrics)


def metrics_warnings(metrics: MetricsConfig | None) -> list[str]:
    if metrics is None or not metrics.posts_disabled:
        return []
    return [f"metrics.bind: {metrics.bind} is reachable beyond this machine and no "
            "metrics.admin_token is set: the drain/enable POST endpoints are disabled "
            "(set a token, or bind to a loopback address)"]


@dataclass(frozen=True)
class LogConfig:
    access: str | None = None  # None = off, "stderr", or a file path
    format: LogFormat = "text"


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    upstreams: dict[str, UpstreamConfig]
    metrics: MetricsConfig | None = None
    workers: int | None = 1  # None means "auto": one per usable CPU
    loop: LoopName = "auto"
    shutdown_timeout: float = 30.0
    log: LogConfig = field(default_factory=LogConfig)
    worker_timeout: float = 30.0  # a worker silent this long (hung, stopped) is replaced
    watch_config: bool = False  # reload when the file's content changes (watch.py)
    resolvers: ResolversConfig = field(default_factory=ResolversConfig)


# --- Parsing -------------------------------------------------------------------------------

TOP_KEYS = ("listeners", "upstreams", "metrics", "workers", "loop", "shutdown_timeout", "log",
            "worker_timeout", "watch_config", "resolvers")
LISTENER_KEYS = ("name", "bind", "upstream", "reuse_port", "defer_accept", "splice_auto", "tls",
                 "sni", "accept_proxy", "max_conns", "per_client", "allow", "deny", "timeouts")
PER_CLIENT_KEYS = ("max_conns", "rate")
LISTENER_TIMEOUTS_KEYS = ("proxy_header",)
UPSTREAM_KEYS = ("strategy", "slow_start", "servers", "health", "retries", "pool", "timeouts",
                 "tls", "send_proxy", "hash", "run")
SERVER_KEYS = ("address", "weight", "max_conns", "backup", "send_proxy")
DISCOVER_KEYS = ("discover", "weight", "max_conns", "backup", "send_proxy")
HEALTH_KEYS = ("max_fails", "fail_timeout", "check")
CHECK_KEYS = ("interval", "timeout", "rise", "fall", "type", "path")
RETRIES_KEYS = ("tries", "timeout")
POOL_KEYS = ("size", "idle_timeout")
TIMEOUTS_KEYS = ("connect", "idle")
METRICS_KEYS = ("bind", "admin_token", "allowed_hosts")
LOG_KEYS = ("access", "format")

# Default instances, so every default lives in exactly one place: the dataclasses above.
_UPSTREAM = UpstreamConfig(name="", servers=())
_SERVER = ServerConfig(Address("", 0))
_CHECK = CheckConfig()
_CONFIG = Config(listeners=(), upstreams={})
_LISTENER = ListenerConfig(name="", bind=Address("", 0), upstream="")


def parse_address(text: object, *, allow_port_zero: bool = True) -> Address:
    """``host:port`` or ``[v6]:port`` as an Address; ValueError carries the reason.

    Port 0 (ephemeral) makes sense for a bind but never for a server to connect to.
    """
    host, port = split_host_port(text, min_port=0 if allow_port_zero else 1)
    return Address(host, port)


def _address(host_port: tuple[str, int] | None) -> Address | None:
    return None if host_port is None else Address(*host_port)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML file; ConfigError names the file for read and syntax errors."""
    try:
        data = read_yaml(path)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    return parse_config(data, str(path), Path(path).parent)


def parse_config(data: object, source: str = "<config>", base: Path | None = None) -> Config:
    """Validate an already-loaded YAML document; ConfigError lists every problem at once.

    Relative certificate paths are taken from `base` (the config file's directory)."""
    base = Path.cwd() if base is None else base
    if data is None:
        raise ConfigError([f"{source}: empty configuration"])
    if not isinstance(data, Mapping):
        raise ConfigError([f"{source}: must be a mapping of settings, got {describe(data)}"])
    problems = Problems()
    top = Section(data, "", problems, TOP_KEYS)
    listeners = _listeners(top, _upstream_names(top.get("upstreams")), base)
    upstreams = _upstreams(top, base)
    metrics = _metrics(top, listeners)
    workers = _workers(top)
    loop = top.choice("loop", _CONFIG.loop, LOOPS)
    shutdown_timeout = top.duration("shutdown_timeout", _CONFIG.shutdown_timeout)
    log = _log(top)
    worker_timeout = _worker_timeout(top)
    watch_config = top.boolean("watch_config", _CONFIG.watch_config)
    resolvers = parse_resolvers(top)
    if problems:
        raise ConfigError(problems.items)
    return Config(listeners, upstreams, metrics, workers, loop, shutdown_timeout, log,
                  worker_timeout, watch_config, resolvers)


def reload_problems(running: Config, new: Config) -> list[str]:
    """What a reload from `running` to `new` cannot apply in place, as ``key: reason``: a
    reload that would skip a key is rejected instead of reported as done."""
    if (running.metrics is None) != (new.metrics is None):
        change = "adding" if new.metrics is not None else "removing"
        return [f"metrics: {change} the metrics section needs a restart "
                "(its keys, metrics.bind included, can change on reload)"]
    return []


# --- Listeners -----------------------------------------------------------------------------


def _upstream_names(value: object) -> set[str] | None:
    """Names listeners may refer to; None when the upstreams section is itself broken."""
    if not isinstance(value, Mapping) or not value:
        return None
    return {key for key in value if isinstance(key, str)}


def _listeners(top: Section, known: set[str] | None, base: Path
               ) -> tuple[ListenerConfig, ...]:
    value = top.required("listeners")
    items = None if value is None else as_list(value, "listeners", top.problems)
    if items is None:
        return ()
    if not items:
        top.fail("listeners", "must not be empty")
    listeners: list[ListenerConfig] = []
    names: dict[str, int] = {}
    binds: dict[str, int] = {}
    for index, raw in enumerate(items):
        path = item("listeners", index)
        data = as_mapping(raw, path, top.problems)
        if data is None:
            continue
        section = Section(data, path, top.problems, LISTENER_KEYS)
        listener = _listener(section, known, base)
        if listener is None:
            continue
        named = section.get("name") is not None
        _unique(section, "name", listener.name, names, index, named=named)
        if listener.bind.port != 0:
            _unique(section, "bind", str(listener.bind), binds, index)
        listeners.append(listener)
    return tuple(listeners)


def _listener(section: Section, known: set[str] | None, base: Path) -> ListenerConfig | None:
    bind = _address(section.host_port("bind"))
    name = section.string("name")
    reuse_port = section.boolean("reuse_port", _LISTENER.reuse_port)
    defer_accept = section.boolean("defer_accept", _LISTENER.defer_accept)
    splice_auto = section.boolean("splice_auto", _LISTENER.splice_auto)
    sni = listener_sni(section, known)
    tls = listener_tls(section, base)
    if sni is not None and section.get("tls") is not None:
        section.fail("sni", "cannot be combined with tls (sni routes TLS without terminating)")
    # An SNI listener's upstream is its fallback, and optional.
    upstream = section.get("upstream") if sni is not None else section.required("upstream")
    if upstream is not None and not isinstance(upstream, str):
        section.fail("upstream", f"must be a string, got {describe(upstream)}")
        upstream = None
    if isinstance(upstream, str) and known and upstream not in known:
        listed = ", ".join(sorted(known))
        section.fail("upstream", f"unknown upstream {upstream!r} (known: {listed})")
    accept_proxy = section.boolean("accept_proxy", _LISTENER.accept_proxy)
    max_conns = section.integer("max_conns", _LISTENER.max_conns, minimum=0)
    per_client = _per_client(section)
    allow = _networks(section, "allow")
    deny = _networks(section, "deny")
    timeouts = section.sub("timeouts", LISTENER_TIMEOUTS_KEYS)
    proxy_header = timeouts.duration("proxy_header", _LISTENER.timeouts.proxy_header,
                                     positive=True)
    if sni is not None:
        # The accept-time rules (limits.py) run on plain and TLS listeners, not yet on SNI
        # passthrough ones.
        for key in ("accept_proxy", "max_conns", "per_client", "allow", "deny"):
            if section.get(key) not in (None, False, 0):
                section.fail(key, "cannot be combined with sni (not supported yet)")
    if bind is None or not (isinstance(upstream, str) or (sni and upstream is None)):
        return None
    if section.get("tls") is not None and tls is None:
        return None  # its problems are reported; never serve a TLS port in the clear
    return ListenerConfig(name=name or str(bind), bind=bind, upstream=upstream,
                          reuse_port=reuse_port, defer_accept=defer_accept,
                          splice_auto=splice_auto, tls=tls,
                          sni=tuple((sni or {}).items()),
                          accept_proxy=accept_proxy, max_conns=max_conns,
                          per_client=per_client, allow=allow, deny=deny,
                          timeouts=ListenerTimeoutsConfig(proxy_header))


def _per_client(listener: Section) -> PerClientConfig | None:
    if listener.get("per_client") is None:
        return None
    section = listener.sub("per_client", PER_CLIENT_KEYS)
    max_conns = section.integer("max_conns", 0, minimum=0)
    rate = _rate(section)
    return PerClientConfig(max_conns, rate) if max_conns or rate else None


def _rate(section: Section) -> float:
    """``N/s`` or ``N/m``: new connections per client, as a count per second."""
    value = section.get("rate")
    if value is None:
        return 0.0
    match = _RATE.match(value) if isinstance(value, str) else None
    if match is None or int(match.group(1)) == 0:
        section.fail("rate", f"must be a positive rate like 20/s or 600/m, got {describe(value)}")
        return 0.0
    return int(match.group(1)) / RATE_UNITS[match.group(2)]


def _networks(section: Section, key: str) -> tuple[Network, ...]:
    """A list of addresses or CIDR networks (``10.0.0.0/8``, ``"2001:db8::/32"``)."""
    value = section.get(key)
    if value is None:
        return ()
    items = as_list(value, section.at(key), section.problems)
    networks: list[Network] = []
    for index, raw in enumerate(items or ()):
        text = raw.strip() if isinstance(raw, str) else ""
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            reason = f"must be an address or a CIDR network, got {describe(raw)}"
            if "has host bits set" in str(exc):
                reason = (f"host bits set in {raw!r} (did you mean "
                          f"{ipaddress.ip_network(text, strict=False)}?)")
            section.problems.add(item(section.at(key), index), reason)
    return tuple(networks)


def _send_proxy(section: Section, default: str | None, *, allow_off: bool) -> str | None:
    """``v1`` or ``v2`` (and ``off`` on a server, to override its upstream)."""
    value = section.get("send_proxy")
    if value is None:
        return default
    if value is False or value == "off":
        if allow_off:
            return "off"
        return None
    if value in SEND_PROXY:
        return str(value)
    options = "v1, v2 or off" if allow_off else "v1 or v2 (omit it for off)"
    section.fail("send_proxy", f"must be {options}, got {describe(value)}")
    return default


def _unique(
    section: Section, key: str, value: str, seen: dict[str, int], index: int, *, named: bool = True
) -> None:
    """Record `value` for listener `index`, reporting it if an earlier listener had it."""
    if value not in seen:
        seen[value] = index
        return
    hint = "" if named else " (the name defaults to the bind address; set a name)"
    section.fail(key, f"duplicate of {item('listeners', seen[value])}{hint}")


# --- Upstreams -----------------------------------------------------------------------------


def _upstreams(top: Section, base: Path) -> dict[str, UpstreamConfig]:
    value = top.required("upstreams")
    data = None if value is None else as_mapping(value, "upstreams", top.problems)
    if data is None:
        return {}
    if not data:
        top.fail("upstreams", "must not be empty")
    upstreams: dict[str, UpstreamConfig] = {}
    for name, raw in data.items():
        path = child("upstreams", name)
        if not isinstance(name, str) or not name:
            top.problems.add(path, f"upstream name must be a non-empty string, got {name!r}")
            continue
        body = as_mapping(raw, path, top.problems)
        if body is not None:
            upstreams[name] = _upstream(name, Section(body, path, top.problems, UPSTREAM_KEYS),
                                        base)
    return upstreams


def _upstream(name: str, section: Section, base: Path) -> UpstreamConfig:
    strategy = section.choice("strategy", _UPSTREAM.strategy, STRATEGIES)
    slow_start = section.duration("slow_start", _UPSTREAM.slow_start)
    run = upstream_run(section, base)
    servers, discover = _servers(section, managed=section.get("run") is not None)
    hash_name = section.choice("hash", _UPSTREAM.hash, HASHES)
    if section.get("hash") is not None and strategy != "ip_hash":
        # A mistake, not a harmless leftover: the operator expects sticky clients.
        section.fail("hash", f"only applies to strategy: ip_hash, got strategy: {strategy}")
    total = sum(server.weight for server in servers)
    if strategy == "ip_hash" and hash_name == "ring" and total > MAX_IP_HASH_WEIGHT:
        section.fail("servers", f"ip_hash allows a total weight of at most {MAX_IP_HASH_WEIGHT} "
                                f"(its ring has 160 points per unit), got {total}")
    return UpstreamConfig(
        name=name,
        servers=servers,
        strategy=strategy,
        hash=hash_name,
        health=_health(section),
        retries=_retries(section),
        pool=_pool(section),
        timeouts=_timeouts(section),
        slow_start=slow_start,
        tls=upstream_tls(section, base),
        send_proxy=_send_proxy(section, _UPSTREAM.send_proxy, allow_off=False),
        run=run,
        discover=discover,
    )


def _servers(upstream: Section, *, managed: bool
             ) -> tuple[tuple[ServerConfig, ...], tuple[DiscoverConfig, ...]]:
    """The static servers and the `discover:` items, which may stand alone (an upstream of
    discovered servers only) or alongside static ones. `servers` is required unless the
    upstream runs its own instances (`run`)."""
    value = upstream.get("servers") if managed else upstream.required("servers")
    if value is None and managed:
        return (), ()
    items = None if value is None else as_list(value, upstream.at("servers"), upstream.problems)
    if items is None:
        return (), ()
    if not items and not managed:
        upstream.fail("servers", "must not be empty")
    servers: list[ServerConfig] = []
    discover: list[DiscoverConfig] = []
    seen: dict[str, int] = {}
    names: dict[str, int] = {}
    for index, raw in enumerate(items):
        path = item(upstream.at("servers"), index)
        if isinstance(raw, Mapping) and "discover" in raw:
            found = _discover(raw, path, upstream.problems)
            if found is None:
                continue
            if found.name in names:
                upstream.problems.add(f"{path}.discover",
                                      f"duplicate of servers[{names[found.name]}] (one "
                                      "discover item per name in an upstream)")
            else:
                names[found.name] = index
            discover.append(found)
            continue
        server, address_path = _server(raw, path, upstream.problems)
        if server is None:
            continue
        if server.key in seen:
            upstream.problems.add(address_path, f"duplicate of servers[{seen[server.key]}]")
        else:
            seen[server.key] = index
        servers.append(server)
    return tuple(servers), tuple(discover)


def _discover(raw: Mapping[object, object], path: str, problems: Problems
              ) -> DiscoverConfig | None:
    """A `discover: NAME:PORT` or `discover: _srv._tcp.NAME` item with the server keys that
    apply to each server it finds."""
    if "address" in raw:
        problems.add(f"{path}.address", "cannot be combined with discover (one or the other)")
    section = Section({k: v for k, v in raw.items() if k != "address"}, path, problems,
                      DISCOVER_KEYS)
    send_proxy = _send_proxy(section, _SERVER.send_proxy, allow_off=True)
    found = parse_discover(section)
    return None if found is None else replace(found, send_proxy=send_proxy)


def _server(raw: object, path: str, problems: Problems) -> tuple[ServerConfig | None, str]:
    """A server and the path its address came from (the item itself for the string form)."""
    if isinstance(raw, str):
        try:
            return ServerConfig(parse_address(raw, allow_port_zero=False)), path
        except ValueError as exc:
            problems.add(path, str(exc))
            return None, path
    if not isinstance(raw, Mapping):
        problems.add(path, f"must be an address string or a mapping, got {describe(raw)}")
        return None, path
    section = Section(raw, path, problems, SERVER_KEYS)
    address = _address(section.host_port("address", min_port=1))
    weight = section.integer("weight", _SERVER.weight, minimum=1,
                             maximum=(MAX_WEIGHT, "as in HAProxy"))
    max_conns = section.integer("max_conns", _SERVER.max_conns, minimum=0)
    backup = section.boolean("backup", _SERVER.backup)
    send_proxy = _send_proxy(section, _SERVER.send_proxy, allow_off=True)
    if address is None:
        return None, section.at("address")
    return ServerConfig(address, weight, max_conns, backup, send_proxy), section.at("address")


def _health(upstream: Section) -> HealthConfig:
    section = upstream.sub("health", HEALTH_KEYS)
    default = _UPSTREAM.health
    max_fails = section.integer("max_fails", default.max_fails, minimum=0)
    # With passive checks off a zero fail_timeout is harmless; with them on it means "never".
    fail_timeout = section.duration("fail_timeout", default.fail_timeout, positive=max_fails > 0)
    return HealthConfig(max_fails, fail_timeout, _check(section))


def _check(health: Section) -> CheckConfig | None:
    if health.get("check") is None:
        return None  # active checks are opt-in
    section = health.sub("check", CHECK_KEYS)
    path = section.string("path", _CHECK.path) or _CHECK.path
    if not path.startswith("/"):
        section.fail("path", f"must start with '/', got {path!r}")
        path = _CHECK.path
    return CheckConfig(
        interval=section.duration("interval", _CHECK.interval, positive=True),
        timeout=section.duration("timeout", _CHECK.timeout, positive=True),
        rise=section.integer("rise", _CHECK.rise, minimum=1),
        fall=section.integer("fall", _CHECK.fall, minimum=1),
        type=section.choice("type", _CHECK.type, CHECK_TYPES),
        path=path,
    )


def _retries(upstream: Section) -> RetriesConfig:
    section = upstream.sub("retries", RETRIES_KEYS)
    default = _UPSTREAM.retries
    return RetriesConfig(
        tries=section.integer("tries", default.tries, minimum=1),
        timeout=section.duration("timeout", default.timeout, positive=True),
    )


def _pool(upstream: Section) -> PoolConfig:
    section = upstream.sub("pool", POOL_KEYS)
    default = _UPSTREAM.pool
    return PoolConfig(
        size=section.integer("size", default.size, minimum=0),
        # The pool sweeps every idle_timeout / 2, so zero would spin.
        idle_timeout=section.duration("idle_timeout", default.idle_timeout, positive=True),
    )


def _timeouts(upstream: Section) -> TimeoutsConfig:
    section = upstream.sub("timeouts", TIMEOUTS_KEYS)
    default = _UPSTREAM.timeouts
    return TimeoutsConfig(
        connect=section.duration("connect", default.connect, positive=True),
        idle=section.duration("idle", default.idle, positive=True),
    )


# --- Process-wide settings -----------------------------------------------------------------


def _metrics(top: Section, listeners: tuple[ListenerConfig, ...]) -> MetricsConfig | None:
    value = top.get("metrics")
    data = None if value is None else as_mapping(value, "metrics", top.problems)
    if data is None:
        return None  # absent means no metrics endpoint
    section = Section(data, "metrics", top.problems, METRICS_KEYS)
    bind = _metrics_bind(section)
    token = section.string("admin_token")
    allowed = _allowed_hosts(section)
    if bind is None:
        return None
    for index, listener in enumerate(listeners):
        if bind.port != 0 and listener.bind == bind:
            section.fail("bind", f"same address as {item('listeners', index)}.bind")
    return MetricsConfig(bind, token, allowed)


def _allowed_hosts(section: Section) -> tuple[str, ...]:
    value = section.get("allowed_hosts")
    items = None if value is None else as_list(value, section.at("allowed_hosts"),
                                               section.problems)
    names: list[str] = []
    for index, raw in enumerate(items or ()):
        try:
            names.append(host_name(raw))
        except ValueError as exc:
            section.problems.add(item(section.at("allowed_hosts"), index), str(exc))
    return tuple(names)


def _metrics_bind(section: Section) -> Address | None:
    """``host:port``, or a bare port (``9100`` or ``":9100"``) meaning loopback: the admin
    endpoints reach beyond this machine only when a host is named."""
    value = section.get("bind")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        port = value.strip()
        port = port[1:] if port.startswith(":") else port
        if port.lstrip("-").isdigit():
            try:
                return parse_address(f"{METRICS_HOST}:{port}")
            except ValueError as exc:
                section.fail("bind", str(exc))
                return None
    return _address(section.host_port("bind"))


def _workers(top: Section) -> int | None:
    """A positive count, or ``auto`` (None) for one worker per usable CPU."""
    value = top.get("workers")
    if value is None:
        return _CONFIG.workers
    if value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    top.fail("workers", f"must be a positive integer or 'auto', got {describe(value)}")
    return _CONFIG.workers


def _worker_timeout(top: Section) -> float:
    """At least a second: a worker's heartbeat comes every 0.25 s (proc/shared.py), and a
    loaded worker must not be taken for a hung one."""
    value = top.duration("worker_timeout", _CONFIG.worker_timeout, positive=True)
    if value < MIN_WORKER_TIMEOUT:
        top.fail("worker_timeout", f"must be at least {MIN_WORKER_TIMEOUT:g}s, got "
                                   f"{describe(top.get('worker_timeout'))}")
        return _CONFIG.worker_timeout
    return value


def _log(top: Section) -> LogConfig:
    section = top.sub("log", LOG_KEYS)
    log_format = section.choice("format", _CONFIG.log.format, LOG_FORMATS)
    return LogConfig(access=_access(section), format=log_format)


def _access(section: Section) -> str | None:
    """``off`` arrives as YAML false (YAML 1.1) or the string; anything else names a sink."""
    value = section.get("access")
    if value is None or value is False or value == "off":
        return None
    if isinstance(value, str) and value.strip():
        return value
    section.fail("access", f"must be off, stderr or a file path, got {describe(value)}")
    return None

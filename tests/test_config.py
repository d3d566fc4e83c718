"""Configuration loading: the schema, its defaults, and the exact wording of every problem."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.config import (
    Address,
    CheckConfig,
    Config,
    ConfigError,
    HealthConfig,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    PoolConfig,
    RetriesConfig,
    ServerConfig,
    TimeoutsConfig,
    UpstreamConfig,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

FULL = """\
listeners:
  - name: web
    bind: 0.0.0.0:8080
    upstream: app
  - bind: "[::1]:0"
    upstream: app
upstreams:
  app:
    strategy: least_conn
    slow_start: 30s
    servers:
      - address: 127.0.0.1:3001
        weight: 2
        max_conns: 100
        backup: false
      - 127.0.0.1:3002
      - address: 127.0.0.1:3003
        backup: true
    health:
      max_fails: 5
      fail_timeout: 20s
      check:
        interval: 500ms
        timeout: 250ms
        rise: 1
        fall: 4
        type: http
        path: /ready
    retries:
      tries: 2
      timeout: 1.5s
    pool:
      size: 4
      idle_timeout: 1m
    timeouts:
      connect: 2s
      idle: 1h
  spare:
    servers: [localhost:4000]
metrics:
  bind: 127.0.0.1:9100
  admin_token: secret
workers: 4
loop: uvloop
shutdown_timeout: 5s
log:
  access: /var/log/balancer.log
  format: json
"""


def minimal() -> dict[str, Any]:
    """The smallest valid config, as plain data for tests to break one piece at a time."""
    return {
        "listeners": [{"bind": "127.0.0.1:8080", "upstream": "app"}],
        "upstreams": {"app": {"servers": ["127.0.0.1:3001"]}},
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def with_upstream(**keys: Any) -> dict[str, Any]:
    data = minimal()
    data["upstreams"]["app"].update(keys)
    return data


# --- Valid configurations ------------------------------------------------------------------


def test_full_config_round_trips_into_dataclasses() -> None:
    config = parse_config(yaml.safe_load(FULL))
    assert config.listeners == (
        ListenerConfig("web", Address("0.0.0.0", 8080), "app"),
        ListenerConfig("[::1]:0", Address("::1", 0), "app"),
    )
    assert config.upstreams["app"] == UpstreamConfig(
        name="app",
        servers=(
            ServerConfig(Address("127.0.0.1", 3001), weight=2, max_conns=100, backup=False),
            ServerConfig(Address("127.0.0.1", 3002)),
            ServerConfig(Address("127.0.0.1", 3003), backup=True),
        ),
        strategy="least_conn",
        health=HealthConfig(5, 20.0, CheckConfig(0.5, 0.25, 1, 4, "http", "/ready")),
        retries=RetriesConfig(2, 1.5),
        pool=PoolConfig(4, 60.0),
        timeouts=TimeoutsConfig(2.0, 3600.0),
        slow_start=30.0,
    )
    assert config.metrics == MetricsConfig(Address("127.0.0.1", 9100), "secret")
    assert (config.workers, config.loop, config.shutdown_timeout) == (4, "uvloop", 5.0)
    assert config.log == LogConfig("/var/log/balancer.log", "json")


def test_omitted_keys_take_the_dataclass_defaults() -> None:
    config = parse_config(minimal())
    assert config == Config(
        listeners=(ListenerConfig("127.0.0.1:8080", Address("127.0.0.1", 8080), "app"),),
        upstreams={"app": UpstreamConfig("app", (ServerConfig(Address("127.0.0.1", 3001)),))},
    )
    upstream = config.upstreams["app"]
    assert upstream.strategy == "round_robin" and upstream.slow_start == 0.0
    assert upstream.health == HealthConfig(3, 10.0, None)
    assert (config.metrics, config.workers, config.loop) == (None, 1, "auto")
    assert config.log == LogConfig(None, "text")
    assert config.listeners[0].splice_auto  # bulk splices unless a listener opts out


def test_splice_auto_false_opts_a_listener_out_of_splice() -> None:
    data = minimal()
    data["listeners"][0]["splice_auto"] = False
    assert not parse_config(data).listeners[0].splice_auto


@pytest.mark.parametrize(("bind", "address"), [
    (9100, Address("127.0.0.1", 9100)),
    (":9100", Address("127.0.0.1", 9100)),
    ("9100", Address("127.0.0.1", 9100)),
    (" :9100 ", Address("127.0.0.1", 9100)),
    (0, Address("127.0.0.1", 0)),
    ("0.0.0.0:9100", Address("0.0.0.0", 9100)),
    ("[::1]:9100", Address("::1", 9100)),
])
def test_metrics_bind_bare_port_means_loopback(bind: object, address: Address) -> None:
    data = minimal()
    data["metrics"] = {"bind": bind}
    assert parse_config(data).metrics == MetricsConfig(address)


def test_durations_take_hours() -> None:
    data = minimal()
    data["upstreams"]["app"]["timeouts"] = {"idle": "1h"}
    assert parse_config(data).upstreams["app"].timeouts.idle == 3600.0


def test_upstream_referenced_by_no_listener_is_allowed() -> None:
    config = parse_config(yaml.safe_load(FULL))
    assert config.upstreams["spare"].servers == (ServerConfig(Address("localhost", 4000)),)


def test_empty_check_mapping_enables_checks_with_defaults() -> None:
    config = parse_config(with_upstream(health={"check": {}}))
    assert config.upstreams["app"].health.check == CheckConfig()


def test_workers_auto_means_none() -> None:
    data = minimal() | {"workers": "auto"}
    assert parse_config(data).workers is None


@pytest.mark.parametrize("access", [False, "off", None])
def test_access_log_off(access: object) -> None:
    assert parse_config(minimal() | {"log": {"access": access}}).log.access is None


def test_access_log_off_as_written_in_yaml() -> None:
    data = yaml.safe_load("log:\n  access: off\n") | minimal()
    assert parse_config(data).log.access is None


def test_string_shorthand_server() -> None:
    config = parse_config(with_upstream(servers=["127.0.0.1:3001", "[::1]:3002"]))
    assert config.upstreams["app"].servers == (
        ServerConfig(Address("127.0.0.1", 3001)),
        ServerConfig(Address("::1", 3002)),
    )


def test_fail_timeout_may_be_zero_when_passive_checks_are_off() -> None:
    config = parse_config(with_upstream(health={"max_fails": 0, "fail_timeout": 0}))
    assert config.upstreams["app"].health == HealthConfig(0, 0.0, None)


# --- Durations and addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (3, 3.0),
        (2.5, 2.5),
        ("250ms", 0.25),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0s", 0.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", [True, False, -1, -0.5, float("inf"), float("nan"), "fast", "10", "10 sec", "",
              "-1s", "1d", "s", None, [1]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="must be a duration like 250ms, 10s, 5m, 1h"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("0.0.0.0:8080", Address("0.0.0.0", 8080), "0.0.0.0:8080"),
        ("localhost:80", Address("localhost", 80), "localhost:80"),
        ("127.0.0.1:0", Address("127.0.0.1", 0), "127.0.0.1:0"),
        ("[::1]:8080", Address("::1", 8080), "[::1]:8080"),
        ("[::]:65535", Address("::", 65535), "[::]:65535"),
        ("[2001:db8::1]:443", Address("2001:db8::1", 443), "[2001:db8::1]:443"),
        ("backend-1.example.com:3001", Address("backend-1.example.com", 3001),
         "backend-1.example.com:3001"),
    ],
)
def test_parse_address(text: str, address: Address, shown: str) -> None:
    assert parse_address(text) == address
    assert str(address) == shown


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("localhost", "missing port in 'localhost' (expected host:port or [v6]:port)"),
        (":80", "missing host in ':80'"),
        ("host:http", "port must be 0..65535, got 'http'"),
        ("host:65536", "port must be 0..65535, got 65536"),
        ("host:-1", "port must be 0..65535, got '-1'"),
        ("::1:80", "IPv6 addresses need brackets, like [::1]:80, got '::1:80'"),
        ("[::1]80", "must be [v6]:port, got '[::1]80'"),
        ("[nope]:80", "invalid IPv6 address 'nope'"),
        ("300.1.1.1:80", "invalid IPv4 address '300.1.1.1'"),
        ("bad host:80", "invalid host name 'bad host'"),
        (8080, "must be an address like host:port, got 8080"),
    ],
)
def test_parse_address_rejects(text: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == reason


def test_server_port_zero_is_rejected_but_bind_port_zero_is_not() -> None:
    assert parse_address("127.0.0.1:0").port == 0
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535, got 0"):
        parse_address("127.0.0.1:0", allow_port_zero=False)


# --- One mistake, one exact message --------------------------------------------------------


def _set(path: str, value: object) -> dict[str, Any]:
    """minimal() with the dotted `path` (list indexes as numbers) set to `value`."""
    data = minimal()
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[int(last) if last.isdigit() else last] = value
    return data


MISTAKES = [
    ("upstreams.app.servers", [{"address": "127.0.0.1:1"}, {"address": "127.0.0.1:2", "weight": 0}],
     "upstreams.app.servers[1].weight: must be a positive integer, got 0"),
    ("listeners.0.upstream", "ap", "listeners[0].upstream: unknown upstream 'ap' (known: app)"),
    ("upstreams.app.stratgy", "least_conn",
     "upstreams.app.stratgy: unknown key (did you mean 'strategy'?)"),
    ("upstreams.app.colour", "blue", "upstreams.app.colour: unknown key"),
    ("listner", [], "listner: unknown key (did you mean 'listeners'?)"),
    ("upstreams.app.strategy", "fastest",
     "upstreams.app.strategy: must be one of round_robin, weighted, least_conn, ip_hash, "
     "random_two, got 'fastest'"),
    ("listeners.0.bind", "localhost",
     "listeners[0].bind: missing port in 'localhost' (expected host:port or [v6]:port)"),
    ("listeners.0.bind", None, "listeners[0].bind: required"),
    ("listeners.0.upstream", 7, "listeners[0].upstream: must be a string, got 7"),
    ("listeners.0.name", 7, "listeners[0].name: must be a string, got 7"),
    ("listeners.0.name", "", "listeners[0].name: must not be empty"),
    ("listeners.0.reuse_port", "yes", "listeners[0].reuse_port: must be a boolean, got 'yes'"),
    ("listeners.0.splice_auto", "auto",
     "listeners[0].splice_auto: must be a boolean, got 'auto'"),
    ("listeners", [], "listeners: must not be empty"),
    ("listeners", None, "listeners: required"),
    ("listeners", {"bind": "x:1"}, "listeners: must be a list, got a mapping"),
    ("listeners.0", "127.0.0.1:80", "listeners[0]: must be a mapping, got '127.0.0.1:80'"),
    ("upstreams", None, "upstreams: required"),
    ("upstreams", {}, "upstreams: must not be empty"),
    ("upstreams.app", ["x"], "upstreams.app: must be a mapping, got a list"),
    ("upstreams.app.servers", [], "upstreams.app.servers: must not be empty"),
    ("upstreams.app.servers", None, "upstreams.app.servers: required"),
    ("upstreams.app.servers", "127.0.0.1:1",
     "upstreams.app.servers: must be a list, got '127.0.0.1:1'"),
    ("upstreams.app.servers", [{"weight": 1}], "upstreams.app.servers[0].address: required"),
    ("upstreams.app.servers", [7],
     "upstreams.app.servers[0]: must be an address string or a mapping, got 7"),
    ("upstreams.app.servers", ["127.0.0.1:0"],
     "upstreams.app.servers[0]: port must be 1..65535, got 0"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:0"}],
     "upstreams.app.servers[0].address: port must be 1..65535, got 0"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "weight": True}],
     "upstreams.app.servers[0].weight: must be a positive integer, got True"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "weight": 1.5}],
     "upstreams.app.servers[0].weight: must be a positive integer, got 1.5"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "max_conns": -1}],
     "upstreams.app.servers[0].max_conns: must be a non-negative integer, got -1"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "backup": "yes please"}],
     "upstreams.app.servers[0].backup: must be a boolean, got 'yes please'"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "wieght": 2}],
     "upstreams.app.servers[0].wieght: unknown key (did you mean 'weight'?)"),
    ("upstreams.app.slow_start", "soon",
     "upstreams.app.slow_start: must be a duration like 250ms, 10s, 5m, 1h, got 'soon'"),
    ("upstreams.app.timeouts.connect", "fast",
     "upstreams.app.timeouts.connect: must be a duration like 250ms, 10s, 5m, 1h, got 'fast'"),
    ("upstreams.app.timeouts.connect", 0,
     "upstreams.app.timeouts.connect: must be greater than 0, got 0"),
    ("upstreams.app.timeouts.idle", "0s",
     "upstreams.app.timeouts.idle: must be greater than 0, got '0s'"),
    ("upstreams.app.timeouts.connect", True,
     "upstreams.app.timeouts.connect: must be a duration like 250ms, 10s, 5m, 1h, got True"),
    ("upstreams.app.timeouts", "1s", "upstreams.app.timeouts: must be a mapping, got '1s'"),
    ("upstreams.app.health.max_fails", -1,
     "upstreams.app.health.max_fails: must be a non-negative integer, got -1"),
    ("upstreams.app.health.fail_timeout", 0,
     "upstreams.app.health.fail_timeout: must be greater than 0, got 0"),
    ("upstreams.app.health.check", {"interval": 0},
     "upstreams.app.health.check.interval: must be greater than 0, got 0"),
    ("upstreams.app.health.check", {"timeout": "0ms"},
     "upstreams.app.health.check.timeout: must be greater than 0, got '0ms'"),
    ("upstreams.app.health.check", {"rise": 0},
     "upstreams.app.health.check.rise: must be a positive integer, got 0"),
    ("upstreams.app.health.check", {"fall": "3"},
     "upstreams.app.health.check.fall: must be a positive integer, got '3'"),
    ("upstreams.app.health.check", {"type": "udp"},
     "upstreams.app.health.check.type: must be one of tcp, http, got 'udp'"),
    ("upstreams.app.health.check", {"path": "health"},
     "upstreams.app.health.check.path: must start with '/', got 'health'"),
    ("upstreams.app.health.check", True,
     "upstreams.app.health.check: must be a mapping, got True"),
    ("upstreams.app.retries.tries", 0,
     "upstreams.app.retries.tries: must be a positive integer, got 0"),
    ("upstreams.app.retries.timeout", 0,
     "upstreams.app.retries.timeout: must be greater than 0, got 0"),
    ("upstreams.app.pool.size", -2,
     "upstreams.app.pool.size: must be a non-negative integer, got -2"),
    ("upstreams.app.pool.idle_timeout", 0,
     "upstreams.app.pool.idle_timeout: must be greater than 0, got 0"),
    ("metrics", {"admin_token": "x"}, "metrics.bind: required"),
    ("metrics", {"bind": "127.0.0.1:9100", "admin_token": 123},
     "metrics.admin_token: must be a string, got 123"),
    ("metrics", {"bind": "127.0.0.1:8080"}, "metrics.bind: same address as listeners[0].bind"),
    ("metrics", "127.0.0.1:9100", "metrics: must be a mapping, got '127.0.0.1:9100'"),
    ("metrics", {"bind": "127.0.0.1:9100", "allowed_hosts": "lb"},
     "metrics.allowed_hosts: must be a list, got 'lb'"),
    ("metrics", {"bind": "127.0.0.1:9100", "allowed_hosts": ["lb", "bad host"]},
     "metrics.allowed_hosts[1]: invalid host name 'bad host'"),
    ("metrics", {"bind": "127.0.0.1:9100", "allowed_hosts": [7]},
     "metrics.allowed_hosts[0]: must be a host name or address, got 7"),
    ("metrics", {"bind": "127.0.0.1:9100", "allowed_hosts": ["[::1"]},
     "metrics.allowed_hosts[0]: invalid IPv6 address '[::1'"),
    ("metrics", {"bind": 70000}, "metrics.bind: port must be 0..65535, got 70000"),
    ("metrics", {"bind": ":-1"}, "metrics.bind: port must be 0..65535, got '-1'"),
    ("metrics", {"bind": ":"}, "metrics.bind: missing host in ':'"),
    ("metrics", {"bind": True}, "metrics.bind: must be an address like host:port, got True"),
    ("metrics", {"bind": 8080}, "metrics.bind: same address as listeners[0].bind"),
    ("workers", 0, "workers: must be a positive integer or 'auto', got 0"),
    ("workers", True, "workers: must be a positive integer or 'auto', got True"),
    ("workers", "many", "workers: must be a positive integer or 'auto', got 'many'"),
    ("loop", "trio", "loop: must be one of auto, uvloop, asyncio, got 'trio'"),
    ("shutdown_timeout", "-5s",
     "shutdown_timeout: must be a duration like 250ms, 10s, 5m, 1h, got '-5s'"),
    ("worker_timeout", "soon",
     "worker_timeout: must be a duration like 250ms, 10s, 5m, 1h, got 'soon'"),
    ("worker_timeout", 0, "worker_timeout: must be greater than 0, got 0"),
    ("worker_timeout", "500ms", "worker_timeout: must be at least 1s, got '500ms'"),
    ("log.format", "xml", "log.format: must be one of text, json, got 'xml'"),
    ("log.access", True, "log.access: must be off, stderr or a file path, got True"),
    ("log.acess", "stderr", "log.acess: unknown key (did you mean 'access'?)"),
    # Hostile input: caps that keep a file from exhausting memory, and ASCII digits only.
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "weight": 257}],
     "upstreams.app.servers[0].weight: must be at most 256 (as in HAProxy), got 257"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "weight": 100_000_000}],
     "upstreams.app.servers[0].weight: must be at most 256 (as in HAProxy), got 100000000"),
    ("upstreams.app.slow_start", "\uff11\uff10s",
     "upstreams.app.slow_start: must be a duration like 250ms, 10s, 5m, 1h, "
     "got '\uff11\uff10s'"),
    ("upstreams.app.timeouts.idle", "9" * 400 + "h",
     "upstreams.app.timeouts.idle: must be a duration like 250ms, 10s, 5m, 1h, "
     f"got {'9' * 60!r}... (401 characters)"),
    ("upstreams.app.servers", ["a" * 250 + ".com:80"],
     f"upstreams.app.servers[0]: host name longer than 253 characters: {'a' * 60!r}... "
     "(254 characters)"),
    ("upstreams.app.servers", ["a" * 5_000_000 + ":80"],
     f"upstreams.app.servers[0]: host name longer than 253 characters: {'a' * 60!r}... "
     "(5000000 characters)"),
    ("upstreams.app.servers", ["x." + "b" * 64 + ".com:80"],
     f"upstreams.app.servers[0]: host name label longer than 63 characters: {'b' * 60!r}... "
     "(64 characters)"),
    ("listeners.0.bind", "127.0.0.1:\uff18\uff10",
     "listeners[0].bind: port must be 0..65535, got '\uff18\uff10'"),
    ("upstreams.app.servers", ["\uff11\uff12\uff17.0.0.1:80"],
     "upstreams.app.servers[0]: invalid host name '\uff11\uff12\uff17.0.0.1'"),
    ("upstreams.app.servers", [{"address": "x" * 1000}],
     f"upstreams.app.servers[0].address: missing port in {'x' * 60!r}... (1000 characters) "
     "(expected host:port or [v6]:port)"),
    # PROXY protocol and listener limits (issue 14)
    ("listeners.0.accept_proxy", "yes", "listeners[0].accept_proxy: must be a boolean, got 'yes'"),
    ("listeners.0.max_conns", -1,
     "listeners[0].max_conns: must be a non-negative integer, got -1"),
    ("listeners.0.per_client", {"max_conns": 1.5},
     "listeners[0].per_client.max_conns: must be a non-negative integer, got 1.5"),
    ("listeners.0.per_client", {"rate": 20},
     "listeners[0].per_client.rate: must be a positive rate like 20/s or 600/m, got 20"),
    ("listeners.0.per_client", {"rate": "0/s"},
     "listeners[0].per_client.rate: must be a positive rate like 20/s or 600/m, got '0/s'"),
    ("listeners.0.per_client", {"rate": "20/d"},
     "listeners[0].per_client.rate: must be a positive rate like 20/s or 600/m, got '20/d'"),
    ("listeners.0.per_client", {"max_con": 5},
     "listeners[0].per_client.max_con: unknown key (did you mean 'max_conns'?)"),
    ("listeners.0.per_client", 50, "listeners[0].per_client: must be a mapping, got 50"),
    ("listeners.0.allow", "10.0.0.0/8", "listeners[0].allow: must be a list, got '10.0.0.0/8'"),
    ("listeners.0.allow", ["10.0.0.0/8", "10.0.0.1/8"],
     "listeners[0].allow[1]: host bits set in '10.0.0.1/8' (did you mean 10.0.0.0/8?)"),
    ("listeners.0.deny", ["10.6.6.0/33"],
     "listeners[0].deny[0]: must be an address or a CIDR network, got '10.6.6.0/33'"),
    ("listeners.0.deny", [7], "listeners[0].deny[0]: must be an address or a CIDR network, got 7"),
    ("listeners.0.timeouts", {"proxy_header": 0},
     "listeners[0].timeouts.proxy_header: must be greater than 0, got 0"),
    ("listeners.0.timeouts", {"connect": "1s"}, "listeners[0].timeouts.connect: unknown key"),
    ("upstreams.app.send_proxy", "v3", "upstreams.app.send_proxy: must be v1 or v2 (omit it for "
     "off), got 'v3'"),
    ("upstreams.app.send_proxy", True, "upstreams.app.send_proxy: must be v1 or v2 (omit it for "
     "off), got True"),
    ("upstreams.app.servers", [{"address": "127.0.0.1:1", "send_proxy": 2}],
     "upstreams.app.servers[0].send_proxy: must be v1, v2 or off, got 2"),
]


def test_proxy_and_limit_keys_parse() -> None:
    data = minimal()
    data["listeners"][0].update({
        "accept_proxy": True, "max_conns": 100, "per_client": {"max_conns": 5, "rate": "600/m"},
        "allow": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"], "deny": ["10.6.6.0/24"],
        "timeouts": {"proxy_header": "500ms"},
    })
    data["upstreams"]["app"]["send_proxy"] = "v2"
    data["upstreams"]["app"]["servers"] = [
        {"address": "127.0.0.1:1", "send_proxy": "v1"}, {"address": "127.0.0.1:2",
                                                         "send_proxy": False}, "127.0.0.1:3"]
    config = parse_config(data)
    listener = config.listeners[0]
    assert listener.accept_proxy and listener.max_conns == 100 and listener.limited
    assert listener.per_client is not None
    assert (listener.per_client.max_conns, listener.per_client.rate) == (5, 10.0)
    assert [str(n) for n in listener.allow] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    assert [str(n) for n in listener.deny] == ["10.6.6.0/24"]
    assert listener.timeouts.proxy_header == 0.5
    upstream = config.upstreams["app"]
    assert upstream.send_proxy == "v2"
    assert [s.send_proxy for s in upstream.servers] == ["v1", "off", None]
    plain = parse_config(minimal()).listeners[0]
    assert not plain.accept_proxy and not plain.limited and plain.timeouts.proxy_header == 3.0


@pytest.mark.parametrize(("path", "value", "expected"), MISTAKES)
def test_each_mistake_has_its_exact_message(path: str, value: object, expected: str) -> None:
    assert expected in problems_of(_set(path, value))


def test_mistakes_report_only_themselves() -> None:
    """No knock-on noise: a single mistake yields a single line."""
    for path, value, expected in MISTAKES:
        assert problems_of(_set(path, copy.deepcopy(value))) == [expected], path


def test_allowed_hosts_are_normalised_as_a_host_header_carries_them() -> None:
    data = minimal()
    data["metrics"] = {"bind": "9100", "allowed_hosts": ["LB.Internal.", "[::1]", "10.0.0.1",
                                                        "0:0::2"]}
    metrics = parse_config(data).metrics
    assert metrics is not None
    assert metrics.allowed_hosts == ("lb.internal", "::1", "10.0.0.1", "::2")


@pytest.mark.parametrize(
    ("bind", "token", "disabled"),
    [("127.0.0.1:9100", None, False), ("127.1.2.3:9100", None, False),
     ("[::1]:9100", None, False), ("localhost:9100", None, False),
     ("0.0.0.0:9100", None, True), ("[::]:9100", None, True), ("10.0.0.1:9100", None, True),
     ("admin.example:9100", None, True), ("0.0.0.0:9100", "t", False)])
def test_posts_are_disabled_on_a_reachable_bind_without_a_token(
        bind: str, token: str | None, disabled: bool) -> None:
    from balancer.config import config_warnings

    data = minimal()
    data["metrics"] = {"bind": bind, "admin_token": token}
    config = parse_config(data)
    assert config.metrics is not None and config.metrics.posts_disabled is disabled
    assert len(config_warnings(config)) == disabled


def test_longest_host_name_weight_and_label_are_accepted() -> None:
    label = "b" * 63
    host = ".".join([label] * 3 + ["c" * 61])  # 253 characters
    assert len(host) == 253
    data = with_upstream(servers=[{"address": f"{host}:80", "weight": 256}])
    assert parse_config(data).upstreams["app"].servers[0].weight == 256


def test_ip_hash_total_weight_is_capped() -> None:
    """256 servers of weight 16 is a 655,360-point ring; one more unit is refused."""
    servers = [{"address": f"127.0.{i // 250}.{i % 250 + 1}:80", "weight": 16}
               for i in range(256)]
    assert parse_config(with_upstream(strategy="ip_hash", hash="ring", servers=servers))
    servers[0]["weight"] = 17
    assert problems_of(with_upstream(strategy="ip_hash", hash="ring", servers=servers)) == [
        "upstreams.app.servers: ip_hash allows a total weight of at most 4096 (its ring has "
        "160 points per unit), got 4097"]
    assert parse_config(with_upstream(strategy="weighted", servers=servers))


def test_duplicate_server_addresses() -> None:
    servers = ["127.0.0.1:3001", "127.0.0.1:3002", {"address": "127.0.0.1:3001"}, "127.0.0.1:3002"]
    assert problems_of(with_upstream(servers=servers)) == [
        "upstreams.app.servers[2].address: duplicate of servers[0]",
        "upstreams.app.servers[3]: duplicate of servers[1]",
    ]


def test_duplicate_listener_names_and_binds() -> None:
    data = minimal()
    data["listeners"] = [
        {"name": "web", "bind": "127.0.0.1:8080", "upstream": "app"},
        {"name": "web", "bind": "127.0.0.1:8081", "upstream": "app"},
        {"name": "other", "bind": "127.0.0.1:8080", "upstream": "app"},
    ]
    assert problems_of(data) == [
        "listeners[1].name: duplicate of listeners[0]",
        "listeners[2].bind: duplicate of listeners[0]",
    ]


def test_default_names_that_collide_say_how_to_fix_it() -> None:
    data = minimal()
    data["listeners"] = [{"bind": "127.0.0.1:0", "upstream": "app"}] * 2
    assert problems_of(data) == [
        "listeners[1].name: duplicate of listeners[0] "
        "(the name defaults to the bind address; set a name)"
    ]


def test_ephemeral_binds_are_not_duplicates() -> None:
    data = minimal()
    data["listeners"] = [
        {"name": "a", "bind": "127.0.0.1:0", "upstream": "app"},
        {"name": "b", "bind": "127.0.0.1:0", "upstream": "app"},
    ]
    assert len(parse_config(data).listeners) == 2


def test_unknown_upstream_lists_every_known_name() -> None:
    data = _set("listeners.0.upstream", "db")
    data["upstreams"]["cache"] = {"servers": ["127.0.0.1:6379"]}
    assert problems_of(data) == ["listeners[0].upstream: unknown upstream 'db' (known: app, cache)"]


def test_top_level_must_be_a_mapping() -> None:
    assert problems_of(["listeners"]) == ["<config>: must be a mapping of settings, got a list"]
    assert problems_of(None) == ["<config>: empty configuration"]


def test_every_mistake_in_one_file_is_reported_at_once() -> None:
    text = """\
listeners:
  - bind: 0.0.0.0:8080
    upstream: ap
  - bind: nowhere
    upstream: app
upstreams:
  app:
    stratgy: least_conn
    servers:
      - 127.0.0.1:3001
      - address: 127.0.0.1:3002
        weight: 0
    timeouts:
      connect: fast
workers: 0
"""
    assert problems_of(yaml.safe_load(text)) == [
        "listeners[0].upstream: unknown upstream 'ap' (known: app)",
        "listeners[1].bind: missing port in 'nowhere' (expected host:port or [v6]:port)",
        "upstreams.app.stratgy: unknown key (did you mean 'strategy'?)",
        "upstreams.app.servers[1].weight: must be a positive integer, got 0",
        "upstreams.app.timeouts.connect: must be a duration like 250ms, 10s, 5m, 1h, got 'fast'",
        "workers: must be a positive integer or 'auto', got 0",
    ]


# --- Files ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "balancer.yaml"
    path.write_text(text)
    return path


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, FULL)) == parse_config(yaml.safe_load(FULL))


def test_load_config_prefixes_nothing_to_key_paths(tmp_path: Path) -> None:
    path = write(tmp_path, FULL.replace("weight: 2", "weight: 0"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "upstreams.app.servers[0].weight: must be a positive integer, got 0"
    ]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listeners:\n  - bind: 127.0.0.1:0\n    upstream: [app\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: YAML syntax error at line 4, column 1: ")


def test_yaml_syntax_error_line_is_one_based(tmp_path: Path) -> None:
    text = "listeners:\n  - bind: 127.0.0.1:0\n   upstream: app\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "YAML syntax error at line 3, column 4: " in info.value.problems[0]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = FULL + "upstreams:\n  other:\n    servers: [127.0.0.1:1]\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    line = len(FULL.splitlines()) + 1
    assert info.value.problems == [
        f"{tmp_path / 'balancer.yaml'}: YAML syntax error at line {line}, column 1: "
        "duplicate key 'upstreams'"
    ]


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    full = (
        "listeners: [{bind: '127.0.0.1:80', upstream: app}]\n"
        "upstreams:\n  base: &base\n    servers: [127.0.0.1:3001]\n    strategy: weighted\n"
        "  app:\n    <<: *base\n    strategy: least_conn\n"
    )
    config = load_config(write(tmp_path, full))
    assert config.upstreams["app"].strategy == "least_conn"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: cannot read: No such file or directory"]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: empty configuration"]


VALID_FILE = "listeners: [{bind: '127.0.0.1:0', upstream: app}]\n" \
             "upstreams: {app: {servers: ['127.0.0.1:1']}}\n"


def test_a_file_of_up_to_1_mib_loads_and_a_larger_one_is_refused(tmp_path: Path) -> None:
    padding = 1024 * 1024 - len(VALID_FILE) - 1
    path = write(tmp_path, VALID_FILE + "#" * padding + "\n")
    assert path.stat().st_size == 1024 * 1024
    assert load_config(path).upstreams["app"]
    path.write_text(VALID_FILE + "#" * (padding + 1) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}: too large: over 1 MiB (the limit for a configuration file)"]


@pytest.mark.parametrize("style", ["flow", "block"])
def test_deep_nesting_is_a_clear_error(tmp_path: Path, style: str) -> None:
    """Thousands of levels used to end in a RecursionError traceback."""
    if style == "flow":
        text = "listeners: " + "[" * 5000 + "]" * 5000 + "\n"
    else:
        text = "".join(" " * level + f"k{level}:\n" for level in range(1000))  # 0.5 MB
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: nested deeper than 32 levels at line ")


def test_nesting_up_to_the_limit_is_parsed(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: " + "[" * 31 + "]" * 31 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "workers: must be a positive integer or 'auto', got a list" in info.value.problems


def test_shipped_configs_exist() -> None:
    names = {p.name for p in (CONFIGS / "examples").glob("*.yaml")}
    assert (CONFIGS / "upstream.yaml").is_file()
    assert names >= {f"{s}.yaml" for s in ("round_robin", "weighted", "least_conn", "ip_hash",
                                           "random_two")}


@pytest.mark.parametrize(
    "path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_shipped_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.listeners and config.upstreams


@pytest.mark.parametrize(
    "strategy", ["round_robin", "weighted", "least_conn", "ip_hash", "random_two"]
)
def test_each_example_uses_its_strategy(strategy: str) -> None:
    config = load_config(CONFIGS / "examples" / f"{strategy}.yaml")
    assert {up.strategy for up in config.upstreams.values()} == {strategy}


def test_reference_config_documents_every_key() -> None:
    """configs/upstream.yaml is the reference: every key the loader accepts appears in it,
    at its place, so a new key cannot ship undocumented."""
    from balancer import config as schema

    doc = yaml.safe_load((CONFIGS / "upstream.yaml").read_text())
    upstream = doc["upstreams"]["app"]
    server_keys = set().union(*(s.keys() for s in upstream["servers"] if "discover" not in s))
    discover_keys = set().union(*(s.keys() for s in upstream["servers"] if "discover" in s))
    # tls and sni cannot share a listener: each key is documented on one of them.
    listener_keys = set().union(*(lst.keys() for lst in doc["listeners"]))
    tls = doc["listeners"][0]["tls"]
    guarded = next(lst for lst in doc["listeners"] if "per_client" in lst)
    certificate_keys = set().union(*(c.keys() for c in tls["certificates"]))
    places = [
        (set(doc), schema.TOP_KEYS),
        (listener_keys, schema.LISTENER_KEYS),
        (set(tls), schema.LISTENER_TLS_KEYS),
        (certificate_keys, schema.CERTIFICATE_KEYS),
        (set(upstream["tls"]), schema.UPSTREAM_TLS_KEYS),
        (set(upstream["run"]), schema.RUN_KEYS),
        (set(guarded["per_client"]), schema.PER_CLIENT_KEYS),
        (set(guarded["timeouts"]), schema.LISTENER_TIMEOUTS_KEYS),
        (set().union(*doc["upstreams"].values()), schema.UPSTREAM_KEYS),
        (server_keys, schema.SERVER_KEYS),
        (discover_keys, schema.DISCOVER_KEYS),
        (set(doc["resolvers"]), schema.RESOLVERS_KEYS),
        (set(upstream["health"]), schema.HEALTH_KEYS),
        (set(upstream["health"]["check"]), schema.CHECK_KEYS),
        (set(upstream["retries"]), schema.RETRIES_KEYS),
        (set(upstream["pool"]), schema.POOL_KEYS),
        (set(upstream["timeouts"]), schema.TIMEOUTS_KEYS),
        (set(doc["metrics"]), schema.METRICS_KEYS),
        (set(doc["log"]), schema.LOG_KEYS),
    ]
    for documented, accepted in places:
        assert documented == set(accepted)


def test_ip_hash_table_is_maglev_unless_told_ring() -> None:
    assert parse_config(with_upstream(strategy="ip_hash")).upstreams["app"].hash == "maglev"
    for name in ("ring", "maglev"):
        data = with_upstream(strategy="ip_hash", hash=name)
        assert parse_config(data).upstreams["app"].hash == name
    assert problems_of(with_upstream(strategy="ip_hash", hash="ketama")) == [
        "upstreams.app.hash: must be one of ring, maglev, got 'ketama'"]


def test_hash_without_ip_hash_is_an_error() -> None:
    assert problems_of(with_upstream(strategy="least_conn", hash="maglev")) == [
        "upstreams.app.hash: only applies to strategy: ip_hash, got strategy: least_conn"]
    assert problems_of(with_upstream(hash="ring")) == [
        "upstreams.app.hash: only applies to strategy: ip_hash, got strategy: round_robin"]


def test_maglev_has_no_total_weight_cap() -> None:
    """Its table is 65,537 slots whatever the weights: 256 servers of weight 256 build it."""
    servers = [{"address": f"127.0.{i // 250}.{i % 250 + 1}:80", "weight": 256}
               for i in range(256)]
    assert parse_config(with_upstream(strategy="ip_hash", hash="maglev", servers=servers))
    assert parse_config(with_upstream(strategy="ip_hash", servers=servers))


# --- DNS discovery -------------------------------------------------------------------------


def test_discover_items_and_resolvers_parse() -> None:
    from balancer.config import DiscoverConfig, ResolversConfig

    data = with_upstream(servers=[
        {"discover": "App.Internal.:3000", "weight": 3, "max_conns": 100, "send_proxy": "v2"},
        {"discover": "_http._tcp.app.default.svc.cluster.local", "backup": True},
        "10.0.0.9:3000"])
    data["resolvers"] = {"nameservers": ["10.96.0.10", "127.0.0.1:5353", "[fd00::10]:53",
                                         "fd00::11"],
                         "interval": "2s", "timeout": "250ms", "hold": 0}
    config = parse_config(data)
    upstream = config.upstreams["app"]
    assert upstream.servers == (ServerConfig(Address("10.0.0.9", 3000)),)
    assert upstream.discover == (
        DiscoverConfig("app.internal", 3000, weight=3, max_conns=100, send_proxy="v2"),
        DiscoverConfig("_http._tcp.app.default.svc.cluster.local", None, backup=True))
    assert [d.source for d in upstream.discover] == [
        "dns app.internal", "dns _http._tcp.app.default.svc.cluster.local"]
    assert config.resolvers == ResolversConfig(
        (("10.96.0.10", 53), ("127.0.0.1", 5353), ("fd00::10", 53), ("fd00::11", 53)),
        interval=2.0, timeout=0.25, hold=0.0)
    assert parse_config(minimal()).resolvers == ResolversConfig((), 5.0, 1.0, 30.0)


def test_an_upstream_may_have_discovered_servers_only() -> None:
    config = parse_config(with_upstream(servers=[{"discover": "app:3000"}]))
    assert config.upstreams["app"].servers == ()
    assert [d.name for d in config.upstreams["app"].discover] == ["app"]


@pytest.mark.parametrize(("item", "expected"), [
    ({"discover": "app"}, "upstreams.app.servers[0].discover: missing port in 'app' (NAME:PORT "
     "for A/AAAA records; SRV names start with _)"),
    ({"discover": "_http._tcp.app:80"}, "upstreams.app.servers[0].discover: an SRV name "
     "carries its ports in its records: drop the port from '_http._tcp.app:80'"),
    ({"discover": "10.0.0.1:80"}, "upstreams.app.servers[0].discover: '10.0.0.1:80' is an "
     "address, not a name: list it as a server instead"),
    ({"discover": "app:0"}, "upstreams.app.servers[0].discover: port must be 1..65535, got 0"),
    ({"discover": "bad name:80"}, "upstreams.app.servers[0].discover: invalid host name "
     "'bad name'"),
    ({"discover": 3000}, "upstreams.app.servers[0].discover: must be NAME:PORT or an SRV name "
     "(_service._tcp.NAME), got 3000"),
    ({"discover": "_x._tcp.app", "weight": 2}, "upstreams.app.servers[0].weight: an SRV "
     "name's records carry their weights (omit weight)"),
    ({"discover": "app:1", "weight": 0}, "upstreams.app.servers[0].weight: must be a positive "
     "integer, got 0"),
    ({"discover": "app:1", "address": "10.0.0.1:1"}, "upstreams.app.servers[0].address: "
     "cannot be combined with discover (one or the other)"),
    ({"discover": "app:1", "ttl": 5}, "upstreams.app.servers[0].ttl: unknown key"),
    ({"discover": "app:1", "send_proxy": "v3"}, "upstreams.app.servers[0].send_proxy: must be "
     "v1, v2 or off, got 'v3'"),
])
def test_each_discover_mistake_has_its_exact_message(item: dict, expected: str) -> None:
    assert problems_of(with_upstream(servers=[item])) == [expected]


def test_a_name_discovered_twice_in_one_upstream_is_refused() -> None:
    problems = problems_of(with_upstream(servers=[{"discover": "app:1"},
                                                  {"discover": "APP.:2"}]))
    assert problems == ["upstreams.app.servers[1].discover: duplicate of servers[0] (one "
                        "discover item per name in an upstream)"]


@pytest.mark.parametrize(("resolvers", "expected"), [
    ({"nameservers": ["dns.local:53"]}, "resolvers.nameservers[0]: must be an IP address with "
     "an optional port, like 10.96.0.10:53 or [fd00::10]:53, got 'dns.local:53'"),
    ({"nameservers": ["10.0.0.1:0"]}, "resolvers.nameservers[0]: port must be 1..65535, got 0"),
    ({"nameservers": []}, "resolvers.nameservers: must not be empty (omit it to use "
     "/etc/resolv.conf)"),
    ({"nameservers": "10.0.0.1"}, "resolvers.nameservers: must be a list, got '10.0.0.1'"),
    ({"interval": 0}, "resolvers.interval: must be greater than 0, got 0"),
    ({"timeout": "1"}, "resolvers.timeout: must be a duration like 250ms, 10s, 5m, 1h, "
     "got '1'"),
    ({"hold": -1}, "resolvers.hold: must be a duration like 250ms, 10s, 5m, 1h, got -1"),
    ({"hodl": "1s"}, "resolvers.hodl: unknown key (did you mean 'hold'?)"),
    ("yes", "resolvers: must be a mapping, got 'yes'"),
])
def test_each_resolvers_mistake_has_its_exact_message(resolvers: object, expected: str) -> None:
    data = minimal()
    data["resolvers"] = resolvers
    assert problems_of(data) == [expected]


def test_check_validates_discover_without_resolving(tmp_path: Path) -> None:
    """`balancer check` reads the syntax only: a name no DNS knows, behind a nameserver
    nobody runs, is fine."""
    import subprocess
    import sys

    data = with_upstream(servers=[{"discover": "no-such-name.invalid:3000"}])
    data["resolvers"] = {"nameservers": ["192.0.2.1:53"], "timeout": "10s"}
    path = write(tmp_path, yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "balancer", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=5)
    assert done.returncode == 0, done.stderr

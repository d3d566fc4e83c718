"""Small building blocks for validating the configuration; only `balancer.config` uses them.

Validation never stops at the first mistake: every reader records a ``path: reason`` problem in
a shared `Problems` list and hands back a default, so the caller can carry on and report the
whole file at once.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import yaml

Choice = TypeVar("Choice", bound=str)  # one of a closed set of names

# [0-9], not \d: \d also matches other scripts' digits, which float() accepts (fullwidth 10s).
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")
DURATION_HINT = "must be a duration like 250ms, 10s, 5m, 1h"

# Limits on what a config file may be, so a wrong or hostile file is a clear error and not a
# stall, a RecursionError or an exhausted memory (a real configuration is a few KiB, 6 deep).
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_HOSTNAME = 253  # RFC 1035: a whole name; one label is at most 63
MAX_LABEL = 63
SHOWN_CHARS = 60  # longer bad values are cut in messages


def describe(value: object) -> str:
    """Show a bad value the way the operator wrote it; containers by kind, not by content."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return shown(value)
    return repr(value)


def shown(text: str) -> str:
    """`text` quoted for a message, cut when long: an error must not repeat a 5 MB value."""
    if len(text) <= SHOWN_CHARS:
        return repr(text)
    return f"{text[:SHOWN_CHARS]!r}... ({len(text)} characters)"


def child(path: str, key: object) -> str:
    """The path of `key` inside the mapping at `path` (the top level has an empty path)."""
    return f"{path}.{key}" if path else str(key)


def item(path: str, index: int) -> str:
    """The path of element `index` inside the list at `path`."""
    return f"{path}[{index}]"


class Problems:
    """Every problem found so far, in the order found, each as ``path: reason``."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append(f"{path}: {reason}")

    def __bool__(self) -> bool:
        return bool(self.items)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``250ms``, ``1.5s``, ``5m``, ``1h``.

    Raises ValueError (with the reason as its message) rather than guessing: a bare string
    like ``"10"`` or a boolean is far more likely a mistake than an intended duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"{DURATION_HINT}, got {describe(value)}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{DURATION_HINT}, got {describe(value)}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else math.inf
        if math.isfinite(seconds):  # 400 nines are a float too: infinity
            return seconds
    raise ValueError(f"{DURATION_HINT}, got {describe(value)}")


def split_host_port(text: object, *, min_port: int = 0) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; ValueError says what is wrong with it.

    Bare IPv6 literals are refused because ``::1:80`` cannot be split unambiguously.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be an address like host:port, got {describe(text)}")
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be [v6]:port, got {shown(text)}")
        _check_ipv6(host)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {shown(text)} (expected host:port or [v6]:port)")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets, like [::1]:80, got {shown(text)}")
        _check_host(host, text)
    return host, _parse_port(port_text, min_port)


def host_name(text: object) -> str:
    """A host name or IP address as an HTTP Host header carries it, normalised: lowercase,
    no trailing dot, IPv6 compressed and without brackets. ValueError says what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"must be a host name or address, got {describe(text)}")
    host = text.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        _check_ipv6(host)
        return ipaddress.IPv6Address(host).compressed
    _check_host(host, text)
    return host.rstrip(".")


def _check_ipv6(host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"invalid IPv6 address {shown(host)}") from None


def _check_host(host: str, text: str) -> None:
    """Hostnames are resolved later; here we only catch what can never resolve."""
    if not host:
        raise ValueError(f"missing host in {shown(text)}")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {shown(host)}") from None
        return
    if len(host) > MAX_HOSTNAME:
        raise ValueError(f"host name longer than {MAX_HOSTNAME} characters: {shown(host)}")
    if not _HOSTNAME.match(host):
        raise ValueError(f"invalid host name {shown(host)}")
    label = max(host.split("."), key=len)
    if len(label) > MAX_LABEL:
        raise ValueError(f"host name label longer than {MAX_LABEL} characters: {shown(label)}")


def _parse_port(text: str, min_port: int) -> int:
    numeric = text.isdigit() and text.isascii()
    port = int(text) if numeric else -1
    if not min_port <= port <= 65535:
        raise ValueError(f"port must be {min_port}..65535, got {text if numeric else shown(text)}")
    return port


def unknown_keys(data: Mapping[object, object], allowed: Iterable[str]) -> list[tuple[str, str]]:
    """(key, reason) for each key not in `allowed`, suggesting the closest known spelling."""
    allowed = list(allowed)
    found = []
    for key in data:
        name = str(key)
        if name in allowed:
            continue
        close = difflib.get_close_matches(name, allowed, n=1)
        reason = f"unknown key (did you mean {close[0]!r}?)" if close else "unknown key"
        found.append((name, reason))
    return found


def as_mapping(value: object, path: str, problems: Problems) -> Mapping[object, object] | None:
    """`value` if it is a mapping, else record the problem and return None."""
    if isinstance(value, Mapping):
        return value
    problems.add(path, f"must be a mapping, got {describe(value)}")
    return None


def as_list(value: object, path: str, problems: Problems) -> list[object] | None:
    """`value` if it is a list, else record the problem and return None."""
    if isinstance(value, list):
        return value
    problems.add(path, f"must be a list, got {describe(value)}")
    return None


class Section:
    """One mapping of the config, read key by key.

    A missing or null key yields the default; a bad value records a problem and also yields
    the default, so reading continues and later mistakes are still found.
    """

    def __init__(
        self, data: Mapping[object, object], path: str, problems: Problems, keys: Iterable[str]
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        for key, reason in unknown_keys(data, keys):
            problems.add(child(path, key), reason)

    def at(self, key: str) -> str:
        return child(self.path, key)

    def get(self, key: str) -> object:
        return self.data.get(key)

    def fail(self, key: str, reason: str) -> None:
        self.problems.add(self.at(key), reason)

    def required(self, key: str) -> object:
        """The value of a key that must be present; None (and a problem) when absent."""
        value = self.get(key)
        if value is None:
            self.fail(key, "required")
        return value

    def sub(self, key: str, keys: Iterable[str]) -> Section:
        """A nested section; absent (or broken, already reported) reads as all defaults."""
        value = self.get(key)
        data = {} if value is None else as_mapping(value, self.at(key), self.problems)
        return Section(data or {}, self.at(key), self.problems, keys)

    def host_port(self, key: str, *, min_port: int = 0) -> tuple[str, int] | None:
        """A required ``host:port``; None (and a problem) when absent or malformed."""
        value = self.required(key)
        if value is None:
            return None
        try:
            return split_host_port(value, min_port=min_port)
        except ValueError as exc:
            self.fail(key, str(exc))
            return None

    def integer(self, key: str, default: int, *, minimum: int = 0,
                maximum: tuple[int, str] | None = None) -> int:
        """An integer >= `minimum`; `maximum` is (the cap, why) for values that size memory."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
            if maximum is None or value <= maximum[0]:
                return value
            self.fail(key, f"must be at most {maximum[0]} ({maximum[1]}), got {value}")
            return default
        kind = "a positive integer" if minimum == 1 else "a non-negative integer"
        self.fail(key, f"must be {kind}, got {describe(value)}")
        return default

    def duration(self, key: str, default: float, *, positive: bool = False) -> float:
        value = self.get(key)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
            return default
        if positive and seconds <= 0:
            self.fail(key, f"must be greater than 0, got {describe(value)}")
            return default
        return seconds

    def choice(self, key: str, default: Choice, options: tuple[Choice, ...]) -> Choice:
        """One of `options` (a Literal type's values), so the result keeps that type."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, str):
            for option in options:
                if value == option:
                    return option
        self.fail(key, f"must be one of {', '.join(options)}, got {describe(value)}")
        return default

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        self.fail(key, f"must be a boolean, got {describe(value)}")
        return default

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, str) and value:
            return value
        if isinstance(value, str):
            self.fail(key, "must not be empty")
        else:
            self.fail(key, f"must be a string, got {describe(value)}")
        return default


def read_yaml(path: str | os.PathLike[str]) -> object:
    """The YAML document in `path`; ValueError carries one ``path: reason`` line.

    Read and syntax errors name the file (and line), since there is no key path yet. Files
    over MAX_CONFIG_BYTES and documents nested deeper than MAX_DEPTH are refused before they
    can stall the caller or exhaust its stack.
    """
    try:
        with Path(path).open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)  # never more, whatever the file's size
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: cannot read: not UTF-8 text") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path}: too large: over {MAX_CONFIG_BYTES >> 20} MiB "
                         "(the limit for a configuration file)")
    try:
        return yaml.load(text, Loader=StrictLoader)
    except TooDeep as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: {exc.problem}{where}") from None
    except RecursionError:  # not expected past TooDeep: still an error, not a traceback
        raise ValueError(f"{path}: nested too deeply") from None
    except yaml.MarkedYAMLError as exc:
        raise ValueError(_yaml_problem(str(path), exc)) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: YAML error: {exc}") from None


class TooDeep(yaml.MarkedYAMLError):
    """A document nested deeper than MAX_DEPTH (the composer would recurse for each level)."""


class StrictLoader(yaml.SafeLoader):
    """safe_load, except that a repeated key is an error instead of silently winning, and
    nesting stops at MAX_DEPTH levels.

    A second ``app:`` under ``upstreams`` would otherwise replace the first without a word.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise TooDeep(None, None, f"nested deeper than {MAX_DEPTH} levels",
                              self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may legitimately be overridden
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # unhashable; the base class reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    reason = exc.problem or exc.context or "invalid YAML"
    if mark is None:
        return f"{path}: YAML syntax error: {reason}"
    return f"{path}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {reason}"

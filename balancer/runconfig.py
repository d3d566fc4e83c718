"""The `run` section of an upstream: the app instances the balancer starts and supervises.

Part of config.py (which re-exports the dataclass), kept apart to keep each module small.
Paths are resolved here, once: a program path and `cwd` written relative are taken from the
config file's folder, and `log` as a folder likewise; the command's other arguments are the
app's business (it runs in `cwd`, which defaults to that same folder).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ._validate import Section, as_list, as_mapping, child, describe, item

RUN_KEYS = ("command", "instances", "cwd", "env", "ports", "ready_timeout", "kill_timeout",
            "max_memory", "log")
RESERVED_ENV = ("PORT", "INSTANCE")  # set by the balancer for each instance
MAX_INSTANCES = 256  # a typo like 4000 must not fork 4000 processes
_PORTS = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMG]?)\s*$", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


@dataclass(frozen=True)
class RunConfig:
    """How to start an upstream's instances (each gets PORT and INSTANCE in its env)."""

    command: tuple[str, ...]  # argv; the program resolved (absolute, or found on PATH)
    cwd: str  # absolute
    instances: int | None = 1  # None = auto: one per usable CPU
    env: tuple[tuple[str, str], ...] = ()
    ports: tuple[int, int] | None = None  # an inclusive range; None = free loopback ports
    ready_timeout: float = 10.0
    kill_timeout: float = 5.0
    max_memory: int = 0  # bytes of RSS; 0 = no limit
    log: str = "stderr"  # "stderr" (lines prefixed) or an absolute folder path

    @property
    def count(self) -> int:
        """The number of instances to run (`auto` resolved now)."""
        return self.instances if self.instances is not None else usable_cpus()


_RUN = RunConfig(command=(), cwd="")


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def upstream_run(upstream: Section, base: Path) -> RunConfig | None:
    """The upstream's `run` section, or None when it has none (or it is broken: reported)."""
    value = upstream.get("run")
    if value is None:
        return None
    data = as_mapping(value, upstream.at("run"), upstream.problems)
    if data is None:
        return None
    section = Section(data, upstream.at("run"), upstream.problems, RUN_KEYS)
    command = _command(section, base)
    instances = _instances(section)
    cwd = _folder(section, "cwd", base, must_exist=True)
    env = _env(section)
    ports = _ports(section, instances)
    ready_timeout = section.duration("ready_timeout", _RUN.ready_timeout, positive=True)
    kill_timeout = section.duration("kill_timeout", _RUN.kill_timeout, positive=True)
    max_memory = _memory(section)
    log = _log(section, base)
    if command is None:
        return None
    return RunConfig(command=command, cwd=cwd or str(base.resolve()), instances=instances,
                     env=env, ports=ports, ready_timeout=ready_timeout,
                     kill_timeout=kill_timeout, max_memory=max_memory, log=log)


def _command(section: Section, base: Path) -> tuple[str, ...] | None:
    value = section.required("command")
    if value is None:
        return None
    if isinstance(value, str):
        section.fail("command", "must be a list of arguments (argv, no shell), like "
                                f"[node, server.js], got {describe(value)}")
        return None
    items = as_list(value, section.at("command"), section.problems)
    if items is None:
        return None
    if not items:
        section.fail("command", "must not be empty")
        return None
    argv: list[str] = []
    for index, raw in enumerate(items):
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            section.problems.add(item(section.at("command"), index),
                                 f"must be a string, got {describe(raw)}")
            return None
        argv.append(str(raw))
    program = _program(argv[0], base)
    if program is None:
        where = "no such executable file" if "/" in argv[0] else "not found on PATH"
        section.problems.add(item(section.at("command"), 0), f"{where}: {argv[0]!r}")
        return None
    return (program, *argv[1:])


def _program(name: str, base: Path) -> str | None:
    """A program path as written (relative to the config's folder), or found on PATH."""
    if "/" not in name:
        return shutil.which(name)
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_file() and os.access(path, os.X_OK):
        return str(path.resolve())
    return None


def _instances(section: Section) -> int | None:
    value = section.get("instances")
    if value is None:
        return _RUN.instances
    if value == "auto":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INSTANCES:
        return value
    section.fail("instances", f"must be an integer 1..{MAX_INSTANCES} or 'auto', "
                              f"got {describe(value)}")
    return _RUN.instances


def _folder(section: Section, key: str, base: Path, *, must_exist: bool) -> str | None:
    value = section.string(key)
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    path = path.resolve()
    if path.exists() and not path.is_dir():
        section.fail(key, f"not a folder: {str(path)!r}")
        return None
    if must_exist and not path.is_dir():
        section.fail(key, f"no such folder: {str(path)!r}")
        return None
    return str(path)


def _env(section: Section) -> tuple[tuple[str, str], ...]:
    value = section.get("env")
    if value is None:
        return ()
    data = as_mapping(value, section.at("env"), section.problems)
    if data is None:
        return ()
    env: list[tuple[str, str]] = []
    for key, raw in data.items():
        path = child(section.at("env"), key)
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            section.problems.add(path, "must be a variable name")
            continue
        if key in RESERVED_ENV:
            section.problems.add(path, "set by the balancer for each instance (PORT is its "
                                       "port, INSTANCE its number 0..n-1)")
            continue
        if isinstance(raw, bool) or not isinstance(raw, str | int | float):
            section.problems.add(path, f"must be a string or a number, got {describe(raw)}")
            continue
        env.append((key, str(raw)))
    return tuple(env)


def _ports(section: Section, instances: int | None) -> tuple[int, int] | None:
    value = section.get("ports")
    if value is None:
        return None
    match = _PORTS.match(value) if isinstance(value, str) else None
    low, high = (int(match.group(1)), int(match.group(2))) if match else (0, -1)
    if match is None or not 1 <= low <= high <= 65535:
        section.fail("ports", f"must be a port range like 3001-3005, got {describe(value)}")
        return None
    count = instances if instances is not None else usable_cpus()
    if high - low + 1 < count + 1:
        section.fail("ports", f"{low}-{high} has {high - low + 1} port(s); {count} instance(s) "
                              f"need {count + 1} (a rollout starts each new instance beside "
                              "the old one)")
        return None
    return low, high


def _memory(section: Section) -> int:
    """Bytes from ``500M``, ``1.5G``, ``800K`` or a plain number of bytes (units of 1024)."""
    value = section.get("max_memory")
    if value is None:
        return _RUN.max_memory
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _MEMORY.match(value) if isinstance(value, str) else None
    size = float(match.group(1)) * _MEMORY_UNITS[match.group(2).upper()] if match else 0
    if size < 1:
        section.fail("max_memory", f"must be a size like 500M, 1G or 800K, got "
                                   f"{describe(value)}")
        return _RUN.max_memory
    return int(size)


def _log(section: Section, base: Path) -> str:
    value = section.get("log")
    if value is None or value == "stderr":
        return _RUN.log
    if not isinstance(value, str) or not value.strip():
        section.fail("log", f"must be stderr or a folder, got {describe(value)}")
        return _RUN.log
    return _folder(section, "log", base, must_exist=False) or _RUN.log

"""Servers found at run time, merged into the file's config and applied like a reload.

The config file names some servers; others come and go while the balancer runs: addresses a
DNS name resolves to, app instances the balancer starts itself. Each of those is a *source*
(`Source`), and each source says, per upstream, which servers it has found right now
(`Membership.update`). The *effective* config is the file's config with every source's
servers appended to their upstream; it is what the data path runs, and it is applied exactly
as a reload is (a new generation in every worker), so a server that stays keeps its health,
counters and pool, and one that left finishes its connections for up to `shutdown_timeout`.

Only the primary process owns a `Membership` (the `Balancer` alone, or the `Supervisor` with
workers): sources resolve and supervise once per balancer, and workers follow the effective
config they are sent. Applies run one at a time, each from the latest state, so a burst of
updates costs one apply and a file reload never races a source's update.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, Protocol

from .config import Config, ServerConfig

log = logging.getLogger("balancer.membership")

# Why a config is applied: a file reload (counted as a reload) or what the sources found.
Reason = Literal["reload", "found"]
# Applies a config in the owner (every worker, when there are workers); False: not applied,
# and the owner has already said why.
Apply = Callable[[Config, Reason], Awaitable[bool]]
# Open connections to `upstream`'s server `key`, in every worker, also after it left the set.
ActiveCount = Callable[[str, str], int]


class Source(Protocol):
    """Something that finds servers while the balancer runs (DNS names, managed instances)."""

    async def start(self, config: Config) -> None:
        """Begin with the file's config; awaited before any listener opens, so what can be
        found quickly is there for the first client. Bound the wait yourself."""

    def reconfigure(self, config: Config) -> None:
        """A file reload was applied: follow its new settings (names, instances, ...)."""

    async def stop(self) -> None:
        """The balancer is stopping and its clients have drained: end all background work."""


def make_sources(membership: Membership) -> list[Source]:
    """Every kind of source; each decides from the config whether it has anything to do."""
    from .appsource import AppSource
    from .discovery import DnsDiscovery  # imports dnspython: only where sources run

    return [AppSource(membership), DnsDiscovery(membership.update)]


class Membership:
    """What every source has found, and the effective config built from it."""

    def __init__(self, config: Config, apply: Apply, active: ActiveCount) -> None:
        self.config = config  # the file's, as last accepted
        self._apply = apply
        self._active = active
        self._found: dict[str, dict[str, tuple[ServerConfig, ...]]] = {}  # upstream -> source
        self._lock = asyncio.Lock()
        self._version = 0  # bumped by every change of what was found
        self._applied = 0  # the version the running config was built from
        self._live = False  # the owner runs the effective config: changes get applied
        self._task: asyncio.Task[None] | None = None
        self.sources: list[Source] = []

    # -- what sources call ------------------------------------------------------------------

    def update(self, upstream: str, source: str, servers: Sequence[ServerConfig]) -> None:
        """Replace what `source` has found for `upstream`; log and apply the change, if any."""
        by_source = self._found.setdefault(upstream, {})
        old = by_source.get(source, ())
        new = tuple(servers)
        if new == old:
            return
        if new:
            by_source[source] = new
        else:
            by_source.pop(source, None)
        self._version += 1
        old_keys = {server.key for server in old}
        new_keys = {server.key for server in new}
        named = self._file_keys(upstream)  # the file wins on these: no change to report
        added = [f"+{server.key}" for server in new
                 if server.key not in old_keys and server.key not in named]
        removed = [f"-{server.key}" for server in old
                   if server.key not in new_keys and server.key not in named]
        if added or removed:
            log.info("upstream %s: %s (%s)", upstream, " ".join(added + removed), source)
        self._schedule()

    def _file_keys(self, upstream: str) -> set[str]:
        """The addresses the file names for `upstream`: a source finding one changes nothing."""
        section = self.config.upstreams.get(upstream)
        return {server.key for server in section.servers} if section is not None else set()

    def active(self, upstream: str, key: str) -> int:
        """Open connections to a server, in every worker (also one no longer in the set)."""
        return self._active(upstream, key)

    # -- what the owner calls ---------------------------------------------------------------

    async def start(self) -> None:
        """Create and start the sources; what they find now is in `effective()`."""
        self.sources = make_sources(self)
        for source in self.sources:
            await source.start(self.config)

    def effective(self, config: Config | None = None) -> Config:
        """`config` (default: the file's) with what the sources found added to its upstreams.
        A found server whose address the file already names is left out: the file wins."""
        config = self.config if config is None else config
        self._applied = self._version
        upstreams = dict(config.upstreams)
        changed = False
        for name, by_source in self._found.items():
            upstream = upstreams.get(name)
            if upstream is None:  # a reload removed it; its source is told to stop
                continue
            seen = {server.key for server in upstream.servers}
            extra: list[ServerConfig] = []
            for servers in by_source.values():
                for server in servers:
                    if server.key not in seen:
                        seen.add(server.key)
                        extra.append(server)
            if extra:
                upstreams[name] = dataclasses.replace(
                    upstream, servers=(*upstream.servers, *extra))
                changed = True
        return dataclasses.replace(config, upstreams=upstreams) if changed else config

    def go_live(self) -> None:
        """The owner now runs `effective()`: from here on every change is applied."""
        self._live = True
        if self._version != self._applied:
            self._schedule()

    async def reload(self, config: Config) -> bool:
        """Apply a new file config (with what was found); on success the sources follow it."""
        async with self._lock:
            if not await self._apply(self.effective(config), "reload"):
                return False
            self.config = config
        for source in self.sources:
            source.reconfigure(config)
        return True

    async def settled(self) -> None:
        """Return once every change made so far is applied (or could not be)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def stop(self) -> None:
        """Stop applying, then stop every source (after the owner's clients drained)."""
        self._live = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for source in self.sources:
            try:
                await source.stop()
            except Exception:
                log.exception("a source of servers failed to stop")

    # -- applying ------------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._live and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._apply_found())

    async def _apply_found(self) -> None:
        # Each pass builds from the latest state, so updates that came meanwhile cost one more
        # pass at most, and a file reload (same lock) is never undone by an older view.
        while self._live and self._version != self._applied:
            async with self._lock:
                try:
                    await self._apply(self.effective(), "found")
                except Exception:
                    log.exception("could not apply the servers found")

"""The membership source of managed app instances: one `AppGroup` (apps.py) per upstream
with a `run` section, started with the balancer, following its reloads, stopped last.

Registered in `membership.make_sources()`; the admin endpoint reaches it through its
owner's `membership` (`app_source`) for rollouts and /status.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .apps import AppGroup
from .config import Address, CheckConfig, Config, UpstreamConfig
from .instances import Probe

if TYPE_CHECKING:
    from .membership import Membership


class AppSource:
    """The membership source of managed instances: one `AppGroup` per upstream with `run`."""

    def __init__(self, membership: Membership, probe: Probe | None = None) -> None:
        self.membership = membership
        self.probe = probe or check_probe
        self.groups: dict[str, AppGroup] = {}
        self.leaving: list[AppGroup] = []  # removed by a reload, draining
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, config: Config) -> None:
        groups = [self._group(up, config) for up in config.upstreams.values()
                  if up.run is not None]
        await asyncio.gather(*(group.start() for group in groups))

    def _group(self, upstream: UpstreamConfig, config: Config) -> AppGroup:
        assert upstream.run is not None
        group = AppGroup(upstream, upstream.run, self.membership, config.shutdown_timeout,
                         self.probe)
        self.groups[upstream.name] = group
        return group

    def reconfigure(self, config: Config) -> None:
        """A reload: new `run` sections start, removed ones stop, changed ones roll out."""
        for name in [name for name in self.groups if not _runs(config, name)]:
            removed = self.groups.pop(name)
            self.leaving.append(removed)
            self._background(self._retire(removed))
        for upstream in config.upstreams.values():
            if upstream.run is None:
                continue
            group = self.groups.get(upstream.name)
            if group is None:
                self._background(self._group(upstream, config).start())
                continue
            group.check = upstream.health.check
            group.shutdown_timeout = config.shutdown_timeout
            if upstream.run != group.run:
                group.start_rollout(upstream.run, "the run section changed")

    def rollout(self, upstream: str) -> tuple[int, dict[str, Any]]:
        """The admin endpoint's POST /upstreams/{name}/rollout: (HTTP status, body)."""
        group = self.groups.get(upstream)
        if group is None:
            return 404, {"error": f"upstream {upstream!r} runs no instances (no run section)"}
        if not group.start_rollout(reason="requested"):
            return 409, {"error": "a rollout is already running", "rollout": group.rollout}
        return 202, {"rollout": group.rollout}

    def status(self, upstream: str) -> dict[str, Any] | None:
        group = self.groups.get(upstream)
        return None if group is None else group.status()

    async def _retire(self, group: AppGroup) -> None:
        try:
            await group.retire()
        finally:
            self.leaving.remove(group)

    async def stop(self) -> None:
        groups = [*self.groups.values(), *self.leaving]
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(group.stop() for group in groups))

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def app_source(owner: object) -> AppSource | None:
    """The AppSource of a balancer (or supervisor view) that has a `membership`, if any."""
    membership = getattr(owner, "membership", None)
    for source in getattr(membership, "sources", ()):
        if isinstance(source, AppSource):
            return source
    return None


def _runs(config: Config, name: str) -> bool:
    upstream = config.upstreams.get(name)
    return upstream is not None and upstream.run is not None


async def check_probe(address: Address, check: CheckConfig) -> tuple[bool, str]:
    """An instance's readiness check: the upstream's active health check, once."""
    from .checks import probe_address

    try:
        return await probe_address(address, check)
    except Exception as exc:  # what the app provoked (an endless status line): not ready
        return False, f"probe error ({type(exc).__name__})"

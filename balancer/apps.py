"""The app instances of one upstream with a `run` section: kept running, rolled, stopped.

An `AppGroup` publishes its ready instances to membership (membership.py) as the servers of
its upstream, 127.0.0.1:PORT each, so the data path treats them as any other server; the
source that owns every group is `appsource.AppSource`, in the primary process only. A group
keeps `instances` processes:

- start: every instance at once; a server is added only once its instance accepts
  connections (and passes health.check when configured) within `ready_timeout`;
- crash: the exited instance leaves the set at once (its exit callback publishes), and is
  restarted on the same port after 1 s, doubling to 30 s while it keeps crashing; one that
  served for STABLE_RUN starts the count again;
- replace (rollout, max_memory): a new instance on a fresh port, ready before it goes in;
  the old one leaves the set, finishes its connections (up to `shutdown_timeout`), then
  gets SIGTERM, and SIGKILL after `kill_timeout`. One at a time, so capacity never dips;
- stop: every instance the same graceful way, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import CheckConfig, RunConfig, ServerConfig, UpstreamConfig
from .instances import STATES, Instance, Probe
from .metrics import instance_metrics

if TYPE_CHECKING:
    from .membership import Membership

log = logging.getLogger("balancer.apps")

RESTART_DELAY_FIRST = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_RUN = 30.0  # an instance ready this long was no crash loop
RSS_INTERVAL = 1.0  # seconds between RSS samples (max_memory, /status)
DRAIN_POLL = 0.05  # seconds between looks at a draining instance's open connections
START_GRACE = 2.0  # beyond ready_timeout, for start() to give up waiting


def source_name(upstream: str) -> str:
    """What this source is called in Membership.update and its log line."""
    return f"run {upstream}"


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class AppGroup:
    """The instances of one upstream (see the module docstring)."""

    def __init__(self, upstream: UpstreamConfig, run: RunConfig, membership: Membership,
                 shutdown_timeout: float, probe: Probe) -> None:
        self.name = upstream.name
        self.run = run
        self.check: CheckConfig | None = upstream.health.check
        self.membership = membership
        self.shutdown_timeout = shutdown_timeout
        self.probe = probe
        self.slots: list[Instance] = []
        self.retiring: list[Instance] = []
        self.crashes: list[int] = []  # per slot, in a row
        self.rollout: dict[str, Any] = {"state": "none"}
        self.stopping = False
        self._pending: RunConfig | None = None  # a reload's run section, after this rollout
        self._rolling: asyncio.Task[None] | None = None
        self._replacing = asyncio.Lock()  # one replacement (rollout step, max_memory) at once
        self._tasks: set[asyncio.Task[None]] = set()
        self._keepers: list[asyncio.Task[None]] = []
        self._first: list[asyncio.Event] = []
        self.metrics = instance_metrics()
        self.metrics.restarts.labels(self.name)

    # -- start and keep ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start every instance; return once each is ready or has failed its first start
        (bounded by ready_timeout: the balancer must not wait for ever on a broken app)."""
        ports = self._initial_ports(self.run.count)
        for index, port in enumerate(ports):
            self._add_slot(Instance(self.name, index, port, self.run))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.run.ready_timeout + START_GRACE):
                await asyncio.gather(*(event.wait() for event in self._first))
        ready = sum(inst.state == "ready" for inst in self.slots)
        log.info("upstream %s: %d of %d instance(s) ready", self.name, ready, len(self.slots))
        self._spawn(self._watch_memory())

    def _add_slot(self, inst: Instance) -> None:
        self.slots.append(inst)
        self.crashes.append(0)
        self._first.append(asyncio.Event())
        keeper = asyncio.get_running_loop().create_task(self._keep(inst.index))
        keeper.add_done_callback(self._keeper_done)
        self._keepers.append(keeper)

    def _keeper_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("upstream %s: an instance's keeper failed; it is no longer restarted",
                      self.name, exc_info=task.exception())

    def _initial_ports(self, count: int) -> list[int]:
        if self.run.ports is None:
            return [free_loopback_port() for _ in range(count)]
        low, _ = self.run.ports
        return list(range(low, low + count))

    def _fresh_port(self) -> int:
        """A port no instance of this group holds (a range keeps one spare for this)."""
        if self.run.ports is None:
            return free_loopback_port()
        used = {inst.port for inst in [*self.slots, *self.retiring]}
        low, high = self.run.ports
        for port in range(low, high + 1):
            if port not in used:
                return port
        raise RuntimeError(f"upstream {self.name}: no free port in run.ports {low}-{high}")

    async def _keep(self, index: int) -> None:
        """Keep slot `index` running: start its instance, and restart it when it exits,
        unless it was replaced (then watch the replacement) or the group is stopping."""
        while not self.stopping:
            inst = self.slots[index]
            if inst.process is None and not inst.exited.done():
                failure = await self._bring_up(inst)
                self._first[index].set()
                if failure is not None and inst.running() and not self.stopping:
                    log.warning("%s: %s", inst.label, failure)  # no exit line would say it
                    await inst.terminate()
            await asyncio.shield(inst.exited)
            if self.stopping:
                return
            if inst is not self.slots[index]:
                continue  # replaced on purpose: the replacement is ours now
            delay = self._after_crash(index, inst)
            self.metrics.restarts.labels(self.name).inc()
            log.warning("%s %s; restarting in %gs", inst.label, inst.last_exit, delay)
            inst.state = "backoff"
            self._count_states()
            await asyncio.sleep(delay)
            if self.stopping or inst is not self.slots[index]:
                continue
            again = Instance(self.name, index, inst.port, inst.config, inst.restarts + 1)
            again.last_exit = inst.last_exit
            self.slots[index] = again

    def _after_crash(self, index: int, inst: Instance) -> float:
        served = time.monotonic() - inst.ready_at if inst.ready_at is not None else 0.0
        if served >= STABLE_RUN:
            self.crashes[index] = 0
        self.crashes[index] += 1
        return min(RESTART_DELAY_FIRST * 2 ** (self.crashes[index] - 1), RESTART_DELAY_MAX)

    async def _bring_up(self, inst: Instance) -> str | None:
        """Spawn `inst` and wait until it is ready; None when it is, else why not."""
        inst.state = "starting"
        self._count_states()
        try:
            await inst.spawn()
        except (OSError, subprocess.SubprocessError) as exc:
            inst.last_exit = f"cannot start: {getattr(exc, 'strerror', None) or exc}"
            inst.exited.set_result(-1)
            return inst.last_exit
        inst.exited.add_done_callback(lambda _: self._exited(inst))
        failure = await inst.wait_ready(self.check, self.probe)
        if failure is None and inst.running() and inst.state == "starting":  # not replaced
            inst.state = "ready"
            inst.ready_at = time.monotonic()
            log.info("%s ready on port %d", inst.label, inst.port)
            self._publish()
        return failure

    def _exited(self, inst: Instance) -> None:
        """An instance's process ended: out of the set at once (no failed connect needed)."""
        if not inst.stop_requested:
            log.debug("%s %s", inst.label, inst.last_exit)
        self._publish()

    def _publish(self) -> None:
        """Tell membership which instances take traffic now: the ready ones."""
        servers: Sequence[ServerConfig] = [inst.server() for inst in self.slots
                                           if inst.state == "ready" and inst.running()]
        self.membership.update(self.name, source_name(self.name), servers)
        self._count_states()

    def _count_states(self) -> None:
        counts = dict.fromkeys(STATES, 0)
        for inst in [*self.slots, *self.retiring]:
            if inst.running() or inst.state == "backoff":
                counts[inst.state] += 1
            elif inst.state == "starting" and not inst.exited.done():
                counts["starting"] += 1
        for state, count in counts.items():
            self.metrics.instances.labels(self.name, state).set(count)

    # -- replace ------------------------------------------------------------------------------

    async def _replace(self, index: int, run: RunConfig, why: str, restarts: int = 0
                       ) -> str | None:
        """Replace slot `index` by a new instance of `run`; None when done, else why not
        (then the old instance keeps serving). `restarts` adds to the old one's count."""
        old = self.slots[index]
        new = Instance(self.name, index, self._fresh_port(), run, old.restarts + restarts)
        self.retiring.append(new)  # holds its port, shows in /status while it starts
        failure = await self._bring_up(new)
        self.retiring.remove(new)
        if failure is not None or self.stopping:
            await new.terminate()
            return failure or "stopping"
        self.slots[index] = new
        log.info("%s replaces %s (%s)", new.label, old.label, why)
        self._publish()  # +new -old in one change
        await self._retire(old)
        return None

    async def _retire(self, old: Instance) -> None:
        """Drain an instance that left the set, then stop it."""
        self.retiring.append(old)
        try:
            if old.running():
                old.state = "draining"
                self._count_states()
                await self._drained(old)
            old.state = "stopping"
            self._count_states()
            await old.terminate()
        finally:
            self.retiring.remove(old)
            self._count_states()

    async def _drained(self, old: Instance) -> None:
        await self.membership.settled()  # every worker has the set without it now
        key = str(old.address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while self.membership.active(self.name, key) and loop.time() < deadline:
            if old.exited.done():
                return
            await asyncio.sleep(DRAIN_POLL)
        left = self.membership.active(self.name, key)
        if left:
            log.warning("%s: %d connection(s) still open after shutdown_timeout %gs",
                        old.label, left, self.shutdown_timeout)

    # -- rollout -----------------------------------------------------------------------------

    def start_rollout(self, run: RunConfig | None = None, reason: str = "requested") -> bool:
        """Begin replacing every instance, one at a time; False if one is already running
        (a reload's new run section is then rolled out right after it)."""
        if self._rolling is not None and not self._rolling.done():
            if run is not None:
                self._pending = run
            return False
        self._begin(run or self.run, reason)
        return True

    def _begin(self, run: RunConfig, reason: str) -> None:
        self.rollout = {"state": "running", "reason": reason, "started": time.time(),
                        "finished": None, "done": 0, "total": run.count, "error": None}
        self._rolling = asyncio.get_running_loop().create_task(self._roll(run, reason))

    async def _roll(self, run: RunConfig, reason: str) -> None:
        started = self.rollout["started"]
        count = run.count
        log.info("upstream %s: rollout of %d instance(s) begins (%s)", self.name, count, reason)
        self.run = run
        failure = None
        async with self._replacing:
            for index in range(count):
                if self.stopping:
                    failure = "the balancer is stopping"
                    break
                try:
                    failure = await self._roll_slot(index, run)
                except (OSError, RuntimeError) as exc:  # no port left in the range
                    failure = str(exc)
                if failure is not None:
                    failure = f"new instance #{index}: {failure}"
                    break
                self.rollout["done"] = index + 1
            if failure is None and len(self.slots) > count:  # fewer instances than before
                await self._retire_all(self._shrink(count))
        took = time.time() - started
        self.rollout.update(finished=time.time(), duration=round(took, 3))
        if failure is None:
            self.rollout["state"] = "done"
            log.info("upstream %s: rollout done in %.1fs", self.name, took)
        else:
            self.rollout.update(state="failed", error=failure)
            log.error("upstream %s: rollout stopped: %s; the old instances keep serving",
                      self.name, failure)
        pending, self._pending = self._pending, None
        if pending is not None and not self.stopping:
            self._begin(pending, "the run section changed")

    async def _roll_slot(self, index: int, run: RunConfig) -> str | None:
        if index < len(self.slots):
            return await self._replace(index, run, "rollout")
        inst = Instance(self.name, index, self._fresh_port(), run)  # more than before
        self._add_slot(inst)
        await self._first[index].wait()
        return None if inst.state == "ready" else inst.last_exit or "not ready"

    def _shrink(self, count: int) -> list[Instance]:
        """Take the slots past `count` out of the set (their keepers end)."""
        surplus = self.slots[count:]
        for task in self._keepers[count:]:
            task.cancel()
        del self.slots[count:], self._keepers[count:], self.crashes[count:]
        del self._first[count:]
        self._publish()
        return surplus

    async def _retire_all(self, instances: list[Instance]) -> None:
        await asyncio.gather(*(self._retire(inst) for inst in instances))

    # -- max_memory ---------------------------------------------------------------------------

    async def _watch_memory(self) -> None:
        while not self.stopping:
            await asyncio.sleep(RSS_INTERVAL)
            for inst in [*self.slots, *self.retiring]:
                inst.sample_rss()
            limit = self.run.max_memory
            if not limit or self._replacing.locked():
                continue
            for index, inst in enumerate(self.slots):
                limit = inst.config.max_memory
                if limit and inst.state == "ready" and inst.rss > limit:
                    log.warning("%s: RSS %s over max_memory %s: replacing it", inst.label,
                                _size(inst.rss), _size(limit))
                    self._spawn(self._memory_restart(index, inst))
                    break  # one at a time, as in a rollout

    async def _memory_restart(self, index: int, inst: Instance) -> None:
        async with self._replacing:
            if self.stopping or self.slots[index] is not inst:
                return
            self.metrics.restarts.labels(self.name).inc()
            failure = await self._replace(index, inst.config, "max_memory", restarts=1)
            if failure is not None:
                log.error("%s: its replacement failed (%s); it keeps serving", inst.label,
                          failure)

    # -- stop ---------------------------------------------------------------------------------

    async def _end_background_work(self) -> None:
        """Stopping or retiring: no keeper, restart or rollout may act on an instance after."""
        self.stopping = True
        tasks = [*self._keepers, *self._tasks]
        if self._rolling is not None:
            tasks.append(self._rolling)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Stop every instance gracefully (SIGTERM, SIGKILL after kill_timeout), at once."""
        await self._end_background_work()
        alive = [inst for inst in [*self.slots, *self.retiring] if inst.running()]
        for inst in alive:
            inst.state = "stopping"
        self._count_states()
        await asyncio.gather(*(inst.terminate() for inst in alive))
        self.membership.update(self.name, source_name(self.name), ())
        for inst in alive:
            if inst.exited.done() and inst.last_exit is not None:
                log.info("%s stopped (%s)", inst.label, inst.last_exit)

    async def retire(self) -> None:
        """A reload removed this group: out of the set first, drained, then stopped."""
        await self._end_background_work()
        leaving = [inst for inst in self.slots if inst.running()]
        self.slots = []
        self.membership.update(self.name, source_name(self.name), ())
        log.info("upstream %s: run section removed: stopping %d instance(s) once drained",
                 self.name, len(leaving))
        await asyncio.gather(*(self._retire(inst) for inst in leaving))
        await self.stop()  # whatever was still starting or retiring

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The group for /status: every instance, retiring ones too, and the last rollout."""
        for inst in [*self.slots, *self.retiring]:
            inst.sample_rss()
        return {"instances": [instance_status(inst) for inst in [*self.slots, *self.retiring]],
                "rollout": dict(self.rollout)}


def instance_status(inst: Instance) -> dict[str, Any]:
    running = inst.running()
    return {"index": inst.index, "pid": inst.pid if running else None, "port": inst.port,
            "state": inst.state, "restarts": inst.restarts,
            "uptime": round(inst.uptime(), 3) if running else None,
            "rss": inst.rss if running else None, "last_exit": inst.last_exit}


def _size(count: int) -> str:
    return f"{count / (1 << 20):.1f}M"

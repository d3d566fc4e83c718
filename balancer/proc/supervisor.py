"""The primary of a multi-worker balancer: sockets, workers, reload, stop. No client traffic.

gunicorn's arbiter is the model: signal handlers only queue; one loop does the work.

- Sockets: for every listener the primary binds one SO_REUSEPORT socket per worker slot and
  keeps it open for as long as the listener exists. The kernel spreads connections across the
  slots; a worker that dies or is replaced leaves its queue intact for its successor, so no
  queued connection is ever reset by a restart or a reload. A stop closes them at once (the
  workers close their copies as they stop accepting), so new clients are refused.
- Workers are fresh interpreters (`python -m balancer.proc.worker`): each creates its own loop and
  inherits no event loop, thread or lock from the primary. They get their config (the exact
  `Config` the primary validated) and sockets over a stream socket pair (control.py).
- A worker that exits unexpectedly is logged with its status and replaced: at once the first
  time, then, while its slot keeps crashing, after a delay that doubles up to
  `RESTART_DELAY_MAX` (`SlotBackoff`). Meanwhile the slot's sockets are closed, so the kernel
  sends new clients to the workers that run. The primary never gives up on a worker that
  booted; it gives up (exit 1) only on one that cannot boot (`EXIT_BOOT_ERROR`: a bad
  environment fails the same way every time).
- SIGHUP (or `balancer reload`) reloads: a bad config is logged and counted and changes
  nothing; a good one becomes the next *generation* and is sent to every worker, which
  applies it in place. Generations keep the workers on one config: every worker knows the
  generation it runs, a worker that becomes ready on an older one (it was starting during a
  reload) is sent the current one, answers name the generation they are about (a late answer
  is never taken for a later one), and a worker that fails to apply a generation (it says so,
  or does not answer within `REPLY_TIMEOUT`) is replaced by one started on it: the primary
  starts the replacement, then lets the old worker drain, as a restart does.
- Metrics: prometheus-client multiprocess mode in a clean directory; the primary serves one
  `/metrics` for all workers and calls `mark_process_dead` for every worker it reaps.
- Shared state (shared.py): active connections per server across workers, and health and
  drain decisions, so least_conn and ejections are global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..config import Address, Config, ConfigError, ListenerConfig, reload_problems
from ..membership import Membership, Reason
from ..notify import Notifier
from ..signals import handle_stop_signals, remove_stop_signals
from ..sockets import BindError, bind_group
from ..watch import ConfigWatcher
from .control import EXIT_BOOT_ERROR, Channel, ChannelClosed, Message, channel_pair
from .shared import HEARTBEAT_INTERVAL

log = logging.getLogger("balancer.supervisor")

RESTART_DELAY_FIRST = 0.1  # after the second crash in a row of a slot; the first: at once
RESTART_DELAY_MAX = 30.0
STABLE_RUN = 30.0  # a worker that served this long before it died restarts at once again
READY_TIMEOUT = 15.0
EXIT_GRACE = 5.0  # for a worker that closed its channel before it was ready to exit
REPLY_TIMEOUT = 15.0  # for a worker to apply a reload; past it, the worker is replaced
# For the workers to flush their metrics before a scrape; one that has not answered by then
# shows what it flushed last (at most FLUSH_INTERVAL, a second, old).
FLUSH_TIMEOUT = 0.5
SHARED_ROWS = 16384  # servers the shared table can hold (pages never touched cost nothing)
ROW_SWEEP_INTERVAL = 1.0  # seconds between looks for rows to free
STATE_PREFIX = "balancer-"  # + the primary's pid + a random part, in the temp folder
COLUMNS_PER_WORKER = 4  # worker slots in the table: room for replacements while old ones drain


class GiveUp(Exception):
    """Workers keep failing; stop instead of restarting them for ever."""


class WorkerDied(Exception):
    """A worker exited (or never answered) before it was ready."""

    def __init__(self, slot: int, code: int) -> None:
        super().__init__(f"worker {slot} exited with {code}")
        self.slot = slot
        self.code = code


# A slot that waits this long or more to restart closes its sockets meanwhile: closing resets
# the clients already queued on them, which is worth it only when they would wait longer.
PARK_AFTER = 1.0


@dataclass
class SlotBackoff:
    """How long a slot waits before its next worker starts: nothing after a first crash, then
    a delay doubling with every crash in a row, up to RESTART_DELAY_MAX. A worker that
    served for STABLE_RUN ends the run of crashes."""

    delay: float = 0.0
    crashes: int = 0  # in a row

    def after_crash(self, ran_for: float) -> float:
        if ran_for >= STABLE_RUN:
            self.crashes = 0
        self.crashes += 1
        self.delay = (0.0 if self.crashes == 1 else
                      min(RESTART_DELAY_FIRST * 2 ** (self.crashes - 2), RESTART_DELAY_MAX))
        return self.delay


@dataclass(eq=False)  # compared and hashed by identity: one object per process
class WorkerProcess:
    slot: int
    column: int
    process: asyncio.subprocess.Process
    control: Channel
    replies: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    # The generation it was started on, then the last one it confirmed; and the socket
    # groups (self.sockets' values) it holds, so that a reload sends only new ones.
    generation: int = 0
    held: dict[str, list[list[socket.socket]]] = field(default_factory=dict)
    talking: asyncio.Lock = field(default_factory=asyncio.Lock)  # one exchange at a time
    retiring: bool = False  # replaced: it drains and exits, and is not restarted
    ready_at: float = 0.0  # monotonic time it said "ready"
    hung: bool = False  # killed because its heartbeat stopped
    stop_sent: bool = False  # a second SIGTERM would close its connections at once
    flushes: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # asked, by id

    def stop(self) -> None:
        """Ask it to stop accepting and drain (once)."""
        if not self.stop_sent:
            self.stop_sent = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)


class Supervisor:
    def __init__(self, config: Config, config_path: str, workers: int, state_dir: Path,
                 watcher: ConfigWatcher | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.watcher = watcher or ConfigWatcher(config_path)
        self.notifier = Notifier.from_environment()  # before any worker inherits it
        self.count = workers
        self.state_dir = state_dir
        self.sockets: dict[str, list[list[socket.socket]]] = {}  # listener -> slot -> group
        self.rows: dict[str, int] = {}  # server key -> its row in the shared table
        self.free_rows: list[int] = []  # given out before, free again
        self.next_row = 0  # rows from here on were never given out
        self.free_columns = list(range(workers * COLUMNS_PER_WORKER))
        self.workers: dict[int, WorkerProcess] = {}  # slot -> live worker
        self.starting: set[WorkerProcess] = set()  # spawned, not ready yet
        self.retired: set[WorkerProcess] = set()  # replaced, draining
        self.generation = 1  # of self.config: every applied config gets the next number
        self.leaving: list[socket.socket] = []  # of listeners a reload in progress removes
        self._reload_lock = asyncio.Lock()
        self.backoff: dict[int, SlotBackoff] = {}  # slot -> its restart delay
        self.restarts: dict[int, tuple[int, str]] = {}  # slot -> (restarts, why the last one)
        self.started_at = time.monotonic()
        self.failure: str | None = None
        self.stopping = False
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_ids = 0
        from .shared import SharedTable

        self.table = SharedTable(state_dir / "shared", SHARED_ROWS, len(self.free_columns),
                                 create=True)
        self.view: Any = None
        self.admin: Any = None
        self.membership = Membership(config, self.apply, self.server_active)

    # -- sockets and rows -----------------------------------------------------------------------

    def bind_listener(self, cfg: ListenerConfig, ours: bool = False) -> list[list[socket.socket]]:
        """For each worker slot, a group of SO_REUSEPORT sockets, all on the same address.
        The first group checks that nobody else listens there, unless `reuse_port` says to
        share the address or it is `ours` (a reload renaming a listener); the others join it."""
        slots: list[list[socket.socket]] = []
        port = cfg.bind.port
        exclusive = not (ours or cfg.reuse_port)
        try:
            for _ in range(self.count):
                try:
                    group = bind_group(cfg.bind.host, port, exclusive=exclusive and not slots)
                except BindError as exc:
                    raise BindError(f"listener {cfg.name}: {exc}") from exc
                for sock in group:
                    sock.set_inheritable(False)
                slots.append(group)
                port = group[0].getsockname()[1]  # port 0: the other slots join it
        except OSError:
            for group in slots:
                for sock in group:
                    sock.close()
            raise
        log.info("listening on %s (%s -> upstream %s, %d workers)",
                 Address(cfg.bind.host, port), cfg.name, cfg.upstream, self.count)
        return slots

    def bind_new_listeners(self, added: list[ListenerConfig]
                           ) -> dict[str, list[list[socket.socket]]]:
        """Bind the listeners a reload adds: all of them, or none (OSError)."""
        held = {group[0].getsockname()[1] for slots in self.sockets.values()
                for group in slots if is_open(group)}  # ports we listen on
        bound: dict[str, list[list[socket.socket]]] = {}
        try:
            for cfg in added:
                bound[cfg.name] = self.bind_listener(cfg, ours=cfg.bind.port in held)
        except OSError:
            for slots in bound.values():
                for group in slots:
                    for sock in group:
                        sock.close()
            raise
        return bound

    def share(self, names: list[str], slot: int) -> tuple[list[tuple[str, int]], list[int]]:
        """What one worker gets of some listeners: their layout and its sockets' fds."""
        layout = [(name, len(self.sockets[name][slot])) for name in names]
        fds = [sock.fileno() for name in names for sock in self.sockets[name][slot]]
        return layout, fds

    def assign_rows(self, config: Config) -> None:
        """Give every server of `config` a row; a server newly added gets a clean one."""
        current = row_keys(self.config) if self.rows else set()
        for key in row_keys(config):
            row = self.rows.get(key)
            if row is not None:
                if key not in current:  # removed, and back before its row was freed
                    self.table.reset_row(row, keep_active=True)
                continue
            if self.free_rows:
                row = self.free_rows.pop()
            elif self.next_row < SHARED_ROWS:
                row = self.next_row
                self.next_row += 1
            else:
                raise ConfigError([f"more than {SHARED_ROWS} servers in all"])
            self.table.reset_row(row)
            self.rows[key] = row

    def free_unused_rows(self) -> None:
        """Free the rows of servers no longer configured once no connection counts on them,
        and no worker runs a generation that could still have them."""
        everyone = [*self.workers.values(), *self.starting, *self.retired]
        if any(worker.generation < self.generation for worker in everyone):
            return
        wanted = row_keys(self.config)
        for key in [key for key in self.rows if key not in wanted]:
            row = self.rows[key]
            if self.table.active(row) == 0:
                del self.rows[key]
                self.free_rows.append(row)

    async def _sweep_rows(self) -> None:
        while True:
            await asyncio.sleep(ROW_SWEEP_INTERVAL)
            self.free_unused_rows()

    # -- workers ------------------------------------------------------------------------------

    async def spawn(self, slot: int) -> WorkerProcess | None:
        """Start the worker for `slot` and wait until it serves (None: a stop came first)."""
        column = self.free_columns.pop(0)
        self.table.clear_column(column, self.next_row)
        ours, theirs = channel_pair()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "balancer.proc.worker", "--control-fd", str(theirs.fileno()),
            "--log-level", logging.getLevelName(logging.getLogger().level).lower(),
            pass_fds=[theirs.fileno()], start_new_session=True,
        )
        theirs.close()
        worker = WorkerProcess(slot, column, process, Channel(ours))
        # A stop waits for the workers being started too, or they would outlive the primary.
        self.starting.add(worker)
        try:
            return await self._start(worker)
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        finally:
            self.starting.discard(worker)
            self._check_done()

    async def _start(self, worker: WorkerProcess) -> WorkerProcess | None:
        """Hand a new worker the current config and its sockets and wait for its "ready"."""
        slot, process = worker.slot, worker.process
        if self.stopping:  # a stop came while it was starting: the sockets are closed
            await self._kill(worker)
            return None
        names = [cfg.name for cfg in self.config.listeners]
        layout, fds = self.share(names, slot)
        worker.generation = self.generation
        worker.held = {name: self.sockets[name] for name in names}
        start = {
            "kind": "start", "generation": self.generation, "config": self.config,
            "listeners": layout, "rows": self.rows, "column": worker.column,
            "columns": self.table.columns, "capacity": SHARED_ROWS,
            "shm": str(self.table.path),
        }
        worker.control.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(worker.control.fileno(), self._on_reply, worker)
        hello = loop.create_task(self._hello(worker, start, fds))
        exited = loop.create_task(process.wait())
        done, _ = await asyncio.wait({hello, exited}, timeout=READY_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        hello.cancel()
        exited.cancel()
        ready = hello in done and not hello.cancelled() and hello.exception() is None
        if not ready:
            if hello in done and not hello.cancelled():
                log.error("worker %d (pid %d): %s", slot, process.pid, hello.exception())
            if hello in done and isinstance(hello.exception(), ChannelClosed):
                # It closed its end because it is exiting: let it, for its status says why
                # (EXIT_BOOT_ERROR stops the primary; a kill would hide it).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(EXIT_GRACE):
                        await process.wait()
            code = await self._kill(worker)
            if self.stopping:  # told to stop before it was ready: not a crash
                log.info("worker %d (pid %d) stopped before it was ready", slot, process.pid)
                return None
            raise WorkerDied(slot, code)
        worker.ready_at = time.monotonic()
        self.table.beat(worker.column, worker.ready_at)  # its own beats run from now on
        self.workers[slot] = worker
        log.info("worker %d started (pid %d) on generation %d", slot, process.pid,
                 worker.generation)
        self._spawn_task(self._watch(worker))
        if self.stopping:  # a stop came while it was starting
            worker.stop()
        elif worker.generation < self.generation:  # a reload came while it was starting
            self._spawn_task(self._converge(worker))
        return worker

    async def _hello(self, worker: WorkerProcess, start: Message, fds: list[int]) -> Message:
        await worker.control.send(start, fds)
        return await self._reply(worker, "ready", start["generation"])

    async def _reply(self, worker: WorkerProcess, kind: str, generation: int) -> Message:
        """The worker's answer of `kind` about `generation`; older answers are dropped."""
        while True:
            message = await worker.replies.get()
            if message["kind"] == "closed":
                worker.replies.put_nowait(message)  # for whoever waits next
                raise ChannelClosed("the worker closed its channel")
            if message["kind"] == kind and message.get("generation") == generation:
                return message
            log.info("worker %d: dropped a late %r answer (generation %s)", worker.slot,
                     message["kind"], message.get("generation"))

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start_slot(self, slot: int) -> None:
        """Start a worker for `slot`, counting deaths before it is ready as crashes."""
        while not self.stopping:
            try:
                self._unpark(slot)
                await self.spawn(slot)
                return
            except WorkerDied as died:
                log.error("worker %d %s before it was ready", slot, describe_exit(died.code))
                await self._after_crash(slot, died.code, 0.0)
            except OSError as exc:  # no process or no sockets for it (out of memory or fds?)
                log.error("worker %d could not be started: %s", slot, exc)
                await self._after_crash(slot, 1, 0.0)

    def _on_reply(self, worker: WorkerProcess) -> None:
        try:
            frames = worker.control.read()
        except ChannelClosed:
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
            worker.replies.put_nowait({"kind": "closed"})
            for waiter in worker.flushes.values():
                if not waiter.done():
                    waiter.set_result(None)
            return
        for message, fds in frames:
            for fd in fds:
                os.close(fd)
            if message["kind"] == "flushed":  # not an exchange's answer: whoever asked
                asker = worker.flushes.get(message["id"])
                if asker is not None and not asker.done():
                    asker.set_result(None)
                continue
            worker.replies.put_nowait(message)

    async def flush_workers(self) -> None:
        """Before a scrape: every serving worker adds its plain counts to its metrics files
        (metrics.py), so that /metrics is exact at scrape time; waits FLUSH_TIMEOUT at most.
        A worker that is stopping no longer reads its channel: it flushes as it exits."""
        loop = asyncio.get_running_loop()
        self._flush_ids += 1
        number = self._flush_ids
        asked = [w for w in [*self.workers.values(), *self.retired] if not w.stop_sent]
        try:
            for worker in asked:
                worker.flushes[number] = loop.create_future()
                with contextlib.suppress(ChannelClosed):  # gone: nothing more to flush
                    await worker.control.send({"kind": "flush", "id": number})
                    continue
                worker.flushes[number].set_result(None)
            waiting = [worker.flushes[number] for worker in asked]
            if waiting:
                await asyncio.wait(waiting, timeout=FLUSH_TIMEOUT)
        finally:
            for worker in asked:
                worker.flushes.pop(number, None)

    async def _kill(self, worker: WorkerProcess) -> int:
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()
        code = await worker.process.wait()
        self._forget(worker)
        return code

    def _forget(self, worker: WorkerProcess) -> None:
        """A worker has exited: release its column, its metrics files and its channel."""
        from prometheus_client import multiprocess

        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(worker.control.fileno())
        worker.control.close()
        multiprocess.mark_process_dead(worker.process.pid)
        self.table.clear_column(worker.column, self.next_row)
        self.free_columns.append(worker.column)
        self.retired.discard(worker)
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]

    async def _watch(self, worker: WorkerProcess) -> None:
        """Wait for a worker to exit; replace it unless it was asked to go."""
        code = await worker.process.wait()
        self._forget(worker)
        if worker.retiring or self.stopping:
            log.info("worker %d (pid %d) exited", worker.slot, worker.process.pid)
            self._check_done()
            return
        why = "was killed: hung" if worker.hung else describe_exit(code)
        log.error("worker %d (pid %d) %s", worker.slot, worker.process.pid, why)
        count, _ = self.restarts.get(worker.slot, (0, ""))
        self.restarts[worker.slot] = (count + 1, why)
        try:
            await self._after_crash(worker.slot, code, time.monotonic() - worker.ready_at)
            await self.start_slot(worker.slot)
        except GiveUp as exc:
            self.failure = str(exc)
            log.error("giving up: %s", exc)
            self.request_stop()

    async def _watch_heartbeats(self) -> None:
        """Kill a worker whose event loop has stopped beating for `worker_timeout` (a hung or
        stopped worker is otherwise never noticed: the kernel keeps handing it clients);
        `_watch` then replaces it like any crashed worker. gunicorn's `murder_workers`."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            timeout, now = self.config.worker_timeout, time.monotonic()
            for worker in [*self.workers.values(), *self.retired]:
                silent = now - self.table.heartbeat(worker.column)
                if silent > timeout and not worker.hung:
                    worker.hung = True
                    log.error("worker %d (pid %d) has not run its event loop for %.1fs "
                              "(worker_timeout %gs): killing it", worker.slot,
                              worker.process.pid, silent, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()

    async def _after_crash(self, slot: int, code: int, ran_for: float) -> None:
        """Give up on a boot error; else wait as long as the slot's backoff says, with its
        sockets closed meanwhile. The delay is logged when it changes."""
        if code == EXIT_BOOT_ERROR:
            raise GiveUp(f"worker {slot} could not boot (see its error above)")
        backoff = self.backoff.setdefault(slot, SlotBackoff())
        before = backoff.delay
        delay = backoff.after_crash(ran_for)
        if delay != before and delay:
            log.warning("worker %d crashed %d times in a row: restarting it in %gs (doubling "
                        "up to %gs while it keeps crashing)", slot, backoff.crashes, delay,
                        RESTART_DELAY_MAX)
        elif delay != before:
            log.info("worker %d had served for %.0fs: restarting it at once again", slot,
                     ran_for)
        if delay:
            if delay >= PARK_AFTER:  # a short wait is cheaper than resetting queued clients
                self._park(slot)
            await asyncio.sleep(delay)

    def _park(self, slot: int) -> None:
        """While a slot waits to restart, close its sockets: the kernel then hands its share
        of new clients to the workers that run (clients queued since the crash are reset).
        Never a listener's last open group, so the port stays ours."""
        for slots in self.sockets.values():
            if any(is_open(group) for other, group in enumerate(slots) if other != slot):
                for sock in slots[slot]:
                    sock.close()

    def _unpark(self, slot: int) -> None:
        """Bind the groups `_park` closed again, next to the slots that kept theirs."""
        for cfg in self.config.listeners:
            slots = self.sockets.get(cfg.name)
            if slots is None or is_open(slots[slot]):
                continue
            port = next(group[0].getsockname()[1] for group in slots if is_open(group))
            group = bind_group(cfg.bind.host, port, exclusive=False)  # joins our own
            for sock in group:
                sock.set_inheritable(False)
            slots[slot] = group

    # -- reload -------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file; make it (with the servers found at run time) the next
        generation and apply it in every worker, or change nothing."""
        from ..metrics import reject_reload
        from ..server import read_config

        if self.stopping:
            log.warning("reload ignored: stopping")
            return False
        try:
            config = await read_config(self.config_path)
        except ConfigError as exc:
            return reject_reload(log, exc.problems)
        return await self.membership.reload(config)

    async def apply(self, config: Config, reason: Reason) -> bool:
        """Make `config` the next generation and apply it in every worker, or change
        nothing. Applies run one at a time, in the order they came."""
        async with self._reload_lock:
            return await self._apply(config, reason)

    async def _apply(self, config: Config, reason: Reason) -> bool:
        from ..admin import AdminBindError
        from ..metrics import count_reload
        from ..server import log_problems

        if self.stopping:
            log.warning("%s ignored: stopping", "reload" if reason == "reload" else "update")
            return False
        admin = self.admin
        try:
            problems = reload_problems(self.config, config)
            if config.log != self.config.log:  # checked here, or every worker would refuse it
                problems += log_problems(config.log)
            if problems:
                raise ConfigError(problems)
            if (config.workers or self.count) != self.count:
                log.warning("reload: changing the number of workers needs a restart; "
                            "keeping %d", self.count)
            # The admin endpoint first: if it cannot move, nothing has changed yet.
            if admin is not None and config.metrics is not None:
                admin = await admin.rebound(config.metrics)
            self.assign_rows(config)
            added = [cfg for cfg in config.listeners if cfg.name not in self.sockets or
                     self._bind_of(cfg.name) != (cfg.bind, cfg.mode)]
            new_sockets = self.bind_new_listeners(added)
        except AdminBindError as exc:
            return self._refuse(reason, [f"{exc} (the admin endpoint stays where it was)"])
        except (ConfigError, OSError) as exc:
            if admin is not None and admin is not self.admin:
                await admin.stop()  # moved for this reload: back where it was
            if isinstance(exc, ConfigError):
                return self._refuse(reason, exc.problems)
            return self._refuse(reason, [f"cannot open a new listener: {exc}"])
        if self.admin is not None and config.metrics is not None:
            await self.admin.replace_by(admin, config.metrics)
            self.admin = admin
        self.config = config
        self.generation += 1
        generation = self.generation
        removed = {name: socks for name, socks in self.sockets.items()
                   if name not in {cfg.name for cfg in config.listeners} or name in new_sockets}
        for name in removed:  # in place: the cluster view reads the same dict
            del self.sockets[name]
        self.sockets.update(new_sockets)
        # Closed when every worker has answered, or at once if a stop comes first.
        self.leaving = [sock for slots in removed.values() for group in slots for sock in group]
        workers = list(self.workers.values())
        log.info("applying generation %d in %d worker(s)", generation, len(workers))
        try:
            results = await asyncio.gather(*(self._converge(w) for w in workers))
        finally:
            for sock in self.leaving:
                sock.close()
            self.leaving = []
        if self.stopping:
            return False
        self.view.apply(config)
        self.free_unused_rows()
        failed = results.count(False)
        source = f"from {self.config_path}" if reason == "reload" else "with the servers found"
        if reason == "reload":
            count_reload("failure" if failed else "success")
        if failed:
            log.error("%s: generation %d %s is current, but %d worker(s) could not apply it "
                      "(replaced by workers started on it)", reason, generation, source, failed)
        elif reason == "reload":
            log.info("configuration reloaded from %s (generation %d)", self.config_path,
                     generation)
        else:
            log.info("servers found applied (generation %d)", generation)
        return True  # current either way: the workers that failed are replaced on it

    @staticmethod
    def _refuse(reason: Reason, problems: list[str]) -> bool:
        """A config that cannot be applied: a reload says so (and counts it) as every reload
        does; servers found at run time that cannot be added are an error of their own."""
        from ..metrics import reject_reload

        if reason == "reload":
            return reject_reload(log, problems)
        log.error("could not apply the servers found: %s", "; ".join(problems))
        return False

    def server_active(self, upstream: str, key: str) -> int:
        """Open connections to a server over all workers (its row outlives its removal
        until they have ended)."""
        row = self.rows.get(f"{upstream}/{key}")
        return 0 if row is None else self.table.active(row)

    async def _converge(self, worker: WorkerProcess) -> bool:
        """Bring one worker to the current generation. False if it could not: then it is
        replaced (or, if its channel closed, it is exiting and `_watch` replaces it)."""
        async with worker.talking:
            while worker.generation < self.generation:
                if self.stopping or worker.retiring:
                    return False
                generation, config = self.generation, self.config
                held = {cfg.name: self.sockets[cfg.name] for cfg in config.listeners}
                names = [name for name, group in held.items()
                         if worker.held.get(name) is not group]
                layout, fds = self.share(names, worker.slot)
                message = {"kind": "reload", "generation": generation, "config": config,
                           "listeners": layout, "rows": self.rows}
                try:
                    async with asyncio.timeout(REPLY_TIMEOUT):
                        await worker.control.send(message, fds)
                        reply = await self._reply(worker, "reloaded", generation)
                except ChannelClosed as exc:
                    log.error("worker %d (pid %d) could not apply generation %d: %s",
                              worker.slot, worker.process.pid, generation, exc)
                    return False
                except TimeoutError:
                    error = f"no answer within {REPLY_TIMEOUT:g}s"
                else:
                    error = "" if reply["ok"] else reply["error"]
                if error:
                    log.error("worker %d (pid %d) could not apply generation %d: %s; "
                              "replacing it", worker.slot, worker.process.pid, generation, error)
                    self._replace(worker)
                    return False
                worker.generation = generation
                worker.held = held
        return True

    def _replace(self, worker: WorkerProcess) -> None:
        """Start a worker on the current generation in `worker`'s slot, then retire it."""
        if worker.retiring or self.stopping:
            return
        worker.retiring = True
        self.retired.add(worker)
        self._spawn_task(self._replace_slot(worker))

    async def _replace_slot(self, old: WorkerProcess) -> None:
        try:
            await self.start_slot(old.slot)
        except GiveUp as exc:
            self.failure = str(exc)
            log.error("giving up: %s", exc)
            self.request_stop()
        finally:
            old.stop()

    def cluster_status(self) -> dict[str, Any]:
        """For /status: the current generation, and each worker's ("starting": not ready,
        "retiring": replaced, draining)."""
        workers = [(w, "serving") for w in self.workers.values()]
        workers += [(w, "starting") for w in self.starting]
        workers += [(w, "retiring") for w in self.retired]
        now = time.monotonic()
        servers = [row for key, row in self.rows.items() if not key.startswith("listener ")]
        listeners = [row for key, row in self.rows.items() if key.startswith("listener ")]
        lines = []
        for w, state in sorted(workers, key=lambda item: item[0].slot):
            restarts, why = self.restarts.get(w.slot, (0, None))
            lines.append({
                "slot": w.slot, "pid": w.process.pid, "generation": w.generation,
                "state": state, "uptime": round(now - w.ready_at, 1) if w.ready_at else 0.0,
                "restarts": restarts, "last_exit": why,
                "active": self.table.column_active(w.column, servers),
                "connections": self.table.column_total(w.column, 0, listeners),
                "heartbeat_age": round(now - self.table.heartbeat(w.column), 3),
            })
        return {"generation": self.generation, "workers": lines,
                "primary": {"pid": os.getpid(), "uptime": round(now - self.started_at, 1)}}

    def _bind_of(self, name: str) -> Any:
        """A listener's address and mode: a change of either is a new listener (server.py)."""
        return next(((cfg.bind, cfg.mode) for cfg in self.config.listeners
                     if cfg.name == name), None)

    # -- stop ---------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop accepting at once, then let the workers drain.

        The primary's copies of the listening sockets go first: a listening socket lives as
        long as any process holds it, so if the primary kept its copies the kernel would go
        on completing handshakes into queues no worker reads, and reset them at exit. Once
        every worker has closed its share too, new clients are refused."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.stopping()
        self._close_sockets()
        for worker in [*self.workers.values(), *self.starting, *self.retired]:
            worker.stop()
        self._check_done()

    def _check_done(self) -> None:
        if self.stopping and not self.workers and not self.starting and not self.retired:
            self._done.set()

    def _close_sockets(self) -> None:
        for slots in self.sockets.values():
            for group in slots:
                for sock in group:
                    sock.close()
        for sock in self.leaving:
            sock.close()

    def force_stop(self) -> None:
        """Second signal: workers close their connections at once."""
        for worker in [*self.workers.values(), *self.starting, *self.retired]:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        reloading: set[asyncio.Task[bool]] = set()

        async def reload() -> bool:
            self.notifier.reloading()
            try:
                return await self.reload()
            finally:
                if not self.stopping:
                    self.notifier.ready()

        def start_reload() -> None:
            task = loop.create_task(reload())
            reloading.add(task)
            task.add_done_callback(reloading.discard)

        def on_hangup() -> None:
            log.info("received SIGHUP, reloading %s", self.config_path)
            start_reload()

        handle_stop_signals(loop, self.request_stop, self.force_stop, log, "stopping workers")
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        try:
            await self.membership.start()
            self.config = self.membership.effective()
            try:
                self.assign_rows(self.config)
            except ConfigError as exc:
                log.error("cannot start: %s", "; ".join(exc.problems))
                await self.membership.stop()
                return 1
            self._spawn_task(self._sweep_rows())
            self._spawn_task(self._watch_heartbeats())
            for cfg in self.config.listeners:
                self.sockets[cfg.name] = self.bind_listener(cfg)
            await self._start_admin()
            for slot in range(self.count):
                await self.start_slot(slot)
            self.membership.go_live()
            self._spawn_task(self.watcher.run(lambda: self.membership.config.watch_config,
                                              start_reload))
            if not self.stopping:
                self.notifier.ready()
            await self._done.wait()
        except GiveUp as exc:
            self.failure = str(exc)
            log.error("giving up: %s", exc)
            self.request_stop()
            await self._wait_workers()
        except BaseException:  # nothing we started may outlive us
            await self.membership.stop()
            raise
        finally:
            remove_stop_signals(loop)
            loop.remove_signal_handler(signal.SIGHUP)
        await self._wait_workers()
        await self.membership.stop()  # managed instances stop once the workers have drained
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.admin is not None:
            await self.admin.stop()
        if self.view is not None:
            self.view.stop()
        self._close_sockets()
        log.info("stopped")
        return 1 if self.failure else 0

    async def _wait_workers(self) -> None:
        deadline = self.config.shutdown_timeout + 5
        for worker in [*self.workers.values(), *self.retired]:
            try:
                async with asyncio.timeout(deadline):
                    await worker.process.wait()
            except TimeoutError:
                await self._kill(worker)

    async def _start_admin(self) -> None:
        from ..admin import AdminServer
        from .cluster import ClusterView, render_cluster_metrics

        self.view = ClusterView(self.config, self.table, self.rows, self.sockets,
                                self.cluster_status)
        self.view.membership = self.membership  # the admin endpoint's rollouts and instances
        self.view.start()
        if self.config.metrics is not None:
            self.admin = AdminServer(self.view, self.config.metrics,
                                     render_metrics=partial(render_cluster_metrics, rows=self.rows),
                                     before_scrape=self.flush_workers)
            await self.admin.start()


def row_keys(config: Config) -> set[str]:
    """The shared-table keys of a config's servers, `upstream/host:port`, and of its
    listeners, `listener NAME` (their totals, for /status)."""
    return {f"{name}/{server.key}" for name, upstream in config.upstreams.items()
            for server in upstream.servers} | {f"listener {cfg.name}"
                                               for cfg in config.listeners}


def is_open(group: list[socket.socket]) -> bool:
    return group[0].fileno() != -1


def describe_exit(code: int) -> str:
    """How a worker ended, the way an operator wants to read it."""
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (perhaps out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with status {code}"


def make_state_dir() -> Path:
    """A fresh folder for the shared table and the metrics files, named after this primary's
    pid: a primary killed with -9 cannot remove its own, so the next start removes every
    folder whose primary is dead."""
    remove_stale_state_dirs(Path(tempfile.gettempdir()))
    return Path(tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-"))


def remove_stale_state_dirs(root: Path) -> None:
    """Remove the state folders under `root` of primaries that are no longer running."""
    for path in root.glob(f"{STATE_PREFIX}*-*"):
        pid = path.name[len(STATE_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or process_exists(int(pid)):
            continue
        try:
            info = path.lstat()
        except OSError:  # removed meanwhile
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue  # not a folder a balancer of ours made (a link, another user's)
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed %s, left by a balancer (pid %s) that did not stop cleanly", path, pid)


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_supervisor(config: Config, config_path: str, workers: int,
                   pid_file: str | None = None, watcher: ConfigWatcher | None = None) -> int:
    """Run the primary with `workers` workers until stopped."""
    state_dir = make_state_dir()
    # Must be set before prometheus_client is first imported, here and in every worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(state_dir)
    if pid_file:
        Path(pid_file).write_text(f"{os.getpid()}\n")
    loop = asyncio.new_event_loop()  # the primary moves no client bytes: stdlib loop is fine
    asyncio.set_event_loop(loop)
    try:
        supervisor = Supervisor(config, config_path, workers, state_dir, watcher)
        return loop.run_until_complete(supervisor.run())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
        shutil.rmtree(state_dir, ignore_errors=True)
        if pid_file:
            Path(pid_file).unlink(missing_ok=True)

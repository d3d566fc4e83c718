"""One app instance the balancer runs: its process, its readiness, its output, how it ended.

An instance is started with PORT (its port on 127.0.0.1) and INSTANCE (its number) in its
environment, in a process group of its own, so a Ctrl-C at the terminal reaches the balancer
alone and the balancer stops its instances in order, after draining. It dies with the
balancer even when the balancer cannot stop it (SIGKILL, a crash): the kernel sends it
SIGKILL when its parent goes (`PR_SET_PDEATHSIG`). The group (`apps.py`) decides when to
start, restart, replace and stop; this module only does each of those for one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, TextIO

from .config import Address, CheckConfig, RunConfig, ServerConfig
from .health import failure_reason

log = logging.getLogger("balancer.instances")

State = Literal["starting", "ready", "draining", "stopping", "backoff"]
STATES: tuple[State, ...] = ("starting", "ready", "draining", "stopping", "backoff")
PROBE_INTERVAL = 0.05  # between readiness connects while an instance starts
PROBE_TIMEOUT = 1.0  # for one readiness connect (or check) to answer
MAX_LINE = 64 * 1024  # a longer output line is cut into pieces of this size
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# A readiness check beyond "it accepts connections": the upstream's health.check.
Probe = Callable[[Address, CheckConfig], Awaitable[tuple[bool, str]]]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The child's last act before exec: be killed when the balancer goes, and go now if it
    already went (between fork and this call)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def prepare() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return prepare


def describe_exit(code: int, killed_after: float | None = None) -> str:
    """`exited 1`, `killed by SIGKILL (out of memory?)`: how an instance ended
    (`killed_after`: we sent the SIGKILL ourselves, that long after SIGTERM)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGKILL":
            why = "out of memory?" if killed_after is None else f"kill_timeout {killed_after:g}s"
            return f"killed by SIGKILL ({why})"
        return f"killed by {name}"
    return f"exited {code}"


def read_rss(pid: int) -> int:
    """Resident memory of a process in bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class Instance:
    """One process of an upstream's app, on one port, from start to exit."""

    def __init__(self, upstream: str, index: int, port: int, config: RunConfig,
                 restarts: int = 0) -> None:
        self.upstream = upstream
        self.index = index
        self.port = port
        self.config = config
        self.restarts = restarts
        self.state: State = "starting"
        self.process: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.started = 0.0  # time.monotonic() at spawn
        self.ready_at: float | None = None
        self.rss = 0
        self.last_exit: str | None = None  # of the process this one replaced, then its own
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stop_requested = False  # a planned stop: its exit is not a crash
        self.killed_after: float | None = None  # we sent SIGKILL, after this kill_timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._log_file: TextIO | None = None

    @property
    def name(self) -> str:
        return f"{self.upstream}#{self.index}"

    @property
    def label(self) -> str:
        """`app#2 pid 1234`: the server's source in /status and every log line about it."""
        return f"{self.name} pid {self.pid}"

    @property
    def address(self) -> Address:
        return Address(LOOPBACK, self.port)

    def server(self) -> ServerConfig:
        return ServerConfig(self.address, source=self.label)

    def running(self) -> bool:
        return self.process is not None and not self.exited.done()

    def uptime(self) -> float:
        return time.monotonic() - self.started if self.running() else 0.0

    async def spawn(self) -> None:
        """Start the process (OSError when the program cannot be run)."""
        config = self.config
        env = {**os.environ, **dict(config.env), "PORT": str(self.port),
               "INSTANCE": str(self.index)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # our workers' metrics, not the app's
        if config.log == "stderr":
            out: int | TextIO = asyncio.subprocess.PIPE
        else:
            folder = Path(config.log)
            folder.mkdir(parents=True, exist_ok=True)
            out = self._log_file = open(  # noqa: SIM115 - kept open for the process's life
                folder / f"{self.upstream}-{self.index}.log", "a", encoding="utf-8")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *config.command, cwd=config.cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=out, start_new_session=True,
                preexec_fn=_die_with_parent(os.getpid()))
        except BaseException:
            self._close_log()
            raise
        self.pid = self.process.pid
        self.started = time.monotonic()
        loop = asyncio.get_running_loop()
        prefix = f"[{self.label}] ".encode()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                self._tasks.append(loop.create_task(_pump(stream, prefix)))
        self._tasks.append(loop.create_task(self._wait()))

    async def _wait(self) -> None:
        assert self.process is not None
        code = await self.process.wait()
        # Let the output pumps reach the end, so the last lines come before the exit line.
        pumps = [task for task in self._tasks if task is not asyncio.current_task()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.gather(*pumps, return_exceptions=True)
        self._close_log()
        self.last_exit = describe_exit(code, self.killed_after)
        self.exited.set_result(code)

    async def wait_ready(self, check: CheckConfig | None, probe: Probe) -> str | None:
        """Wait until the instance accepts connections (and passes `check`), for up to
        `ready_timeout`; None when ready, else why not."""
        deadline = asyncio.get_running_loop().time() + self.config.ready_timeout
        reason = "no answer"
        while not self.exited.done():
            ok, reason = await self._probe_once(check, probe)
            if ok:
                return None
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return (f"not ready within {self.config.ready_timeout:g}s "
                        f"(last probe: {reason})")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(PROBE_INTERVAL, remaining)):
                    await asyncio.shield(self.exited)
        return f"{self.last_exit} before it was ready"

    async def _probe_once(self, check: CheckConfig | None, probe: Probe) -> tuple[bool, str]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(LOOPBACK, self.port)
            writer.close()
        except (OSError, TimeoutError) as exc:
            return False, failure_reason(exc)
        if check is None:
            return True, "connected"
        return await probe(self.address, check)

    def signal(self, signum: int) -> None:
        """Signal the instance's process group (its own children too), if it still runs."""
        if self.running() and self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signum)

    async def terminate(self) -> None:
        """SIGTERM, then SIGKILL after `kill_timeout`; returns once the process is gone."""
        self.stop_requested = True
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.config.kill_timeout):
                await asyncio.shield(self.exited)
        except TimeoutError:
            log.warning("%s did not stop within kill_timeout %gs: SIGKILL", self.label,
                        self.config.kill_timeout)
            self.killed_after = self.config.kill_timeout
            self.signal(signal.SIGKILL)
            await asyncio.shield(self.exited)

    def sample_rss(self) -> int:
        self.rss = read_rss(self.pid) if self.running() and self.pid is not None else 0
        return self.rss

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


async def _pump(stream: asyncio.StreamReader, prefix: bytes) -> None:
    """Copy an instance's output to our stderr line by line, each line prefixed."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    while True:
        try:
            line = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial
            if not line:
                return
            line += b"\n"
        except asyncio.LimitOverrunError as exc:
            line = await stream.readexactly(min(exc.consumed, MAX_LINE)) + b"\n"
        except OSError:
            return
        if out is not None:
            out.write(prefix + line)
            out.flush()
        else:
            sys.stderr.write((prefix + line).decode(errors="replace"))

"""Process plumbing: start pinned processes, wait for ports, read /proc, stop everything.

Every process the harness starts goes through `Supervisor`, so one `stop_all()` in a
`finally` is enough to leave nothing running, whatever failed in between.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_PROXY = 0
CPU_LOAD = 1


class StartError(RuntimeError):
    """A process did not come up (exited, or its port never accepted)."""


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    """Prefix `cmd` with taskset so proxy and load never share a core."""
    if cpu is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


def free_port() -> int:
    """An ephemeral loopback port that is free right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None) -> None:
    """Poll until 127.0.0.1:port accepts, failing early if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"exited with code {proc.returncode} before listening"
                             f"{tail_text(log)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", port))
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise StartError(f"port {port} did not accept within {timeout:.0f}s{tail_text(log)}")


def tail_text(log: Path | None, lines: int = 4) -> str:
    """The end of a process log (where a Python traceback names the error), one line."""
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("; log: " + " | ".join(text)) if text else ""


def tree_pids(root: int) -> list[int]:
    """`root` and all its live descendants (nginx master+worker, a forking balancer)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float:
    """utime+stime of a process tree, in seconds (live processes only)."""
    return sum(cpu_split(root))


def cpu_split(root: int) -> tuple[float, float]:
    """(utime, stime) of a process tree, in seconds (live processes only): user time is
    where a change to the balancer's own code shows, apart from the kernel's share."""
    user = system = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the comm field: state=0 ... utime=11, stime=12 (stat fields 14 and 15).
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU from /proc/stat: shows whether CPU 0 had company."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            vals = [int(v) for v in line.split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            return sum(vals) - idle, sum(vals)
    return 0, 0


def rss_kib(root: int) -> int:
    """VmRSS of a process tree in KiB."""
    total = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
    return total


@dataclass
class Proc:
    """A started process with its log file, so failures can show why."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def death(self) -> str:
        """Why the process is gone, for the failure report."""
        code = self.popen.returncode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        return f"{self.name} died during the run ({how}){tail_text(self.log)}"


@dataclass
class Supervisor:
    """Owns every child process; `stop_all` is called from a finally."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, cmd: list[str], cpu: int | None,
              cwd: str | None = None) -> Proc:
        log = self.workdir / f"{name}.{len(self.procs)}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                pinned(cmd, cpu), stdout=fh, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, and reap."""
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(grace)
        else:
            # The leader is gone; make sure no orphaned worker of its group survives.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)

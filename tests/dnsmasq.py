"""A real DNS server for the discovery tests: dnsmasq (Debian's `dnsmasq-base`) serving a
hosts directory on a loopback port, re-read by inotify whenever a test replaces a file.

`--local=/#/` makes it the authority for every name (no upstream to forward to): a name it
has no AAAA for answers NODATA and an unknown name NXDOMAIN, instead of REFUSED.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .utils import free_port, stop_process

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
START_TIMEOUT = 10.0


def available() -> bool:
    return os.access(DNSMASQ, os.X_OK)


class Dnsmasq:
    """dnsmasq on 127.0.0.1:`port`, names from `directory/hosts`, SRV records from `srv`
    (``--srv-host`` values: ``_name._tcp.domain,target,port,priority,weight``)."""

    def __init__(self, directory: Path, srv: Iterable[str] = (), port: int = 0) -> None:
        self.directory = directory
        self.hosts = directory / "hosts"
        self.hosts.mkdir(parents=True, exist_ok=True)
        self.srv = list(srv)
        self.port = port or free_port()
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread
        self.start()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or start again, after `stop`, on the same port and files)."""
        since = len(self.lines)
        self.proc = subprocess.Popen(
            [DNSMASQ, "--keep-in-foreground", "--log-facility=-", f"--port={self.port}",
             "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
             f"--hostsdir={self.hosts}", "--local-ttl=1", "--user=root", "--local=/#/",
             "--pid-file=", *(f"--srv-host={record}" for record in self.srv)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._pump, args=(self.proc,), daemon=True)
        self._reader.start()
        self.wait_for(r"started, version", START_TIMEOUT, since)

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(regex.search(line) for line in self.lines[since:]):
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None):
                    raise AssertionError(f"dnsmasq: no {pattern!r}; log:\n"
                                         + "\n".join(self.lines[-20:]))
                self._changed.wait(min(left, 0.2))

    async def set(self, name: str, addresses: Iterable[str]) -> None:
        """Make `name` resolve to `addresses` (in that order; none removes it), and return
        once dnsmasq has read the change."""
        path = self.hosts / name
        since = len(self.lines)
        addresses = list(addresses)
        if addresses:
            temporary = self.directory / f".{name}.tmp"
            temporary.write_text("".join(f"{address} {name}\n" for address in addresses))
            os.replace(temporary, path)  # one inotify event, never a half-written file
            pattern = rf"read {re.escape(str(path))} - \d+ names"
        else:
            path.unlink()
            pattern = rf"{re.escape(str(path))} removed"
        await asyncio.to_thread(self.wait_for, pattern, 5.0, since)

    def stop(self) -> None:
        """Stop it, and let the log reader reach the end before its pipe is closed."""
        if self.proc is not None:
            stop_process(self.proc, close_pipes=False)
            self._reader.join(5)
            assert self.proc.stderr is not None
            self.proc.stderr.close()
            self.proc = None

"""`--watch-config` / `watch_config: true`: reload when the config file's content changes.

Kubernetes updates a mounted ConfigMap by pointing a symlink (`..data`) at a new folder, and
nobody sends SIGHUP. Timestamps do not help there (the new file may carry any mtime, and the
path the balancer was given never changes itself), so the watcher reads the file through its
symlinks about once a second and compares a hash of the content. A change starts exactly the
reload SIGHUP starts: a bad file is rejected and logged once, and the old config keeps serving.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

log = logging.getLogger("balancer")

INTERVAL = 1.0  # seconds between two reads of the file


def file_digest(path: str) -> bytes:
    # open() resolves the symlink chain at once, so a swap in between is never half seen.
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).digest()


class ConfigWatcher:
    """Polls `path` while watching is on (`always`: the `--watch-config` flag, or the running
    config's `watch_config`) and calls for a reload when its content changed.

    Made before the file is first loaded: the content seen then is the baseline, so a change
    that lands while the balancer starts is reloaded, never missed."""

    def __init__(self, path: str, always: bool = False) -> None:
        self.path = path
        self.always = always
        self._unreadable = False
        try:  # unreadable: the load that follows says why
            self.digest: bytes | None = file_digest(path)  # of the content last seen
        except OSError:
            self.digest = None

    def _read_digest(self) -> bytes | None:
        try:
            digest = file_digest(self.path)
        except OSError as exc:
            if not self._unreadable:  # once per outage, not once a second
                self._unreadable = True
                log.warning("watching %s: cannot read it: %s (keeping the running config)",
                            self.path, exc.strerror or exc)
            return None
        if self._unreadable:
            self._unreadable = False
            log.info("watching %s: readable again", self.path)
        return digest

    async def check(self, configured: bool, reload: Callable[[], None]) -> bool:
        """One poll; True if it called `reload`."""
        if not (self.always or configured):
            self.digest = None  # turned off by a reload: start afresh if turned on again
            return False
        digest = await asyncio.to_thread(self._read_digest)
        if digest is None:
            return False
        previous, self.digest = self.digest, digest
        if previous is None or digest == previous:
            return False
        # The new content is remembered even if the reload rejects it: a bad file is
        # reported once, and the next edit is what tries again.
        log.info("%s changed, reloading", self.path)
        reload()
        return True

    async def run(self, configured: Callable[[], bool], reload: Callable[[], None],
                  interval: float = INTERVAL) -> None:
        """Poll every `interval` until cancelled (at shutdown); `configured()` is the running
        config's `watch_config`."""
        while True:
            await self.check(configured(), reload)
            await asyncio.sleep(interval)

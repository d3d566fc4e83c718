"""One log line per interval for an event that comes in storms."""

from __future__ import annotations

import time
from collections.abc import Callable


class Throttle:
    """Says when a log line is due, and how many events it stands for.

    Out of descriptors, one event (a failed accept, a queued client closed) can happen
    thousands of times a second while the balancer is already struggling; a line each would
    be a log flood. With this it is one line an interval, with the count.
    """

    def __init__(self, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.logged_at = float("-inf")
        self.pending = 0

    def due(self, events: int = 1) -> int | None:
        """Count `events`; if a line is due, how many events it reports (these and the ones
        held back since the last line), else None."""
        self.pending += events
        now = self.clock()
        if now - self.logged_at < self.interval:
            return None
        self.logged_at = now
        count, self.pending = self.pending, 0
        return count

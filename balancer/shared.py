"""State the workers share, in one memory-mapped file (nginx's `zone`, in miniature).

One row per server (`upstream/host:port`), one column per worker slot:

    down_until   float64   monotonic time until which the server is ejected; 0 = up
    draining     int64     1 while an operator has it draining
    active[c]    int64     open connections of the worker in column c
    failures[c]  int64     connect failures seen by the worker in column c

Every worker writes only its own column, so no locks are needed; readers sum the columns.
`down_until` and `draining` are written by whoever changes them and read by everyone's
periodic sync (`SYNC_INTERVAL`), which is how "down in one worker" becomes "down in all of
them" within a second. CLOCK_MONOTONIC is system-wide on Linux, so the times compare.

Per worker stay: pools, the smooth-weighted round-robin position, the active-check schedule
(each worker probes on its own), and the half-open trial (up to one per worker).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SYNC_INTERVAL = 0.25  # seconds between a worker's reads of the shared state
HEADER_FIELDS = 2  # down_until, draining


class SharedTable:
    """The mapped file: `rows` servers x `columns` worker slots."""

    def __init__(self, path: str | os.PathLike[str], rows: int, columns: int,
                 create: bool = False) -> None:
        self.path = Path(path)
        self.rows = rows
        self.columns = columns
        self.stride = HEADER_FIELDS + 2 * columns
        size = rows * self.stride * 8
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.ints = memoryview(self._map).cast("q")
        self.floats = memoryview(self._map).cast("d")

    def cell(self, row: int, column: int) -> SharedCell:
        return SharedCell(self, row, column)

    def clear_column(self, column: int) -> None:
        """Forget a worker slot's counts (its worker exited, maybe killed)."""
        for row in range(self.rows):
            base = row * self.stride + HEADER_FIELDS
            self.ints[base + column] = 0

    def close(self) -> None:
        self.ints.release()
        self.floats.release()
        self._map.close()


class SharedCell:
    """One server's row, as seen by the worker in one column."""

    __slots__ = ("active_index", "base", "columns", "failure_index", "floats", "ints")

    def __init__(self, table: SharedTable, row: int, column: int) -> None:
        self.ints = table.ints
        self.floats = table.floats
        self.columns = table.columns
        self.base = row * table.stride
        self.active_index = self.base + HEADER_FIELDS + column
        self.failure_index = self.base + HEADER_FIELDS + table.columns + column

    def add_active(self, delta: int) -> None:
        self.ints[self.active_index] += delta

    def total_active(self) -> int:
        start = self.base + HEADER_FIELDS
        return sum(self.ints[start : start + self.columns])

    def add_failure(self) -> None:
        self.ints[self.failure_index] += 1

    def total_failures(self) -> int:
        start = self.base + HEADER_FIELDS + self.columns
        return sum(self.ints[start : start + self.columns])

    @property
    def down_until(self) -> float:
        return self.floats[self.base]

    @down_until.setter
    def down_until(self, value: float) -> None:
        self.floats[self.base] = value

    @property
    def draining(self) -> bool:
        return bool(self.ints[self.base + 1])

    @draining.setter
    def draining(self, value: bool) -> None:
        self.ints[self.base + 1] = int(value)

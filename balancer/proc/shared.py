"""State the workers share, in one memory-mapped file (nginx's `zone`, in miniature).

One row per server (`upstream/host:port`), one column per worker slot:

    down_until   float64   monotonic time until which the server is ejected; 0 = up
    draining     int64     1 while an operator has it draining
    active[c]    int64     open connections of the worker in column c
    failures[c]  int64     connect failures seen by the worker in column c
    checked[c]   int64     1 while the active checks of the worker in column c say down
    counter[k][c] int64    COUNTERS running totals of the worker in column c (what they count
                           depends on the row: SERVER_COUNTERS or LISTENER_COUNTERS)
    last[k][c]   int64     LAST values of the worker in column c (its last active check, and
                           its own peak of open connections)
    retired[k]   int64     the counters of workers that exited, folded in by the primary

Totals are the worker's own since it started, copied from its Python counters at every sync
(never written on the data path); readers add the columns and `retired`, so a total never
goes backwards when a worker is replaced. A listener's row (key `listener NAME`) uses only
the counters. Then, after all the rows, for every row and column, the reason those checks gave
(`REASON_BYTES` of UTF-8, written before `checked[c]` is set, so a reader that sees the flag
finds the reason whole). Last, one float64 per column: the worker's heartbeat, the monotonic
time its event loop last ran a `HEARTBEAT_INTERVAL` timer; the primary kills a worker whose
heartbeat is older than `worker_timeout` (hung, or stopped).

The primary gives rows out (supervisor.py): a server newly added gets a clean row, and a
row is freed once no config of any live worker has its server and its active count is 0.

Every worker writes only its own column, so no locks are needed; readers sum the columns.
`down_until` and `draining` are written by whoever changes them and read by everyone's
periodic sync (`SYNC_INTERVAL`), which is how "down in one worker" becomes "down in all of
them" within a second. CLOCK_MONOTONIC is system-wide on Linux, so the times compare.
`checked[c]` is read only by the primary, for /status and /healthz: a worker routes by its own
checks' verdict.

Per worker stay: pools, the smooth-weighted round-robin position, the active-check schedule
and verdict (each worker probes on its own), and the half-open trial (up to one per worker).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SYNC_INTERVAL = 0.25  # seconds between a worker's reads of the shared state
HEADER_FIELDS = 2  # down_until, draining
COLUMN_FIELDS = 3  # active, failures, checked
# The running totals a row counts per worker (the names /status gives them).
SERVER_COUNTERS = ("connections", "bytes_in", "bytes_out", "connect_errors", "retries",
                   "connect_us", "connect_count")
LISTENER_COUNTERS = ("connections", "tls_handshake_errors", "max_conns", "client_conns",
                     "client_rate", "denied", "bad_proxy_header")
COUNTERS = 7
LAST = 3  # a worker's last active check (result code, latency in us) and its peak open
REASON_BYTES = 120  # a multiple of 8: the heartbeats after the reasons stay aligned
HEARTBEAT_INTERVAL = 0.25  # seconds between a worker's heartbeats


class SharedTable:
    """The mapped file: `rows` servers x `columns` worker slots."""

    def __init__(self, path: str | os.PathLike[str], rows: int, columns: int,
                 create: bool = False) -> None:
        self.path = Path(path)
        self.rows = rows
        self.columns = columns
        self.stride = HEADER_FIELDS + (COLUMN_FIELDS + COUNTERS + LAST) * columns + COUNTERS
        self.counters_at = HEADER_FIELDS + COLUMN_FIELDS * columns  # within a row
        self.last_at = self.counters_at + COUNTERS * columns
        self.retired_at = self.last_at + LAST * columns
        self.reasons_at = rows * self.stride * 8  # byte offset of the reasons
        heartbeats_at = self.reasons_at + rows * columns * REASON_BYTES
        self.heartbeat_index = heartbeats_at // 8  # in `floats`
        size = heartbeats_at + columns * 8
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
        self.bytes = memoryview(self._map)

    def cell(self, row: int, column: int | None) -> SharedCell:
        """A worker's cell for one server (`column=None`: the primary's, which only reads)."""
        return SharedCell(self, row, column)

    def clear_column(self, column: int, rows: int | None = None) -> None:
        """Forget a worker slot's counts and check verdicts (its worker exited, maybe killed),
        in the first `rows` rows (all by default: those never given out are zero). Its
        totals move to the row's `retired` ones."""
        checked = HEADER_FIELDS + 2 * self.columns + column
        ints, columns = self.ints, self.columns
        for row in range(self.rows if rows is None else rows):
            base = row * self.stride
            ints[base + HEADER_FIELDS + column] = 0
            ints[base + checked] = 0
            for k in range(COUNTERS):
                at = base + self.counters_at + k * columns + column
                if ints[at]:
                    ints[base + self.retired_at + k] += ints[at]
                    ints[at] = 0
            for k in range(LAST):
                ints[base + self.last_at + k * columns + column] = 0

    def column_total(self, column: int, counter: int, rows: list[int]) -> int:
        """One worker's total of `counter` over `rows` (its new connections, say)."""
        at = self.counters_at + counter * self.columns + column
        return sum(self.ints[row * self.stride + at] for row in rows)

    def column_active(self, column: int, rows: list[int]) -> int:
        """One worker's open connections over `rows`."""
        return sum(self.ints[row * self.stride + HEADER_FIELDS + column] for row in rows)

    def reset_row(self, row: int, keep_active: bool = False) -> None:
        """Make `row` as new for a server newly added: up, not draining, no failures, no
        check verdicts. `keep_active`: the row still counts connections of the server a
        reload removed (same address, back before they ended); those counts stay right."""
        base = row * self.stride
        self.floats[base] = 0.0  # down_until
        self.ints[base + 1] = 0  # draining
        first = base + HEADER_FIELDS + (self.columns if keep_active else 0)
        for index in range(first, base + self.stride):
            self.ints[index] = 0
        at = self.reasons_at + row * self.columns * REASON_BYTES
        self.bytes[at : at + self.columns * REASON_BYTES] = bytes(self.columns * REASON_BYTES)

    def active(self, row: int) -> int:
        """Open connections to the server in `row`, over all workers."""
        start = row * self.stride + HEADER_FIELDS
        return sum(self.ints[start : start + self.columns])

    def beat(self, column: int, now: float) -> None:
        """A heartbeat of the worker in `column` (the primary also sets one when it starts)."""
        self.floats[self.heartbeat_index + column] = now

    def heartbeat(self, column: int) -> float:
        return self.floats[self.heartbeat_index + column]

    def close(self) -> None:
        self.ints.release()
        self.floats.release()
        self.bytes.release()
        self._map.close()


class SharedCell:
    """One server's row, as seen by the worker in one column (or by the primary: no column)."""

    __slots__ = ("active_index", "base", "bytes", "checked_index", "column", "columns",
                 "counters_index", "failure_index", "floats", "ints", "last_index",
                 "reason_at", "retired_index")

    def __init__(self, table: SharedTable, row: int, column: int | None) -> None:
        self.ints = table.ints
        self.floats = table.floats
        self.bytes = table.bytes
        self.columns = table.columns
        self.column = column
        self.base = row * table.stride
        # The primary's cell never counts connections; its indices point at column 0 only so
        # that they are valid.
        own = column or 0
        self.active_index = self.base + HEADER_FIELDS + own
        self.failure_index = self.base + HEADER_FIELDS + table.columns + own
        self.checked_index = self.base + HEADER_FIELDS + 2 * table.columns + own
        self.reason_at = table.reasons_at + row * table.columns * REASON_BYTES
        self.counters_index = self.base + table.counters_at
        self.last_index = self.base + table.last_at
        self.retired_index = self.base + table.retired_at

    def publish(self, values: tuple[int, ...] | list[int]) -> None:
        """Write this worker's running totals (COUNTERS of them) into its column."""
        if self.column is None:
            return
        ints, columns, at = self.ints, self.columns, self.counters_index + self.column
        for k, value in enumerate(values):
            ints[at + k * columns] = value

    def totals(self) -> list[int]:
        """Every counter summed over the workers, those that exited included."""
        ints, columns = self.ints, self.columns
        result = []
        for k in range(COUNTERS):
            start = self.counters_index + k * columns
            result.append(sum(ints[start : start + columns]) + ints[self.retired_index + k])
        return result

    def publish_last(self, values: tuple[int, int, int]) -> None:
        """This worker's last active check (result code, latency in microseconds) and its
        peak of open connections."""
        if self.column is not None:
            for k, value in enumerate(values):
                self.ints[self.last_index + k * self.columns + self.column] = value

    def lasts(self) -> list[tuple[int, int]]:
        """The last active check of every worker that ran one."""
        ints, columns, at = self.ints, self.columns, self.last_index
        return [(ints[at + c], ints[at + columns + c]) for c in range(columns) if ints[at + c]]

    def peak(self) -> int:
        """The highest of the workers' own peaks (a lower bound of the cluster's)."""
        at = self.last_index + 2 * self.columns
        return max(self.ints[at : at + self.columns])

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

    def set_checked_down(self, down: bool, reason: str) -> None:
        """Publish this worker's active-check verdict (a no-op in the primary's cell)."""
        if self.column is None:
            return
        if not down:
            self.ints[self.checked_index] = 0
        elif not self.ints[self.checked_index]:  # the reason of the change, not later ones
            data = reason.encode()[:REASON_BYTES].ljust(REASON_BYTES, b"\0")
            at = self.reason_at + self.column * REASON_BYTES
            self.bytes[at : at + REASON_BYTES] = data
            self.ints[self.checked_index] = 1

    def checked_down(self) -> list[str]:
        """The reasons of every worker whose active checks say this server is down."""
        start = self.base + HEADER_FIELDS + 2 * self.columns
        reasons = []
        for column in range(self.columns):
            if self.ints[start + column]:
                at = self.reason_at + column * REASON_BYTES
                raw = bytes(self.bytes[at : at + REASON_BYTES]).rstrip(b"\0")
                reasons.append(raw.decode(errors="ignore") or "active checks failed")
        return reasons

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

"""least_conn for large upstreams: the servers' loads kept in order, so a pick costs a few
C-level list operations instead of a scan of every server (62 µs at 1,000 servers).

`LoadIndex` keeps each server's key, active connections / weight, in a list cut into blocks
of about sqrt(N), with each block's minimum beside it: the least loaded server is
`min(block minimums)` and one `list.index` into its block, and a change of one key costs
one block. It answers exactly as the scan does (least active/weight, ties to the first
server at or after the cursor, round robin), because it is told whenever a key can change:
`Server` calls its watcher (`_watcher`) on every acquire and release, health transition and
drain flag. Servers that `Server.usable()` refuses are parked (key infinite) until one of
those events, or until their ejection ends (`down_until`), or at the latest after `RECHECK`
seconds.

Two things it cannot be told, so it refreshes them on a clock:
- slow start ramps a weight with time: ramping servers are re-keyed every `RAMP_REFRESH`;
- with workers, `server.active` sums every worker's shared counter, and the other workers'
  connects and closes are not events here. The chosen server's count is always re-read
  before it is returned (so a server another worker just filled is not chosen on a stale
  count), and every key is re-read every `refresh_period` (N x 20 µs, at least 2 ms: 20 ms
  at 1,000 servers), so across workers least_conn may use counts that old.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .health import DOWN

if TYPE_CHECKING:
    from .upstream import Server

INF = math.inf
RECHECK = 0.25  # a parked server no event brings back is asked again after this long
RAMP_REFRESH = 0.05  # slow-start weights are re-read this often (a 30 s ramp moves 0.2%)
REFRESH_PER_SERVER = 20e-6  # with workers: all counts re-read every N x this (>= 2 ms)


class LoadIndex:
    """Least active/weight among usable servers, with the scan's round-robin ties."""

    def __init__(self, servers: Sequence[Server],
                 clock: Callable[[], float] = time.monotonic) -> None:
        from .upstream import Server  # upstream.py imports strategies.py, which imports this

        self.plain = Server.usable  # what Upstream.pick passes without a retry's exclude
        self.clock = clock  # the servers' health clock (tests give both a fake one)
        self.servers = list(servers)
        count = len(self.servers)
        self.block = block = max(8, math.isqrt(count))
        self.keys: list[float] = [INF] * count
        self.mins: list[float] = [INF] * max(1, -(-count // block))  # never empty: min()
        self.cursor = 0
        self.parked: set[int] = set()
        self.recheck_at = INF
        self.ramping: set[int] = set()
        self.ramp_refresh_at = 0.0
        self.shared = any(server.cell is not None for server in self.servers)
        self.refresh_period = max(0.002, count * REFRESH_PER_SERVER)
        self.refresh_at = clock() + self.refresh_period  # the keys below are fresh
        for index, server in enumerate(self.servers):
            self._rekey(index, server)
            watcher = self._watcher(index)
            server.watchers.append(watcher)
            server.count_watchers.append(watcher)

    # -- keys -------------------------------------------------------------------------------

    def _set(self, index: int, key: float) -> None:
        keys = self.keys
        old = keys[index]
        keys[index] = key
        block = index // self.block
        mins = self.mins
        if key <= mins[block]:
            mins[block] = key
        elif old == mins[block]:  # the block's minimum rose: find the new one
            start = block * self.block
            mins[block] = min(keys[start:start + self.block])

    def _rekey(self, index: int, server: Server) -> None:
        self._set(index, server.active / server.weight)
        if server.ramp_until:
            self.ramping.add(index)

    def _watcher(self, index: int) -> Callable[[Server], None]:
        """What the server at `index` calls when its count, health or drain flag changed:
        re-key it (and unpark it: the next pick asks `usable` again). It runs on every
        acquire and release, so it is bound to its index, and the common case (one process,
        no ramp) reads the count and weight inline and stops when the key did not change."""
        keys, mins, parked, rekey = self.keys, self.mins, self.parked, self._rekey
        block = index // self.block
        start = block * self.block
        end = start + self.block

        def changed(server: Server) -> None:
            if parked:
                parked.discard(index)
            if server.cell is not None or server.ramp_until:
                rekey(index, server)
                return
            key = server.local_active / server.config.weight
            old = keys[index]
            if key == old:
                return
            keys[index] = key
            least = mins[block]
            if key <= least:
                mins[block] = key
            elif old == least:  # the block's minimum rose: find the new one
                mins[block] = min(keys[start:end])

        return changed

    def _park(self, index: int, server: Server) -> None:
        self._set(index, INF)
        self.parked.add(index)
        health = server.health
        if health.state == DOWN and health.active_up and not server.draining:
            at = health.down_until  # the scan would try it (half-open) from then on
        else:
            at = self.clock() + RECHECK
        if at < self.recheck_at:
            self.recheck_at = at

    def _on_clock(self) -> None:
        """The time-driven part: ejections that ended, ramps, other workers' counts."""
        now = self.clock()
        servers = self.servers
        if now >= self.recheck_at:
            back = list(self.parked)
            self.parked.clear()
            self.recheck_at = INF
            for index in back:
                self._rekey(index, servers[index])
        if self.shared and now >= self.refresh_at:
            self.refresh_at = now + self.refresh_period
            parked, keys = self.parked, self.keys
            for index, server in enumerate(servers):
                if index not in parked:
                    key = server.active / server.weight
                    if key != keys[index]:  # most have not changed: skip the block work
                        self._set(index, key)
                    if server.ramp_until:
                        self.ramping.add(index)
        elif self.ramping and now >= self.ramp_refresh_at:
            self.ramp_refresh_at = now + RAMP_REFRESH
            for index in list(self.ramping):
                server = servers[index]
                if index not in self.parked:
                    self._set(index, server.active / server.weight)  # ends a finished ramp
                if not server.ramp_until:
                    self.ramping.discard(index)

    # -- picking ----------------------------------------------------------------------------

    def _first(self, least: float) -> int:
        """The first server at or after the cursor (wrapping) whose key is `least`. Without
        exceptions: a `list.index` that misses costs more (0.85 µs) than the whole pick."""
        keys, mins, block = self.keys, self.mins, self.block
        cursor = self.cursor
        if cursor >= len(keys):
            cursor = 0
        here = cursor // block
        if mins[here] == least:
            tail = keys[cursor:here * block + block]
            if least in tail:
                return cursor + tail.index(least)
            # only before the cursor in this block: it comes last, after wrapping
        after = mins[here + 1:]
        found = here + 1 + after.index(least) if least in after else mins.index(least)
        start = found * block
        return keys.index(least, start, start + block)

    def pick(self, usable: Callable[[Server], bool]) -> Server | None:
        if self.parked or self.ramping or self.shared:
            self._on_clock()
        if usable is self.plain and not self.shared:
            # The common case: the least loaded is healthy, not draining and has room (as
            # Server.usable answers, read inline; one process: its count is local_active).
            least = min(self.mins)
            if least != INF:
                index = self._first(least)
                server = self.servers[index]
                if server.health.ok and not server._draining:
                    limit = server.config.max_conns
                    if limit == 0 or server.local_active < limit:
                        self.cursor = index + 1
                        return server
        return self._pick(usable)

    def _pick(self, usable: Callable[[Server], bool]) -> Server | None:
        """The general case: refused servers are parked (or, refused by this caller only,
        set aside for this pick), other workers' counts re-read."""
        servers = self.servers
        mins = self.mins
        refused: list[tuple[int, float]] | None = None  # no list unless a retry needs one
        chosen: Server | None = None
        while True:
            least = min(mins)
            if least == INF:
                break
            index = self._first(least)
            server = servers[index]
            if usable(server):
                if self.shared:  # another worker may have filled it since the last refresh
                    fresh = server.active / server.weight
                    if fresh != least:
                        self._set(index, fresh)
                        continue
                self.cursor = index + 1
                chosen = server
                break
            if server.usable():  # refused by this caller only (a retry's exclude)
                if refused is None:
                    refused = []
                refused.append((index, least))
                self._set(index, INF)
            else:
                self._park(index, server)
        if refused is not None:
            for index, key in refused:
                self._set(index, key)
        if chosen is None and self.parked:
            chosen = self._pick_parked(usable)
        return chosen

    def _pick_parked(self, usable: Callable[[Server], bool]) -> Server | None:
        """Nothing indexed is usable: ask the parked ones as the scan would (a caller may
        accept what `Server.usable` refuses). Rare, and O(parked)."""
        best: Server | None = None
        best_index = -1
        count = len(self.servers)
        for offset in range(count):
            index = (self.cursor + offset) % count
            if index not in self.parked:
                continue
            server = self.servers[index]
            if usable(server) and (best is None or server.active * best.weight
                                   < best.active * server.weight):
                best, best_index = server, index
        if best is not None:
            self.cursor = best_index + 1
        return best

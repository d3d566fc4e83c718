"""Smooth weighted round robin for large upstreams, without touching every server per pick.

nginx's algorithm (strategies.smooth_pick) adds every usable server's weight to its credit
at every pick, gives the pick to the richest and charges it the total. Here the credit is
kept lazily, as `base + weight * ticks` (`ticks` counts picks): servers of equal weight
gain alike, so within one weight class their order only changes when one is charged, and a
heap per class (richest first, lowest index on ties) holds it. A pick compares the top of
each class (a handful: weights are 1..256 and upstreams use few), charges the winner and
re-pushes it: O(classes + log N) instead of O(N), and the same sequence as the scan.

Servers `Server.usable()` refuses gain nothing, as in the scan: they are parked with their
credit frozen when an event says so (its watcher: health, drain, and acquire/release when
the server has max_conns), when a pick meets one, or at the latest `RECHECK` seconds after;
an ejection's end is awaited on the clock (`down_until`). A retry's `exclude` gains nothing
for that pick. Servers in slow start (weight ramping with time) sit outside the classes
with an explicit credit, updated at each pick as the scan does (O(ramping servers)).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .health import DOWN

if TYPE_CHECKING:
    from .upstream import Server

INF = float("inf")
RECHECK = 0.25
ACTIVE, PARKED, RAMPING = 0, 1, 2
NO_CREDIT: dict[int, float] = {}  # the ramping credits of a pick when nothing ramps


class SmoothIndex:
    """The smooth weighted round robin sequence, O(weight classes + log N) per pick."""

    def __init__(self, servers: Sequence[Server],
                 clock: Callable[[], float] = time.monotonic) -> None:
        from .upstream import Server  # upstream.py imports strategies.py, which imports this

        self.plain = Server.usable  # what Upstream.pick passes without a retry's exclude
        self.clock = clock
        self.servers = list(servers)
        self.position = {server: index for index, server in enumerate(self.servers)}
        count = len(self.servers)
        self.ticks = 0
        self.base: list[float] = [0] * count  # credit = base + weight * ticks, while ACTIVE
        self.credit: list[float] = [0.0] * count  # while PARKED (frozen) or RAMPING (live)
        self.state = [ACTIVE] * count
        self.weights = [server.config.weight for server in self.servers]
        self.classes: dict[int, list[tuple[float, int]]] = {}
        self.active_weight = 0  # sum of the ACTIVE servers' weights
        self.ramping: set[int] = set()
        self.parked: set[int] = set()
        self.recheck_at = INF
        for index, server in enumerate(self.servers):
            self._join(index, 0.0)
            watcher = self._watcher(index)
            server.watchers.append(watcher)
            if server.config.max_conns:  # else a count never changes whether it is usable
                server.count_watchers.append(watcher)
            if not server.usable():
                self._park(index)

    # -- moving servers between states --------------------------------------------------------

    def _credit(self, index: int) -> float:
        if self.state[index] == ACTIVE:
            return self.base[index] + self.weights[index] * self.ticks
        return self.credit[index]

    def _join(self, index: int, credit: float) -> None:
        """Make `index` gain from the next pick on, from `credit`."""
        server = self.servers[index]
        if server.ramp_until and server.weight < self.weights[index]:
            self.state[index] = RAMPING
            self.credit[index] = credit
            self.ramping.add(index)
            return
        weight = self.weights[index]
        self.state[index] = ACTIVE
        base = self.base[index] = credit - weight * self.ticks
        self.active_weight += weight
        heapq.heappush(self.classes.setdefault(weight, []), (-base, index))

    def _leave(self, index: int) -> float:
        """Stop `index` gaining; returns its credit now."""
        credit = self._credit(index)
        if self.state[index] == ACTIVE:
            self.active_weight -= self.weights[index]  # its heap entry goes stale
        else:
            self.ramping.discard(index)
        return credit

    def _park(self, index: int) -> None:
        if self.state[index] == PARKED:
            return
        self.credit[index] = self._leave(index)
        self.state[index] = PARKED
        self.parked.add(index)
        self._schedule(index)

    def _unpark(self, index: int) -> None:
        # usable() can move a server to half-open, whose listener unparks it first.
        if self.state[index] != PARKED:
            return
        self.parked.discard(index)
        self._join(index, self.credit[index])

    def _watcher(self, index: int) -> Callable[[Server], None]:
        """What the server at `index` calls on a count, health or drain change: park or
        unpark it to match (bound to its index: with max_conns it runs on every acquire and
        release)."""
        state, park, unpark = self.state, self._park, self._unpark

        def changed(server: Server) -> None:
            if state[index] != PARKED and server.health.ok and not server._draining:
                limit = server.config.max_conns  # usable, as Server.usable would answer:
                cell = server.cell  # and in the running, so nothing to do (a count change)
                if limit == 0 or (server.local_active if cell is None
                                  else cell.total_active()) < limit:
                    return
            usable = server.usable()
            if state[index] == PARKED:
                if usable:
                    unpark(index)
            elif not usable:
                park(index)

        return changed

    def _on_clock(self) -> None:
        """Parked servers whose time has come (an ejection's end) are asked again."""
        if self.clock() < self.recheck_at:
            return
        self.recheck_at = INF
        for index in list(self.parked):
            if self.servers[index].usable():
                self._unpark(index)
            else:
                self._schedule(index)

    def _schedule(self, index: int) -> None:
        """When to ask a parked server again, if no event comes first."""
        server = self.servers[index]
        health = server.health
        if health.state == DOWN and health.active_up and not server.draining:
            at = health.down_until
        else:
            at = self.clock() + RECHECK
        if at < self.recheck_at:
            self.recheck_at = at

    # -- picking ------------------------------------------------------------------------------

    def pick(self, usable: Callable[[Server], bool],
             exclude: Server | None = None) -> Server | None:
        if self.parked or self.ramping or exclude is not None or usable is not self.plain:
            return self._pick(usable, exclude)
        # The common case, nothing parked, ramping or excluded: the richest top of a class
        # wins, and if it is healthy, not draining and has room (Server.usable's answer, read
        # inline) it pays the total, else the general case decides (nothing changed yet but
        # stale heap entries dropped, which it would drop too).
        ticks = self.ticks + 1
        best, _, heap = self._richest(ticks)
        if best >= 0:
            server = self.servers[best]
            if server.health.ok and not server._draining:
                limit = server.config.max_conns
                cell = server.cell
                if limit == 0 or (server.local_active if cell is None
                                  else cell.total_active()) < limit:
                    self.ticks = ticks
                    bases = self.base
                    base = bases[best] = bases[best] - self.active_weight
                    heapq.heapreplace(heap, (-base, best))  # it won from the top
                    return server
        return self._pick(usable, exclude)

    def _richest(self, ticks: int) -> tuple[int, float, list[tuple[float, int]]]:
        """The richest top of the weight classes at `ticks` (lowest index on ties): its
        index (-1 if no class has an ACTIVE server), credit and heap. Drops the stale
        entries it meets on the way."""
        state, bases = self.state, self.base
        best = -1
        best_credit = 0.0
        best_heap: list[tuple[float, int]] = []
        for weight, heap in self.classes.items():
            while heap:
                key, index = heap[0]
                if state[index] == ACTIVE and bases[index] == -key:
                    break
                heapq.heappop(heap)  # stale: charged, parked or skipped since
            else:
                continue
            credit = -key + weight * ticks
            if best < 0 or credit > best_credit or (credit == best_credit and index < best):
                best, best_credit, best_heap = index, credit, heap
        return best, best_credit, best_heap

    def _pick(self, usable: Callable[[Server], bool],
              exclude: Server | None) -> Server | None:
        """Any pick: ramping servers credited, a retry's exclude and servers `usable`
        refuses left out of this pick (parked when Server.usable refuses them too)."""
        if self.parked:
            self._on_clock()
        self.ticks += 1
        ticks = self.ticks
        servers = self.servers
        total: float = self.active_weight
        ramping_credit = NO_CREDIT  # never written: a fresh dict when anything ramps
        if self.ramping:
            ramping_credit = {}
        for index in list(self.ramping) if self.ramping else ():
            weight = servers[index].weight  # ends a finished ramp
            if servers[index].ramp_until:
                self.credit[index] += weight
                total += weight
                ramping_credit[index] = self.credit[index]
            else:  # the ramp is over: into its class, with this pick's gain
                self.ramping.discard(index)
                self._join(index, self.credit[index] + self.weights[index])
                total += self.weights[index]
        skipped: list[int] = []  # servers that gain nothing this pick, back after it
        if exclude is not None:
            index = self.position.get(exclude, -1)
            if index >= 0 and self.state[index] != PARKED:
                total -= self._skip(index, skipped, ramping_credit)
        chosen: Server | None = None
        while True:
            best, best_credit, _ = self._richest(ticks)
            for index, credit in ramping_credit.items():
                if best < 0 or credit > best_credit or (credit == best_credit
                                                        and index < best):
                    best, best_credit = index, credit
            if best < 0:
                break
            server = servers[best]
            if usable(server):
                self._charge(best, total)
                ramping_credit.pop(best, None)
                chosen = server
                break
            if server.usable():  # refused by this caller only: no gain this pick
                total -= self._skip(best, skipped, ramping_credit)
            else:
                # It did not gain this pick: its credit is the one before it.
                if self.state[best] == RAMPING:
                    weight_now = servers[best].weight
                    self.credit[best] -= weight_now
                    total -= weight_now
                    ramping_credit.pop(best, None)
                else:
                    total -= self.weights[best]
                self.ticks -= 1
                self._park(best)
                self.ticks += 1
        for index in skipped:
            self._join(index, self.credit[index])
        return chosen

    def _skip(self, index: int, skipped: list[int],
              ramping_credit: dict[int, float]) -> float:
        """Take `index` out of this pick (no gain); it rejoins after. Returns its weight."""
        if self.state[index] == RAMPING:
            weight = self.servers[index].weight
            self.credit[index] -= weight
            ramping_credit.pop(index, None)
            self.ramping.discard(index)
        else:
            weight = self.weights[index]
            self.credit[index] = self.base[index] + weight * (self.ticks - 1)
            self.active_weight -= weight
        self.state[index] = PARKED  # out of the running for this pick only
        skipped.append(index)
        return weight

    def _charge(self, index: int, total: float) -> None:
        if self.state[index] == RAMPING:
            self.credit[index] -= total
            return
        weight = self.weights[index]
        base = self.base[index] = self.base[index] - total
        heap = self.classes[weight]
        if heap and heap[0][1] == index:  # it won from the top: one heap operation
            heapq.heapreplace(heap, (-base, index))
        else:
            heapq.heappush(heap, (-base, index))

"""Balancing strategies: one small class each, behind one `pick()`.

A strategy is built once for a fixed list of servers (a reload builds a new one) and asked,
per client connection, for a server that `usable(server)` accepts. `usable` folds in health,
draining, `max_conns` and the server a retry must avoid, so every strategy honours them the
same way. `pick` is on the per-connection path: O(servers) at most, no logging, and no
allocation on the common path. Weights are read from `server.weight` at every pick (never
cached) because slow start changes them over time.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import StrategyName
    from .upstream import Server

Usable = Callable[["Server"], bool]


class Strategy(ABC):
    """Chooses one server among a fixed list."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers: list[Server] = list(servers)

    @abstractmethod
    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        """Return a server for which `usable(server)` is true, or None if there is none."""


def smooth_pick(servers: list[Server], current: list[float], usable: Usable,
                share: bool) -> int:
    """One step of smooth weighted round robin (nginx): every usable server gains its weight
    in credit, the richest wins and pays the total. Returns its index, or -1 if none is
    usable. With `share`, a server's weight is its slow-start share (0..1) instead."""
    best = -1
    best_current = 0.0
    total = 0.0
    for index in range(len(servers)):
        server = servers[index]
        if not usable(server):
            continue
        weight = server.weight
        if share:
            weight /= server.config.weight
        value = current[index] + weight
        current[index] = value
        total += weight
        if best < 0 or value > best_current:
            best = index
            best_current = value
    if best >= 0:
        current[best] = best_current - total
    return best


class RoundRobin(Strategy):
    """Each usable server in turn. The cursor restarts after the server chosen, not after
    the one it pointed at, so an unusable server's turn goes to whoever comes next rather
    than handing its neighbour a double share.

    Weights are ignored, except for slow start (HAProxy applies `slowstart` to roundrobin
    too): while any server is ramping, picks follow smooth weighted round robin over each
    server's slow-start share (1 for a server not ramping), so a recovering server gets its
    ramped share of the rotation. With no server ramping it is the exact rotation again.
    """

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        self.cursor = 0
        # slow_start is an upstream setting and a reload builds new strategies, so whether
        # any server can ramp is known now; without slow start no pick pays for the check.
        self.slow_start = any(server.slow_start for server in self.servers)
        self.current: list[float] = [0.0] * len(self.servers)  # smooth-WRR credit, ramping
        self.smooth = False  # the last pick was a ramping one: `current` holds live credit

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        servers = self.servers
        if self.slow_start:
            for server in servers:
                # `ramp_until` is 0.0 unless the server recovered recently; reading `weight`
                # ends a ramp whose time is up, so a finished ramp does not count here.
                if server.ramp_until and server.weight < server.config.weight:
                    return self._pick_ramping(usable)
            self.smooth = False
        count = len(servers)
        index = self.cursor
        for _ in range(count):
            if index >= count:
                index = 0
            server = servers[index]
            index += 1
            if usable(server):
                self.cursor = index
                return server
        return None

    def _pick_ramping(self, usable: Usable) -> Server | None:
        """Smooth weighted round robin (see `Weighted`) with weight = slow-start share."""
        servers = self.servers
        current = self.current
        if not self.smooth:  # a new ramp: start from no credit, not a stale ramp's
            for index in range(len(current)):
                current[index] = 0.0
            self.smooth = True
        best = smooth_pick(servers, current, usable, share=True)
        if best < 0:
            return None
        self.cursor = best + 1  # once the ramp ends, the rotation goes on after this one
        return servers[best]


class Weighted(Strategy):
    """Smooth weighted round robin (nginx): over sum(weights) picks each server gets exactly
    its weight, interleaved rather than in bursts (5,1,1 gives a a b a c a a). Unusable
    servers neither gain nor lose credit, so they rejoin without a burst."""

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        self.current: list[float] = [0.0] * len(self.servers)

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        best = smooth_pick(self.servers, self.current, usable, share=False)
        return self.servers[best] if best >= 0 else None


class LeastConn(Strategy):
    """Fewest active connections relative to weight. Among equals the scan starts after the
    last server chosen, so idle servers take turns instead of the first one taking all."""

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        self.cursor = 0

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        servers = self.servers
        count = len(servers)
        best = -1
        best_active = 0
        best_weight = 1.0
        index = self.cursor
        for _ in range(count):
            if index >= count:
                index = 0
            server = servers[index]
            if usable(server):
                active = server.active  # may sum shared counters: read once
                weight = server.weight
                # active / weight < best_active / best_weight, without division (as nginx)
                if best < 0 or active * best_weight < best_active * weight:
                    best = index
                    best_active = active
                    best_weight = weight
            index += 1
        if best < 0:
            return None
        self.cursor = best + 1
        return servers[best]


class IpHash(Strategy):
    """Sticky by client IP through consistent hashing: a ring of weight-proportional virtual
    nodes keyed by server address. Removing one of N servers moves only the clients it had
    (about 1/N), and when a client's server is unusable the next distinct usable server
    clockwise takes it, so every other client stays put. Slow start does not apply (as with
    HAProxy's static `balance source`): a recovered server takes back all its clients at once,
    since moving them elsewhere meanwhile would break the stickiness this strategy is for."""

    VNODES_PER_WEIGHT = 160

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        points: list[tuple[int, int]] = []
        for index, server in enumerate(self.servers):
            # Configured weight, not the slow-start one: the ring must not depend on timing.
            for replica in range(self.VNODES_PER_WEIGHT * server.config.weight):
                points.append((_hash(f"{server.key}#{replica}"), index))
        points.sort()
        self.hashes: list[int] = [point for point, _ in points]
        self.owners: list[int] = [index for _, index in points]
        # Marks servers already refused during one walk; compared to a pick counter so it
        # never needs clearing (no per-pick set).
        self.seen: list[int] = [0] * len(self.servers)
        self.walks = 0

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        hashes = self.hashes
        size = len(hashes)
        if not size:
            return None
        position = bisect.bisect(hashes, _hash(_client_key(client_ip)))
        if position == size:
            position = 0
        owners = self.owners
        servers = self.servers
        owner = owners[position]
        server = servers[owner]
        if usable(server):
            return server
        return self._walk(position, owner, usable)

    def _walk(self, position: int, refused: int, usable: Usable) -> Server | None:
        """Clockwise from `position` to the next distinct server `usable` accepts."""
        self.walks += 1
        walk = self.walks
        seen = self.seen
        seen[refused] = walk
        left = len(self.servers) - 1  # distinct servers not yet asked
        owners = self.owners
        size = len(owners)
        for step in range(1, size):
            if not left:
                break
            owner = owners[(position + step) % size]
            if seen[owner] == walk:
                continue
            server = self.servers[owner]
            if usable(server):
                return server
            seen[owner] = walk
            left -= 1
        return None


class RandomTwo(Strategy):
    """Power of two random choices: of two random usable servers, the less loaded relative
    to weight wins. Nearly as even as least_conn, without every balancer process herding
    onto the same 'least' server when counts are stale."""

    def __init__(self, servers: Sequence[Server], seed: int | None = None) -> None:
        super().__init__(servers)
        self.random = random.Random(seed)
        # Reused across picks for a partial Fisher-Yates shuffle: samples without a new list.
        self.order: list[int] = list(range(len(self.servers)))

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        servers = self.servers
        order = self.order
        count = len(order)
        rand = self.random.random
        first: Server | None = None
        for slot in range(count):
            # Swap a random not-yet-drawn index into `slot`: a uniform draw without repeats.
            other = slot + int(rand() * (count - slot))
            drawn = order[other]
            order[other] = order[slot]
            order[slot] = drawn
            server = servers[drawn]
            if not usable(server):
                continue
            if first is None:
                first = server
                continue
            if server.active * first.weight < first.active * server.weight:
                return server
            return first
        return first


STRATEGIES: dict[StrategyName, type[Strategy]] = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "least_conn": LeastConn,
    "ip_hash": IpHash,
    "random_two": RandomTwo,
}


def make_strategy(name: StrategyName, servers: Sequence[Server]) -> Strategy:
    """Build the strategy called `name` (validated by the config loader) for `servers`."""
    return STRATEGIES[name](servers)


def _hash(text: str) -> int:
    """A stable 64-bit hash: Python's hash() is randomised per process, and every worker
    and every restart must map a client to the same server."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _client_key(client_ip: str) -> str:
    """The client's address as hashed: an IPv4-mapped IPv6 address ('::ffff:1.2.3.4', as a
    dual-stack listener reports IPv4 clients) hashes as the plain IPv4 address. Peer names
    are already canonical text, so parsing them (microseconds) would buy nothing."""
    if client_ip.startswith("::ffff:") and "." in client_ip:
        return client_ip[7:]
    return client_ip

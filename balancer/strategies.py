"""Balancing strategies: one small class each, behind one `pick()`.

A strategy is built once for a fixed list of servers (a reload builds a new one) and asked,
per client connection, for a server that `usable(server)` accepts. `usable` folds in health,
draining, `max_conns` and the server a retry must avoid, so every strategy honours them the
same way. `pick` is on the per-connection path: O(servers) at most, no logging.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .upstream import Server

Usable = Callable[["Server"], bool]


class Strategy(ABC):
    """Chooses one server among a fixed list."""

    def __init__(self, servers: Sequence[Server]) -> None:
        self.servers = list(servers)

    @abstractmethod
    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        """Return a server for which `usable(server)` is true, or None if there is none."""


class Weighted(Strategy):
    """Smooth weighted round robin (nginx): over sum(weights) picks each server gets exactly
    its weight, interleaved rather than in bursts. Weights are read at every pick, so a
    server in slow start ramps up smoothly."""

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        self.current = [0.0] * len(self.servers)

    def weight_of(self, server: Server) -> float:
        return server.weight

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        best = -1
        total = 0.0
        current = self.current
        for i, server in enumerate(self.servers):
            if not usable(server):
                continue
            weight = self.weight_of(server)
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return self.servers[best]


class RoundRobin(Weighted):
    """Each usable server in turn: smooth weighted round robin with every weight 1."""

    def weight_of(self, server: Server) -> float:
        return 1.0


class LeastConn(Strategy):
    """Fewest active connections relative to weight; ties go round robin."""

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        self.next_start = 0

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        servers = self.servers
        count = len(servers)
        best: Server | None = None
        start = self.next_start
        for offset in range(count):
            server = servers[(start + offset) % count]
            if not usable(server):
                continue
            # active_a / weight_a < active_b / weight_b, without division (as nginx does)
            if best is None or server.active * best.weight < best.active * server.weight:
                best = server
        if count:
            self.next_start = (start + 1) % count
        return best


class IpHash(Strategy):
    """Sticky by client IP: consistent hashing on a ring of weight-proportional virtual
    nodes. Removing one of N servers moves only the clients it had (about 1/N); when the
    chosen server is unusable, the next distinct server clockwise takes the client."""

    VNODES_PER_WEIGHT = 160

    def __init__(self, servers: Sequence[Server]) -> None:
        super().__init__(servers)
        points: list[tuple[int, int]] = []
        for index, server in enumerate(self.servers):
            for replica in range(self.VNODES_PER_WEIGHT * server.config.weight):
                points.append((_hash(f"{server.key}#{replica}".encode()), index))
        points.sort()
        self.hashes = [h for h, _ in points]
        self.owners = [i for _, i in points]

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        if not self.hashes:
            return None
        position = bisect.bisect(self.hashes, _hash(_ip_key(client_ip)))
        size = len(self.hashes)
        tried: set[int] = set()
        for step in range(size):
            index = self.owners[(position + step) % size]
            if index in tried:
                continue
            server = self.servers[index]
            if usable(server):
                return server
            tried.add(index)
            if len(tried) == len(self.servers):
                break
        return None


class RandomTwo(Strategy):
    """Power of two random choices: of two random usable servers, the less loaded (relative
    to weight) wins. Avoids the herd effect of many balancers all choosing one 'least'."""

    def __init__(self, servers: Sequence[Server], seed: int | None = None) -> None:
        super().__init__(servers)
        self.random = random.Random(seed)

    def pick(self, client_ip: str, usable: Usable) -> Server | None:
        candidates = [s for s in self.servers if usable(s)]
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        a, b = self.random.sample(candidates, 2)
        return a if a.active * b.weight <= b.active * a.weight else b


STRATEGIES: dict[str, type[Strategy]] = {
    "round_robin": RoundRobin,
    "weighted": Weighted,
    "least_conn": LeastConn,
    "ip_hash": IpHash,
    "random_two": RandomTwo,
}


def make_strategy(name: str, servers: Sequence[Server]) -> Strategy:
    """Build the strategy called `name` (validated by the config loader) for `servers`."""
    return STRATEGIES[name](servers)


def _hash(data: bytes) -> int:
    """A stable 64-bit hash (Python's hash() is randomised per process)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _ip_key(client_ip: str) -> bytes:
    """The packed address, so '::ffff:1.2.3.4' and '1.2.3.4' hash alike."""
    try:
        address = ipaddress.ip_address(client_ip)
    except ValueError:
        return client_ip.encode()
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.packed

"""The indexes of large upstreams (least_conn's LoadIndex, weighted's SmoothIndex) and the
scans of small ones against the straightforward scans as they were: the same choice at every
pick, through random sequences of picks, retries, connections opening and closing, ejections,
recoveries, active checks, drains and max_conns, on a fake clock. A pick without a retry
passes `Server.usable` itself, as `Upstream.pick` does, so the paths that read it inline are
the ones checked."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import Address, HealthConfig, ServerConfig
from balancer.strategies import LeastConn, RandomTwo, Strategy, Weighted
from balancer.upstream import Server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reference_pick(servers: list[Server], cursor: list[int],
                   usable: Callable[[Server], bool]) -> Server | None:
    """least_conn as it was: scan every server from the cursor, least active/weight wins."""
    count = len(servers)
    best = -1
    best_active, best_weight = 0, 1.0
    for step in range(count):
        index = (cursor[0] + step) % count
        server = servers[index]
        if usable(server):
            active, weight = server.active, server.weight
            if best < 0 or active * best_weight < best_active * weight:
                best, best_active, best_weight = index, active, weight
    if best < 0:
        return None
    cursor[0] = best + 1
    return servers[best]


class ReferenceWeighted:
    """weighted as it was: smooth weighted round robin over every server at every pick."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.current = [0.0] * len(servers)

    def pick(self, usable: Callable[[Server], bool]) -> Server | None:
        best, best_current, total = -1, 0.0, 0.0
        for index, server in enumerate(self.servers):
            if usable(server):
                weight = server.weight
                self.current[index] += weight
                total += weight
                if best < 0 or self.current[index] > best_current:
                    best, best_current = index, self.current[index]
        if best < 0:
            return None
        self.current[best] -= total
        return self.servers[best]


class Reference(Protocol):
    def pick(self, usable: Callable[[Server], bool]) -> Server | None: ...


class ReferenceLeastConn:
    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.cursor = [0]

    def pick(self, usable: Callable[[Server], bool]) -> Server | None:
        return reference_pick(self.servers, self.cursor, usable)


class ReferenceRandomTwo:
    """random_two as it was: of two random usable servers, the less loaded per weight."""

    def __init__(self, servers: list[Server]) -> None:
        self.servers = servers
        self.random = random.Random(SEED)
        self.order = list(range(len(servers)))

    def pick(self, usable: Callable[[Server], bool]) -> Server | None:
        order, count, first = self.order, len(self.order), None
        for slot in range(count):
            other = slot + int(self.random.random() * (count - slot))
            order[slot], order[other] = order[other], order[slot]
            server = self.servers[order[slot]]
            if not usable(server):
                continue
            if first is None:
                first = server
                continue
            return server if server.active * first.weight < first.active * server.weight \
                else first
        return first


SEED = 7
# kind: (the reference, what must choose as it does: the index, where there is one, first)
KINDS: dict[str, tuple[Callable[[list[Server]], Reference],
                       list[Callable[[list[Server]], Strategy]]]] = {
    "least_conn": (ReferenceLeastConn, [lambda servers: LeastConn(servers, indexed=True),
                                        lambda servers: LeastConn(servers, indexed=False)]),
    "weighted": (ReferenceWeighted, [lambda servers: Weighted(servers, indexed=True),
                                     lambda servers: Weighted(servers, indexed=False)]),
    "random_two": (ReferenceRandomTwo, [lambda servers: RandomTwo(servers, seed=SEED)]),
}
INDEXED = {"least_conn": LeastConn, "weighted": Weighted}


def world(specs: list[tuple[int, int, int]], clock: Clock) -> list[Server]:
    servers = []
    for i, (weight, max_conns, max_fails) in enumerate(specs):
        server = Server(ServerConfig(Address("10.0.0.1", 3000 + i), weight=weight,
                                     max_conns=max_conns),
                        "app", HealthConfig(max_fails=max_fails, fail_timeout=1.0))
        server.health.clock = clock
        servers.append(server)
    return servers


SERVER_SPEC = st.tuples(st.integers(1, 4), st.sampled_from([0, 0, 1, 2, 3]),
                        st.integers(0, 2))
SERVER = st.integers(0, 7)  # ops aim at the first few servers, so their effects meet
PICK = st.tuples(st.just("pick"), st.integers(-1, 7), st.booleans())  # exclude, hold it
OPS = st.lists(st.one_of(
    PICK, PICK, PICK, PICK,
    st.tuples(st.just("release"), st.integers(0, 1000), st.just(False)),
    st.tuples(st.just("fail"), SERVER, st.just(False)),
    st.tuples(st.just("succeed"), SERVER, st.just(False)),
    st.tuples(st.just("checks"), SERVER, st.booleans()),
    st.tuples(st.just("drain"), SERVER, st.booleans()),
    st.tuples(st.just("tick"), st.sampled_from([0, 0, 0, 1, 3]), st.just(False)),  # x 0.4 s
), max_size=80)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=400, deadline=None)
@given(specs=st.one_of(st.lists(SERVER_SPEC, min_size=1, max_size=6),
                       st.lists(SERVER_SPEC, min_size=1, max_size=40)), ops=OPS)
def test_index_chooses_as_the_scan_does(kind, specs, ops):
    check_same_choices(kind, specs, ops)


ONE = [(1, 0, 1), (1, 0, 1), (2, 0, 1)]
FULL = [(1, 1, 1), (1, 0, 1), (1, 0, 1)]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("specs", "ops"), [
    # active checks take a server out and bring it back: back at once, not after a recheck
    (ONE, [("checks", 0, False), ("pick", -1, False), ("checks", 0, True), ("pick", -1, False),
           ("pick", -1, False), ("pick", -1, False)]),
    # a drain and its end
    (ONE, [("drain", 1, True), ("pick", -1, True), ("pick", -1, True), ("drain", 1, False),
           ("pick", -1, False), ("pick", -1, False)]),
    # a passive ejection ends on the clock: half-open exactly when the scan would try it
    (ONE, [("fail", 0, False), ("pick", -1, False), ("tick", 2, False), ("pick", -1, False),
           ("tick", 1, False), ("pick", -1, True), ("pick", -1, True), ("pick", -1, False)]),
    # max_conns: full, then a slot frees
    (FULL, [("pick", -1, True), ("pick", -1, True), ("pick", -1, True), ("pick", -1, True),
            ("release", 0, False), ("pick", -1, False), ("pick", -1, False)]),
    # ... and the freed server gains credit from the next pick on, as in the scan: told by
    # the release itself, not by a recheck later (weighted's index: its count watcher)
    (FULL, [("pick", -1, True), ("pick", -1, False), ("pick", -1, False), ("pick", -1, False),
            ("release", 0, False)] + [("pick", -1, False)] * 6),
    # a retry's exclude skips a server for that pick only
    (ONE, [("pick", 0, True), ("pick", 1, True), ("pick", 2, False), ("pick", -1, False),
           ("pick", -1, False)]),
])
def test_index_follows_each_kind_of_change(kind, specs, ops):
    check_same_choices(kind, specs, ops)


def check_same_choices(kind, specs, ops):
    """The reference and each contender (the index, today's scan), each in a world of its
    own, given the same operations: every pick must choose the same server in all."""
    reference_type, contender_types = KINDS[kind]
    sides = range(1 + len(contender_types))
    clocks = tuple(Clock() for _ in sides)
    worlds = tuple(world(specs, clock) for clock in clocks)
    reference = reference_type(worlds[0])
    contenders = [make(servers) for make, servers in zip(contender_types, worlds[1:],
                                                          strict=True)]
    for contender, clock in zip(contenders, clocks[1:], strict=True):
        index = getattr(contender, "index", None)
        if index is not None:
            index.clock = clock
    if kind in INDEXED:  # the index and the scan, in that order
        assert contenders[0].index is not None and contenders[1].index is None  # type: ignore[attr-defined]
    held: tuple[list[Server], ...] = tuple([] for _ in sides)
    count = len(specs)
    for op, arg, flag in ops:
        if op == "pick":
            chosen = []
            for side in sides:
                servers = worlds[side]
                exclude = servers[arg % count] if arg >= 0 else None
                usable: Callable[[Server], bool] = Server.usable  # as Upstream.pick passes

                if exclude is not None:
                    def usable(server: Server, exclude: Server = exclude) -> bool:
                        return server is not exclude and server.usable()

                if side == 0:
                    server = reference.pick(usable)
                else:
                    server = contenders[side - 1].pick("10.0.0.1", usable, exclude)
                chosen.append(None if server is None else servers.index(server))
                if server is not None and flag:  # as the proxy does with a chosen server
                    server.health.connect_started()
                    server.acquire()
                    held[side].append(server)
            assert len(set(chosen)) == 1, (op, arg, chosen)
            continue
        for side in sides:
            servers = worlds[side]
            server = servers[arg % count]
            if op == "release":
                if held[side]:
                    held[side].pop(arg % len(held[side])).release()
            elif op == "fail":
                server.health.connect_failed("refused")
            elif op == "succeed":
                server.health.connect_succeeded()
            elif op == "checks":
                server.health.set_active(flag, "checks")
            elif op == "drain":
                server.draining = flag
            elif op == "tick":
                clocks[side].now += 0.4 * arg


@pytest.mark.parametrize(("kind", "scan_up_to"), [("least_conn", 6), ("weighted", 6)])
def test_index_is_used_for_large_upstreams_only(kind, scan_up_to):
    small = [Server(ServerConfig(Address("10.0.0.1", 3000 + i))) for i in range(scan_up_to)]
    large = [Server(ServerConfig(Address("10.0.0.2", 3000 + i)))
             for i in range(scan_up_to + 1)]
    assert INDEXED[kind](small).index is None
    assert INDEXED[kind](large).index is not None


@pytest.mark.parametrize("kind", list(INDEXED))
def test_index_of_no_servers_gives_none(kind):
    strategy = INDEXED[kind]([], indexed=True)
    assert strategy.pick("10.0.0.1", Server.usable) is None


def test_smooth_index_follows_slow_start_and_the_ramp_end():
    servers = [Server(ServerConfig(Address("10.0.0.1", 3000 + i), weight=10 if i == 0 else 1))
               for i in range(40)]
    for server in servers:
        server.slow_start = 1000.0
    servers[0].ramp_until = time.monotonic() + 999.0  # at the 5% floor: weight 0.5
    strategy = Weighted(servers, indexed=True)
    counts = Counter(strategy.pick("10.0.0.1", Server.usable) for _ in range(39 * 2 * 10 + 10))
    assert abs(counts[servers[0]] - 10) <= 2, counts[servers[0]]  # 0.5 : 39
    servers[0].ramp_until = time.monotonic() - 1  # the ramp is over: weight 10 again
    counts = Counter(strategy.pick("10.0.0.1", Server.usable) for _ in range(49 * 4))
    assert counts[servers[0]] == 40 and all(counts[s] == 4 for s in servers[1:]), counts


def test_load_index_follows_slow_start():
    servers = [Server(ServerConfig(Address("10.0.0.1", 3000 + i))) for i in range(40)]
    for server in servers:
        server.slow_start = 1000.0
        server.acquire()
        server.acquire()  # every server holds 2
    servers[0].ramp_until = time.monotonic() + 500.0  # half way: weight 0.5, key 4
    strategy = LeastConn(servers, indexed=True)
    for _ in range(39):  # the others go to 3 each (key 3 < 4) before it gets one
        chosen = strategy.pick("10.0.0.1", Server.usable)
        assert chosen is not servers[0]
        chosen.acquire()  # type: ignore[union-attr]
    servers[0].ramp_until = 0.0  # ramp over (as reading the weight at its end does)
    servers[0].release()  # an event: re-keyed at weight 1, key 1
    assert strategy.pick("10.0.0.1", Server.usable) is servers[0]


def test_load_index_with_workers_rereads_other_workers_counts(tmp_path):
    """Other workers' connects are seen at once for the server about to be chosen, their
    closes within the refresh period (N x 20 µs, at least 2 ms)."""
    from balancer.proc.shared import SharedTable

    table = SharedTable(tmp_path / "shared", 40, 2, create=True)
    try:
        servers = [Server(ServerConfig(Address("10.0.0.1", 3000 + i)), "app",
                          cell=table.cell(i, 0)) for i in range(40)]
        others = [table.cell(i, 1) for i in range(40)]  # the other worker's column
        for server in servers:
            server.acquire()  # one each, here
        clock = Clock()
        strategy = LeastConn(servers, indexed=True)
        assert strategy.index is not None and strategy.index.shared
        strategy.index.clock = clock
        strategy.index.refresh_at = clock.now + strategy.index.refresh_period  # as if built now
        others[0].add_active(5)  # the other worker fills server 0: its key still says 1
        assert strategy.pick("10.0.0.1", Server.usable) is servers[1]  # 0 was re-read: 6
        servers[1].acquire()
        for other in others[1:]:
            other.add_active(2)  # now two each everywhere, unseen by the keys
        clock.now += strategy.index.refresh_period  # a refresh: every key re-read
        assert strategy.pick("10.0.0.1", Server.usable) is servers[2]  # 3, the least
        servers[2].acquire()
        others[30].add_active(-2)  # the other worker's connections to server 30 close
        clock.now += strategy.index.refresh_period / 2
        assert strategy.pick("10.0.0.1", Server.usable) is servers[3]  # not seen yet
        servers[3].acquire()
        clock.now += strategy.index.refresh_period / 2
        assert strategy.pick("10.0.0.1", Server.usable) is servers[30]  # seen: 1
    finally:
        for server in servers:
            server.cell = None
        table.close()


def test_smooth_index_with_workers_skips_a_server_other_workers_filled(tmp_path):
    """max_conns counts every worker's connections: a server another worker filled is not
    chosen, though no event here said so (the scan asks Server.usable at every pick)."""
    from balancer.proc.shared import SharedTable

    table = SharedTable(tmp_path / "shared", 40, 2, create=True)
    try:
        servers = [Server(ServerConfig(Address("10.0.0.1", 3000 + i), max_conns=2), "app",
                          cell=table.cell(i, 0)) for i in range(40)]
        strategy = Weighted(servers, indexed=True)
        reference = ReferenceWeighted(servers[:])
        assert strategy.pick("10.0.0.1", Server.usable) is servers[0]
        reference.pick(Server.usable)
        table.cell(1, 1).add_active(2)  # the other worker fills server 1
        for _ in range(80):
            expected = reference.pick(Server.usable)
            assert expected is not servers[1]
            assert strategy.pick("10.0.0.1", Server.usable) is expected
    finally:
        for server in servers:
            server.cell = None
        table.close()

"""least_conn's LoadIndex against the straightforward scan: the same choice at every pick,
through random sequences of picks, retries, connections opening and closing, ejections,
recoveries, active checks, drains and max_conns, on a fake clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config import Address, HealthConfig, ServerConfig
from balancer.strategies import LeastConn
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


@settings(max_examples=400, deadline=None)
@given(specs=st.one_of(st.lists(SERVER_SPEC, min_size=1, max_size=6),
                       st.lists(SERVER_SPEC, min_size=1, max_size=40)), ops=OPS)
def test_load_index_chooses_as_the_scan_does(specs, ops):
    check_same_choices(specs, ops)


ONE = [(1, 0, 1), (1, 0, 1), (2, 0, 1)]
FULL = [(1, 1, 1), (1, 0, 1), (1, 0, 1)]


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
    # a retry's exclude skips a server for that pick only
    (ONE, [("pick", 0, True), ("pick", 1, True), ("pick", 2, False), ("pick", -1, False),
           ("pick", -1, False)]),
])
def test_load_index_follows_each_kind_of_change(specs, ops):
    check_same_choices(specs, ops)


def check_same_choices(specs, ops):
    clocks = (Clock(), Clock())
    worlds = (world(specs, clocks[0]), world(specs, clocks[1]))
    strategy = LeastConn(worlds[1], indexed=True)
    assert strategy.index is not None
    strategy.index.clock = clocks[1]
    cursor = [0]
    held: tuple[list[Server], list[Server]] = ([], [])
    count = len(specs)
    for op, arg, flag in ops:
        if op == "pick":
            chosen = []
            for side in (0, 1):
                servers = worlds[side]
                exclude = servers[arg % count] if arg >= 0 else None

                def usable(server: Server, exclude: Server | None = exclude) -> bool:
                    return server is not exclude and server.usable()

                if side == 0:
                    server = reference_pick(servers, cursor, usable)
                else:
                    server = strategy.pick("10.0.0.1", usable)
                chosen.append(None if server is None else servers.index(server))
                if server is not None and flag:  # as the proxy does with a chosen server
                    server.health.connect_started()
                    server.acquire()
                    held[side].append(server)
            assert chosen[0] == chosen[1], (op, arg)
            continue
        for side in (0, 1):
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


def test_load_index_is_used_for_large_upstreams_only():
    small = [Server(ServerConfig(Address("10.0.0.1", 3000 + i))) for i in range(32)]
    large = [Server(ServerConfig(Address("10.0.0.2", 3000 + i))) for i in range(33)]
    assert LeastConn(small).index is None
    assert LeastConn(large).index is not None

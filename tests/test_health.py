"""The per-server circuit breaker and active-check verdicts, on a controlled clock."""

from __future__ import annotations

import logging

from balancer.config import HealthConfig
from balancer.health import DOWN, HALF_OPEN, UP, ServerHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(max_fails: int = 3, fail_timeout: float = 10.0) -> tuple[ServerHealth, Clock]:
    clock = Clock()
    return ServerHealth("app/127.0.0.1:1", HealthConfig(max_fails, fail_timeout), clock), clock


def test_max_fails_within_fail_timeout_takes_server_down():
    health, _clock = make()
    for _ in range(2):
        health.connect_failed("refused")
        assert health.available()
    health.connect_failed("refused")
    assert health.state == DOWN and not health.available()


def test_failures_spread_beyond_the_window_do_not_add_up():
    health, clock = make()
    for _ in range(5):
        health.connect_failed("refused")
        health.connect_failed("refused")
        clock.now += 11
    assert health.state == UP


def test_success_resets_the_count():
    health, _ = make()
    health.connect_failed("refused")
    health.connect_failed("refused")
    health.connect_succeeded()
    health.connect_failed("refused")
    health.connect_failed("refused")
    assert health.state == UP


def test_half_open_allows_exactly_one_trial_then_recovers():
    health, clock = make()
    for _ in range(3):
        health.connect_failed("refused")
    clock.now += 9.9
    assert not health.available()
    clock.now += 0.2
    assert health.available() and health.state == HALF_OPEN
    health.connect_started()
    assert not health.available()  # the one trial is in flight
    health.connect_succeeded()
    assert health.state == UP and health.available()


def test_failed_trial_doubles_the_ejection_up_to_ten_times():
    health, clock = make()
    for _ in range(3):
        health.connect_failed("refused")
    downs = []
    for _ in range(6):
        start = clock.now
        while not health.available():
            clock.now += 1
        downs.append(clock.now - start)
        health.connect_started()
        health.connect_failed("refused")
    assert downs == [10, 20, 40, 80, 100, 100]


def test_abandoned_trial_frees_the_slot():
    health, clock = make()
    for _ in range(3):
        health.connect_failed("timeout")
    clock.now += 10
    assert health.available()
    health.connect_started()
    health.connect_abandoned()
    assert health.available()


def test_max_fails_zero_disables_passive_checks():
    health, _ = make(max_fails=0)
    for _ in range(100):
        health.connect_failed("refused")
    assert health.state == UP and health.available()


def test_active_check_down_overrides_passive_up():
    health, _ = make()
    health.set_active(False, "3 failed checks")
    assert not health.available() and health.display_state == DOWN
    health.set_active(True, "2 passed checks")
    assert health.available() and health.display_state == UP


def test_each_state_change_is_logged_once(caplog):
    health, _clock = make()
    with caplog.at_level(logging.INFO, logger="balancer.health"):
        for _ in range(10):
            health.connect_failed("refused")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "server app/127.0.0.1:1 down: 3 connect failures in 10s (last: refused); out for 10s"
    ]


def test_slow_start_ramps_weight_after_recovery():
    from balancer.config import Address, ServerConfig
    from balancer.upstream import Server

    server = Server(ServerConfig(Address("127.0.0.1", 1), weight=20), "app",
                    HealthConfig(max_fails=1, fail_timeout=10.0), slow_start=30.0)
    assert server.weight == 20  # at start: no ramp (nothing recovered)
    server.health.connect_failed("refused")
    server.health.down_until = 0.0  # its ejection is over
    assert server.up  # half-open now
    server.health.connect_started()
    server.health.connect_succeeded()
    ramped = server.weight
    assert 20 * 0.05 <= ramped < 20 * 0.1  # just back: a small share of its weight
    server.ramp_until -= 15  # halfway through the 30 s ramp
    assert 9.5 < server.weight < 10.5
    server.ramp_until -= 16  # the ramp is over
    assert server.weight == 20 and server.ramp_until == 0.0

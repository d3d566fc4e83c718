"""The per-server circuit breaker on a controlled clock, and the active checks that feed it
(scripted probes, and real sockets for what a server can send back)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from balancer.checks import ActiveChecker, _status_ok
from balancer.config import Address, CheckConfig, HealthConfig, ServerConfig
from balancer.health import DOWN, HALF_OPEN, UP, ServerHealth
from balancer.upstream import Server


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
        for _ in range(1000):  # the longest ejection is 100 s: far fewer steps than this
            if health.available():
                break
            clock.now += 1
        else:
            raise AssertionError(f"still unavailable {clock.now - start:g}s after ejection")
        downs.append(clock.now - start)
        health.connect_started()
        health.connect_failed("refused")
    assert downs == [10, 20, 40, 80, 100, 100]


def test_a_failure_after_the_ejection_ended_counts_whether_or_not_anything_asked():
    # A pool refill or a connect begun earlier can fail after the ejection's end with no
    # pick in between to move the server to half-open; the outcome must not depend on that
    # (the least_conn index asks fewer servers than the scan, and chose differently).
    asked, clock_a = make()
    unasked, clock_u = make()
    for health, clock in ((asked, clock_a), (unasked, clock_u)):
        for _ in range(3):
            health.connect_failed("refused")
        clock.now += 10
    assert asked.available() and asked.state == HALF_OPEN
    for health in (asked, unasked):
        health.connect_failed("refused")
    assert (unasked.state, unasked.down_until) == (asked.state, asked.down_until) == (
        DOWN, clock_a.now + 20)
    assert not unasked.available() and not asked.available()


def test_abandoned_trial_frees_the_slot():
    health, clock = make()
    for _ in range(3):
        health.connect_failed("timeout")
    clock.now += 10
    assert health.available()
    trial = health.connect_started()
    assert trial and not health.available()
    assert health.connect_started() is False  # a second connect is not the trial
    health.connect_abandoned(False)  # ...and its leaving does not free the trial
    assert not health.available()
    health.connect_abandoned(trial)
    assert health.available()


def test_max_fails_zero_disables_passive_checks():
    health, _ = make(max_fails=0)
    for _ in range(100):
        health.connect_failed("refused")
    assert health.state == UP and health.available()


def test_max_fails_zero_set_while_ejected_ends_the_ejection():
    """A reload turns passive checks off while the server is half-open and its trial is in
    flight; the trial is then refused. It must not stay half-open with its trial taken for
    ever (the early return for `max_fails == 0` used to skip freeing the trial)."""
    health, clock = make(max_fails=1)
    health.connect_failed("refused")
    clock.now += 10
    assert health.available() and health.state == HALF_OPEN
    assert health.connect_started()  # the trial
    health.reconfigure(HealthConfig(max_fails=0, fail_timeout=10.0))
    assert health.state == UP and health.reason == "passive checks turned off"
    health.connect_failed("refused")  # the trial's answer comes in after all
    assert health.state == UP and health.available()
    for _ in range(5):  # and failures go on costing it nothing
        health.connect_failed("refused")
    assert health.ok and not health.trial_in_flight


def test_a_refused_trial_frees_it_even_with_passive_checks_off():
    """Half-open with `max_fails: 0` (another worker's ejection, adopted before a reload
    reached this one): a refused trial frees the trial for the next client."""
    health, clock = make(max_fails=1)
    health.connect_failed("refused")
    clock.now += 10
    assert health.available() and health.connect_started()
    health.max_fails = 0  # as if reconfigured without the reset, the way it used to be
    health.connect_failed("refused")
    assert health.available() and not health.trial_in_flight


def test_questions_do_not_change_the_state():
    """`may_try` answers what `available` would, for /healthz and /status, and leaves the
    server down (the data path's `available` moves it to half-open)."""
    health, clock = make(max_fails=1)
    health.connect_failed("refused")
    assert not health.may_try()
    clock.now += 10
    for _ in range(3):
        assert health.may_try() and health.state == DOWN
    assert health.available() and health.state == HALF_OPEN
    health.connect_started()
    assert not health.may_try() and not health.available()
    health.set_active(False, "2 active checks failed")
    assert not health.may_try()


def test_checks_passing_again_give_an_ejected_server_its_trial_now():
    """The checks' verdict never decides the passive state: a server they bring back while
    it is ejected is half-open at once (clean record), and a real connect decides."""
    health, clock = make(max_fails=1)
    health.connect_failed("refused")  # ejected for 10 s
    health.set_active(False, "2 active checks failed")
    assert health.state == DOWN and health.changed_by == "checks"
    health.set_active(True, "2 active checks passed")
    assert health.state == HALF_OPEN and health.display_state == HALF_OPEN
    assert health.available() and health.connect_started()
    health.connect_failed("refused")  # the trial fails: out for fail_timeout, not twice it
    assert health.state == DOWN and health.down_until == clock.now + 10
    assert health.changed_by == "passive"


def test_the_primarys_mirror_follows_the_shared_down_until_from_any_state():
    health, clock = make()
    now = clock.now
    health.mirror(now + 5, now, None)
    assert health.state == DOWN and not health.may_try()
    health.mirror(now + 5, now + 6, None)  # the ejection is over: a worker may try it
    assert health.state == HALF_OPEN and health.may_try()
    health.mirror(now + 20, now + 7, None)  # re-ejected by a worker's failed trial
    assert health.state == DOWN and health.down_until == now + 20 and not health.may_try()
    health.mirror(now + 20, now + 8, "2 active checks failed (last: refused)")
    assert health.display_state == DOWN and health.reason.startswith("2 active checks")
    health.mirror(0.0, now + 9, None)
    assert health.state == UP and health.ok
    assert health.reason == "active checks pass in every worker"
    assert health.changed_by == "shared"


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
    server = Server(ServerConfig(Address("127.0.0.1", 1), weight=20), "app",
                    HealthConfig(max_fails=1, fail_timeout=10.0), slow_start=30.0)
    clock = Clock()
    server.health.clock = clock
    assert server.weight == 20  # at start: no ramp (nothing recovered)
    server.health.connect_failed("refused")
    clock.now += 10.0  # its ejection (fail_timeout) is over
    assert server.up  # may be tried now
    server.health.connect_started()
    server.health.connect_succeeded()
    ramped = server.weight
    assert 20 * 0.05 <= ramped < 20 * 0.1  # just back: a small share of its weight
    server.ramp_until -= 15  # halfway through the 30 s ramp
    assert 9.5 < server.weight < 10.5
    server.ramp_until -= 16  # the ramp is over
    assert server.weight == 20 and server.ramp_until == 0.0


# -- active checks ------------------------------------------------------------------------

Verdict = tuple[bool, str] | Exception


class ScriptedChecker(ActiveChecker):
    """Active checks of one server whose probe results come from a script. It records the
    server's active verdict as each probe starts, and once the script is spent sets `done`
    and waits to be cancelled."""

    def __init__(self, server: Server, check: CheckConfig, script: list[Verdict]) -> None:
        super().__init__([server], check)
        self.script = list(script)
        self.seen: list[bool] = []
        self.done = asyncio.Event()

    async def probe(self, server: Server) -> tuple[bool, str]:
        self.seen.append(server.health.active_up)
        if not self.script:
            self.done.set()
            await asyncio.get_running_loop().create_future()  # until stop() cancels us
        verdict = self.script.pop(0)
        if isinstance(verdict, Exception):
            raise verdict
        return verdict


def check_config(**overrides: object) -> CheckConfig:
    settings: dict = {"interval": 0.001, "timeout": 2.0, "rise": 1, "fall": 1}
    settings.update(overrides)
    return CheckConfig(**settings)


def checked_server(port: int = 1) -> Server:
    return Server(ServerConfig(Address("127.0.0.1", port)), "app", HealthConfig())


async def run_until_spent(checker: ActiveChecker, done: asyncio.Event) -> None:
    """Run the checker's loop until `done`, then stop it and wait for its tasks to end."""
    checker.start()
    tasks = list(checker._tasks)
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        checker.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_rise_and_fall_are_counted_as_configured():
    server = checked_server()
    passed, failed = (True, "HTTP 200"), (False, "refused")
    checker = ScriptedChecker(server, check_config(rise=3, fall=1),
                              [failed, passed, passed, passed, failed])
    await run_until_spent(checker, checker.done)
    # Verdict before each probe: one failure takes it down, the third pass brings it back.
    assert checker.seen == [True, False, False, False, True, False]


async def test_fall_needs_consecutive_failures():
    server = checked_server()
    passed, failed = (True, "HTTP 200"), (False, "timeout")
    checker = ScriptedChecker(server, check_config(rise=1, fall=3),
                              [failed, failed, passed, failed, failed, failed])
    await run_until_spent(checker, checker.done)
    assert checker.seen == [True, True, True, True, True, True, False]


async def test_check_loop_survives_an_unexpected_error_and_logs_it_once(caplog):
    server = checked_server()
    bug = RuntimeError("bug in a check")
    checker = ScriptedChecker(server, check_config(), [bug, bug, bug, (False, "refused")])
    with caplog.at_level(logging.DEBUG, logger="balancer.checks"):
        await run_until_spent(checker, checker.done)
    assert checker.seen == [True, True, True, True, False]  # it kept probing, then went down
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "active check of app/127.0.0.1:1 raised" in errors[0].getMessage()


@pytest.mark.parametrize(("status_line", "ok"), [
    (b"HTTP/1.1 200 OK\r\n", True),
    (b"HTTP/1.0 204 No Content\r\n", True),
    (b"HTTP/1.1 302 Found\r\n", True),
    (b"HTTP/1.1 404 Not Found\r\n", False),
    (b"HTTP/1.1 500 Internal Server Error\r\n", False),
    (b"SSH-2.0-OpenSSH_9.6\r\n", False),
    (b"HTTP/1.1 abc\r\n", False),
    (b"\x00\xff garbage", False),
    (b"", False),
])
def test_status_line_verdict(status_line: bytes, ok: bool):
    assert _status_ok(status_line)[0] is ok


async def test_http_check_against_an_endless_line_fails_and_checks_go_on(caplog):
    """100 KiB without a newline overruns readline()'s 64 KiB limit (a ValueError, not an
    OSError): a failed check, and the server keeps being checked."""
    probes = 0
    three_probes = asyncio.Event()

    async def endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal probes
        probes += 1
        if probes >= 3:
            three_probes.set()
        try:
            await reader.readuntil(b"\r\n\r\n")  # read the request: closing on unread
            writer.write(b"x" * (100 * 1024))       # bytes would reset the connection
            await writer.drain()
            await reader.read()  # until the checker gives up and closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(endless_line, "127.0.0.1", 0)
    async with listener:
        server = checked_server(listener.sockets[0].getsockname()[1])
        checker = ActiveChecker([server], check_config(type="http", interval=0.01))
        with caplog.at_level(logging.DEBUG, logger="balancer.checks"):
            ok, detail = await checker.probe(server)
        assert (ok, detail) == (False, "probe error (ValueError)")
        assert any("ValueError" in r.getMessage() for r in caplog.records)

        await run_until_spent(checker, three_probes)
        assert not server.health.active_up
        assert "probe error (ValueError)" in server.health.reason

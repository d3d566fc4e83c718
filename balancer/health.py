"""Health of one server: a passive circuit breaker plus the verdict of active checks.

Passive (nginx semantics): `max_fails` connect failures within `fail_timeout` take the server
down for `fail_timeout`. Then it is half-open: exactly one real client connection is tried.
Success brings it up; failure takes it down again for twice as long (capped at 10x), so a
server that keeps failing costs clients little. `max_fails: 0` turns passive checks off.

Active checks (HAProxy's `rise`/`fall`) run elsewhere (`checks.py`) and report here; a server
down by active check gets no traffic whatever its passive state.

Every transition happens in `_set_state`, which logs it once with its reason: down at WARNING,
up again and half-open at INFO. With workers, a change is logged once for the balancer: by
the worker whose connects decided it (the others, and the primary, follow it at DEBUG), and
for active checks by the primary, which logs the cluster's verdict (cluster.follow_checks;
each worker's own verdict is DEBUG: `quiet_checks`).
"""

from __future__ import annotations

import errno
import logging
import ssl
import time
from collections.abc import Callable
from typing import Final, Literal, get_args

from .config import HealthConfig

log = logging.getLogger("balancer.health")

# The states of the state machine, as /status, the logs and the metrics name them.
HealthState = Literal["up", "down", "half_open"]
UP: Final = "up"
DOWN: Final = "down"
HALF_OPEN: Final = "half_open"

# Why a connect failed, as the metrics' `reason` label and the logs name it. The server's
# failures are refused, timeout, reset and tls (its certificate or handshake failed);
# `local` and `internal` are ours (see NOT_THE_SERVERS).
FailureReason = Literal["refused", "timeout", "reset", "local", "internal", "tls"]
FAILURE_REASONS: tuple[FailureReason, ...] = get_args(FailureReason)

MAX_BACKOFF = 10  # the longest ejection, as a multiple of fail_timeout


# Errors of our own process or host, not of the server: out of descriptors, buffers, memory or
# ephemeral ports. Counting them against a server would eject a healthy one during an fd storm.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                          errno.EADDRNOTAVAIL})
# Failure reasons that say nothing about the server: `local` (above) and `internal` (a bug of
# ours on the connect path). They are counted in metrics but never fed to passive health.
NOT_THE_SERVERS: frozenset[FailureReason] = frozenset({"local", "internal"})


def failure_reason(exc: BaseException) -> FailureReason:
    """Classify a failed connect the way metrics and logs name it."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ssl.SSLError):  # a TLS server's certificate or handshake failed
        return "tls"
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        return "local"
    return "reset"


class ServerHealth:
    """The health state of one server, updated by connect outcomes and active checks."""

    def __init__(
        self,
        name: str,
        config: HealthConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name  # "upstream/host:port", for logs
        self.max_fails = config.max_fails
        self.fail_timeout = config.fail_timeout
        self.clock = clock
        self.state: HealthState = UP
        # `ok` is the hot-path summary: True means "usable, no questions asked".
        self.ok = True
        self.active_up = True
        self.fails = 0
        self.first_fail_at = 0.0
        self.ejections = 0  # consecutive ejections, for the back-off
        self.down_until = 0.0
        self.trial_in_flight = False
        self.total_failures = 0
        self.reason = "initial"
        self.adopted = False  # down because another worker said so: it logged the change
        self.quiet_checks = False  # a worker's own check verdicts: the primary logs them
        self.changed_at = time.time()
        self.listeners: list[Callable[[ServerHealth], None]] = []

    # -- questions ------------------------------------------------------------------------

    def available(self) -> bool:
        """May a new connection be tried now? Moves down -> half-open when the time has come."""
        if self.ok:
            return True
        if not self.active_up:
            return False
        if self.state == DOWN and self.clock() >= self.down_until:
            self._set_state(HALF_OPEN, f"trying again after {self._down_for():g}s down",
                            quiet=self.adopted)
        return self.state == HALF_OPEN and not self.trial_in_flight

    @property
    def display_state(self) -> HealthState:
        """What /status shows: an active-check failure reads as down."""
        return self.state if self.active_up else DOWN

    # -- passive outcomes -------------------------------------------------------------------

    def connect_started(self) -> bool:
        """A connect begins; True if it is the half-open server's one trial. Called as the
        server is picked, so the next client in the same loop pass already sees it taken."""
        if self.state == HALF_OPEN and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def connect_abandoned(self, was_trial: bool) -> None:
        """The client left before the connect finished: neither success nor failure. Only
        the connect that held the trial frees it."""
        if was_trial:
            self.trial_in_flight = False

    def connect_succeeded(self) -> None:
        self.fails = 0
        if self.state != UP:
            self.trial_in_flight = False
            self.ejections = 0
            self._set_state(UP, "trial connection succeeded")

    def connect_failed(self, reason: FailureReason) -> None:
        self.total_failures += 1
        if self.max_fails == 0:
            return
        now = self.clock()
        if self.state == HALF_OPEN:
            self.trial_in_flight = False
            # A follower's failed trial goes on with an outage another worker logged.
            self._eject(now, f"trial connection failed ({reason})", quiet=self.adopted)
            return
        if self.state == DOWN:
            return
        if self.fails == 0 or now - self.first_fail_at > self.fail_timeout:
            self.fails = 0
            self.first_fail_at = now
        self.fails += 1
        if self.fails >= self.max_fails:
            self._eject(
                now,
                f"{self.fails} connect failures in {self.fail_timeout:g}s (last: {reason})",
            )

    def _eject(self, now: float, reason: str, quiet: bool = False) -> None:
        self.adopted = quiet
        self.ejections += 1
        self.fails = 0
        self.down_until = now + self._down_for()
        self._set_state(DOWN, f"{reason}; out for {self._down_for():g}s", quiet=quiet)

    def _down_for(self) -> float:
        factor = min(2 ** max(self.ejections - 1, 0), MAX_BACKOFF)
        return self.fail_timeout * factor

    # -- what other workers decided (see shared.py) -----------------------------------------

    def adopt_down(self, until: float, reason: str) -> None:
        """Another worker ejected this server until `until`: follow it."""
        if self.state == UP:
            self.down_until = until
            self.fails = 0
            self.adopted = True
            self._set_state(DOWN, reason, quiet=True)

    def adopt_up(self, reason: str) -> None:
        """Another worker's trial brought this server back: follow it."""
        if self.state != UP:
            self.ejections = 0
            self.trial_in_flight = False
            self._set_state(UP, reason, quiet=True)

    def reconfigure(self, config: HealthConfig) -> None:
        """New thresholds from a reload; the current state is kept."""
        self.max_fails = config.max_fails
        self.fail_timeout = config.fail_timeout

    # -- active checks ----------------------------------------------------------------------

    def set_active(self, up: bool, reason: str) -> None:
        """An active check crossed its rise/fall threshold."""
        if up == self.active_up:
            return
        before = self.display_state
        self.active_up = up
        if up:
            # A server the checks brought back starts with a clean passive record.
            self.fails = 0
            self.ejections = 0
            self.trial_in_flight = False
        self._set_state(UP if up else self.state, reason, before, quiet=self.quiet_checks)

    # -- the one place state changes ------------------------------------------------------

    def _set_state(self, state: HealthState, reason: str,
                   before: HealthState | None = None, quiet: bool = False) -> None:
        """Change state, log the change once with its reason (at DEBUG when `quiet`: another
        process logs it for the balancer), and tell listeners."""
        if before is None:
            before = self.display_state
        self.state = state
        self.ok = state == UP and self.active_up
        self.reason = reason
        self.changed_at = time.time()
        after = self.display_state
        if after != before:
            level = (logging.DEBUG if quiet else
                     logging.WARNING if after == DOWN else logging.INFO)
            log.log(level, "server %s %s: %s", self.name, after.replace("_", "-"), reason)
        for listener in self.listeners:
            listener(self)

"""Health of one server: a passive circuit breaker plus the verdict of active checks.

Passive (nginx semantics): `max_fails` connect failures within `fail_timeout` take the server
down for `fail_timeout`. Then it is half-open: exactly one real client connection is tried.
Success brings it up; failure takes it down again for twice as long (capped at 10x), so a
server that keeps failing costs clients little. `max_fails: 0` turns passive checks off.

Active checks (HAProxy's `rise`/`fall`) run elsewhere (`checks.py`) and report here; a server
down by active check gets no traffic whatever its passive state. Checks that pass again end a
passive ejection early, as a half-open trial: a real connect still decides.

With workers, what a worker's own connects decide (its passive transitions) is shared through
`down_until` (see proc/shared.py); its checks' verdict is its own and never written there, so
one worker's checks cannot undo another worker's fresh ejection. `changed_by` tells listeners
which kind of news each transition is. Questions (`may_try`, `display_state`) never change
the state: reports are read-only.

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

# Who made a transition: this process's connects, its active checks, or another process
# (a worker following the shared table, or the primary mirroring it).
ChangedBy = Literal["passive", "checks", "shared"]

MAX_BACKOFF = 10  # the longest ejection, as a multiple of fail_timeout


# Errors of our own process or host, not of the server: out of descriptors, buffers, memory or
# ephemeral ports. Counting them against a server would eject a healthy one during an fd storm.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                          errno.EADDRNOTAVAIL})
# Failure reasons that say nothing about the server: `local` (above) and `internal` (a bug of
# ours on the connect path). They are counted in metrics but never fed to passive health.
NOT_THE_SERVERS: frozenset[FailureReason] = frozenset({"local", "internal"})
# A connect timer that fires this much after its deadline found a loop that was not polling
# (stalled: a long collection, a process starved or stopped). The connect may well have
# completed meanwhile, its event waiting in the poll that comes next; failing it would eject
# a healthy server for the balancer's own delay (proxy.py looks once more, pool.py tries again).
LATE_CONNECT_TIMER = 0.05


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
        self.changed_by: ChangedBy = "passive"
        self.changed_at = time.time()
        self.listeners: list[Callable[[ServerHealth], None]] = []

    # -- questions ------------------------------------------------------------------------

    def available(self) -> bool:
        """May a new connection be tried now? Moves down -> half-open when the time has come
        (for the data path, which then tries it; reports ask `may_try`)."""
        if self.ok:
            return True
        if not self.active_up:
            return False
        if self.state == DOWN and self.clock() >= self.down_until:
            self._set_state(HALF_OPEN, f"trying again after {self._down_for():g}s down",
                            quiet=self.adopted, changed_by="passive")
        return self.state == HALF_OPEN and not self.trial_in_flight

    def may_try(self) -> bool:
        """What `available()` would answer, without changing anything: for /healthz and
        /status, which must not move a server to half-open (nor take its trial)."""
        if self.ok:
            return True
        if not self.active_up:
            return False
        if self.state == DOWN:
            return self.clock() >= self.down_until
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
            self._set_state(UP, "trial connection succeeded", changed_by="passive")

    def connect_failed(self, reason: FailureReason) -> None:
        self.total_failures += 1
        if self.state == HALF_OPEN:
            self.trial_in_flight = False  # whatever happens next, this trial is over
        if self.max_fails == 0:
            return
        now = self.clock()
        if self.state == HALF_OPEN:
            # A follower's failed trial goes on with an outage another worker logged.
            self._eject(now, f"trial connection failed ({reason})", quiet=self.adopted)
            return
        if self.state == DOWN:
            if now < self.down_until:
                return  # a connect begun before the ejection: it says nothing new
            # Its ejection is over but nothing asked since (`available()` would have made it
            # half-open): a failure now is what a failed trial would be, so it goes back out
            # for longer, whether or not a pick happened to look at it in between.
            self._eject(now, f"connect failed after its ejection ended ({reason})",
                        quiet=self.adopted)
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
        self._set_state(DOWN, f"{reason}; out for {self._down_for():g}s", quiet=quiet,
                        changed_by="passive")

    def _down_for(self) -> float:
        factor = min(2 ** max(self.ejections - 1, 0), MAX_BACKOFF)
        return self.fail_timeout * factor

    # -- what other workers decided (see shared.py) -----------------------------------------

    def adopt_down(self, until: float, reason: str) -> None:
        """Another worker ejected this server until `until`: follow it (unless passive
        checks are off here)."""
        if self.state == UP and self.max_fails:
            self.down_until = until
            self.fails = 0
            self.adopted = True
            self._set_state(DOWN, reason, quiet=True, changed_by="shared")

    def adopt_up(self, reason: str) -> None:
        """Another worker's trial brought this server back: follow it."""
        if self.state != UP:
            self.ejections = 0
            self.trial_in_flight = False
            self._set_state(UP, reason, quiet=True, changed_by="shared")

    def mirror(self, until: float, now: float, checks_failed: str | None) -> None:
        """The primary's copy of what its workers decided (it connects nowhere itself): the
        passive state is what the shared `down_until` says, whatever the state was before
        (0: up; later than now: down; past: the ejection is over, a worker may try it), and
        down by active check while any live worker's checks say so (`checks_failed`). The
        workers log passive changes; the primary logs the cluster's check verdict."""
        state: HealthState
        if until == 0.0:
            state, reason = UP, "marked up by another worker"
        elif until > now:
            state, reason = DOWN, "marked down by another worker"
        else:
            state, reason = HALF_OPEN, "ejection over: a worker may try it again"
        active_up = checks_failed is None
        if state == self.state and active_up == self.active_up and until == self.down_until:
            return
        checks_changed = active_up != self.active_up
        if checks_failed is not None:
            reason = checks_failed
        elif checks_changed and state == UP:
            reason = "active checks pass in every worker"
        before = self.display_state
        self.active_up = active_up
        self.down_until = until
        self._set_state(state, reason, before, quiet=not checks_changed, changed_by="shared")

    def reconfigure(self, config: HealthConfig) -> None:
        """New thresholds from a reload; the current state is kept, except that turning
        passive checks off (`max_fails: 0`) ends an ejection: nothing would end it later."""
        self.max_fails = config.max_fails
        self.fail_timeout = config.fail_timeout
        if not self.max_fails and self.state != UP:
            self.fails = 0
            self.ejections = 0
            self.trial_in_flight = False
            self._set_state(UP, "passive checks turned off", changed_by="passive")

    # -- active checks ----------------------------------------------------------------------

    def set_active(self, up: bool, reason: str) -> None:
        """An active check crossed its rise/fall threshold (or checks were turned off).

        The passive state is left to connects: a server the checks bring back while it is
        ejected gets a clean passive record and its half-open trial now, instead of at the
        end of its ejection; the trial's outcome is what other workers hear of."""
        if up == self.active_up:
            return
        before = self.display_state
        self.active_up = up
        state = self.state
        if up and state != UP:
            self.fails = 0
            self.ejections = 0
            state = HALF_OPEN
        self._set_state(state, reason, before, quiet=self.quiet_checks, changed_by="checks")

    # -- the one place state changes ------------------------------------------------------

    def _set_state(self, state: HealthState, reason: str,
                   before: HealthState | None = None, quiet: bool = False, *,
                   changed_by: ChangedBy) -> None:
        """Change state, log the change once with its reason (at DEBUG when `quiet`: another
        process logs it for the balancer), and tell listeners."""
        if before is None:
            before = self.display_state
        self.state = state
        self.ok = state == UP and self.active_up
        self.reason = reason
        self.changed_by = changed_by
        self.changed_at = time.time()
        after = self.display_state
        if after != before:
            level = (logging.DEBUG if quiet else
                     logging.WARNING if after == DOWN else logging.INFO)
            log.log(level, "server %s %s: %s", self.name, after.replace("_", "-"), reason)
        for listener in self.listeners:
            listener(self)

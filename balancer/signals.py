"""Stop signals, the same everywhere: SIGINT or SIGTERM asks for a graceful stop (drain), a
second one closes what is still open at once.

A single process, the primary, each worker and the demo all follow this rule. The handler
only counts and calls back; the work happens in the main coroutine, as in uvicorn's
`capture_signals` and gunicorn's signal queue.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def handle_stop_signals(
    loop: asyncio.AbstractEventLoop,
    drain: Callable[[], None],
    close_now: Callable[[], None],
    log: logging.Logger | None = None,
    stopping: str = "shutting down",
) -> None:
    """On the first stop signal call `drain`, on every later one `close_now`; with `log`, say
    which (`stopping` names what the first one starts). Remove with `remove_stop_signals`."""
    received = 0

    def on_signal(signum: int) -> None:
        nonlocal received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            if log is not None:
                log.info("received %s, %s (again to close connections at once)", name, stopping)
            drain()
        else:
            if log is not None:
                log.info("received %s again, closing all connections now", name)
            close_now()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)


def remove_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    for signum in STOP_SIGNALS:
        loop.remove_signal_handler(signum)

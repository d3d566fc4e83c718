"""Fixtures that start real backends and a real balancer, and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .utils import Backend, BalancerProcess


@pytest.fixture
def start_backend() -> Iterator[Callable[..., Backend]]:
    """Factory: `start_backend("echo", "a")` -> a running backend, stopped after the test."""
    started: list[Backend] = []

    def start(mode: str, name: str = "backend", *extra: str, port: int = 0) -> Backend:
        backend = Backend(mode, name, *extra, port=port)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()


LOOPS = ("uvloop", "asyncio")
LOG_TAIL = 60  # lines of each balancer's log a failing test shows


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test or module marked `both_loops` runs once per event loop (uvloop's own suite pairs
    `Test_UV_TCP` with `Test_AIO_TCP` the same way): a data-path bug on one loop is a bug."""
    if "balancer_loop" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "both_loops"):
        metafunc.parametrize("balancer_loop", LOOPS)


@pytest.fixture
def balancer_loop() -> str:
    """The event loop the test's balancers run on: uvloop, unless marked `both_loops`."""
    return "uvloop"


@pytest.fixture
def start_balancer(tmp_path: Path, balancer_loop: str) -> Iterator[Callable[..., BalancerProcess]]:
    """Factory: `start_balancer(config_dict)` -> a running `balancer` process.

    Every balancer is stopped after the test and its log checked: an unexpected error in it
    (a traceback, `ERROR`, a future or task exception never retrieved) fails the test. A test
    that provokes one on purpose passes `expect_log=[regex, ...]` to allow those lines.
    """
    started: list[BalancerProcess] = []

    def start(config: dict, *args: str, **kwargs: Any) -> BalancerProcess:
        kwargs.setdefault("loop", balancer_loop)
        process = BalancerProcess(config, tmp_path, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    for process in started:
        # Shown only when the test fails (pytest keeps captured output for failures).
        print(f"--- balancer pid {process.pid}: last lines of its log ---")
        print("\n".join(process.lines[-LOG_TAIL:]))
    for process in started:
        process.check_log()

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


@pytest.fixture
def start_balancer(tmp_path: Path) -> Iterator[Callable[..., BalancerProcess]]:
    """Factory: `start_balancer(config_dict)` -> a running `balancer` process."""
    started: list[BalancerProcess] = []

    def start(config: dict, *args: str, **kwargs: Any) -> BalancerProcess:
        process = BalancerProcess(config, tmp_path, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

"""The `balancer` command: check, config errors, exit codes, signals."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from balancer import __version__
from balancer.loops import new_event_loop, resolve_loop_name

from .utils import balancer, free_port, make_config, stop_process, write

pytestmark = pytest.mark.timeout(60)


def test_check_accepts_a_valid_config(tmp_path):
    result = balancer("check", "-c", write(tmp_path, make_config(["127.0.0.1:3001"])))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "configuration ok"


BAD_CONFIG = """\
listeners:
  - bind: 127.0.0.1:0
    upstream: ap
upstreams:
  app:
    stratgy: least_conn
    servers:
      - address: 127.0.0.1:3001
      - address: 127.0.0.1:3002
        weight: 0
"""


@pytest.mark.parametrize("command", [["check"], []])
def test_every_problem_is_reported_with_exit_code_2(tmp_path, command):
    result = balancer(*command, "-c", write(tmp_path, BAD_CONFIG))
    assert result.returncode == 2
    problems = result.stderr.splitlines()
    assert "upstreams.app.servers[1].weight: must be a positive integer, got 0" in problems
    assert "listeners[0].upstream: unknown upstream 'ap' (known: app)" in problems
    assert "upstreams.app.stratgy: unknown key (did you mean 'strategy'?)" in problems
    assert "listening" not in result.stderr  # nothing was bound
    assert "Traceback" not in result.stderr


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "listeners:\n  - bind: [127.0.0.1:0\n    upstream: app\n")
    result = balancer("check", "-c", path)
    assert result.returncode == 2
    assert "line " in result.stderr and "YAML syntax error" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("text", "problem"),
    [("listeners: " + "[" * 5000 + "]" * 5000, r"nested deeper than 32 levels at line 1"),
     ("#" * (2 << 20), r"too large: over 1 MiB \(the limit for a configuration file\)")],
    ids=["deep", "large"])
def test_hostile_files_are_config_errors(tmp_path, text, problem):
    """`check` exits 2 with one line, not a RecursionError traceback or a long parse."""
    path = write(tmp_path, text)
    result = balancer("check", "-c", path)
    assert result.returncode == 2
    assert re.fullmatch(rf"{re.escape(path)}: {problem}.*\n", result.stderr)


def test_workers_option_takes_ascii_digits_only(tmp_path):
    """`--workers` with a fullwidth two is a usage error, not two workers."""
    path = write(tmp_path, make_config(["127.0.0.1:3001"]))
    result = balancer("-c", path, "--workers", "\uff12", timeout=10)
    assert result.returncode == 2
    assert "--workers: must be a positive integer or auto" in result.stderr


def test_missing_file_is_a_config_error(tmp_path):
    result = balancer("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_version_help_and_usage():
    assert balancer("--version").stdout.strip() == f"balancer {__version__}"
    help_text = balancer("--help")
    assert help_text.returncode == 0
    for word in ("check", "demo", "--config", "--log-level", "--loop"):
        assert word in help_text.stdout
    missing = balancer("check")
    assert missing.returncode == 2 and "-c/--config" in missing.stderr


def test_port_in_use_exits_1_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(["127.0.0.1:3001"])
        config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
        result = balancer("-c", write(tmp_path, config))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_signal(start_balancer, signum):
    process = start_balancer(make_config(["127.0.0.1:3001"]))
    process.send_signal(signum)
    assert process.proc.wait(10) == 0
    process.wait_for_line("stopped", timeout=5)


# -- event loop selection and log levels ----------------------------------------------------


def test_auto_loop_is_uvloop_when_it_imports():
    pytest.importorskip("uvloop")
    assert resolve_loop_name("auto") == "uvloop"
    assert resolve_loop_name("uvloop") == "uvloop"
    assert resolve_loop_name("asyncio") == "asyncio"
    loop = new_event_loop("auto")
    try:
        assert type(loop).__module__.startswith("uvloop")
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` now fails
    assert resolve_loop_name("auto") == "asyncio"
    assert resolve_loop_name("asyncio") == "asyncio"
    with pytest.raises(RuntimeError, match="loop: uvloop was requested but is not installed"):
        resolve_loop_name("uvloop")
    loop = new_event_loop("auto")
    try:
        assert isinstance(loop, asyncio.BaseEventLoop)  # the stdlib loop
    finally:
        loop.close()


def test_loop_option_overrides_the_config(start_backend, start_balancer):
    echo = start_backend("echo")
    config = make_config([echo.address])
    config["loop"] = "uvloop"
    balancer = start_balancer(config, "-v", "debug", loop="asyncio")  # runs `--loop asyncio`
    assert balancer.wait_for_line(r"event loop: \w+").endswith("event loop: asyncio")


def test_debug_level_shows_debug_lines(start_backend, start_balancer):
    echo = start_backend("echo")
    balancer = start_balancer(make_config([echo.address]), "-v", "debug")
    balancer.wait_for_line(r" DEBUG balancer\.")


def test_error_level_hides_info_lines(start_backend, tmp_path):
    echo = start_backend("echo")
    config = make_config([echo.address])
    port = free_port()
    config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "balancer", "-c", write(tmp_path, config), "-v", "error"],
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        # Nothing is logged at this level, so readiness is the port accepting (bounded).
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "balancer exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "balancer did not start listening"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        stderr = proc.stderr.read()
    finally:
        stop_process(proc)
    assert "listening" not in stderr and " INFO " not in stderr, stderr

"""The `run` section of an upstream: parsed into RunConfig, every mistake with its key path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from balancer.config import ConfigError, RunConfig, parse_config

PYTHON = sys.executable


def config(run: object, **upstream: Any) -> dict[str, Any]:
    return {"listeners": [{"bind": "127.0.0.1:8080", "upstream": "app"}],
            "upstreams": {"app": {"run": run, **upstream}}}


def run_of(run: object, base: Path | None = None, **upstream: Any) -> RunConfig:
    parsed = parse_config(config(run, **upstream), base=base).upstreams["app"]
    assert parsed.run is not None
    return parsed.run


def problems_of(data: object, base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base=base)
    return info.value.problems


def test_run_alone_needs_no_servers_and_takes_every_key(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    run = run_of({"command": ["python3", "server.py", 8], "instances": 4, "cwd": "./app",
                  "env": {"NODE_ENV": "production", "WORKERS": 2}, "ports": "3001-3005",
                  "ready_timeout": "2s", "kill_timeout": "500ms", "max_memory": "500M",
                  "log": "logs"}, base=tmp_path)
    assert Path(run.command[0]).name.startswith("python3")
    assert run.command[1:] == ("server.py", "8")
    assert run.cwd == str((tmp_path / "app").resolve())
    assert run.instances == 4 and run.count == 4
    assert run.env == (("NODE_ENV", "production"), ("WORKERS", "2"))
    assert run.ports == (3001, 3005)
    assert (run.ready_timeout, run.kill_timeout) == (2.0, 0.5)
    assert run.max_memory == 500 << 20
    assert run.log == str((tmp_path / "logs").resolve())


def test_defaults_and_auto(tmp_path: Path) -> None:
    run = run_of({"command": [PYTHON], "instances": "auto"}, base=tmp_path)
    assert run.instances is None and run.count >= 1
    assert run.cwd == str(tmp_path.resolve())
    assert (run.ports, run.ready_timeout, run.kill_timeout, run.max_memory, run.log) == (
        None, 10.0, 5.0, 0, "stderr")


def test_a_relative_program_path_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "app"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert run_of({"command": ["./bin/app"]}, base=tmp_path).command == (str(script),)


def test_servers_and_run_coexist() -> None:
    parsed = parse_config(config({"command": [PYTHON]}, servers=["10.0.0.1:80"]))
    assert [s.key for s in parsed.upstreams["app"].servers] == ["10.0.0.1:80"]


def test_without_run_servers_are_still_required() -> None:
    data = config(None)
    del data["upstreams"]["app"]["run"]
    assert problems_of(data) == ["upstreams.app.servers: required"]


RUN_MISTAKES = [
    ({}, "upstreams.app.run.command: required"),
    ({"command": "node app.js"}, "upstreams.app.run.command: must be a list of arguments "
                                 "(argv, no shell), like [node, server.js], got 'node app.js'"),
    ({"command": []}, "upstreams.app.run.command: must not be empty"),
    ({"command": [PYTHON, {"a": 1}]}, "upstreams.app.run.command[1]: must be a string, "
                                      "got a mapping"),
    ({"command": ["no-such-program-here"]},
     "upstreams.app.run.command[0]: not found on PATH: 'no-such-program-here'"),
    ({"command": ["./missing.sh"]},
     "upstreams.app.run.command[0]: no such executable file: './missing.sh'"),
    ({"command": [PYTHON], "instances": 0},
     "upstreams.app.run.instances: must be an integer 1..256 or 'auto', got 0"),
    ({"command": [PYTHON], "instances": 1000},
     "upstreams.app.run.instances: must be an integer 1..256 or 'auto', got 1000"),
    ({"command": [PYTHON], "instance": 2},
     "upstreams.app.run.instance: unknown key (did you mean 'instances'?)"),
    ({"command": [PYTHON], "cwd": "./nowhere"}, "upstreams.app.run.cwd: no such folder: "),
    ({"command": [PYTHON], "env": {"PORT": 80}},
     "upstreams.app.run.env.PORT: set by the balancer for each instance (PORT is its port, "
     "INSTANCE its number 0..n-1)"),
    ({"command": [PYTHON], "env": {"A": [1]}},
     "upstreams.app.run.env.A: must be a string or a number, got a list"),
    ({"command": [PYTHON], "env": ["A=1"]}, "upstreams.app.run.env: must be a mapping, got a list"),
    ({"command": [PYTHON], "ports": "3001"},
     "upstreams.app.run.ports: must be a port range like 3001-3005, got '3001'"),
    ({"command": [PYTHON], "ports": "3005-3001"},
     "upstreams.app.run.ports: must be a port range like 3001-3005, got '3005-3001'"),
    ({"command": [PYTHON], "instances": 4, "ports": "3001-3004"},
     "upstreams.app.run.ports: 3001-3004 has 4 port(s); 4 instance(s) need 5 (a rollout "
     "starts each new instance beside the old one)"),
    ({"command": [PYTHON], "ready_timeout": 0},
     "upstreams.app.run.ready_timeout: must be greater than 0, got 0"),
    ({"command": [PYTHON], "kill_timeout": "soon"},
     "upstreams.app.run.kill_timeout: must be a duration like 250ms, 10s, 5m, 1h, got 'soon'"),
    ({"command": [PYTHON], "max_memory": "lots"},
     "upstreams.app.run.max_memory: must be a size like 500M, 1G or 800K, got 'lots'"),
    ({"command": [PYTHON], "max_memory": 0},
     "upstreams.app.run.max_memory: must be a size like 500M, 1G or 800K, got 0"),
    ({"command": [PYTHON], "log": 7}, "upstreams.app.run.log: must be stderr or a folder, got 7"),
    ("node app.js", "upstreams.app.run: must be a mapping, got 'node app.js'"),
]


@pytest.mark.parametrize(("run", "expected"), RUN_MISTAKES)
def test_each_run_mistake_is_the_only_problem_with_its_exact_message(
        run: object, expected: str, tmp_path: Path) -> None:
    problems = problems_of(config(run), base=tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_a_log_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("")
    problems = problems_of(config({"command": [PYTHON], "log": "out"}), base=tmp_path)
    assert problems == [f"upstreams.app.run.log: not a folder: {str(tmp_path / 'out')!r}"]

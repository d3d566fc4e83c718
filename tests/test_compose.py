"""docker-compose.yml, the Dockerfile, configs/docker.yaml and configs/prometheus.yml agree
with each other and with the repo.

Docker cannot run here (the image itself runs under podman in test_podman.py), so these
checks catch what would break `docker compose up`: a mount of a file that does not exist, a
name the balancer discovers that is no service or on the wrong port, a published or exposed
port the balancer does not listen on, a scrape Prometheus would get 403 for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancer.config import Config, load_config
from balancer.demo.command import read_listening_port

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
CONFIG_IN_CONTAINER = "/etc/balancer/balancer.yaml"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    """Compose allows a mapping or a list of KEY=VALUE; normalise to a mapping of strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host path, container path, mode) for each short-syntax bind mount."""
    result = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"use the short volume syntax: {volume!r}"
        source, target, *mode = volume.split(":")
        result.append((source, target, mode[0] if mode else "rw"))
    return result


def published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port for each `[ip:]host:container` entry."""
    ports = {}
    for entry in service.get("ports", []):
        parts = str(entry).split("/")[0].split(":")
        ports[int(parts[-1])] = int(parts[-2])
    return ports


def docker_config() -> tuple[Path, Config]:
    """The config file the balancer container reads, and its parsed form."""
    for source, target, _mode in mounts(services()["balancer"]):
        if target == CONFIG_IN_CONTAINER:
            path = (REPO / source).resolve()
            return path, load_config(path)
    raise AssertionError(f"nothing is mounted at {CONFIG_IN_CONTAINER}")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def test_services_are_the_app_the_balancer_and_prometheus() -> None:
    found = services()
    assert set(found) == {"app", "balancer", "prometheus"}
    app = found["app"]
    assert app["image"] == "node:20-alpine"
    assert app["deploy"]["replicas"] == 3
    env = environment(app)
    assert env["HOST"] == "0.0.0.0", "bound to loopback, the balancer could not reach it"
    assert env["PORT"].isdigit()
    assert "APP_NAME" not in env, "every replica would answer with the same name"
    # The command runs the very file that is mounted.
    app_js = next(t for s, t, _m in mounts(app) if s.endswith("demo/app.js"))
    assert app_js in app["command"]


def test_every_mounted_host_path_exists_and_is_read_only() -> None:
    for name, service in services().items():
        for source, target, mode in mounts(service):
            assert source.startswith("."), f"{name}: {source} should be relative to the repo"
            assert (REPO / source).exists(), f"{name}: mounts missing {source}"
            assert mode == "ro", f"{name}: {source} -> {target} should be read-only"


def test_the_balancer_is_built_from_the_dockerfile_and_runs_the_docker_config() -> None:
    balancer = services()["balancer"]
    assert balancer["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert (REPO / balancer["build"]["context"] / balancer["build"]["dockerfile"]) == DOCKERFILE
    assert "/src" not in {target for _source, target, _mode in mounts(balancer)}
    path, config = docker_config()
    assert path == REPO / "configs" / "docker.yaml"
    assert balancer["command"] == ["-c", CONFIG_IN_CONTAINER]
    grace = balancer["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > config.shutdown_timeout


def test_docker_config_loads_with_the_advertised_settings() -> None:
    _path, config = docker_config()
    assert [listener.bind.host for listener in config.listeners] == ["0.0.0.0"]
    assert config.metrics is not None and config.metrics.bind.host == "0.0.0.0"
    assert {upstream.strategy for upstream in config.upstreams.values()} == {"least_conn"}
    # Docker's embedded DNS, asked every 2 s: `--scale` is seen within seconds.
    assert config.resolvers.nameservers == (("127.0.0.11", 53),)
    assert config.resolvers.interval == 2.0


def test_the_balancer_discovers_the_app_service_on_its_port() -> None:
    found = services()
    _path, config = docker_config()
    static = [s for u in config.upstreams.values() for s in u.servers]
    assert static == [], "a static server is resolved once and never sees --scale"
    names = [d for u in config.upstreams.values() for d in u.discover]
    assert [(d.name, d.srv) for d in names] == [("app", False)]
    for item in names:
        assert item.name in found, f"{item.name} is not a compose service"
        assert int(environment(found[item.name])["PORT"]) == item.port, item


def test_published_ports_match_the_listeners_and_metrics() -> None:
    _path, config = docker_config()
    ports = published(services()["balancer"])
    assert config.metrics is not None
    expected = {listener.bind.port for listener in config.listeners} | {config.metrics.bind.port}
    assert set(ports) == expected
    assert all(host == container for container, host in ports.items())
    assert not services()["app"].get("ports"), "apps are reached through the balancer only"


def test_prometheus_scrapes_the_balancer_by_a_host_name_it_accepts() -> None:
    prometheus = services()["prometheus"]
    (source, _target, _mode), = [m for m in mounts(prometheus) if m[1].endswith(".yml")]
    assert f"--config.file={_target}" in prometheus["command"]
    scrape = yaml.safe_load((REPO / source).read_text())["scrape_configs"]
    targets = [t for job in scrape for sc in job["static_configs"] for t in sc["targets"]]
    _path, config = docker_config()
    assert config.metrics is not None
    assert targets == [f"balancer:{config.metrics.bind.port}"]
    # The admin endpoint refuses a Host header it does not know (DNS rebinding).
    assert "balancer" in config.metrics.allowed_hosts


def test_the_dockerfile_builds_from_a_base_argument_into_a_venv_as_a_non_root_user() -> None:
    assert dockerfile()[0] == ("ARG", "BASE=python:3.12-slim")
    assert instructions("FROM") == ["${BASE}"]
    run = " ".join(instructions("RUN"))
    assert "python3 -m venv /opt/balancer" in run
    assert "/opt/balancer/bin/pip install" in run
    user = instructions("USER")[-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert instructions("STOPSIGNAL") == ["SIGTERM"]
    assert instructions("ENTRYPOINT") == ['["balancer"]']
    for copy in instructions("COPY"):
        *sources, _target = copy.split()
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_the_image_exposes_and_health_checks_the_docker_config() -> None:
    """What the image runs without a mount: configs/docker.yaml, on the ports it EXPOSEs,
    its HEALTHCHECK asking that config's /healthz."""
    copied = [c.split() for c in instructions("COPY") if c.split()[-1] == CONFIG_IN_CONTAINER]
    assert copied == [["configs/docker.yaml", CONFIG_IN_CONTAINER]]
    config = load_config(REPO / "configs" / "docker.yaml")
    assert config.metrics is not None
    ports = {listener.bind.port for listener in config.listeners} | {config.metrics.bind.port}
    assert {int(p) for e in instructions("EXPOSE") for p in e.split()} == ports
    (check,) = instructions("HEALTHCHECK")
    assert f"http://127.0.0.1:{config.metrics.bind.port}/healthz" in check
    assert instructions("CMD")[-1] == f'["-c", "{CONFIG_IN_CONTAINER}"]'


def test_the_build_context_leaves_out_the_virtualenv_and_git() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_app_js_takes_its_settings_from_the_compose_environment() -> None:
    """The app containers pass no arguments: APP_NAME, HOST and PORT must be honoured."""
    env = {**os.environ, "APP_NAME": "from-env", "HOST": "127.0.0.1", "PORT": "0"}
    proc = subprocess.Popen(["node", str(REPO / "balancer" / "demo" / "app.js")],
                            stdout=subprocess.PIPE, env=env)
    try:
        port = read_listening_port(proc, "app.js", time.monotonic() + 10)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                         headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
        assert body["name"] == "from-env"
        assert body["pid"] == proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

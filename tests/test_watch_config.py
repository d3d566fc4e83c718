"""`--watch-config` and `watch_config: true`: a change of the config file's content reloads,
as SIGHUP does, also when it arrives the way Kubernetes updates a mounted ConfigMap (a
`..data` symlink swapped to a new folder, the file's own path never touched)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from balancer.config import ConfigError, parse_config

from .utils import make_config, start_workers, who_answers

pytestmark = pytest.mark.both_loops

BAD = {"listeners": [{"name": "test", "bind": "127.0.0.1:0", "upstream": "app"}],
       "upstreams": {"app": {"servers": [{"address": "127.0.0.1:1", "weight": 0}]}}}
QUIET = 2.5  # seconds in which a watcher polling every second would have acted twice


class ConfigMapVolume:
    """A folder laid out as kubelet lays out a ConfigMap volume: `balancer.yaml` ->
    `..data/balancer.yaml`, `..data` -> `..<timestamp>/`; an update writes a new timestamped
    folder and renames a new `..data` link over the old one (atomic), then removes the old
    folder."""

    def __init__(self, root: Path, config: dict) -> None:
        self.root = root
        self.count = 0
        root.mkdir()
        self.current = self._write(config)
        (root / "..data").symlink_to(self.current.name)
        (root / "balancer.yaml").symlink_to("..data/balancer.yaml")

    @property
    def path(self) -> Path:
        return self.root / "balancer.yaml"

    def _write(self, config: dict) -> Path:
        self.count += 1
        folder = self.root / f"..2026_12_01_00_00_{self.count:02d}.{os.getpid()}"
        folder.mkdir()
        (folder / "balancer.yaml").write_text(yaml.safe_dump(config))
        return folder

    def update(self, config: dict) -> None:
        old, self.current = self.current, self._write(config)
        (self.root / "..data_tmp").symlink_to(self.current.name)
        os.rename(self.root / "..data_tmp", self.root / "..data")
        (old / "balancer.yaml").unlink()
        old.rmdir()


def replace_file(path: Path, config: dict) -> None:
    """Write a whole new file at once (rename), as editors and config tools do."""
    new = path.with_suffix(".new")
    new.write_text(yaml.safe_dump(config))
    os.rename(new, path)


def count(balancer, text: str) -> int:
    return sum(text in line for line in balancer.lines)


async def test_a_configmap_symlink_swap_reloads_and_a_bad_one_is_rejected_once(
        tmp_path, start_backend, start_balancer) -> None:
    a, b = start_backend("name", "a"), start_backend("name", "b")
    volume = ConfigMapVolume(tmp_path / "config", make_config([a.address]))
    balancer = start_balancer({"listeners": [{}]}, "--watch-config", config_file=volume.path,
                              expect_log=[r"reload rejected"])
    assert await who_answers(balancer.port) == "a"

    volume.update(make_config([b.address]))
    balancer.wait_for_line(r"configuration reloaded", timeout=10)
    assert await who_answers(balancer.port) == "b"

    volume.update(BAD)
    line = balancer.wait_for_line(r"reload rejected", timeout=10)
    assert "upstreams.app.servers[0].weight" in line
    assert await who_answers(balancer.port) == "b"  # the old config keeps serving
    time.sleep(QUIET)  # the bad content is rejected once, not once a poll
    assert count(balancer, "reload rejected") == 1
    assert count(balancer, "changed, reloading") == 2


async def test_the_config_key_alone_watches_and_without_either_nothing_does(
        tmp_path, start_backend, start_balancer) -> None:
    a, b = start_backend("name", "a"), start_backend("name", "b")
    watched = start_balancer({**make_config([a.address]), "watch_config": True})
    unwatched = start_balancer(make_config([a.address]))
    for balancer in (watched, unwatched):
        replace_file(balancer.config_path, make_config([b.address]))
    watched.wait_for_line(r"configuration reloaded", timeout=10)
    assert await who_answers(watched.port) == "b"
    # The reload turned the key off (the new file lacks it): the watcher stops with it.
    replace_file(watched.config_path, make_config([a.address]))
    time.sleep(QUIET)
    assert await who_answers(watched.port) == "b"
    assert await who_answers(unwatched.port) == "a"
    assert count(unwatched, "reloading") == 0


async def test_workers_the_primary_watches_and_every_worker_follows(
        tmp_path, start_backend, start_balancer) -> None:
    a, b = start_backend("name", "a"), start_backend("name", "b")
    volume = ConfigMapVolume(tmp_path / "config", {**make_config([a.address]), "workers": 2})
    balancer = start_workers(start_balancer, {"listeners": [{}]}, 2, "--watch-config",
                             config_file=volume.path, expect_log=[r"reload rejected"])
    volume.update({**make_config([b.address]), "workers": 2})
    balancer.wait_for_line(r"configuration reloaded from .* \(generation 2\)", timeout=15)
    # Each new connection may land on either worker: all of them must send to b now.
    assert {await who_answers(balancer.port) for _ in range(20)} == {"b"}

    volume.update({**BAD, "workers": 2})
    balancer.wait_for_line(r"reload rejected", timeout=10)
    assert {await who_answers(balancer.port) for _ in range(20)} == {"b"}
    assert count(balancer, "changed, reloading") == 2


def test_watch_config_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**make_config(["127.0.0.1:1"]), "watch_config": "yes"})
    assert info.value.problems == ["watch_config: must be a boolean, got 'yes'"]

"""What the Prometheus metrics cost a connection, and that making it small changed nothing
/metrics shows: plain counts on the connection path (metrics.py), plain histograms
(histogram.py), brought to prometheus-client's objects by a flush before every scrape."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import FrameType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from balancer.config import parse_config
from balancer.histogram import PlainHistogram
from balancer.proc.cluster import render_cluster_metrics
from balancer.server import Balancer

from .utils import make_config, with_metrics

BUCKETS = (0.005, 0.01, 0.05, 0.1, 1, 5)
# On a bound (le is "<="), between bounds, zero, past the last bound, and many alike.
VALUES = [0.0, 0.005, 0.0051, 0.01, 0.07, 0.1, 0.5, 1.0, 4.99, 5.0, 7.5, 1e6] + [0.02] * 7


def samples_of(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One family's samples by (name without the family's own, sorted labels), `_created`
    left out (a timestamp)."""
    found = {}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name.startswith(family) and not sample.name.endswith("_created"):
                key = (sample.name.removeprefix(family), tuple(sorted(sample.labels.items())))
                found[key] = sample.value
    return found


def test_a_plain_histogram_shows_what_prometheus_clients_own_shows():
    """Same lines, in the same order, for the same observations: buckets (cumulative, on a
    bound counted in it), _count, _sum and a _created per label set."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = PlainHistogram("h_seconds", "Help.", ["upstream", "server"], BUCKETS,
                           registry=ours, multiprocess=False)
    reference = Histogram("h_seconds", "Help.", ["upstream", "server"], buckets=BUCKETS,
                          registry=theirs)
    for i, value in enumerate(VALUES):
        labels = ("app", f"s{i % 3}")
        plain.labels(*labels).observe(value)
        reference.labels(*labels).observe(value)
    plain.labels("app", "never")  # a label set with no observation yet shows zeros
    reference.labels("app", "never")

    def lines(registry: CollectorRegistry) -> list[str]:
        return [line.rsplit(" ", 1)[0] if "_created" in line else line
                for line in generate_latest(registry).decode().splitlines()]

    assert lines(ours) == lines(theirs)
    plain.remove("app", "s1")
    reference.remove("app", "s1")
    assert lines(ours) == lines(theirs)


WRITER = """
import sys
from prometheus_client import Histogram
from balancer.histogram import PlainHistogram
buckets = tuple(float(b) for b in sys.argv[1].split(","))
values = [float(v) for v in sys.argv[2].split(",")]
reference = Histogram("ref_seconds", "Help.", ["upstream"], buckets=buckets)
plain = PlainHistogram("our_seconds", "Help.", ["upstream"], buckets)
for i, value in enumerate(values):
    reference.labels(f"u{i % 2}").observe(value)
    plain.labels(f"u{i % 2}").observe(value)
    if i == 3:
        plain.flush()  # a flush part-way: the next one adds only what came after
plain.flush()
"""


def test_with_workers_the_hidden_counters_merge_into_the_same_histogram(tmp_path):
    """Two worker processes (multiprocess mode) observe the same values into a
    prometheus-client histogram and into ours; the primary's merge shows both alike."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for part in (VALUES[:9], VALUES[9:]):  # two processes: two pids, two sets of files
        subprocess.run([sys.executable, "-c", WRITER, ",".join(map(str, BUCKETS)),
                        ",".join(map(str, part))], env=env, check=True, timeout=60)
    text = render_cluster_metrics(str(tmp_path)).decode()
    ours, theirs = samples_of(text, "our_seconds"), samples_of(text, "ref_seconds")
    assert theirs and ours == theirs
    assert ours[("_count", (("upstream", "u0"),))] == 10
    assert ":bucket" not in text and ":sum" not in text  # the hidden pairs stay hidden
    assert "# TYPE our_seconds histogram" in text


def prometheus_calls_from(names: set[str], counts: list[int]) -> Any:
    """A profile hook counting calls into prometheus_client made by balancer functions named
    in `names` (directly: what the connection events call, not what a flush calls)."""

    def hook(frame: FrameType, event: str, arg: object) -> None:
        if event == "call" and "prometheus_client" in frame.f_code.co_filename:
            caller = frame.f_back
            if caller is not None and caller.f_code.co_name in names and \
                    "balancer" in caller.f_code.co_filename:
                counts[0] += 1

    return hook


@pytest.mark.parametrize("pool", [None, {"size": 2}])
async def test_a_connection_makes_no_prometheus_client_call(start_backend, pool):
    """The connection events bump plain ints: before, every connection made nine locked
    value updates (connections, active up and down, two histogram observes of two each,
    bytes both ways) through about thirty prometheus-client calls, and with a pool two
    gauge sets more (the pooled connection taken, then replaced)."""
    echo = start_backend("echo")
    raw = with_metrics(make_config([echo.address])) if pool is None else \
        with_metrics(make_config([echo.address], pool=pool))
    config = parse_config(raw)
    balancer = Balancer(config, serve_admin=False)
    await balancer.start()
    counts = [0]
    # This process's metrics outlive one test (one registry): the upstream's histogram too.
    duration = ("connection_duration_seconds_count", (("upstream", "app"),))
    before = samples_of(balancer.render_metrics().decode(), "balancer_").get(duration, 0)
    try:
        port = balancer.listeners[0].address()[1]
        sys.setprofile(prometheus_calls_from({"connected", "closed", "_count_bytes",
                                              "<lambda>"}, counts))
        try:
            for i in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x%d" % i)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 10) == b"x%d" % i
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(0)
            for _ in range(100):  # the balancer's side of the last close, within 1 s
                if not balancer.open_connections():
                    break
                await asyncio.sleep(0.01)
        finally:
            sys.setprofile(None)
        assert not balancer.open_connections()
        events = balancer.metrics_events
        assert events is not None
        assert counts[0] == 0
        # ...and the counts are all there once flushed (as before every scrape).
        text = balancer.render_metrics().decode()
        found = samples_of(text, "balancer_")
        key = (("listener", "test"), ("server", echo.address), ("upstream", "app"))
        assert found[("connections_total", key)] == 20
        assert found[("active_connections", key)] == 0
        assert found[duration] - before == 20
        assert found[("bytes_total", (("direction", "upstream"), *key[1:]))] == 50
        connects = found[("upstream_connect_seconds_count", key[1:])]
        if pool is None:
            assert connects == 20
        else:
            hits = found[("pool_requests_total", (("result", "hit"), *key[1:]))]
            misses = found[("pool_requests_total", (("result", "miss"), *key[1:]))]
            assert hits > 0 and hits + misses == 20 and connects == misses
            idle = balancer.upstreams["app"].servers[0].pool
            assert idle is not None
            assert found[("pool_idle_connections", key[1:])] == len(idle.idle)
    finally:
        await balancer.shutdown(timeout=1)


@pytest.fixture(autouse=True)
def _no_profile_left() -> Any:
    yield
    sys.setprofile(None)


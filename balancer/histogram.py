"""A Prometheus histogram whose observations cost two additions and no lock.

prometheus-client's `Histogram.observe` takes a lock twice (the sum and the bucket; in
multiprocess mode each is a write to an mmapped file) and walks the bounds in Python: about a
fifth of a new connection's own code, with the connect and the duration histograms both on
the connection path. Here one label set is a list of plain bucket counts and a sum, and the
family is a custom collector that renders them at scrape time, with the same samples
prometheus-client's own histogram shows (`_bucket` per bound, `_count`, `_sum`, `_created`).

prometheus-client has no public way to add counts to a histogram's buckets in bulk, so with
workers (multiprocess mode, where only what a worker writes into its files reaches the
primary) each label set is published as two hidden counter families, `NAME:bucket` (the
plain count of each bucket, label `le`) and `NAME:sum`, brought up to date by `flush()`
(once a second and at stop, with the other metrics); the primary turns them back into the
histogram (`from_counters`, proc/cluster.py) after merging the workers' files. Counters
merge by addition, which is what buckets and sums need.
"""

from __future__ import annotations

import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.utils import floatToGoString

BUCKET_SUFFIX = ":bucket"  # the hidden counter families of a histogram, with workers
SUM_SUFFIX = ":sum"
INF = float("inf")


def _created_series() -> bool:
    """prometheus-client's own switch for the `_created` samples (its environment variable)."""
    return os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
        "true", "1", "t")


class HistogramChild:
    """One label set: a plain count per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "created", "flushed", "flushed_sum", "hidden", "sum")

    def __init__(self, bounds: tuple[float, ...], hidden: list[Any] | None) -> None:
        self.bounds = bounds  # upper bounds, +Inf last
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()
        # With workers: the hidden counters' children (one per bucket, then the sum) and
        # what they were last given.
        self.hidden = hidden
        self.flushed = [0] * len(bounds)
        self.flushed_sum = 0.0

    def observe(self, value: float) -> None:
        """As prometheus-client's: the first bucket whose bound is >= value."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def flush(self) -> None:
        hidden = self.hidden
        if hidden is None or self.counts == self.flushed:
            return
        for i, (now, before) in enumerate(zip(self.counts, self.flushed, strict=True)):
            if now != before:
                hidden[i].inc(now - before)
        hidden[-1].inc(self.sum - self.flushed_sum)
        self.flushed = list(self.counts)
        self.flushed_sum = self.sum


class PlainHistogram(Collector):
    """A labelled histogram family: `labels(...)` and `remove(...)` as prometheus-client's,
    and `observe` on the child without a lock (one event loop thread feeds it)."""

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str],
                 buckets: Iterable[float], registry: CollectorRegistry | None = REGISTRY,
                 multiprocess: bool | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._le = [floatToGoString(b) for b in bounds]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        if multiprocess is None:
            multiprocess = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._hidden: tuple[Counter, Counter] | None = None
        if multiprocess:  # on no registry: they reach the primary through the files only
            self._hidden = (
                Counter(name + BUCKET_SUFFIX, documentation, [*self.labelnames, "le"],
                        registry=None),
                Counter(name + SUM_SUFFIX, documentation, self.labelnames, registry=None))
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            hidden = None
            if self._hidden is not None:
                buckets, total = self._hidden
                hidden = [buckets.labels(*values, le) for le in self._le]
                hidden.append(total.labels(*values))
            child = self._children[values] = HistogramChild(self.bounds, hidden)
        return child

    def remove(self, *values: str) -> None:
        self._children.pop(values, None)

    def flush(self) -> None:
        """With workers: give the hidden counters what was observed since the last flush."""
        if self._hidden is not None:
            for child in self._children.values():
                child.flush()

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._le, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
            if created:
                family.add_sample(self.name + "_created", dict(zip(self.labelnames, values,
                                                                    strict=True)),
                                  child.created)
        return [family]


def from_counters(families: Iterable[Metric]) -> Iterator[Metric]:
    """The families merged from the workers' files, with each histogram's hidden counter
    pair (`NAME:bucket`, `NAME:sum`) turned back into the histogram `NAME`, as
    prometheus-client's multiprocess collector shows one: cumulative `_bucket` samples in
    bound order, `_count` and `_sum` (no `_created`, as there)."""
    sums: dict[str, Metric] = {}
    buckets: dict[str, Metric] = {}
    for family in families:
        if family.name.endswith(BUCKET_SUFFIX):
            buckets[family.name.removesuffix(BUCKET_SUFFIX)] = family
        elif family.name.endswith(SUM_SUFFIX):
            sums[family.name.removesuffix(SUM_SUFFIX)] = family
        else:
            yield family
    for name, family in buckets.items():
        yield _histogram(name, family, sums.get(name))


def _histogram(name: str, counts: Metric, sums: Metric | None) -> Metric:
    per_set: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}
    for sample in counts.samples:
        if not sample.name.endswith("_total"):
            continue  # the counters' _created samples
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        key = tuple(labels.items())
        per_set.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    totals = {tuple(s.labels.items()): s.value for s in (sums.samples if sums else [])
              if s.name.endswith("_total")}
    family = Metric(name, counts.documentation, "histogram")
    for key, by_bound in per_set.items():
        labels = dict(key)
        family.add_sample(name + "_sum", labels, totals.get(key, 0.0))
        cumulative = 0.0
        for bound in sorted(by_bound):
            cumulative += by_bound[bound]
            family.add_sample(name + "_bucket", dict(sorted(  # labels in the merge's order
                {**labels, "le": floatToGoString(bound)}.items())), cumulative)
        family.add_sample(name + "_count", labels, cumulative)
    return family

"""The last minutes of every server, listener and worker, for the status page's sparklines.

The process that serves /status samples, once a second, what it already shows (open
connections and running totals): the last `RECENT` seconds give the rates (new connections
and bytes per second over 10 s, the peak of new connections per second), and every
`SPARK_EVERY` samples one point goes into the 5-minute series of open connections and new
connections per second. Fixed-size arrays per entity, and entities no longer shown are
dropped at the next sample: memory is bounded by the number of servers (about 1.1 KiB
each, see README).
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Callable, Iterable
from typing import Any

SAMPLE_INTERVAL = 1.0  # seconds between samples
RATE_WINDOW = 10  # samples: rates are over the last 10 s
RECENT = RATE_WINDOW + 1
SPARK_EVERY = 5  # samples per sparkline point: one every 5 s...
SPARK_POINTS = 60  # ... for 5 minutes

# What a sample reads of one entity: open connections now, and running totals of new
# connections, bytes in, bytes out.
Reading = tuple[int, int, int, int]


class Track:
    """One entity's recent totals, rates and its two sparklines, in two fixed arrays."""

    __slots__ = ("numbers", "points", "spark", "ticks")

    # numbers: (conns, in, out) for each of the last RECENT seconds, then the three rates
    # over RATE_WINDOW (conn/s, bytes in/s, bytes out/s), then the peak of conn/s.
    RATES = 3 * RECENT
    PEAK = RATES + 3

    def __init__(self) -> None:
        self.numbers = array("d", bytes(8 * (self.PEAK + 1)))
        self.spark = array("f", bytes(4 * 2 * SPARK_POINTS))  # open points, then conn/s ones
        self.ticks = 0  # samples taken
        self.points = 0  # sparkline points taken

    @property
    def rates(self) -> tuple[float, float, float]:
        n = self.numbers
        return n[self.RATES], n[self.RATES + 1], n[self.RATES + 2]

    @property
    def peak_rate(self) -> float:
        return self.numbers[self.PEAK]

    def sample(self, reading: Reading) -> None:
        open_now, *totals = reading
        n, ticks, at = self.numbers, self.ticks, (self.ticks % RECENT) * 3
        if ticks:
            before = ((ticks - 1) % RECENT) * 3
            n[self.PEAK] = max(n[self.PEAK], totals[0] - n[before])
            span = min(ticks, RATE_WINDOW)
            first = ((ticks - span) % RECENT) * 3
            for k in range(3):
                n[self.RATES + k] = (totals[k] - n[first + k]) / (span * SAMPLE_INTERVAL)
        if ticks and ticks % SPARK_EVERY == 0:  # a point for the last 5 s
            point = self.points % SPARK_POINTS
            first = ((ticks - SPARK_EVERY) % RECENT) * 3
            self.spark[point] = open_now
            self.spark[SPARK_POINTS + point] = ((totals[0] - n[first])
                                                / (SPARK_EVERY * SAMPLE_INTERVAL))
            self.points += 1
        n[at], n[at + 1], n[at + 2] = totals
        self.ticks += 1

    def series(self) -> dict[str, list[float]]:
        """The sparklines, oldest point first."""
        count = min(self.points, SPARK_POINTS)
        start = self.points - count
        order = [(start + i) % SPARK_POINTS for i in range(count)]
        return {"open": [round(self.spark[i], 2) for i in order],
                "conn_rate": [round(self.spark[SPARK_POINTS + i], 2) for i in order]}


class History:
    """Every entity's Track, sampled on a timer from `read()`: (key, Reading) pairs."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, Reading]]]) -> None:
        self.read = read
        self.tracks: dict[str, Track] = {}
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sample()
        self._timer = asyncio.get_running_loop().call_later(SAMPLE_INTERVAL, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(SAMPLE_INTERVAL, self._tick)
        self.sample()

    def sample(self) -> None:
        tracks, seen = self.tracks, {}
        for key, reading in self.read():
            track = tracks.get(key)
            if track is None:
                track = Track()
            track.sample(reading)
            seen[key] = track
        self.tracks = seen  # entities gone since the last sample go with their history

    def rates(self, key: str) -> dict[str, Any]:
        """The rates /status shows for one entity (zeros before its first two samples)."""
        track = self.tracks.get(key)
        if track is None:
            return {"conn_rate": 0.0, "conn_rate_peak": 0.0, "bytes_in_rate": 0.0,
                    "bytes_out_rate": 0.0}
        conns, bytes_in, bytes_out = track.rates
        return {"conn_rate": round(conns, 2), "conn_rate_peak": track.peak_rate,
                "bytes_in_rate": round(bytes_in), "bytes_out_rate": round(bytes_out)}

    def series(self, key: str) -> dict[str, list[float]]:
        track = self.tracks.get(key)
        return track.series() if track is not None else {"open": [], "conn_rate": []}

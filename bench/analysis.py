"""Benchmark: anomaly detection and capacity forecasting against bare numpy on the same arrays.

Prints, in one run, the best of several repetitions of each case and its ratio to a bare numpy
baseline measured in the same run:

- `detect` (z-score and MAD) over a million one-minute points against the same statistics in
  numpy: mean and standard deviation, or the two medians, then the scores and the hits;
- `forecast` over 260,000 points against `numpy.polyfit(x, y, 1)` on the same arrays;
- a fleet of 100 series of 10,000 points end to end (clean, a counter's rate for a third of
  them, MAD detection, forecast) against the numpy equivalent of each step.

Each repetition gets a freshly built series, so nothing pandas caches on an index carries over
from the previous one: a series read from a file or a database arrives like that. Every case
checks its answer (the planted spikes, the slope, the same hits as numpy); a wrong answer makes
the run exit 1, a slow one never does. Needs no services.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import pandas as pd

from tasks.anomaly import MAD_TO_SIGMA, Method, clean, detect, to_rate
from tasks.forecast import SECONDS_PER_DAY, forecast

DETECT_POINTS = 1_000_000
FORECAST_POINTS = 260_000
FLEET_SERIES = 100
FLEET_POINTS = 10_000
# Every third series of the fleet is a counter and goes through to_rate first.
COUNTER_EVERY = 3
REPEATS = 7
FLEET_REPEATS = 3
# Twice the largest score the cycle and the noise reach (about 3), so a correct detector finds
# exactly the planted spikes.
THRESHOLD = 6.0
STEP_NS = 60 * 10**9
START_NS = pd.Timestamp("2026-01-01T00:00:00Z").value
SPIKE_POSITIONS = (1_234, 250_000, 500_001, 777_777, 999_000)
SPIKE_MS = 900.0
GROWTH_PER_DAY = 0.1

FAILURES: list[str] = []
# case, points, bare numpy s, caretaker s, goal (ratio) if there is one
Row = tuple[str, int, float, float, float | None]
Timed = tuple[Callable[[Any], object], Callable[[], Any]]


@dataclass
class Sample:
    """One series as arrays (what bare numpy gets) and how to build it as pandas data."""

    stamps_ns: np.ndarray
    values: np.ndarray

    def series(self) -> pd.Series:
        index = pd.to_datetime(self.stamps_ns, unit="ns", utc=True)
        return pd.Series(self.values.copy(), index=index)


def check(ok: bool, message: str) -> None:
    if not ok:
        FAILURES.append(message)


def one_minute_stamps(points: int) -> np.ndarray:
    stamps: np.ndarray = START_NS + STEP_NS * np.arange(points, dtype=np.int64)
    return stamps


def latency(rng: np.random.Generator, points: int) -> np.ndarray:
    """Milliseconds: a daily cycle and normal noise around 120."""
    minute = np.arange(points)
    daily = 10.0 * np.sin(2 * np.pi * minute / 1440)
    return 120.0 + daily + rng.normal(0.0, 3.0, points)


def best_s(bare: Timed, ours: Timed, repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` calls of each run(make()), taking turns so that a busy moment on a
    shared machine falls on both; make() stays outside the timing."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for side, (run, make) in enumerate((bare, ours)):
            argument = make()
            started = time.perf_counter()
            run(argument)
            best[side] = min(best[side], time.perf_counter() - started)
    return best[0], best[1]


def bare_zscore(values: np.ndarray) -> np.ndarray:
    center, spread = values.mean(), values.std()
    scores = (values - center) / spread
    return np.flatnonzero(np.abs(scores) > THRESHOLD)


def bare_mad(values: np.ndarray) -> np.ndarray:
    center = np.median(values)
    spread = MAD_TO_SIGMA * np.median(np.abs(values - center))
    scores = (values - center) / spread
    return np.flatnonzero(np.abs(scores) > THRESHOLD)


def bench_detect(rows: list[Row]) -> None:
    rng = np.random.default_rng(7)
    sample = Sample(one_minute_stamps(DETECT_POINTS), latency(rng, DETECT_POINTS))
    sample.values[list(SPIKE_POSITIONS)] = SPIKE_MS
    planted = [(pd.Timestamp(sample.stamps_ns[i], tz="UTC"), SPIKE_MS) for i in SPIKE_POSITIONS]

    methods: list[tuple[Method, Callable[[np.ndarray], np.ndarray]]] = [
        ("zscore", bare_zscore),
        ("mad", bare_mad),
    ]
    for method, bare in methods:
        found = detect(sample.series(), method, THRESHOLD)
        check(
            [(a.timestamp, a.value) for a in found.anomalies] == planted,
            f"detect {method}: found {len(found.anomalies)} anomalies, planted {len(planted)}",
        )
        check(
            bare(sample.values).tolist() == list(SPIKE_POSITIONS),
            f"bare {method} misses the planted spikes",
        )
        ours = partial(detect, method=method, threshold=THRESHOLD)
        bare_s, ours_s = best_s((bare, lambda: sample.values), (ours, sample.series), REPEATS)
        rows.append((f"detect {method}", DETECT_POINTS, bare_s, ours_s, 3.0))


def bench_forecast(rows: list[Row]) -> None:
    rng = np.random.default_rng(11)
    stamps = one_minute_stamps(FORECAST_POINTS)
    days = (stamps - stamps[0]) / 1e9 / SECONDS_PER_DAY
    usage = 40.0 + GROWTH_PER_DAY * days + rng.normal(0.0, 0.5, FORECAST_POINTS)
    sample = Sample(stamps, usage)

    result = forecast(sample.series(), 90.0, threshold=90.0, capacity=100.0)
    slope, _ = np.polyfit(days, usage, 1)
    check(
        bool(np.isclose(result.slope_per_day, slope, rtol=1e-9)),
        f"forecast slope {result.slope_per_day} differs from polyfit's {slope}",
    )
    check(
        abs(result.slope_per_day - GROWTH_PER_DAY) < 1e-3,
        f"forecast slope {result.slope_per_day}, planted {GROWTH_PER_DAY}",
    )
    check(result.lower < result.forecast < result.upper, "forecast outside its band")

    bare = (lambda y: np.polyfit(days, y, 1), lambda: usage)
    bare_s, ours_s = best_s(bare, (forecast, sample.series), REPEATS)
    rows.append(("forecast", FORECAST_POINTS, bare_s, ours_s, 2.0))


def fleet(rng: np.random.Generator) -> list[Sample]:
    """Gauges with scrape gaps and a burst each; every third series a counter with a reset."""
    stamps = one_minute_stamps(FLEET_POINTS)
    samples = []
    for number in range(FLEET_SERIES):
        values = latency(rng, FLEET_POINTS)
        values[rng.integers(0, FLEET_POINTS, 3)] = SPIKE_MS
        if number % COUNTER_EVERY == 0:
            # Requests counted per minute, the counter restarting from zero once.
            values = np.cumsum(values * 60.0)
            restart = FLEET_POINTS // 2
            values[restart:] -= values[restart - 1]
        values[rng.integers(0, FLEET_POINTS, 5)] = np.nan
        samples.append(Sample(stamps, values))
    return samples


def caretaker_one(series: pd.Series, counter: bool) -> tuple[list[pd.Timestamp], float]:
    values = clean(series)
    if counter:
        values = to_rate(values)
    found = detect(values, "mad", THRESHOLD)
    trend = forecast(values)
    return [a.timestamp for a in found.anomalies], trend.slope_per_day


def bare_one(stamps_ns: np.ndarray, values: np.ndarray, counter: bool) -> tuple[np.ndarray, float]:
    finite = np.isfinite(values)
    stamps_ns, values = stamps_ns[finite], values[finite]
    if counter:
        increase = np.diff(values)
        reset = increase < 0
        increase[reset] = values[1:][reset]
        values = increase / (np.diff(stamps_ns) / 1e9)
        stamps_ns = stamps_ns[1:]
    center = np.median(values)
    spread = MAD_TO_SIGMA * np.median(np.abs(values - center))
    hits = np.flatnonzero(np.abs((values - center) / spread) > THRESHOLD)
    days = (stamps_ns - stamps_ns[0]) / 1e9 / SECONDS_PER_DAY
    slope, _ = np.polyfit(days, values, 1)
    return stamps_ns[hits], float(slope)


def bench_fleet(rows: list[Row]) -> None:
    samples = fleet(np.random.default_rng(13))
    counters = [number % COUNTER_EVERY == 0 for number in range(FLEET_SERIES)]

    for number, (sample, counter) in enumerate(zip(samples, counters, strict=True)):
        stamps, slope = caretaker_one(sample.series(), counter)
        bare_stamps, bare_slope = bare_one(sample.stamps_ns, sample.values, counter)
        check(
            [s.value for s in stamps] == bare_stamps.tolist(),
            f"fleet {number}: {len(stamps)} anomalies differ from numpy's {len(bare_stamps)}",
        )
        check(
            bool(np.isclose(slope, bare_slope, rtol=1e-6, atol=1e-9)),
            f"fleet {number}: slope {slope}, numpy's {bare_slope}",
        )

    def bare_all(_: None) -> None:
        for sample, counter in zip(samples, counters, strict=True):
            bare_one(sample.stamps_ns, sample.values, counter)

    def ours_all(built: list[pd.Series]) -> None:
        for series, counter in zip(built, counters, strict=True):
            caretaker_one(series, counter)

    built = (ours_all, lambda: [s.series() for s in samples])
    bare_s, ours_s = best_s((bare_all, lambda: None), built, FLEET_REPEATS)
    points = FLEET_SERIES * FLEET_POINTS
    rows.append((f"fleet {FLEET_SERIES} x {FLEET_POINTS}", points, bare_s, ours_s, None))
    rows.append(("  per series", FLEET_POINTS, bare_s / FLEET_SERIES, ours_s / FLEET_SERIES, None))


def main() -> None:
    rows: list[Row] = []
    bench_detect(rows)
    bench_forecast(rows)
    bench_fleet(rows)

    print(
        f"{'case':<20} {'points':>9} {'bare ms':>9} {'caretaker ms':>13} {'ratio':>6} {'goal':>5}"
    )
    for case, points, bare_s, ours_s, goal in rows:
        target = "-" if goal is None else f"{goal:g}x"
        print(
            f"{case:<20} {points:>9} {bare_s * 1000:>9.2f} {ours_s * 1000:>13.2f}"
            f" {ours_s / bare_s:>6.2f} {target:>5}"
        )
    for failure in FAILURES:
        print(f"wrong: {failure}", file=sys.stderr)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()

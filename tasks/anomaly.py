"""Anomaly detection over a time series: z-score and robust (median/MAD) scores, vectorised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

Method = Literal["mad", "zscore"]

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
# sqrt(pi / 2) * mean absolute deviation estimates the standard deviation of normal data.
MEAN_AD_TO_SIGMA = 1.2533
# Fewer points than this give no trustworthy centre and spread: nothing is scored.
MIN_POINTS = 8
# The spread never falls below this share of the centre's size (or the absolute floor), so a
# flat series divides by something, and a real jump away from it still scores high.
RELATIVE_SCALE_FLOOR = 1e-3
ABSOLUTE_SCALE_FLOOR = 1e-9


@dataclass(frozen=True)
class Anomaly:
    timestamp: pd.Timestamp
    value: float
    score: float


@dataclass
class Detection:
    """What a detector found, with the baseline it scored against."""

    method: Method
    threshold: float
    center: float | None = None
    scale: float | None = None
    points: int = 0
    anomalies: list[Anomaly] = field(default_factory=list)
    skipped: str | None = None


def clean(series: pd.Series) -> pd.Series:
    """Finite values only, on a sorted, de-duplicated UTC time index."""
    if series.dtype == np.float64:
        values = series.copy(deep=False)
    else:
        values = pd.to_numeric(series, errors="coerce").astype(float)
    finite = np.isfinite(values.to_numpy())
    if not finite.all():
        values = values[finite]
    # Collected series nearly always arrive in order; pandas' monotonic check settles uniqueness
    # too, and returning early saves the copies that dropping duplicates and sorting make.
    if values.index.is_monotonic_increasing and values.index.is_unique:
        return values
    values = values[~values.index.duplicated(keep="last")]
    return values.sort_index()


def baseline(values: np.ndarray, method: Method) -> tuple[float, float]:
    """(centre, spread) of values: mean and standard deviation, or median and 1.4826 * MAD."""
    if method == "zscore":
        center, spread = float(np.mean(values)), float(np.std(values))
    else:
        flat = np.asarray(values, dtype=float).ravel()
        center = _median(flat.copy())
        deviations = np.abs(flat - center)
        spread = MAD_TO_SIGMA * _median(deviations.copy())
        if spread == 0.0 and flat.size:
            # Over half the points sit on the median (a mostly-zero error rate, an integer
            # gauge): MAD says nothing of the rest. The mean absolute deviation, scaled to a
            # standard deviation for normal data, still does; a truly flat series stays 0.
            spread = MEAN_AD_TO_SIGMA * float(deviations.mean())
    floor = max(abs(center) * RELATIVE_SCALE_FLOOR, ABSOLUTE_SCALE_FLOOR)
    return center, max(spread, floor)


def _median(values: np.ndarray) -> float:
    # The same value as np.median, from one partition around the upper middle element, where
    # np.median partitions around both middle ones and the last: several times slower.
    # Reorders `values`, so callers pass a copy or a temporary.
    if values.size == 0:
        return float(np.median(values))
    middle = values.size // 2
    values.partition(middle)
    upper = values[middle]
    # NaN sorts last, so any NaN lands in the upper part; np.median's answer is then NaN.
    if np.isnan(values[middle:].max()):
        return float("nan")
    if values.size % 2:
        return float(upper)
    return float((values[:middle].max() + upper) / 2)


def detect(
    series: pd.Series,
    method: Method = "mad",
    threshold: float = 3.0,
    against: tuple[float, float] | None = None,
) -> Detection:
    """Score every point; those with |score| over threshold are anomalies.

    Without `against`, points are scored against the series' own statistics (ad hoc analysis);
    with it, against a stored baseline (centre, spread) built from other data.
    """
    values = clean(series)
    found = Detection(method=method, threshold=threshold, points=len(values))
    if against is None and len(values) < MIN_POINTS:
        found.skipped = f"too few points: {len(values)} (at least {MIN_POINTS})"
        return found

    array = values.to_numpy()
    found.center, found.scale = against or baseline(array, method)
    scores = (array - found.center) / found.scale
    hits = np.flatnonzero(np.abs(scores) > threshold)
    # One gather per column: indexing the time index once per hit costs microseconds each,
    # which adds up when a noisy series has thousands.
    found.anomalies = [
        Anomaly(timestamp, value, round(score, 3))
        for timestamp, value, score in zip(
            values.index[hits], array[hits].tolist(), scores[hits].tolist(), strict=True
        )
    ]
    return found


def to_rate(counter: pd.Series) -> pd.Series:
    """Per-second rate of a monotonic counter (`*_total`), by real timestamps; a reset (the
    counter falling) counts the new value as the increase, as Prometheus does."""
    values = clean(counter)
    # A sample repeated at several instants (a query step finer than the scrape interval)
    # is one reading: only the instants where the counter moved are kept, so its increase is
    # spread over the real time it took, not put all on one step.
    array = values.to_numpy()
    moved = np.concatenate(([True], array[1:] != array[:-1]))
    if not moved.all():
        values = values[moved]
        array = values.to_numpy()
    increase = np.diff(array)
    reset = increase < 0
    increase[reset] = array[1:][reset]
    stamps = values.index.asi8.view(f"M8[{values.index.unit}]")
    elapsed_s = np.diff(stamps) / np.timedelta64(1, "s")
    # pandas' rule for the name of a quotient of two series: kept only when both share it.
    name = values.name if values.name == values.index.name else None
    return pd.Series(increase / elapsed_s, index=values.index[1:], name=name)


# Epoch seconds reach 1e11 in the year 5138; larger numbers are milliseconds, up to 1e14.
_SECONDS_BELOW = 1e11
_MILLISECONDS_BELOW = 1e14


def _epoch_unit(numbers: pd.Series, path: str) -> str:
    largest = float(numbers.abs().max()) if len(numbers) else 0.0
    if largest < _SECONDS_BELOW:
        return "s"
    if largest < _MILLISECONDS_BELOW:
        return "ms"
    raise ValueError(f"{path}: epoch timestamps must be in seconds or milliseconds")


def read_csv_series(path: str) -> pd.Series:
    """A `timestamp,value` CSV file as a series; timestamps in RFC 3339 (UTC when no offset
    is given) or epoch seconds (or milliseconds, told apart by their size)."""
    try:
        frame = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    missing = {"timestamp", "value"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    stamps = frame["timestamp"]
    numeric = pd.to_numeric(stamps, errors="coerce")
    try:
        if numeric.notna().all():
            index = pd.to_datetime(numeric, unit=_epoch_unit(numeric, path), utc=True)
        else:
            index = pd.to_datetime(stamps, utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: timestamps must be RFC 3339 or epoch seconds: {exc}") from exc
    return pd.Series(frame["value"].to_numpy(), index=pd.DatetimeIndex(index), name=path)

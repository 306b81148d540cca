"""Anomaly detection over a time series: z-score and robust (median/MAD) scores, vectorised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

Method = Literal["mad", "zscore"]

# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
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
    values = pd.to_numeric(series, errors="coerce").astype(float)
    values = values[np.isfinite(values.to_numpy())]
    values = values[~values.index.duplicated(keep="last")]
    return values.sort_index()


def baseline(values: np.ndarray, method: Method) -> tuple[float, float]:
    """(centre, spread) of values: mean and standard deviation, or median and 1.4826 * MAD."""
    if method == "zscore":
        center, spread = float(np.mean(values)), float(np.std(values))
    else:
        center = float(np.median(values))
        spread = MAD_TO_SIGMA * float(np.median(np.abs(values - center)))
    floor = max(abs(center) * RELATIVE_SCALE_FLOOR, ABSOLUTE_SCALE_FLOOR)
    return center, max(spread, floor)


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
    found.anomalies = [
        Anomaly(values.index[i], float(array[i]), round(float(scores[i]), 3)) for i in hits
    ]
    return found


def to_rate(counter: pd.Series) -> pd.Series:
    """Per-second rate of a monotonic counter (`*_total`), by real timestamps; a reset (the
    counter falling) counts the new value as the increase, as Prometheus does."""
    values = clean(counter)
    increase = values.diff()
    reset = increase < 0
    increase[reset] = values[reset]
    elapsed_s = values.index.to_series().diff().dt.total_seconds()
    return (increase / elapsed_s).iloc[1:]


def read_csv_series(path: str) -> pd.Series:
    """A `timestamp,value` CSV file as a series; timestamps in RFC 3339 or epoch seconds."""
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
            index = pd.to_datetime(numeric, unit="s", utc=True)
        else:
            index = pd.to_datetime(stamps, utc=True, format="ISO8601")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: timestamps must be RFC 3339 or epoch seconds: {exc}") from exc
    return pd.Series(frame["value"].to_numpy(), index=pd.DatetimeIndex(index), name=path)

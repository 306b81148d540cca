"""Capacity forecasting: a linear trend over real timestamps, with a confidence band."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from tasks.anomaly import clean

SECONDS_PER_DAY = 86400.0
# Forecast as a share of capacity: over each level's share, that level applies.
LEVELS = (
    (90.0, "critical", "increase now"),
    (75.0, "warning", "plan within a month"),
    (60.0, "info", "monitor"),
)
MIN_POINTS = 3


@dataclass(frozen=True)
class Forecast:
    points: int
    slope_per_day: float
    current: float
    forecast: float
    lower: float
    upper: float
    horizon_days: float
    threshold: float | None
    days_to_threshold: float | None
    level: str | None
    advice: str | None


def forecast(
    series: pd.Series,
    horizon_days: float = 90.0,
    threshold: float | None = None,
    capacity: float | None = None,
    confidence: float = 0.95,
) -> Forecast:
    """Fit value = a + b * t (t in days); forecast horizon_days past the last point.

    days_to_threshold counts from the last point and is None when the trend never gets there.
    With a capacity (100 for percentages), the share of it the series takes, now (on the
    trend) or at the horizon, whichever is larger, gives the level: a resource full today is
    not "ok" because its trend falls. ValueError for non-finite arguments or a fit that
    overflows.
    """
    arguments = {"horizon_days": horizon_days, "threshold": threshold, "capacity": capacity}
    for name, number in arguments.items():
        if number is not None and not np.isfinite(number):
            raise ValueError(f"{name} must be a finite number, not {number}")
    values = clean(series)
    if len(values) < MIN_POINTS:
        raise ValueError(f"too few points to forecast: {len(values)} (at least {MIN_POINTS})")
    # Days in numpy: pandas' timedelta arithmetic (overflow checks, NaT masks) costs more than
    # the fit itself.
    stamps = values.index.asi8.view(f"M8[{values.index.unit}]")
    days = (stamps - stamps[0]) / np.timedelta64(1, "s") / SECONDS_PER_DAY
    y = values.to_numpy()
    with np.errstate(all="ignore"):
        slope, intercept = _fit(days, y)
        last_day = float(days[-1])
        current = float(intercept + slope * last_day)
        at = last_day + horizon_days
        predicted = float(intercept + slope * at)
        half_width = _band(days, y, slope, intercept, at, confidence)
    if not np.isfinite([slope, current, predicted, half_width]).all():
        raise ValueError("the values are too large to fit a trend to")
    return Forecast(
        points=len(values),
        slope_per_day=slope,
        current=current,
        forecast=predicted,
        lower=predicted - half_width,
        upper=predicted + half_width,
        horizon_days=horizon_days,
        threshold=threshold,
        days_to_threshold=_days_to(threshold, current, slope),
        **dict(zip(("level", "advice"), _level(max(predicted, current), capacity), strict=True)),
    )


def _fit(days: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    # (slope, intercept) of the least-squares line, computed as scipy.stats.linregress does
    # (same calls, same rounding) without its input checks, r, p-value and standard errors,
    # which cost more than the fit on a few thousand points.
    ssxm, ssxym, _, _ = np.cov(days, y, bias=True).flat
    slope = ssxym / ssxm
    return float(slope), float(np.mean(y) - slope * np.mean(days))


def _band(
    days: np.ndarray, y: np.ndarray, slope: float, intercept: float, at: float, confidence: float
) -> float:
    # Prediction interval of a new observation at `at` for a least-squares line.
    n = len(days)
    if n < 3:
        return 0.0
    residuals = y - (intercept + slope * days)
    sigma = float(np.sqrt(np.sum(residuals**2) / (n - 2)))
    spread = float(np.sum((days - days.mean()) ** 2)) or 1.0
    t = float(stats.t.ppf((1 + confidence) / 2, n - 2))
    return t * sigma * float(np.sqrt(1 + 1 / n + (at - days.mean()) ** 2 / spread))


def _days_to(threshold: float | None, current: float, slope: float) -> float | None:
    if threshold is None:
        return None
    if current >= threshold:
        return 0.0
    if slope <= 0:
        return None
    return round((threshold - current) / slope, 2)


def _level(predicted: float, capacity: float | None) -> tuple[str | None, str | None]:
    if capacity is None:
        return None, None
    share = 100.0 * predicted / capacity
    for minimum, level, advice in LEVELS:
        if share > minimum:
            return level, advice
    return "ok", "nothing to do"

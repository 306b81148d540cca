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
    With a capacity (100 for percentages), the forecast's share of it gives the level.
    """
    values = clean(series)
    if len(values) < MIN_POINTS:
        raise ValueError(f"too few points to forecast: {len(values)} (at least {MIN_POINTS})")
    days = (values.index - values.index[0]).total_seconds().to_numpy() / SECONDS_PER_DAY
    y = values.to_numpy()
    fit = stats.linregress(days, y)

    last_day = float(days[-1])
    current = float(fit.intercept + fit.slope * last_day)
    at = last_day + horizon_days
    predicted = float(fit.intercept + fit.slope * at)
    half_width = _band(days, y, fit, at, confidence)
    return Forecast(
        points=len(values),
        slope_per_day=float(fit.slope),
        current=current,
        forecast=predicted,
        lower=predicted - half_width,
        upper=predicted + half_width,
        horizon_days=horizon_days,
        threshold=threshold,
        days_to_threshold=_days_to(threshold, current, float(fit.slope)),
        **dict(zip(("level", "advice"), _level(predicted, capacity), strict=True)),
    )


def _band(days: np.ndarray, y: np.ndarray, fit: object, at: float, confidence: float) -> float:
    # Prediction interval of a new observation at `at` for a least-squares line.
    n = len(days)
    if n < 3:
        return 0.0
    residuals = y - (fit.intercept + fit.slope * days)  # type: ignore[attr-defined]
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

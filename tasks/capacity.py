"""Capacity planning: each usage series' trend forecast a horizon ahead, with its level."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Any

from tasks import anomaly, sources
from tasks.detection import series_key
from tasks.forecast import forecast
from workers.config import CapacityConfig, Config
from workers.errors import SourceError
from workers.settings import Settings

log = logging.getLogger(__name__)

# The order in which series are listed, and the report's overall level: worst first.
LEVEL_ORDER = {"critical": 0, "warning": 1, "info": 2, "ok": 3, None: 4}


def capacity_report(config: Config, settings: Settings, now: datetime) -> dict[str, Any]:
    """Forecast every configured usage series; a series that cannot be read is listed with
    its error, and the others are still forecast."""
    entries: list[dict[str, Any]] = []
    for spec in config.analysis.capacity:
        entries += _plan(spec, settings, now)
    entries.sort(
        key=lambda e: (LEVEL_ORDER.get(e.get("level"), 4), e.get("days_to_threshold") or 1e18)
    )
    levels = [e["level"] for e in entries if e.get("level")]
    return {
        "kind": "capacity",
        "period_start": (now - timedelta(days=_longest_history(config))).isoformat(),
        "period_end": now.isoformat(),
        "overall": min(levels, key=lambda level: LEVEL_ORDER[level]) if levels else None,
        "series": entries,
    }


def _plan(spec: CapacityConfig, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    start = now - timedelta(days=spec.history_days)
    base = {"name": spec.name, "threshold": spec.threshold, "capacity": spec.capacity}
    try:
        fetched = sources.fetch(spec, start, now, settings)
    except SourceError as exc:
        log.warning("capacity series unreadable name=%s error=%s", spec.name, exc)
        return [base | {"key": spec.name, "labels": {}, "error": str(exc)}]
    if not fetched:
        return [base | {"key": spec.name, "labels": {}, "error": "the source has no such series"}]

    planned = []
    for item in fetched:
        entry = base | {"key": series_key(spec.name, item.labels), "labels": item.labels}
        try:
            result = forecast(
                anomaly.clean(item.values), spec.horizon_days, spec.threshold, spec.capacity
            )
        except ValueError as exc:
            planned.append(entry | {"error": str(exc)})
            continue
        planned.append(entry | asdict(result) | {"recommendation": _advice(spec, result)})
    return planned


def _advice(spec: CapacityConfig, result: Any) -> str:
    if result.level is not None and result.level != "ok":
        share = 100.0 * result.forecast / (spec.capacity or 1.0)
        in_days = f"{share:.0f}% of capacity in {spec.horizon_days:g} days"
        return f"{result.level}: {result.advice} ({in_days})"
    if result.days_to_threshold == 0.0:
        return "over the threshold now"
    if result.days_to_threshold is not None:
        return (
            f"reaches {spec.threshold:g} in {result.days_to_threshold:g} days at the current trend"
        )
    return "not growing towards the threshold"


def _longest_history(config: Config) -> float:
    return max((spec.history_days for spec in config.analysis.capacity), default=30.0)

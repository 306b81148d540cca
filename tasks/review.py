"""The weekly performance review: each configured series' week against its baseline, with
anomalies and recommendations, and the slowest statements of the reviewed databases."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from tasks import anomaly, sources
from tasks.detection import series_key
from workers.config import Config, SeriesConfig
from workers.errors import SourceError
from workers.settings import Settings, read_env_secret

log = logging.getLogger(__name__)

WEEK = timedelta(days=7)
# A typical or tail value this much above the previous period's is worth a look.
RISE_PCT = 20.0
# A statement taking this share of a database's time is where tuning pays first.
HEAVY_STATEMENT_PCT = 30.0
SLOWEST_QUERIES = 10


def performance_review(config: Config, settings: Settings, now: datetime) -> dict[str, Any]:
    """Review the week before `now`; a series or database that cannot be read is listed with
    its error, and the rest is still reviewed."""
    entries: list[dict[str, Any]] = []
    for spec in config.analysis.series:
        entries += _review_series(spec, settings, now)
    databases = [
        _review_database(name, config, config.analysis.review_reset_statements)
        for name in config.analysis.review_databases
    ]
    recommendations = [r for e in entries for r in e.get("recommendations", [])]
    recommendations += [r for d in databases for r in d.get("recommendations", [])]
    return {
        "kind": "performance",
        "period_start": (now - WEEK).isoformat(),
        "period_end": now.isoformat(),
        "series": entries,
        "databases": databases,
        "recommendations": recommendations or ["nothing needs action this week"],
    }


def _review_series(spec: SeriesConfig, settings: Settings, now: datetime) -> list[dict[str, Any]]:
    start = now - WEEK - timedelta(days=spec.baseline_days)
    try:
        fetched = sources.fetch(spec, start, now, settings)
    except SourceError as exc:
        log.warning("review series unreadable name=%s error=%s", spec.name, exc)
        return [{"key": spec.name, "name": spec.name, "labels": {}, "error": str(exc)}]
    if not fetched:
        error = "the source has no such series"
        return [{"key": spec.name, "name": spec.name, "labels": {}, "error": error}]
    counter = sources.is_counter(spec.query, spec.counter)
    return [
        review_values(
            spec,
            item.labels,
            anomaly.to_rate(item.values) if counter else anomaly.clean(item.values),
            now,
        )
        for item in fetched
    ]


def review_values(
    spec: SeriesConfig, labels: dict[str, str], values: pd.Series, now: datetime
) -> dict[str, Any]:
    """One series' week: its statistics against the period before, and its anomalies scored
    against that period's baseline (or the week's own when there is no earlier data)."""
    key = series_key(spec.name, labels)
    week_start = pd.Timestamp(now - WEEK)
    before = values[values.index <= week_start]
    week = values[values.index > week_start]
    entry: dict[str, Any] = {"key": key, "name": spec.name, "labels": labels}
    if week.empty:
        return entry | {
            "points": 0,
            "recommendations": [f"{key}: no data this week; check that its source still reports"],
        }

    against = None
    if len(before) >= anomaly.MIN_POINTS:
        against = anomaly.baseline(before.to_numpy(), spec.method)
    found = anomaly.detect(week, spec.method, spec.threshold, against=against)
    entry |= {
        "points": len(week),
        "week": _stats(week.to_numpy()),
        "before": _stats(before.to_numpy()) if len(before) else None,
        "baseline": {"method": spec.method, "center": found.center, "scale": found.scale},
        "anomalies": [
            {"timestamp": a.timestamp.isoformat(), "value": a.value, "score": a.score}
            for a in found.anomalies
        ],
        "skipped": found.skipped,
    }
    entry["change_pct"] = _changes(entry["week"], entry["before"])
    entry["recommendations"] = _series_advice(key, entry, spec)
    return entry


def _stats(values: np.ndarray) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {
        "median": float(p50),
        "p95": float(p95),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def _changes(week: dict[str, float], before: dict[str, float] | None) -> dict[str, float | None]:
    if before is None:
        return {"median": None, "p95": None}
    return {
        name: (
            round(100.0 * (week[name] - before[name]) / abs(before[name]), 1)
            if before[name]
            else None
        )
        for name in ("median", "p95")
    }


def _series_advice(key: str, entry: dict[str, Any], spec: SeriesConfig) -> list[str]:
    advice = []
    if entry["anomalies"]:
        worst = max(entry["anomalies"], key=lambda a: abs(a["score"]))
        advice.append(
            f"{key}: {len(entry['anomalies'])} anomalous points this week, worst"
            f" {worst['value']:g} at {worst['timestamp'][:16]} (score {worst['score']:+.1f});"
            " look at what changed then"
        )
    for stat, label in (("median", "typical value"), ("p95", "95th percentile")):
        change = entry["change_pct"][stat]
        if change is not None and change >= RISE_PCT:
            advice.append(
                f"{key}: {label} rose {change:g}% on the previous {spec.baseline_days:g} days"
                f" ({entry['before'][stat]:.4g} -> {entry['week'][stat]:.4g})"
            )
    return advice


def _review_database(name: str, config: Config, reset: bool) -> dict[str, Any]:
    from tasks.datachecks import PostgresParams
    from tasks.pgstats import slowest_queries

    found = config.checks.find(name)
    assert found is not None, "config check guarantees a postgres target"
    params = PostgresParams.model_validate(found[1].params)
    try:
        dsn = read_env_secret(params.dsn_env) if params.dsn_env else params.dsn
        assert dsn is not None
        stats = slowest_queries(dsn, limit=SLOWEST_QUERIES, reset=reset).to_json()
    except (KeyError, ValueError, SourceError) as exc:
        log.warning("review database unreadable name=%s error=%s", name, exc)
        return {"target": name, "available": False, "reason": str(exc), "queries": []}
    return {"target": name} | stats | {"recommendations": _database_advice(name, stats)}


def _database_advice(name: str, stats: dict[str, Any]) -> list[str]:
    if not stats.get("available"):
        return [f"{name}: slowest statements unknown: {stats.get('reason')}"]
    advice = []
    for query in stats["queries"]:
        share = float(query.get("share_pct") or 0.0)
        if share >= HEAVY_STATEMENT_PCT:
            advice.append(
                f"{name}: one statement takes {share:.0f}% of the database's time"
                f" ({query['calls']} calls, {query['mean_ms']:.1f} ms each): check its plan"
                f" with EXPLAIN (ANALYZE, BUFFERS): {str(query['query'])[:80]}"
            )
    return advice

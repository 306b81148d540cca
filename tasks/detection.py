"""Scheduled anomaly detection: new points scored against a baseline stored per series.

Each run collects a series' trailing window, scores the points that arrived since the previous
run against the stored baseline (built from earlier points, never from the ones scored), and
then either investigates (anomalies recorded, a finding raised, the baseline left as it was) or
updates the baseline from the window's normal points.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

import numpy as np
import pandas as pd

from tasks import anomaly, sources
from workers import findings
from workers.config import Config, SeriesConfig
from workers.db import Connection, Row, transaction
from workers.settings import Settings

log = logging.getLogger(__name__)

Status = Literal["normal", "anomalous", "learning", "idle"]
FINDING_PREFIX = "anomaly:"
# Labels caretaker sets on a finding; a series label of the same name is not copied over them.
RESERVED_LABELS = frozenset({"alertname", "series", "severity"})


@dataclass
class Judged:
    """What one run made of one series."""

    key: str
    name: str
    labels: dict[str, str]
    status: Status
    scored: int = 0
    anomalies: list[anomaly.Anomaly] = field(default_factory=list)
    center: float | None = None
    scale: float | None = None
    message: str = ""
    new_occurrence_id: int | None = None
    notification_ids: list[int] = field(default_factory=list)


def series_key(name: str, labels: dict[str, str]) -> str:
    """A series' stable identity: its configured name and, when a query returns several, its
    labels, as Prometheus writes them."""
    if not labels:
        return name
    inner = ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def detect_series(
    spec: SeriesConfig, now: datetime, settings: Settings, config: Config
) -> list[Judged]:
    """Collect, analyse and judge every series `spec` names, one transaction per series; the
    collection itself holds no transaction open while Prometheus answers."""
    start = now - timedelta(days=spec.baseline_days)
    fetched = sources.fetch(spec, start, now, settings)
    counter = sources.is_counter(spec.query, spec.counter)
    judged = []
    for item in fetched:
        values = anomaly.to_rate(item.values) if counter else anomaly.clean(item.values)
        with transaction() as conn:
            judged.append(
                judge(conn, spec, item.labels, values, now, settings.anomaly_interval_s, config)
            )
    return judged


def judge(
    conn: Connection,
    spec: SeriesConfig,
    labels: dict[str, str],
    values: pd.Series,
    now: datetime,
    interval_s: float,
    config: Config,
) -> Judged:
    """Score a series' new points against its stored baseline and act on the verdict."""
    key = series_key(spec.name, labels)
    judged = Judged(key=key, name=spec.name, labels=labels, status="idle")
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"baseline:{key}",))
    stored = conn.execute("SELECT * FROM series_baselines WHERE series_key = %s", (key,)).fetchone()
    excluded = _anomalous_times(conn, key, values)

    if stored is not None and stored["method"] == spec.method:
        cut = pd.Timestamp(stored["scored_until"])
        against = (float(stored["center"]), float(stored["scale"]))
    else:
        # A series seen for the first time (or with a new method): its baseline comes from the
        # window before the latest interval, and only that interval is scored.
        cut = pd.Timestamp(now - timedelta(seconds=interval_s))
        earlier = values[(values.index <= cut) & ~excluded]
        if len(earlier) < anomaly.MIN_POINTS:
            judged.status = "learning"
            judged.message = (
                f"learning: {len(earlier)} points before the latest interval,"
                f" at least {anomaly.MIN_POINTS} needed"
            )
            return judged
        against = anomaly.baseline(earlier.to_numpy(), spec.method)

    new = values[values.index > cut]
    judged.center, judged.scale = against
    if new.empty:
        judged.message = (
            "no new points since the previous run"
            if stored is not None
            else "no points in the latest interval yet"
        )
        return judged

    found = anomaly.detect(new, spec.method, spec.threshold, against=against)
    judged.scored = found.points
    judged.anomalies = found.anomalies
    scored_until = new.index[-1].to_pydatetime()
    if found.anomalies:
        judged.status = "anomalous"
        _record_anomalies(conn, judged, spec)
        _keep_baseline(conn, judged, spec, stored, against, values, scored_until)
        judged.message = _summary(judged, spec)
        judged.new_occurrence_id = findings.raise_finding(
            conn, FINDING_PREFIX + key, _finding_labels(spec.name, labels), judged.message
        )
    else:
        judged.status = "normal"
        normal = values[~_anomalous_times(conn, key, values)]
        updated = anomaly.baseline(normal.to_numpy(), spec.method)
        judged.center, judged.scale = updated
        _store_baseline(conn, judged, spec, updated, normal, scored_until)
        judged.message = f"{found.points} new points within |score| {spec.threshold:g}"
        judged.notification_ids = findings.clear_finding(
            conn, FINDING_PREFIX + key, f"{key} is back within its baseline", config
        )
    return judged


def _anomalous_times(conn: Connection, key: str, values: pd.Series) -> np.ndarray:
    """A mask of the points recorded as anomalous before, which a baseline never learns from."""
    if values.empty:
        return np.zeros(0, dtype=bool)
    rows = conn.execute(
        "SELECT at FROM anomalies WHERE series_key = %s AND at >= %s",
        (key, values.index[0].to_pydatetime()),
    ).fetchall()
    if not rows:
        return np.zeros(len(values), dtype=bool)
    known = pd.DatetimeIndex([row["at"] for row in rows], tz="UTC")
    return np.asarray(values.index.isin(known))


def _record_anomalies(conn: Connection, judged: Judged, spec: SeriesConfig) -> None:
    assert judged.center is not None and judged.scale is not None
    conn.cursor().executemany(
        """
        INSERT INTO anomalies (series_key, name, labels, at, value, score, method, center, scale)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (series_key, at) DO NOTHING
        """,
        [
            (
                judged.key,
                judged.name,
                json.dumps(judged.labels),
                found.timestamp.to_pydatetime(),
                found.value,
                found.score,
                spec.method,
                judged.center,
                judged.scale,
            )
            for found in judged.anomalies
        ],
    )


def _keep_baseline(
    conn: Connection,
    judged: Judged,
    spec: SeriesConfig,
    stored: Row | None,
    against: tuple[float, float],
    values: pd.Series,
    scored_until: datetime,
) -> None:
    # Investigate rather than learn: the baseline stays what it was; only the scored points
    # are marked done, so they are not scored again.
    if stored is not None and stored["method"] == spec.method:
        conn.execute(
            "UPDATE series_baselines SET scored_until = %s, updated_at = now()"
            " WHERE series_key = %s",
            (scored_until, judged.key),
        )
        return
    earlier = values[values.index <= scored_until]
    _store_baseline(conn, judged, spec, against, earlier, scored_until)


def _store_baseline(
    conn: Connection,
    judged: Judged,
    spec: SeriesConfig,
    baseline: tuple[float, float],
    window: pd.Series,
    scored_until: datetime,
) -> None:
    conn.execute(
        """
        INSERT INTO series_baselines (series_key, name, labels, method, center, scale, points,
                                      window_start, window_end, scored_until)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (series_key) DO UPDATE SET
            method = excluded.method, center = excluded.center, scale = excluded.scale,
            points = excluded.points, window_start = excluded.window_start,
            window_end = excluded.window_end, scored_until = excluded.scored_until,
            labels = excluded.labels, updated_at = now()
        """,
        (
            judged.key,
            judged.name,
            json.dumps(judged.labels),
            spec.method,
            baseline[0],
            baseline[1],
            len(window),
            window.index[0].to_pydatetime(),
            window.index[-1].to_pydatetime(),
            scored_until,
        ),
    )


def _finding_labels(name: str, labels: dict[str, str]) -> dict[str, str]:
    copied = {k: v for k, v in labels.items() if k not in RESERVED_LABELS}
    return copied | {"alertname": "Anomaly", "series": name, "severity": "warning"}


def _summary(judged: Judged, spec: SeriesConfig) -> str:
    worst = max(judged.anomalies, key=lambda found: abs(found.score))
    return (
        f"{judged.key}: {len(judged.anomalies)} of {judged.scored} new points over"
        f" |score| {spec.threshold:g} ({spec.method}); worst {worst.value:g} at"
        f" {worst.timestamp.isoformat()}, score {worst.score:+.1f} against"
        f" {judged.center:.4g} ± {judged.scale:.4g}"
    )

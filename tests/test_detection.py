"""Scheduled anomaly detection: stored baselines, findings, and the check-history source."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest

from tasks.detection import judge, series_key
from tests.conftest import wait_for
from workers.app import app
from workers.config import Config, SeriesConfig, get_config, parse_config
from workers.db import transaction
from workers.errors import ConfigError

Conn = psycopg.Connection[dict[str, Any]]

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
INTERVAL_S = 300.0
SPEC = SeriesConfig(name="api-latency", target="web", threshold=3.0)
CONFIG = Config()


def minutes(values: list[float] | np.ndarray, end: datetime = NOW) -> pd.Series:
    """Values one minute apart, the last at `end`."""
    index = pd.date_range(end=end, periods=len(values), freq="1min", tz="UTC")
    return pd.Series(np.asarray(values, dtype=float), index=index)


def noise(count: int) -> np.ndarray:
    # A fixed pattern around 100, so the baselines below are known exactly.
    return 100.0 + np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], count // 5 + 1)[:count]


def run(series: pd.Series, now: datetime = NOW, spec: SeriesConfig = SPEC) -> Any:
    with transaction() as conn:
        return judge(conn, spec, {}, series, now, INTERVAL_S, CONFIG)


def baseline_row(db: Conn, key: str = "api-latency") -> dict[str, Any]:
    row = db.execute("SELECT * FROM series_baselines WHERE series_key = %s", (key,)).fetchone()
    assert row is not None
    return row


def test_too_few_earlier_points_is_learning_and_stores_nothing(db: Conn) -> None:
    judged = run(minutes(noise(10)))  # 10 points, only 5 before the latest 5-minute interval

    assert judged.status == "learning"
    assert "5 points before the latest interval" in judged.message
    assert db.execute("SELECT count(*) AS n FROM series_baselines").fetchone() == {"n": 0}


def test_a_planted_spike_in_the_new_points_is_found_against_the_earlier_window(db: Conn) -> None:
    values = noise(60)
    values[-2] = 180.0  # one minute before the end: inside the latest interval
    judged = run(minutes(values))

    assert judged.status == "anomalous"
    assert [(a.timestamp, a.value) for a in judged.anomalies] == [
        (pd.Timestamp(NOW - timedelta(minutes=1)), 180.0)
    ]
    # The baseline is the 55 earlier points only: median 100, MAD 1 -> spread 1.4826.
    assert judged.center == 100.0
    assert judged.scale == 1.4826
    stored = db.execute("SELECT at, value, score, center, scale FROM anomalies").fetchall()
    assert stored == [
        {
            "at": NOW - timedelta(minutes=1),
            "value": 180.0,
            "score": round(80 / 1.4826, 3),
            "center": 100.0,
            "scale": 1.4826,
        }
    ]
    row = baseline_row(db)
    assert (row["center"], row["scale"], row["scored_until"]) == (100.0, 1.4826, NOW)


def test_an_anomalous_series_holds_one_finding_and_the_baseline_does_not_learn_from_it(
    db: Conn,
) -> None:
    values = noise(60)
    values[-1] = 180.0
    first = run(minutes(values))
    # Five minutes on, the series is still far off: the finding goes on, nothing new opens.
    later = np.concatenate([values, [175.0, 178.0, 176.0, 181.0, 179.0]])
    second = run(minutes(later, NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5))

    assert first.status == second.status == "anomalous"
    assert first.new_occurrence_id is not None
    assert second.new_occurrence_id is None
    assert len(second.anomalies) == 5
    occurrences = db.execute(
        "SELECT source, fingerprint, status, labels FROM occurrences"
    ).fetchall()
    assert occurrences == [
        {
            "source": "analysis",
            "fingerprint": "anomaly:api-latency",
            "status": "firing",
            "labels": {"alertname": "Anomaly", "series": "api-latency", "severity": "warning"},
        }
    ]
    row = baseline_row(db)
    assert (row["center"], row["scale"]) == (100.0, 1.4826)
    assert row["scored_until"] == NOW + timedelta(minutes=5)


def test_normal_new_points_update_the_baseline_without_the_anomalies_and_clear_the_finding(
    db: Conn,
) -> None:
    values = noise(60)
    values[-1] = 180.0
    run(minutes(values))
    later = np.concatenate([values, [101.0, 101.0, 101.0, 101.0, 101.0]])
    judged = run(minutes(later, NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5))

    assert judged.status == "normal"
    # Learnt from the 64 normal points: the 180 is left out, the five 101s are in.
    normal = np.concatenate([noise(60)[:-1], [101.0] * 5])
    median = float(np.median(normal))
    assert judged.center == median
    assert judged.scale == 1.4826 * float(np.median(np.abs(normal - median)))
    row = baseline_row(db)
    assert (row["center"], row["points"]) == (median, 64)
    occurrence = db.execute("SELECT status FROM occurrences").fetchone()
    assert occurrence == {"status": "resolved"}


def test_new_points_already_scored_are_not_scored_again(db: Conn) -> None:
    values = noise(60)
    values[-1] = 180.0
    run(minutes(values))
    again = run(minutes(values))  # the same data: nothing after scored_until

    assert again.status == "idle"
    assert again.message == "no new points since the previous run"
    assert db.execute("SELECT count(*) AS n FROM anomalies").fetchone() == {"n": 1}


def test_a_flat_series_stores_a_positive_spread_and_a_jump_away_from_it_is_found(
    db: Conn,
) -> None:
    values = np.full(60, 50.0)
    values[-1] = 50.5  # 1% off a line that never moved
    judged = run(minutes(values))

    assert judged.status == "anomalous"
    assert [a.value for a in judged.anomalies] == [50.5]
    row = baseline_row(db)
    assert row["center"] == 50.0
    assert row["scale"] == 50.0 * 1e-3  # the floor, never zero or NaN
    assert np.isfinite(judged.anomalies[0].score)


def test_non_finite_new_points_are_masked_not_scored(db: Conn) -> None:
    values = noise(60)
    values[-3:] = [np.nan, np.inf, -np.inf]
    judged = run(minutes(values))

    assert judged.status == "normal"
    assert judged.scored == 2  # the last five minutes hold two finite points
    assert db.execute("SELECT count(*) AS n FROM anomalies").fetchone() == {"n": 0}


def test_points_are_placed_by_their_timestamps_across_a_gap(db: Conn) -> None:
    early = minutes(noise(40), NOW - timedelta(hours=2))  # an hour and a half of silence
    late = minutes([100.0, 100.0, 190.0], NOW)
    judged = run(pd.concat([early, late]))

    # Only the three points after the gap are new; the early ones form the baseline.
    assert judged.scored == 3
    assert [a.timestamp for a in judged.anomalies] == [pd.Timestamp(NOW)]


def test_labels_make_separate_series_with_their_own_baselines(db: Conn) -> None:
    with transaction() as conn:
        judge(conn, SPEC, {"endpoint": "/a"}, minutes(noise(60)), NOW, INTERVAL_S, CONFIG)
        judge(conn, SPEC, {"endpoint": "/b"}, minutes(noise(60) * 10), NOW, INTERVAL_S, CONFIG)

    keys = [
        r["series_key"] for r in db.execute("SELECT series_key FROM series_baselines ORDER BY 1")
    ]
    assert keys == ['api-latency{endpoint="/a"}', 'api-latency{endpoint="/b"}']
    assert series_key("x", {"b": "2", "a": 'q"1'}) == 'x{a="q\\"1",b="2"}'


def test_a_changed_method_builds_a_new_baseline(db: Conn) -> None:
    run(minutes(noise(60)))
    zscore = SeriesConfig(name="api-latency", target="web", method="zscore")
    judged = run(minutes(noise(65), NOW + timedelta(minutes=5)), NOW + timedelta(minutes=5), zscore)

    assert judged.status == "normal"
    assert baseline_row(db)["method"] == "zscore"


def test_detection_reads_the_check_history_and_escalates_on_a_real_worker(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    # The session's configuration watches the `web` target's values as `web-latency`.
    assert get_config().analysis.series[0].target == "web"
    now = datetime.now(UTC)
    history = noise(120)
    history[-1] = 400.0
    rows = [
        (
            "web",
            "application",
            "http",
            "healthy",
            float(v),
            "ok",
            0.01,
            now - timedelta(minutes=119 - i),
        )
        for i, v in enumerate(history)
    ]
    db.cursor().executemany(
        """
        INSERT INTO check_results (target, grp, check_name, status, value, summary, duration_s,
                                   checked_at)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        """,
        rows,
    )

    sent = app.send_task("caretaker.analysis.detect_anomalies", ignore_result=False)
    result = sent.get(timeout=60)

    assert result["web-latency"]["status"] == "anomalous"
    incident = wait_for(
        lambda: db.execute("SELECT source, dedup_key, status FROM incidents").fetchone(),
        what="the anomaly to be escalated",
    )
    assert incident == {"source": "analysis", "dedup_key": "anomaly:web-latency", "status": "open"}
    [found] = db.execute("SELECT value FROM anomalies").fetchall()
    assert found == {"value": 400.0}


def test_config_check_names_a_series_on_an_unknown_target() -> None:
    data = {"analysis": {"series": [{"name": "x", "target": "nope"}, {"name": "x", "query": "up"}]}}
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    problems = raised.value.problems
    assert "analysis.series[0].target: no check target named 'nope'" in problems
    assert "analysis.series[1].name: 'x' is used twice" in problems


def test_the_finding_of_a_series_no_longer_configured_is_cleared(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    gone = SeriesConfig(name="retired", target="web")
    values = noise(60)
    values[-1] = 180.0
    assert run(minutes(values), spec=gone).status == "anomalous"

    app.send_task("caretaker.analysis.detect_anomalies", ignore_result=False).get(timeout=60)

    rows = db.execute("SELECT fingerprint, status FROM occurrences").fetchall()
    assert rows == [{"fingerprint": "anomaly:retired", "status": "resolved"}]
    reason = db.execute("SELECT message FROM events WHERE kind = 'occurrence_resolved'").fetchone()
    assert reason == {"message": "retired removed from the configuration"}


def test_the_finding_of_a_label_set_no_longer_reported_is_cleared(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    from workers.findings import raise_finding

    gone = 'anomaly:web-latency{pod="p2"}'
    other = "anomaly:web-latency-p95"  # another series whose name merely starts the same
    with transaction() as conn:
        raise_finding(conn, gone, {"alertname": "Anomaly"}, "p2 was far off")
        raise_finding(conn, other, {"alertname": "Anomaly"}, "still far off")

    app.send_task("caretaker.analysis.detect_anomalies", ignore_result=False).get(timeout=60)

    rows = db.execute("SELECT fingerprint, status FROM occurrences ORDER BY id").fetchall()
    assert rows == [
        {"fingerprint": gone, "status": "resolved"},
        {"fingerprint": other, "status": "resolved"},  # not configured at all: removed
    ]
    reasons = [
        r["message"]
        for r in db.execute(
            "SELECT message FROM events WHERE kind = 'occurrence_resolved' ORDER BY id"
        )
    ]
    assert reasons == [
        'web-latency{pod="p2"} is no longer reported by its source',
        "web-latency-p95 removed from the configuration",
    ]

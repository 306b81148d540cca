"""The capacity plan and the weekly performance review, over the check history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import pytest

from tasks.capacity import capacity_report
from tasks.review import performance_review
from tests.conftest import ROOT
from workers.config import get_config, parse_config
from workers.settings import get_settings

Conn = psycopg.Connection[dict[str, Any]]

NOW = datetime.now(UTC).replace(microsecond=0)


def record(
    db: Conn, values: list[float] | np.ndarray, every: timedelta, target: str = "web"
) -> None:
    """Check results of `target`, `every` apart, the last one at NOW."""
    count = len(values)
    db.cursor().executemany(
        """
        INSERT INTO check_results (target, grp, check_name, status, value, summary, duration_s,
                                   checked_at)
        VALUES (%s, 'application', 'http', 'healthy', %s, 'ok', 0.01, %s)
        """,
        [(target, float(v), NOW - every * (count - 1 - i)) for i, v in enumerate(values)],
    )


def caretaker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_capacity_forecasts_the_written_slope_with_days_to_threshold_and_level(db: Conn) -> None:
    # 30 days of hourly values rising 2 per day from 100: 160 now.
    hours = np.arange(30 * 24 + 1)
    record(db, 100.0 + 2.0 * hours / 24, timedelta(hours=1))

    report = capacity_report(get_config(), get_settings(), NOW)

    [entry] = report["series"]
    assert entry["key"] == "web-latency"
    assert entry["points"] == 721
    assert entry["slope_per_day"] == pytest.approx(2.0, abs=1e-9)
    assert entry["current"] == pytest.approx(160.0, abs=1e-6)
    assert entry["days_to_threshold"] == 70.0  # (300 - 160) / 2
    assert entry["forecast"] == pytest.approx(340.0, abs=1e-6)  # 90 days on
    assert entry["level"] == "warning"  # 340 of a capacity of 400 is 85%
    assert entry["recommendation"] == "warning: plan within a month (85% of capacity in 90 days)"
    assert report["overall"] == "warning"


def test_a_series_that_cannot_be_read_is_listed_with_its_error_and_the_rest_planned(
    db: Conn,
) -> None:
    record(db, [10.0, 11.0, 12.0, 13.0], timedelta(days=1))
    config = parse_config(
        get_config().model_dump(mode="json")
        | {
            "analysis": {
                "capacity": [
                    {"name": "disk", "query": "node_filesystem_avail_bytes", "threshold": 1},
                    {"name": "web", "target": "web", "threshold": 20, "capacity": 1000},
                ]
            }
        }
    )

    report = capacity_report(config, get_settings(), NOW)

    by_name = {e["name"]: e for e in report["series"]}
    assert by_name["disk"]["error"].startswith("a query needs Prometheus")
    assert by_name["web"]["slope_per_day"] == pytest.approx(1.0)
    assert by_name["web"]["days_to_threshold"] == 7.0
    assert by_name["web"]["level"] == "ok"  # 103 in 90 days is 10% of 1000
    assert report["series"][-1]["name"] == "disk"  # errors last, after every level


def test_reports_capacity_now_stores_and_the_plain_command_prints_the_latest(db: Conn) -> None:
    record(db, 100.0 + 2.0 * np.arange(15), timedelta(days=1))

    built = caretaker("reports", "capacity", "--now", "--json")
    shown = caretaker("reports", "capacity")

    assert built.returncode == 0, built.stderr
    stored = json.loads(built.stdout)
    assert stored["series"][0]["slope_per_day"] == pytest.approx(2.0)
    assert shown.returncode == 0, shown.stderr
    assert "web-latency" in shown.stdout
    assert "300 in 86 d" in shown.stdout  # (300 - 128) / 2
    row = db.execute("SELECT kind FROM reports").fetchone()
    assert row == {"kind": "capacity"}


def test_no_stored_report_is_a_clear_error(db: Conn) -> None:
    done = caretaker("reports", "performance")

    assert done.returncode == 1
    assert "no performance report stored yet" in done.stderr


def test_the_weekly_review_compares_the_week_with_the_baseline_and_lists_anomalies(
    db: Conn,
) -> None:
    # The session's series `web-latency` has a one-day baseline: a day around 100 before the
    # week, then a week around 130 with one spike.
    pattern = np.tile([-2.0, -1.0, 0.0, 1.0, 2.0], 400)
    before = 100.0 + pattern[:24]
    week = 130.0 + pattern[: 7 * 24]
    week[-10] = 400.0
    record(db, np.concatenate([before, week]), timedelta(hours=1))

    report = performance_review(get_config(), get_settings(), NOW)

    [entry] = report["series"]
    assert entry["points"] == 7 * 24
    assert entry["week"]["median"] == 130.0
    assert entry["before"]["median"] == 100.0
    assert entry["change_pct"]["median"] == 30.0
    # Scored against the day before: every point of the week is far off it.
    assert entry["baseline"]["center"] == 100.0
    assert len(entry["anomalies"]) == 7 * 24
    spike = NOW - timedelta(hours=9)
    assert max(entry["anomalies"], key=lambda a: a["score"])["timestamp"] == spike.isoformat()
    assert any(
        "typical value rose 30% on the previous 1 days" in r for r in report["recommendations"]
    )


def test_a_series_without_data_this_week_is_reported_so(db: Conn) -> None:
    report = performance_review(get_config(), get_settings(), NOW)

    [entry] = report["series"]
    assert entry["points"] == 0
    assert report["recommendations"] == [
        "web-latency: no data this week; check that its source still reports"
    ]

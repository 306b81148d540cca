"""The daily health report from stored results, as a task and on the command line."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
from click.testing import CliRunner

from tasks.health import report_daily
from workers import health
from workers.cli import cli
from workers.config import CheckTarget, get_config
from workers.db import transaction

Conn = psycopg.Connection[dict[str, Any]]
WEB = CheckTarget(name="web", check="http", params={"url": "http://127.0.0.1:1/"})
DISK = CheckTarget(name="system", check="system")


def record(target: CheckTarget, group: str, *statuses: str) -> None:
    for status in statuses:
        result = {
            "status": status,
            "value": 1.0,
            "summary": f"was {status}",
            "details": {},
            "duration_s": 0.1,
        }
        with transaction() as conn:
            health.record_result(conn, group, target, result, get_config())


def test_the_report_summarises_each_target(db: Conn) -> None:
    record(WEB, "application", "healthy", "healthy", "critical", "healthy")
    record(DISK, "host", "healthy", "warning", "critical")
    db.execute(
        "INSERT INTO check_results (target, grp, check_name, status, summary, duration_s,"
        " checked_at) VALUES ('web', 'application', 'http', 'critical', 'old', 0,"
        " now() - interval '2 days')"
    )

    report = json.loads(CliRunner().invoke(cli, ["reports", "health", "--json"]).output)

    assert report["overall"] == "critical"
    assert [
        (t["target"], t["results"], t["healthy_pct"], t["worst"], t["latest"], t["episodes"])
        for t in report["targets"]
    ] == [
        ("web", 4, 75.0, "critical", "healthy", 1),
        ("system", 3, 33.3, "critical", "critical", 1),
    ]
    # Turning critical within an episode opened the one incident.
    assert report["incidents"] == {"opened": 1, "resolved": 0, "open": 1}


def test_the_text_report_names_every_target(db: Conn) -> None:
    record(WEB, "application", "healthy")
    record(DISK, "host", "healthy")

    output = CliRunner().invoke(cli, ["reports", "health"]).output

    assert "overall healthy" in output
    assert "web" in output and "100.0% healthy of 1" in output


def test_a_configured_target_without_results_is_reported_not_checked(db: Conn) -> None:
    record(WEB, "application", "healthy")

    report = json.loads(CliRunner().invoke(cli, ["reports", "health", "--json"]).output)

    assert report["overall"] == "unknown"
    assert [(t["target"], t["results"], t["latest_summary"]) for t in report["targets"]] == [
        ("web", 1, "was healthy"),
        ("system", 0, "not checked in this period"),
    ]


def test_an_episode_that_began_before_the_period_is_counted(db: Conn) -> None:
    record(WEB, "application", "critical")
    db.execute("UPDATE occurrences SET starts_at = now() - interval '3 days'")

    report = json.loads(CliRunner().invoke(cli, ["reports", "health", "--json"]).output)

    assert report["targets"][0]["episodes"] == 1


def test_a_period_out_of_range_is_refused(db: Conn) -> None:
    result = CliRunner().invoke(cli, ["reports", "health", "--hours", "-1"])

    assert result.exit_code == 2
    assert "--hours" in result.output


def test_the_daily_task_stores_the_report(db: Conn) -> None:
    record(WEB, "application", "warning")

    report_id = report_daily.run()

    row = db.execute(
        "SELECT kind, body, period_end FROM reports WHERE id = %s", (report_id,)
    ).fetchone()
    assert row is not None
    assert row["kind"] == "health"
    assert row["body"]["targets"][0]["target"] == "web"
    assert (datetime.now(UTC) - row["period_end"]).total_seconds() < 60

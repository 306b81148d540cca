"""Change windows: planned changes wait for one, durably, and start when it opens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis

from tasks import sweeper
from tasks.alerts import route_one
from tests.conftest import queued_tasks
from workers.config import ChangeWindow, Config, get_config, parse_config
from workers.db import transaction
from workers.errors import ConfigError
from workers.occurrences import close_occurrences
from workers.windows import next_opening, open_window

Conn = psycopg.Connection[dict[str, Any]]

SUNDAYS = ChangeWindow(name="sunday-night", cron="0 2 * * sun", duration_h=4)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "open_"),
    [
        ("2026-12-06T01:59:59", False),  # a Sunday, just before
        ("2026-12-06T02:00:00", True),
        ("2026-12-06T05:59:59", True),
        ("2026-12-06T06:00:00", False),
        ("2026-12-05T03:00:00", False),  # a Saturday
    ],
)
def test_a_window_is_open_from_its_start_for_its_duration(now: str, open_: bool) -> None:
    assert (open_window([SUNDAYS], at(now)) is SUNDAYS) is open_


def test_the_next_opening_is_the_earliest_of_the_windows() -> None:
    monthly = ChangeWindow(name="monthly", cron="0 22 1 * *", duration_h=2)

    assert next_opening([SUNDAYS, monthly], at("2026-11-30T12:00:00")) == at("2026-12-01T22:00:00")
    assert next_opening([], at("2026-11-30T12:00:00")) is None


def test_a_bad_cron_expression_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config({"change_windows": [{"name": "w", "cron": "every sunday", "duration_h": 2}]})

    assert raised.value.problems == [
        "change_windows[0].cron: 'every sunday' is not a cron expression"
        " (minute hour day month weekday)"
    ]


def planned_hotfix(db: Conn, severity: str = "warning") -> int:
    """An advisory finding with a known fix, as the security scan raises it."""
    labels = {
        "alertname": "SecurityAdvisory",
        "target": "demo",
        "package": "caretaker-demo",
        "advisory": "GHSA-planned-1",
        "fixed_version": "1.1",
        "severity": severity,
    }
    row = db.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations)
        VALUES ('analysis', 'security:demo:caretaker-demo:GHSA-planned-1', now(), 'firing', %s,
                '{}') RETURNING id
        """,
        (json.dumps(labels),),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def with_windows(*windows: ChangeWindow) -> Config:
    return get_config().model_copy(update={"change_windows": list(windows)})


CLOSED = ChangeWindow(name="never-now", cron="0 0 29 2 *", duration_h=1)
ALWAYS = ChangeWindow(name="always", cron="* * * * *", duration_h=1)


def test_a_planned_hotfix_waits_in_postgresql_while_no_window_is_open(
    db: Conn, broker: redis.Redis
) -> None:
    occurrence_id = planned_hotfix(db)

    with transaction() as conn:
        first = route_one(conn, occurrence_id, with_windows(CLOSED))

    assert first is None
    run = db.execute("SELECT runbook, status, waiting_for FROM runs").fetchone()
    assert run == {"runbook": "hotfix:demo", "status": "waiting", "waiting_for": "change window"}
    steps = db.execute("SELECT name, status, dispatched_at FROM steps ORDER BY position").fetchall()
    assert (steps[0]["name"], steps[0]["status"], steps[0]["dispatched_at"]) == (
        "record",
        "waiting",
        None,
    )
    assert {s["status"] for s in steps[1:]} == {"pending"}
    assert queued_tasks(broker, "remediation") == []


def test_a_critical_hotfix_does_not_wait_for_a_window(db: Conn) -> None:
    occurrence_id = planned_hotfix(db, severity="critical")

    with transaction() as conn:
        first = route_one(conn, occurrence_id, with_windows(CLOSED))

    assert first is not None
    assert db.execute("SELECT status FROM runs").fetchone() == {"status": "running"}


def test_when_a_window_opens_the_waiting_runs_start(
    db: Conn, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    occurrence_id = planned_hotfix(db)
    with transaction() as conn:
        route_one(conn, occurrence_id, with_windows(CLOSED))

    monkeypatch.setattr(sweeper, "get_config", lambda: with_windows(CLOSED))
    assert sweeper.open_change_windows() == 0
    monkeypatch.setattr(sweeper, "get_config", lambda: with_windows(ALWAYS))
    assert sweeper.open_change_windows() == 1
    assert sweeper.open_change_windows() == 0  # nothing waits any more

    run = db.execute("SELECT status, waiting_for FROM runs").fetchone()
    assert run == {"status": "running", "waiting_for": None}
    step = db.execute("SELECT id, status FROM steps WHERE name = 'record'").fetchone()
    assert step is not None and step["status"] == "pending"
    assert queued_tasks(broker, "remediation") == [("caretaker.runs.execute_step", [step["id"]])]
    kinds = [r["kind"] for r in db.execute("SELECT kind FROM events WHERE run_id IS NOT NULL")]
    assert kinds[-2:] == ["run_waiting", "run_resumed"]


def test_a_waiting_run_whose_alert_resolved_is_cancelled_not_started(
    db: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    occurrence_id = planned_hotfix(db)
    with transaction() as conn:
        route_one(conn, occurrence_id, with_windows(CLOSED))
        closed = conn.execute(
            "UPDATE occurrences SET status = 'resolved' WHERE id = %s RETURNING id, fingerprint",
            (occurrence_id,),
        ).fetchall()
        close_occurrences(conn, "analysis", closed, "fixed by hand", get_config())

    monkeypatch.setattr(sweeper, "get_config", lambda: with_windows(ALWAYS))
    assert sweeper.open_change_windows() == 0
    assert db.execute("SELECT status FROM runs").fetchone() == {"status": "cancelled"}


def test_a_waiting_planned_run_never_holds_back_an_urgent_hotfix(db: Conn) -> None:
    planned = planned_hotfix(db)
    with transaction() as conn:
        route_one(conn, planned, with_windows(CLOSED))
    urgent = db.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations)
        SELECT source, 'urgent', starts_at, status,
               labels || '{"severity": "critical", "advisory": "GHSA-urgent-1"}', annotations
          FROM occurrences WHERE id = %s RETURNING id
        """,
        (planned,),
    ).fetchone()
    assert urgent is not None

    with transaction() as conn:
        first = route_one(conn, urgent["id"], with_windows(CLOSED))

    assert first is not None
    statuses = db.execute("SELECT status FROM runs ORDER BY id").fetchall()
    assert [r["status"] for r in statuses] == ["waiting", "running"]


def test_a_person_cancels_a_waiting_run_and_a_finished_one_is_refused(db: Conn) -> None:
    from click.testing import CliRunner

    from workers.cli import cli

    occurrence_id = planned_hotfix(db)
    with transaction() as conn:
        route_one(conn, occurrence_id, with_windows(CLOSED))
    run = db.execute("SELECT id FROM runs").fetchone()
    assert run is not None

    done = CliRunner().invoke(cli, ["runs", "cancel", str(run["id"]), "--by", "ops"])
    again = CliRunner().invoke(cli, ["runs", "cancel", str(run["id"])])

    assert (done.exit_code, done.output) == (0, f"run {run['id']} cancelled\n")
    row = db.execute("SELECT status, waiting_for FROM runs").fetchone()
    assert row == {"status": "cancelled", "waiting_for": None}
    skipped = db.execute("SELECT DISTINCT status, error FROM steps").fetchall()
    assert skipped == [{"status": "skipped", "error": "cancelled by ops"}]
    assert again.exit_code == 1
    assert again.output == (
        f"Error: run {run['id']} is cancelled: only a running or waiting run can be cancelled\n"
    )

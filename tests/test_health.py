"""The health flow on the real PostgreSQL: history, episodes, and what findings become."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import redis

from tasks.alerts import route_one
from tests.conftest import HEALTH_PORT
from workers import health, incidents
from workers.config import CheckTarget, Config, get_config
from workers.db import transaction

Conn = psycopg.Connection[dict[str, Any]]
WEB = CheckTarget(name="web", check="http", params={"url": f"http://127.0.0.1:{HEALTH_PORT}/"})
DB = CheckTarget(name="main-db", check="postgres")


def result(status: str, summary: str = "reading") -> dict[str, Any]:
    return {"status": status, "value": 1.0, "summary": summary, "details": {}, "duration_s": 0.01}


def record(target: CheckTarget, status: str, group: str = "application") -> health.Recorded:
    with transaction() as conn:
        return health.record_result(conn, group, target, result(status), get_config())


def route(occurrence_id: int) -> Any:
    with transaction() as conn:
        return route_one(conn, occurrence_id, get_config())


def occurrences(db: Conn) -> list[tuple[str, str, str]]:
    rows = db.execute("SELECT fingerprint, status, labels FROM occurrences ORDER BY id")
    return [(r["fingerprint"], r["status"], r["labels"]["severity"]) for r in rows]


def test_healthy_results_are_history_only(db: Conn) -> None:
    recorded = record(WEB, "healthy")

    assert recorded == health.Recorded()
    rows = db.execute("SELECT target, grp, check_name, status FROM check_results").fetchall()
    assert rows == [
        {"target": "web", "grp": "application", "check_name": "http", "status": "healthy"}
    ]
    assert occurrences(db) == []


def test_a_warning_with_a_recovering_runbook_runs_it(db: Conn) -> None:
    recorded = record(WEB, "warning")
    assert recorded.new_occurrence_id is not None

    first = route(recorded.new_occurrence_id)

    assert first is not None and first.kind == "recover"
    assert db.execute("SELECT runbook FROM runs").fetchone() == {"runbook": "web-slow"}
    assert occurrences(db) == [("web", "firing", "warning")]


def test_a_warning_nothing_recovers_is_recorded_not_escalated(db: Conn) -> None:
    recorded = record(DB, "warning", group="database")
    assert recorded.new_occurrence_id is not None

    assert route(recorded.new_occurrence_id) is None
    assert db.execute("SELECT count(*) AS n FROM runs").fetchone() == {"n": 0}
    kinds = [e["kind"] for e in db.execute("SELECT kind FROM events ORDER BY id")]
    assert kinds == ["occurrence_received", "not_routed"]


def test_a_critical_result_escalates_and_healthy_resolves_it(db: Conn) -> None:
    recorded = record(DB, "critical", group="database")
    assert recorded.new_occurrence_id is not None
    first = route(recorded.new_occurrence_id)
    assert first is not None and first.kind == "escalate"
    incident = _escalate_now(db, first.id)

    healed = record(DB, "healthy", group="database")

    assert occurrences(db) == [("main-db", "resolved", "critical")]
    row = db.execute(
        "SELECT status, resolved_by, source FROM incidents WHERE id = %s", (incident,)
    ).fetchone()
    assert row == {"status": "resolved", "resolved_by": "check", "source": "check"}
    assert len(healed.notification_ids) == 1


def test_one_episode_per_target_while_it_stays_unhealthy(db: Conn) -> None:
    first = record(WEB, "warning")
    again = record(WEB, "warning")
    worse = record(WEB, "critical")
    still = record(WEB, "critical")

    assert first.new_occurrence_id is not None
    assert again.new_occurrence_id is None and worse.new_occurrence_id is None
    assert occurrences(db) == [("web", "firing", "critical")]
    # Turning critical opens the incident at once; staying critical adds nothing.
    assert db.execute("SELECT count(*) AS n FROM incidents").fetchone() == {"n": 1}
    assert len(worse.notification_ids) == 1 and still.notification_ids == []


def test_after_recovery_a_new_episode_is_a_new_occurrence(db: Conn) -> None:
    record(WEB, "warning")
    record(WEB, "healthy")
    time.sleep(0.01)
    record(WEB, "warning")

    assert occurrences(db) == [("web", "resolved", "warning"), ("web", "firing", "warning")]


def test_overlapping_rounds_open_one_episode(db: Conn) -> None:
    threads = [threading.Thread(target=record, args=(WEB, "critical")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert occurrences(db) == [("web", "firing", "critical")]
    assert db.execute("SELECT count(*) AS n FROM check_results").fetchone() == {"n": 8}


def test_history_older_than_the_retention_is_pruned(db: Conn) -> None:
    record(WEB, "healthy")
    record(WEB, "healthy")
    db.execute("UPDATE check_results SET checked_at = now() - interval '40 days' WHERE id = 1")

    with transaction() as conn:
        pruned = health.prune_history(conn, keep_days=30)

    assert pruned == 1
    assert [r["id"] for r in db.execute("SELECT id FROM check_results")] == [2]


def _escalate_now(db: Conn, step_id: int) -> int:
    from tasks.runs import execute_step

    execute_step.run(step_id)
    row = db.execute("SELECT id FROM incidents").fetchone()
    assert row is not None
    return int(row["id"])


def test_config_without_checks_still_checks_the_host() -> None:
    assert [(g, t.name, t.check) for g, t in Config().checks.targets()] == [
        ("host", "system", "system")
    ]


def test_a_round_checks_every_target_and_closes_removed_ones(db: Conn, broker: redis.Redis) -> None:
    from tasks.health import run_round

    db.execute(
        "INSERT INTO occurrences (source, fingerprint, starts_at, status, labels)"
        " VALUES ('check', 'gone', now(), 'firing', '{\"severity\": \"warning\"}')"
    )

    checked = run_round.run()

    assert checked == 2
    rows = db.execute("SELECT target FROM check_results ORDER BY target").fetchall()
    assert [r["target"] for r in rows] == ["system", "web"]
    gone = db.execute("SELECT status FROM occurrences WHERE fingerprint = 'gone'").fetchone()
    assert gone == {"status": "resolved"}
    beat = db.execute("SELECT 1 AS ok FROM heartbeats WHERE name = 'health_round'").fetchone()
    assert beat == {"ok": 1}


def test_a_round_is_skipped_while_the_previous_one_runs(db: Conn, broker: redis.Redis) -> None:
    from tasks.health import run_round

    held = broker.lock("caretaker:health-round", timeout=30)
    assert held.acquire(blocking=False)
    try:
        assert run_round.run() == 0
    finally:
        held.release()
    assert db.execute("SELECT count(*) AS n FROM check_results").fetchone() == {"n": 0}


def test_a_warning_incident_turning_critical_is_raised(db: Conn) -> None:
    with transaction() as conn:
        for severity, title in (("warning", "slow"), ("critical", "down"), ("warning", "slow")):
            health_incident = incidents.escalate(
                conn,
                source="check",
                dedup_key="web",
                severity=severity,
                title=title,
                labels={},
                reason=title,
                truncated_alerts=0,
                config=get_config(),
            )

    row = db.execute("SELECT id, severity, title FROM incidents").fetchone()
    assert row == {"id": health_incident.incident_id, "severity": "critical", "title": "down"}


def test_a_target_still_critical_after_a_person_resolved_it_is_escalated_again(
    db: Conn,
) -> None:
    record(WEB, "warning")
    record(WEB, "critical")
    db.execute("UPDATE incidents SET status = 'resolved', resolved_by = 'alice'")

    again = record(WEB, "critical")
    quiet = record(WEB, "critical")

    statuses = [r["status"] for r in db.execute("SELECT status FROM incidents ORDER BY id")]
    assert statuses == ["resolved", "open"]
    assert len(again.notification_ids) == 1 and quiet.notification_ids == []

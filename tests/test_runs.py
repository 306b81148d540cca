"""The run state machine on the real PostgreSQL, without a worker: claims, results, leases."""

from __future__ import annotations

from typing import Any

import psycopg
import redis

from tasks.alerts import route_one
from tasks.sweeper import sweep_lost_work
from tests.conftest import alert, notification, queued_tasks, service_alert
from workers import runs
from workers.config import get_config
from workers.db import transaction
from workers.occurrences import record_notification
from workers.payloads import Notification
from workers.runs import Outcome, StepRef

Conn = psycopg.Connection[dict[str, Any]]


def routed_run(*alerts: dict[str, Any]) -> StepRef:
    """Record the alerts and route the first; return its first step."""
    with transaction() as conn:
        recorded = record_notification(
            conn, Notification.model_validate(notification(*alerts)), get_config()
        )
        first = route_one(conn, recorded.new_ids[0], get_config())
    assert first is not None
    return first


def claim(step: StepRef) -> runs.Claim:
    with transaction() as conn:
        found = runs.claim_step(conn, step.id, "worker:test", lease_s=60)
    assert found is not None
    return found


def finish(found: runs.Claim, outcome: Outcome) -> list[StepRef]:
    with transaction() as conn:
        return runs.finish_step(conn, found, outcome, "worker:test")


def steps(db: Conn) -> list[tuple[str, str]]:
    rows = db.execute("SELECT name, status FROM steps ORDER BY position").fetchall()
    return [(row["name"], row["status"]) for row in rows]


def test_labels_reach_parameters_only_as_whole_arguments(db: Conn) -> None:
    routed_run(service_alert("p1", "8080"))

    row = db.execute("SELECT params FROM steps WHERE name = 'restart'").fetchone()
    assert row is not None
    assert row["params"]["argv"][2] == "8080"


def test_a_step_is_claimed_once(db: Conn) -> None:
    first = routed_run(service_alert("c1", "1"))

    claim(first)
    with transaction() as conn:
        again = runs.claim_step(conn, first.id, "worker:other", lease_s=60)

    assert again is None
    assert steps(db)[0] == ("diagnose", "running")


def test_success_dispatches_the_next_step_and_failure_plans_escalation(db: Conn) -> None:
    first = routed_run(service_alert("s1", "1"))

    [second] = finish(claim(first), Outcome(ok=True, result={"status": "critical"}))
    [escalation] = finish(claim(second), Outcome(ok=False, result={}, error="exit 3"))

    assert escalation.kind == "escalate"
    assert steps(db) == [
        ("diagnose", "succeeded"),
        ("restart", "failed"),
        ("confirm", "skipped"),
        ("escalate", "pending"),
    ]
    row = db.execute("SELECT result, error FROM steps WHERE name = 'restart'").fetchone()
    assert row == {"result": {}, "error": "exit 3"}


def test_last_success_recovers_the_run(db: Conn) -> None:
    step = routed_run(service_alert("r1", "1"))

    for _ in range(3):
        following = finish(claim(step), Outcome(ok=True, result={}))
        step = following[0] if following else step

    assert following == []
    assert db.execute("SELECT status FROM runs").fetchone() == {"status": "recovered"}


def test_a_cancelled_run_claims_nothing(db: Conn) -> None:
    first = routed_run(service_alert("x1", "1"))
    db.execute("UPDATE runs SET status = 'cancelled'")

    with transaction() as conn:
        found = runs.claim_step(conn, first.id, "worker:test", lease_s=60)

    assert found is None
    assert steps(db)[0] == ("diagnose", "pending")


def test_a_result_after_the_lease_was_lost_is_discarded(db: Conn) -> None:
    first = routed_run(service_alert("d1", "1"))
    stale = claim(first)
    db.execute("UPDATE steps SET status = 'pending' WHERE id = %s", (first.id,))
    claim(first)

    assert finish(stale, Outcome(ok=False, result={}, error="late")) == []
    assert steps(db)[0] == ("diagnose", "running")
    kinds = [
        e["kind"] for e in db.execute("SELECT kind FROM events WHERE step_id = %s", (first.id,))
    ]
    assert "step_result_discarded" in kinds


def test_idempotent_step_whose_lease_expired_is_run_again(db: Conn, broker: redis.Redis) -> None:
    first = routed_run(service_alert("l1", "1"))
    claim(first)
    db.execute(
        "UPDATE steps SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (first.id,)
    )

    counts = sweep_lost_work()

    assert counts["steps"] == 1
    step = db.execute("SELECT status, tries FROM steps WHERE id = %s", (first.id,)).fetchone()
    assert step == {"status": "pending", "tries": 1}
    assert [args for _, args in queued_tasks(broker, "checks")] == [[first.id]]
    kinds = [
        e["kind"] for e in db.execute("SELECT kind FROM events WHERE step_id = %s", (first.id,))
    ]
    assert kinds == ["step_started", "step_requeued"]


def test_sweeper_sends_unrouted_occurrences_after_the_grace(db: Conn, broker: redis.Redis) -> None:
    with transaction() as conn:
        payload = Notification.model_validate(notification(alert(fingerprint="u")))
        record_notification(conn, payload, get_config())
    db.execute("UPDATE occurrences SET received_at = now() - interval '1 hour'")

    counts = sweep_lost_work()

    assert counts["occurrences"] == 1
    assert queued_tasks(broker, "alerts") == [("caretaker.alerts.route_occurrences", [[1]])]
    assert db.execute("SELECT at FROM heartbeats WHERE name = 'sweeper'").fetchone() is not None


def test_an_alert_lacking_a_label_the_runbook_needs_is_escalated_not_run(db: Conn) -> None:
    first = routed_run(alert("ServiceDown", fingerprint="m1"))

    assert first.kind == "escalate"
    run = db.execute("SELECT runbook FROM runs").fetchone()
    step = db.execute("SELECT params FROM steps").fetchone()
    assert run == {"runbook": "default-escalate"}
    assert step is not None
    assert step["params"]["reason"].startswith("runbook service-down cannot run for this alert: ")
    assert "step restart: the alert has no labels.port" in step["params"]["reason"]


def test_sweeper_waits_longer_for_work_in_a_queue_that_is_still_busy(
    db: Conn, broker: redis.Redis
) -> None:
    with transaction() as conn:
        payload = Notification.model_validate(notification(alert(fingerprint="q")))
        record_notification(conn, payload, get_config())
    db.execute("UPDATE occurrences SET received_at = now() - interval '30 seconds'")
    broker.lpush("alerts", b"another message still waiting its turn")

    busy = sweep_lost_work()
    broker.delete("alerts")
    idle = sweep_lost_work()

    # 30 s is past the grace (1 s in the tests) but within the visibility timeout (300 s).
    assert (busy["occurrences"], idle["occurrences"]) == (0, 1)


def test_a_result_with_a_nul_byte_is_stored(db: Conn) -> None:
    first = routed_run(service_alert("n1", "1"))

    finish(claim(first), Outcome(ok=False, result={"stdout": "a\x00b"}, error="exit\x001"))

    row = db.execute("SELECT result, error FROM steps WHERE id = %s", (first.id,)).fetchone()
    assert row == {"result": {"stdout": "a\ufffdb"}, "error": "exit\ufffd1"}


def test_a_lost_step_of_a_cancelled_run_is_skipped_not_run_again(
    db: Conn, broker: redis.Redis
) -> None:
    first = routed_run(service_alert("c2", "1"))
    claim(first)
    db.execute("UPDATE runs SET status = 'cancelled'")
    db.execute(
        "UPDATE steps SET lease_expires_at = now() - interval '1 second' WHERE id = %s", (first.id,)
    )

    counts = sweep_lost_work()

    assert counts["steps"] == 0
    step = db.execute("SELECT status FROM steps WHERE id = %s", (first.id,)).fetchone()
    assert step == {"status": "skipped"}
    assert queued_tasks(broker, "checks") == []

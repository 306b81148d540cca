"""The webhook against the real PostgreSQL and Redis: what Alertmanager sends, what is stored."""

from __future__ import annotations

import base64
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from tasks.alerts import route_one
from tests.conftest import alert, notification, queued_tasks, service_alert
from workers import incidents
from workers.config import get_config
from workers.db import transaction
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]
ROUTE = "caretaker.alerts.route_occurrences"


@pytest.fixture
def client(db: Conn) -> TestClient:
    return TestClient(create_app(Settings()))


def post(client: TestClient, payload: Any) -> Any:
    return client.post("/api/v1/alerts", json=payload)


def occurrences(db: Conn) -> list[dict[str, Any]]:
    return db.execute("SELECT * FROM occurrences ORDER BY id").fetchall()


def routed_ids(broker: redis.Redis) -> list[int]:
    return [i for name, args in queued_tasks(broker, "alerts") if name == ROUTE for i in args[0]]


def open_incident(conn: Any, fingerprint: str) -> incidents.Escalation:
    return incidents.escalate(
        conn,
        source="alertmanager",
        dedup_key=fingerprint,
        severity="critical",
        title="t",
        labels={},
        reason="test",
        truncated_alerts=0,
        config=get_config(),
    )


def test_firing_alert_is_recorded_and_routing_dispatched(
    client: TestClient, db: Conn, broker: redis.Redis
) -> None:
    answer = post(client, notification(alert(fingerprint="a1", instance="web-1")))

    assert answer.status_code == 200
    assert answer.json()["new"] == 1
    [row] = occurrences(db)
    assert (row["fingerprint"], row["status"], row["source"]) == ("a1", "firing", "alertmanager")
    assert row["labels"] == {"alertname": "TestAlert", "instance": "web-1"}
    assert row["annotations"] == {"summary": "TestAlert is happening"}
    assert routed_ids(broker) == [row["id"]]


def test_unknown_keys_are_ignored(client: TestClient, db: Conn, broker: redis.Redis) -> None:
    payload = notification(alert(fingerprint="a1") | {"silencedBy": [], "newField": {"x": 1}})
    payload["someFutureKey"] = "value"

    answer = post(client, payload)

    assert answer.status_code == 200
    assert len(occurrences(db)) == 1
    assert len(routed_ids(broker)) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"alerts": [', "malformed json"),
        (b"[]", "must be a json object"),
        (b'{"version": "4", "status": "firing"}', "no 'alerts'"),
        (b'{"alerts": [{"status": "firing"}]}', "alerts.0.labels"),
        (
            b'{"alerts": [{"status": "pending", "labels": {},'
            b' "startsAt": "2026-01-01T00:00:00Z"}]}',
            "alerts.0.status",
        ),
        (b'{"alerts": "none"}', "alerts"),
    ],
)
def test_bad_payload_is_400_and_records_nothing(
    client: TestClient, db: Conn, broker: redis.Redis, body: bytes, message: str
) -> None:
    answer = client.post("/api/v1/alerts", content=body)

    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert occurrences(db) == []
    assert queued_tasks(broker, "alerts") == []


def test_each_alert_is_handled_by_its_own_status(client: TestClient, db: Conn) -> None:
    payload = notification(alert(fingerprint="a1"), alert(fingerprint="a2", status="resolved"))
    payload["status"] = "resolved"

    answer = post(client, payload)

    assert (answer.json()["new"], answer.json()["ignored"]) == (1, 1)
    statuses = [(r["fingerprint"], r["status"], r["routed_at"] is None) for r in occurrences(db)]
    assert statuses == [("a1", "firing", True), ("a2", "resolved", False)]


def test_repeats_add_nothing(client: TestClient, db: Conn, broker: redis.Redis) -> None:
    payload = notification(alert(fingerprint="a1"), alert(fingerprint="a2"))

    first = post(client, payload)
    second = post(client, payload)

    assert (first.json()["new"], first.json()["deduplicated"]) == (2, 0)
    assert (second.json()["new"], second.json()["deduplicated"]) == (0, 2)
    assert len(occurrences(db)) == 2
    assert sorted(routed_ids(broker)) == [1, 2]
    assert db.execute("SELECT count(*) AS n FROM events").fetchone() == {"n": 2}


def test_same_fingerprint_with_new_starts_at_is_a_new_occurrence(
    client: TestClient, db: Conn
) -> None:
    post(client, notification(alert(fingerprint="a1", starts_at="2026-12-01T10:00:00Z")))
    post(client, notification(alert(fingerprint="a1", starts_at="2026-12-01T12:00:00Z")))

    rows = occurrences(db)
    assert [r["fingerprint"] for r in rows] == ["a1", "a1"]
    assert rows[0]["starts_at"] != rows[1]["starts_at"]


def test_zero_ends_at_means_no_end(client: TestClient, db: Conn) -> None:
    post(client, notification(alert(fingerprint="a1")))

    [row] = occurrences(db)
    assert row["ends_at"] is None


def test_resolved_alert_closes_occurrence_cancels_run_and_resolves_incident(
    client: TestClient, db: Conn, broker: redis.Redis
) -> None:
    post(client, notification(service_alert("a1", "1")))
    [row] = occurrences(db)
    with transaction() as conn:
        first = route_one(conn, row["id"], get_config())
        assert first is not None
        incident = open_incident(conn, "a1")
    broker.flushdb()

    answer = post(client, notification(service_alert("a1", "1", status="resolved")))

    assert answer.json()["resolved"] == 1
    [row] = occurrences(db)
    assert row["status"] == "resolved"
    assert row["ends_at"] is not None
    run = db.execute("SELECT * FROM runs").fetchone()
    assert run is not None and run["status"] == "cancelled"
    steps = db.execute("SELECT status FROM steps ORDER BY position").fetchall()
    assert [s["status"] for s in steps] == ["skipped", "skipped", "skipped"]
    found = db.execute("SELECT status FROM incidents WHERE id = %s", (incident.incident_id,))
    assert found.fetchone() == {"status": "resolved"}
    sent = db.execute("SELECT event FROM notifications ORDER BY id").fetchall()
    assert [row["event"] for row in sent] == ["opened", "resolved"]
    assert [args for _, args in queued_tasks(broker, "incidents")] == [[2]]
    # A resolved alert never triggers recovery: nothing but its notification is dispatched.
    assert queued_tasks(broker, "alerts") == []
    assert queued_tasks(broker, "remediation") == []


def test_resolved_alert_never_seen_firing_is_accepted_and_ignored(
    client: TestClient, db: Conn, broker: redis.Redis
) -> None:
    answer = post(client, notification(alert(fingerprint="zz", status="resolved")))
    late = post(client, notification(alert(fingerprint="zz")))

    assert answer.status_code == 200
    assert answer.json()["ignored"] == 1
    # Kept as resolved, so the firing notification arriving late is a repeat, not new work.
    assert (late.json()["new"], late.json()["deduplicated"]) == (0, 1)
    assert [(r["fingerprint"], r["status"]) for r in occurrences(db)] == [("zz", "resolved")]
    assert queued_tasks(broker, "alerts") == []
    assert db.execute("SELECT count(*) AS n FROM runs").fetchone() == {"n": 0}


def test_truncated_alerts_are_recorded_and_shown_on_the_incident(
    client: TestClient, db: Conn
) -> None:
    post(client, notification(alert(fingerprint="a1")))
    with transaction() as conn:
        incident = open_incident(conn, "a1")

    post(client, notification(alert(fingerprint="a1"), truncated=250))

    [row] = occurrences(db)
    assert row["truncated_alerts"] == 250
    found = db.execute(
        "SELECT truncated_alerts FROM incidents WHERE id = %s", (incident.incident_id,)
    ).fetchone()
    assert found == {"truncated_alerts": 250}
    kinds = [
        e["kind"]
        for e in db.execute(
            "SELECT kind FROM events WHERE incident_id = %s", (incident.incident_id,)
        )
    ]
    assert "alerts_truncated" in kinds


def test_a_group_of_thousands_is_one_batch(
    client: TestClient, db: Conn, broker: redis.Redis
) -> None:
    alerts = [alert(fingerprint=f"fp{i}", instance=f"host-{i}") for i in range(3000)]

    answer = post(client, notification(*alerts))

    assert answer.status_code == 200
    assert answer.json()["new"] == 3000
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 3000}
    # Routing goes out in batches, not one message per alert.
    messages = [args for name, args in queued_tasks(broker, "alerts") if name == ROUTE]
    assert len(messages) == 6
    assert sorted(i for args in messages for i in args[0]) == list(range(1, 3001))


def test_body_over_the_limit_is_413(db: Conn) -> None:
    client = TestClient(create_app(Settings(webhook_max_body_bytes=2048)))
    alerts = [alert(fingerprint=f"fp{i}") for i in range(50)]

    answer = post(client, notification(*alerts))

    assert answer.status_code == 413
    assert "too large" in answer.json()["error"]
    assert occurrences(db) == []


@pytest.fixture
def guarded(db: Conn) -> TestClient:
    settings = Settings(webhook_token="s3cret", webhook_username="am", webhook_password="pw")
    return TestClient(create_app(settings))


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (None, 401),
        ("Bearer wrong", 401),
        ("Bearer s3cret", 200),
        ("Basic " + base64.b64encode(b"am:pw").decode(), 200),
        ("Basic " + base64.b64encode(b"am:nope").decode(), 401),
        ("Basic !!!", 401),
    ],
)
def test_auth_as_alertmanager_sends_it(
    guarded: TestClient, db: Conn, header: str | None, status: int
) -> None:
    headers = {"Authorization": header} if header else {}

    answer = guarded.post("/api/v1/alerts", json=notification(alert()), headers=headers)

    assert answer.status_code == status
    assert len(occurrences(db)) == (1 if status == 200 else 0)


def test_healthz_reports_database_and_broker(client: TestClient) -> None:
    answer = client.get("/healthz")

    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_alerts(client: TestClient) -> None:
    samples = (
        "caretaker_alerts_new_total",
        "caretaker_alerts_deduplicated_total",
        'caretaker_webhook_rejected_total{reason="bad_payload"}',
        "caretaker_webhook_commit_seconds_count",
    )
    before = client.get("/metrics").text

    post(client, notification(alert(fingerprint="m1")))
    post(client, notification(alert(fingerprint="m1")))
    client.post("/api/v1/alerts", content=b"{")
    after = client.get("/metrics").text

    assert [metric(after, s) - metric(before, s) for s in samples] == [1, 1, 1, 2]


def test_a_nul_byte_in_one_alert_does_not_cost_the_group(client: TestClient, db: Conn) -> None:
    poisoned = alert(fingerprint="p1", instance="a\u0000b")
    poisoned["annotations"]["summary"] = "bad\u0000byte"

    answer = post(client, notification(poisoned, alert(fingerprint="p2")))

    assert answer.status_code == 200
    rows = occurrences(db)
    assert [r["fingerprint"] for r in rows] == ["p1", "p2"]
    assert rows[0]["labels"]["instance"] == "a\ufffdb"
    assert rows[0]["annotations"]["summary"] == "bad\ufffdbyte"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (notification(alert(), truncated=2**40), "truncatedAlerts"),
        (notification(alert(fingerprint="f" * 300)), "alerts.0.fingerprint"),
    ],
)
def test_out_of_range_values_are_400(
    client: TestClient, db: Conn, payload: dict[str, Any], message: str
) -> None:
    answer = post(client, payload)

    assert answer.status_code == 400
    assert message in answer.json()["error"]
    assert occurrences(db) == []


def test_deeply_nested_json_is_400(client: TestClient, db: Conn) -> None:
    answer = client.post("/api/v1/alerts", content=b"[" * 100_000 + b"]" * 100_000)

    assert answer.status_code == 400
    assert answer.json()["error"] == "malformed json: nested too deeply"


def test_one_instant_in_two_time_zones_is_one_occurrence(client: TestClient, db: Conn) -> None:
    utc = alert(fingerprint="tz", starts_at="2026-12-01T08:15:00Z")
    paris = alert(fingerprint="tz", starts_at="2026-12-01T09:15:00+01:00")

    answer = post(client, notification(utc, paris))

    assert answer.status_code == 200
    assert (answer.json()["new"], answer.json()["deduplicated"]) == (1, 1)
    assert len(occurrences(db)) == 1


def test_duplicates_within_one_payload_are_counted(client: TestClient, db: Conn) -> None:
    answer = post(client, notification(*[alert(fingerprint="same")] * 50))

    assert (answer.json()["alerts"], answer.json()["new"], answer.json()["deduplicated"]) == (
        50,
        1,
        49,
    )

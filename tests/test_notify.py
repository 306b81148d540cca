"""Escalation notifies through the one notifier, retried, recorded on the timeline."""

from __future__ import annotations

import subprocess
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from tests.conftest import NotifySink, alert, notification, wait_for
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture
def client(db: Conn, worker: subprocess.Popen[bytes]) -> TestClient:
    return TestClient(create_app(Settings()))


def timeline_kinds(db: Conn, incident_id: int) -> list[str]:
    rows = db.execute("SELECT kind FROM events WHERE incident_id = %s ORDER BY id", (incident_id,))
    return [row["kind"] for row in rows]


def test_an_opened_incident_is_notified(client: TestClient, db: Conn, sink: NotifySink) -> None:
    client.post("/api/v1/alerts", json=notification(alert("Unmatched", fingerprint="n1")))

    wait_for(lambda: sink.received, timeout_s=30, what="the notification")
    [sent] = sink.received
    incident = db.execute("SELECT * FROM incidents").fetchone()
    assert incident is not None
    assert sent["event"] == "opened"
    assert sent["dedup_key"] == "alertmanager:n1"
    assert sent["incident"]["id"] == incident["id"]
    assert sent["incident"]["title"] == "Unmatched is happening"
    wait_for(
        lambda: "notified" in timeline_kinds(db, incident["id"]),
        timeout_s=10,
        what="the notified event",
    )
    row = db.execute("SELECT status, attempts FROM notifications").fetchone()
    assert row == {"status": "sent", "attempts": 1}


def test_a_refusing_channel_is_retried_then_recorded_as_failed(
    client: TestClient, db: Conn, sink: NotifySink
) -> None:
    sink.status = 500
    client.post("/api/v1/alerts", json=notification(alert("Unmatched", fingerprint="n2")))

    row = wait_for(
        lambda: db.execute("SELECT * FROM notifications WHERE status = 'failed'").fetchone(),
        timeout_s=30,
        what="the notification to fail",
    )

    # CARETAKER_NOTIFY_MAX_RETRIES is 1 in the tests: the first try and one retry.
    assert row["attempts"] == 2
    assert "answered 500" in row["error"]
    assert len(sink.received) == 2
    assert "notify_failed" in timeline_kinds(db, row["incident_id"])
    # The incident itself stands, whatever happened to its notification.
    status = db.execute("SELECT status FROM incidents WHERE id = %s", (row["incident_id"],))
    assert status.fetchone() == {"status": "open"}

"""Races between Alertmanager's notifications and the workers, on a real worker."""

from __future__ import annotations

import subprocess
from typing import Any

import psycopg
from fastapi.testclient import TestClient

from tests.conftest import alert, notification, wait_for
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]


def test_an_alert_resolving_while_it_escalates_leaves_no_open_incident(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    client = TestClient(create_app(Settings()))
    for i in range(60):
        firing = alert("Unmatched", fingerprint=f"race-{i}")
        client.post("/api/v1/alerts", json=notification(firing))
        client.post(
            "/api/v1/alerts",
            json=notification(alert("Unmatched", status="resolved", fingerprint=f"race-{i}")),
        )

    wait_for(
        lambda: (
            not db.execute(
                "SELECT 1 FROM runs WHERE status IN ('running', 'waiting')"
                " UNION ALL SELECT 1 FROM occurrences WHERE routed_at IS NULL"
            ).fetchone()
        ),
        timeout_s=60,
        what="every run to settle",
    )

    # Each alert resolved: whatever escalated before that was resolved with it.
    stranded = db.execute("SELECT id FROM incidents WHERE status <> 'resolved'").fetchall()
    assert stranded == []

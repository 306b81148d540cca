"""Lost work is found again: a flushed broker, a killed worker, an expired lease."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from tasks.sweeper import sweep_lost_work
from tests.conftest import alert, notification, queued_tasks, wait_for
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]


def run_statuses(db: Conn) -> list[str]:
    return [row["status"] for row in db.execute("SELECT status FROM runs ORDER BY id")]


def test_flushed_queues_after_2xx_still_get_every_occurrence_run(
    db: Conn, broker: redis.Redis, request: pytest.FixtureRequest
) -> None:
    client = TestClient(create_app(Settings()))
    alerts = [alert("Unmatched", fingerprint=f"lost-{i}") for i in range(20)]
    assert client.post("/api/v1/alerts", json=notification(*alerts)).status_code == 200
    assert len(queued_tasks(broker, "alerts")) == 1

    broker.flushdb()  # what a Redis restart without persistence does
    request.getfixturevalue("worker")
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM occurrences WHERE received_at < now() - interval '1 second'"
        ).fetchone(),
        timeout_s=5,
        what="the dispatch grace to pass",
    )
    counts = sweep_lost_work()

    assert counts["occurrences"] == 20
    wait_for(
        lambda: run_statuses(db) == ["escalated"] * 20, timeout_s=60, what="all 20 runs to escalate"
    )
    open_incidents = db.execute("SELECT count(*) AS n FROM incidents WHERE status = 'open'")
    assert open_incidents.fetchone() == {"n": 20}
    # A second pass finds nothing more to do.
    assert sweep_lost_work() == {"occurrences": 0, "steps": 0, "notifications": 0}

"""A worker killed in the middle of a step: the lease runs out and a person decides."""

from __future__ import annotations

import subprocess
from typing import Any

import psutil
import psycopg
import pytest
import redis
from fastapi.testclient import TestClient

from tests.conftest import Processes, alert, celery_worker, notification, wait_for
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]


def run_statuses(db: Conn) -> list[str]:
    return [row["status"] for row in db.execute("SELECT status FROM runs ORDER BY id")]


def test_killed_worker_leaves_outcome_unknown_and_escalates(
    db: Conn, broker: redis.Redis, processes: Processes, request: pytest.FixtureRequest
) -> None:
    victim = processes.start(
        celery_worker("alerts,remediation", 1),
        name="victim",
    )
    client = TestClient(create_app(Settings()))
    client.post("/api/v1/alerts", json=notification(alert("SlowCheck", fingerprint="k1")))
    wait_for(
        lambda: db.execute("SELECT 1 FROM steps WHERE status = 'running'").fetchone(),
        timeout_s=30,
        what="the slow step to start",
    )

    for process in [
        *psutil.Process(victim.pid).children(recursive=True),
        psutil.Process(victim.pid),
    ]:
        process.kill()
    victim.wait()
    request.getfixturevalue("worker")
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM steps WHERE status = 'running' AND lease_expires_at < now()"
        ).fetchone(),
        timeout_s=30,
        what="the lease to expire",
    )
    from tasks.sweeper import sweep_lost_work

    sweep_lost_work()

    wait_for(lambda: run_statuses(db) == ["escalated"], timeout_s=30, what="escalation")
    step = db.execute("SELECT status, error FROM steps WHERE position = 0").fetchone()
    assert step is not None and step["status"] == "failed"
    assert "outcome unknown" in step["error"]
    # The command is not run twice: one start, no requeue.
    kinds = [
        e["kind"]
        for e in db.execute("SELECT kind FROM events WHERE step_id IS NOT NULL ORDER BY id")
    ]
    assert kinds.count("step_requeued") == 0
    assert db.execute("SELECT count(*) AS n FROM incidents").fetchone() == {"n": 1}


def test_a_live_worker_renews_the_lease_of_a_long_step(
    db: Conn, broker: redis.Redis, worker: subprocess.Popen[bytes]
) -> None:
    from tasks.sweeper import sweep_lost_work

    client = TestClient(create_app(Settings()))
    client.post("/api/v1/alerts", json=notification(alert("LongStep", fingerprint="r1")))
    started = wait_for(
        lambda: db.execute("SELECT started_at FROM steps WHERE status = 'running'").fetchone(),
        timeout_s=30,
        what="the long step to start",
    )

    # Past the first lease (CARETAKER_LEASE_S is 6 in the tests), the step is still held.
    wait_for(
        lambda: db.execute(
            "SELECT 1 WHERE now() > %s + interval '7 seconds'", (started["started_at"],)
        ).fetchone(),
        timeout_s=15,
        what="the first lease to pass",
    )
    assert sweep_lost_work()["steps"] == 0

    wait_for(lambda: run_statuses(db) == ["recovered"], timeout_s=30, what="the run to finish")
    step = db.execute("SELECT tries, status FROM steps").fetchone()
    assert step == {"tries": 1, "status": "succeeded"}

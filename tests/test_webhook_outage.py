"""The webhook while PostgreSQL is down: 503 so Alertmanager retries; the retry is not doubled."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Processes, alert, notification, wait_for
from tests.services import PrivatePostgres, PrivateRedis
from workers.app import BROKER_TIMEOUT_S
from workers.db import migrate


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    migrate(server.url)
    yield server
    server.destroy()


def count_occurrences(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM occurrences").fetchone()
        assert row is not None
        return int(row[0])


def test_database_down_is_503_and_the_retry_records_once(
    private_pg: PrivatePostgres, processes: Processes
) -> None:
    url = processes.webhook(
        {"CARETAKER_DATABASE_URL": private_pg.url, "CARETAKER_DB_CONNECT_TIMEOUT_S": "2"}
    )
    payload = notification(alert(fingerprint="outage-1"), alert(fingerprint="outage-2"))
    assert httpx.post(f"{url}/api/v1/alerts", json=payload, timeout=10).status_code == 200

    private_pg.stop()
    down = httpx.post(
        f"{url}/api/v1/alerts", json=notification(alert(fingerprint="outage-3")), timeout=10
    )
    health = httpx.get(f"{url}/healthz", timeout=10)

    assert down.status_code == 503
    assert "retry" in down.json()["error"]
    assert health.status_code == 503
    assert health.json()["database"] != "ok"

    private_pg.start()
    # Alertmanager retries the whole group, including what was recorded before the outage.
    retry = notification(
        alert(fingerprint="outage-1"), alert(fingerprint="outage-2"), alert(fingerprint="outage-3")
    )
    again = wait_for(
        lambda: _accepted(httpx.post(f"{url}/api/v1/alerts", json=retry, timeout=10)),
        timeout_s=40,
        what="the webhook to accept again",
    )

    assert (again.json()["new"], again.json()["deduplicated"]) == (1, 2)
    assert count_occurrences(private_pg.url) == 3


def _accepted(answer: httpx.Response) -> httpx.Response | None:
    return answer if answer.status_code == 200 else None


def test_broker_down_answers_promptly_and_the_sweeper_sends_later(
    db: psycopg.Connection[Any], processes: Processes
) -> None:
    private = PrivateRedis()
    private.start()
    url = processes.webhook({"CARETAKER_BROKER_URL": private.url})
    private.stop()

    answers = []
    for i in range(20):
        started = time.monotonic()
        answer = httpx.post(
            f"{url}/api/v1/alerts", json=notification(alert(fingerprint=f"b{i}")), timeout=30
        )
        answers.append((answer.status_code, time.monotonic() - started))

    # Recorded in PostgreSQL, so 200; the broker is never waited on within a request, and
    # after the first refusal not even tried for a while.
    assert [status for status, _ in answers] == [200] * 20
    assert max(elapsed for _, elapsed in answers) < BROKER_TIMEOUT_S + 2
    row = db.execute("SELECT count(*) AS n FROM occurrences WHERE routed_at IS NULL").fetchone()
    assert row == {"n": 20}

"""caretaker's check of itself against the real broker, database and worker processes."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import psycopg
import redis

from tasks.selfchecks import QueuesParams, check_queues

Conn = psycopg.Connection[dict[str, Any]]
QUEUE = "caretaker-test-queue"


def params(**changes: Any) -> QueuesParams:
    return QueuesParams(queues=[QUEUE], worker_timeout_s=1, **changes)


def beat_and_sweeper_alive(db: Conn, age_s: float = 1) -> None:
    db.execute(
        "INSERT INTO heartbeats (name, at) VALUES ('beat', now() - make_interval(secs => %s)),"
        " ('sweeper', now() - make_interval(secs => %s))",
        (age_s, age_s),
    )


def test_no_worker_answering_is_critical(db: Conn, broker: redis.Redis) -> None:
    beat_and_sweeper_alive(db)

    result = check_queues(params())

    assert result.status == "critical"
    assert result.details["workers"] == []
    assert "0 workers answer, 1 expected" in result.summary


def test_all_alive_and_flowing_is_healthy(
    db: Conn, broker: redis.Redis, worker: subprocess.Popen[bytes]
) -> None:
    beat_and_sweeper_alive(db)

    result = check_queues(params())

    assert result.status == "healthy"
    assert len(result.details["workers"]) == 1
    assert result.details["depths"] == {QUEUE: 0}


def test_a_deep_queue_is_a_finding(
    db: Conn, broker: redis.Redis, worker: subprocess.Popen[bytes]
) -> None:
    beat_and_sweeper_alive(db)
    broker.lpush(QUEUE, *[b"m"] * 150)
    broker.lpush(QUEUE + "\x06\x163", *[b"m"] * 10)

    warning = check_queues(params())
    broker.lpush(QUEUE, *[b"m"] * 1000)
    critical = check_queues(params())

    assert (warning.status, warning.details["depths"]) == ("warning", {QUEUE: 160})
    assert (critical.status, critical.value) == ("critical", 1160.0)
    assert f"queue {QUEUE} holds 1160 messages" in critical.summary


def test_a_silent_beat_is_critical_and_a_missing_one_a_warning(
    db: Conn, broker: redis.Redis, worker: subprocess.Popen[bytes]
) -> None:
    never = check_queues(params())
    beat_and_sweeper_alive(db, age_s=3600)
    silent = check_queues(params())

    assert never.status == "warning"
    assert "beat has never run" in never.summary
    assert silent.status == "critical"
    assert re.search(r"beat silent for 360\ds; sweeper silent for 360\ds", silent.summary)


def test_an_unreachable_broker_is_critical_within_the_deadline(db: Conn) -> None:
    from tests.services import PrivateRedis
    from workers.settings import get_settings

    private = PrivateRedis()
    private.start()
    private.stop()
    settings = get_settings()
    original = settings.broker_url
    object.__setattr__(settings, "broker_url", private.url)
    try:
        result = check_queues(params(timeout_s=1))
    finally:
        object.__setattr__(settings, "broker_url", original)

    assert result.status == "critical"
    assert "cannot read queue depths" in result.summary

"""Benchmark: recording an Alertmanager notification against a bare INSERT of the same rows.

Prints, per group size, the time caretaker takes to validate and commit a notification (new
alerts, then the same notification repeated) as a ratio of a bare baseline measured in the same
run: one INSERT ... SELECT of the same rows into a table without constraints, events or checks.
Needs PostgreSQL (CARETAKER_BENCH_PG, default postgresql://postgres@127.0.0.1:5432).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

SERVER = os.environ.get("CARETAKER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
DATABASE_URL = f"{SERVER}/caretaker_bench"
os.environ["CARETAKER_DATABASE_URL"] = DATABASE_URL

from workers.config import Config  # noqa: E402
from workers.db import migrate, transaction  # noqa: E402
from workers.occurrences import record_notification  # noqa: E402
from workers.payloads import Notification  # noqa: E402

SIZES = (10, 100, 1000, 10000)
ROUNDS = 5


def payload(size: int, round_no: int) -> dict[str, Any]:
    alerts = [
        {
            "status": "firing",
            "labels": {
                "alertname": "HostDown",
                "instance": f"host-{i}:9100",
                "job": "node",
                "severity": "critical",
            },
            "annotations": {"summary": f"host-{i} is down"},
            "startsAt": f"2026-12-01T{round_no:02d}:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus/graph",
            "fingerprint": f"{round_no:02d}{i:014x}",
        }
        for i in range(size)
    ]
    return {"version": "4", "groupKey": "bench", "truncatedAlerts": 0, "alerts": alerts}


def bare_insert(body: bytes) -> None:
    data = json.loads(body)
    rows = [
        {"fingerprint": a["fingerprint"], "starts_at": a["startsAt"], "labels": a["labels"]}
        for a in data["alerts"]
    ]
    with BARE.transaction():
        BARE.execute(
            "INSERT INTO bench_bare SELECT * FROM jsonb_to_recordset(%s::jsonb)"
            " AS x(fingerprint text, starts_at timestamptz, labels jsonb)",
            (json.dumps(rows),),
        )


def caretaker_record(body: bytes) -> None:
    notification = Notification.model_validate_json(body)
    with transaction() as conn:
        record_notification(conn, notification, Config())


def timed(func: Callable[[bytes], None], body: bytes) -> float:
    started = time.perf_counter()
    func(body)
    return time.perf_counter() - started


def reset() -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_bare"
            " (fingerprint text, starts_at timestamptz, labels jsonb)"
        )
        conn.execute(
            "TRUNCATE bench_bare, events, notifications, steps, runs, occurrences,"
            " incidents RESTART IDENTITY CASCADE"
        )


BARE: psycopg.Connection[Any]


def main() -> None:
    global BARE
    migrate(DATABASE_URL)
    # Both sides keep their connection open: the bare one here, caretaker's in its pool.
    BARE = psycopg.connect(DATABASE_URL, autocommit=True)
    print(
        f"{'alerts':>7} {'bare ms':>9} {'new ms':>9} {'ratio':>6} {'repeat ms':>10} "
        f"{'ratio':>6} {'us/alert':>9}"
    )
    for size in SIZES:
        reset()
        bare, new, repeat = [], [], []
        for round_no in range(ROUNDS):
            body = json.dumps(payload(size, round_no)).encode()
            bare.append(timed(bare_insert, body))
            new.append(timed(caretaker_record, body))
            repeat.append(timed(caretaker_record, body))
        b, n, r = (statistics.median(x) * 1000 for x in (bare, new, repeat))
        print(
            f"{size:>7} {b:>9.2f} {n:>9.2f} {n / b:>6.2f} {r:>10.2f} {r / b:>6.2f} "
            f"{n * 1000 / size:>9.1f}"
        )


if __name__ == "__main__":
    main()

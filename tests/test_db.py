"""Storage: migrations create the database and apply once; the event log is append-only."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from tests.conftest import PG_HOST
from workers.db import migrate, migrations, redact


def test_migrate_creates_the_database_and_applies_each_migration_once() -> None:
    name = f"caretaker_migrate_{uuid.uuid4().hex[:8]}"
    url = f"{PG_HOST}/{name}"
    try:
        first = migrate(url)
        second = migrate(url)
    finally:
        with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    assert first == [entry[1] for entry in migrations()]
    assert second == []


def test_events_cannot_be_rewritten(db: psycopg.Connection[dict[str, Any]]) -> None:
    db.execute("INSERT INTO events (kind, actor, message) VALUES ('x', 'test', 'original')")

    with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
        db.execute("UPDATE events SET message = 'rewritten'")


def test_one_open_incident_per_dedup_key(db: psycopg.Connection[dict[str, Any]]) -> None:
    insert = (
        "INSERT INTO incidents (source, dedup_key, status, severity, title)"
        " VALUES ('alertmanager', 'k', %s, 'critical', 't')"
    )
    db.execute(insert, ("resolved",))
    db.execute(insert, ("open",))

    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute(insert, ("acknowledged",))


def test_redact_drops_the_password() -> None:
    assert "s3cret" not in redact("postgresql://caretaker:s3cret@db.example/caretaker")

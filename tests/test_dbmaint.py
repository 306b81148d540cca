"""Tests of tasks.dbmaint on scratch databases of the shared server, and on a private cluster
preloading pg_stat_statements for its reset."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks import dbmaint
from tasks.dbmaint import Limits, Session, Table, maintenance_report
from tasks.pgstats import slowest_queries
from tests.conftest import PG_HOST, ROOT, free_port, wait_for
from tests.replica import TunedPostgres
from workers import reports
from workers.config import Config, parse_config
from workers.errors import NotFound
from workers.reports import render_maintenance

SECRET = "s3cret-Maint-x7"
# Tables of the scratch databases: name as written in SQL, rows inserted, rows then deleted.
TABLES = {
    "public.orders": (1000, 600),
    "public.events": (500, 100),
    '"Odd Schema"."line ""items"""': (400, 100),
}
# The same tables as the report names them.
SHOWN = {
    "public.orders": "public.orders",
    "public.events": "public.events",
    '"Odd Schema"."line ""items"""': 'Odd Schema.line "items"',
}
OK_STEPS = [("ANALYZE", "ok", None), ("VACUUM (ANALYZE)", "ok", None)]


def run(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def first_row(dsn: str, query: str, *params: Any) -> tuple[Any, ...]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row


def scalar(dsn: str, query: str, *params: Any) -> Any:
    return first_row(dsn, query, *params)[0]


def bloat(dsn: str, tables: dict[str, tuple[int, int]] = TABLES) -> None:
    """Tables with the given live and dead rows, autovacuum off, their statistics flushed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE SCHEMA IF NOT EXISTS "Odd Schema"')
        for table, (rows, deleted) in tables.items():
            conn.execute(
                f"CREATE TABLE {table} (id int PRIMARY KEY, pad text)"
                " WITH (autovacuum_enabled = off)"
            )
            conn.execute(
                f"INSERT INTO {table} SELECT g, repeat('x', 100) FROM generate_series(1, %s) g",
                (rows,),
            )
            conn.execute(f"DELETE FROM {table} WHERE id <= %s", (deleted,))
        # A session hands its counts to the statistics system when idle, and at most once a
        # second unless asked: this makes the next idle moment flush them.
        conn.execute("SELECT pg_stat_force_next_flush()")
    wait_for(
        lambda: all(dead_tuples(dsn, table) == dead for table, (_, dead) in tables.items()),
        timeout_s=10,
        what="the statistics of the tables",
    )


def dead_tuples(dsn: str, table: str) -> int:
    query = "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::regclass"
    return int(scalar(dsn, query, table))


def config_for(
    databases: dict[str, str], review: dict[str, str] | None = None, **extra: Any
) -> Config:
    """Backed-up databases by name and DSN; review databases by check target name and DSN."""
    review = review or {}
    return parse_config(
        {
            "backups": {"databases": [{"name": n, "dsn": d} for n, d in databases.items()]},
            "checks": {
                "database": [
                    {"name": name, "check": "postgres", "params": {"dsn": dsn}}
                    for name, dsn in review.items()
                ]
            },
            "analysis": {"review_databases": list(review)},
            **extra,
        }
    )


def tables_of(report: dict[str, Any], database: int = 0) -> dict[str, dict[str, Any]]:
    return {table["table"]: table for table in report["databases"][database]["tables"]}


def steps_of(table: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(step["statement"], step["status"], step["error"]) for step in table["steps"]]


@pytest.fixture
def scratch() -> Iterator[str]:
    """A database of its own on the shared server, dropped after."""
    name = f"caretaker_maint_{uuid.uuid4().hex[:8]}"
    run(f"{PG_HOST}/postgres", f"CREATE DATABASE {name}")
    try:
        yield f"{PG_HOST}/{name}"
    finally:
        run(f"{PG_HOST}/postgres", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def stats_pg() -> Iterator[TunedPostgres]:
    """A private cluster preloading pg_stat_statements, with a role that owns nothing."""
    server = TunedPostgres(shared_preload_libraries="pg_stat_statements")
    server.start()
    try:
        run(server.dsn(), "CREATE ROLE outsider LOGIN")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def private_db(stats_pg: TunedPostgres) -> Iterator[str]:
    """A database of its own on the private cluster, with pg_stat_statements; dropped after."""
    name = f"maint_{uuid.uuid4().hex[:8]}"
    run(stats_pg.dsn(), f"CREATE DATABASE {name}")
    run(stats_pg.dsn(name), "CREATE EXTENSION pg_stat_statements")
    try:
        yield stats_pg.dsn(name)
    finally:
        run(stats_pg.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_every_table_is_analyzed_and_vacuumed(scratch: str) -> None:
    bloat(scratch)

    report = maintenance_report(config_for({"scratch": scratch}))

    assert (report["kind"], report["overall"]) == ("maintenance", "ok")
    assert (report["tables_ok"], report["tables_failed"], report["tables_skipped"]) == (3, 0, 0)
    [database] = report["databases"]
    assert (database["name"], database["status"], database["error"]) == ("scratch", "ok", None)
    assert database["server"] == "localhost:5432"
    assert database["dbname"] == scratch.rsplit("/", 1)[1]
    assert database["pgstattuple"] is False
    tables = tables_of(report)
    assert list(tables) == ['Odd Schema.line "items"', "public.events", "public.orders"]
    for written, (rows, deleted) in TABLES.items():
        table = tables[SHOWN[written]]
        assert (table["status"], table["error"]) == ("ok", None)
        assert steps_of(table) == OK_STEPS
        before = table["before"]
        assert (before["live_tuples"], before["dead_tuples"]) == (rows - deleted, deleted)
        assert before["dead_ratio"] == deleted / rows
        assert before["source"] == "pg_stat_user_tables"
        assert before["dead_pct"] == round(100 * deleted / rows, 2)
        assert before["free_pct"] is None
        assert before["table_bytes"] > 0 and before["index_bytes"] > 0
        assert before["last_vacuum_at"] is None and before["last_analyze_at"] is None
        assert before["notes"] == []
        assert table["dead_tuples_after"] == 0
        assert table["seconds"] >= sum(step["seconds"] for step in table["steps"])
        assert dead_tuples(scratch, written) == 0
        vacuumed = "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL"
        assert scalar(
            scratch, f"{vacuumed} FROM pg_stat_user_tables WHERE relid = %s::regclass", written
        )
    assert database["statements"]["action"] == "skipped"
    assert (
        database["statements"]["reason"] == "pg_stat_statements is not installed in this database"
    )
    assert json.loads(json.dumps(report)) == report


def test_the_longest_unvacuumed_table_comes_first(scratch: str) -> None:
    run(scratch, "CREATE TABLE a (id int)", "CREATE TABLE b (id int)", "CREATE TABLE c (id int)")
    run(scratch, "VACUUM a")
    time.sleep(0.01)
    run(scratch, "VACUUM c")

    report = maintenance_report(config_for({"scratch": scratch}))

    assert list(tables_of(report)) == ["public.b", "public.a", "public.c"]


def test_a_locked_table_fails_and_the_others_are_maintained(scratch: str) -> None:
    bloat(scratch)
    config = config_for({"scratch": scratch})

    with psycopg.connect(scratch) as holder:
        holder.execute("LOCK TABLE public.orders IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        report = maintenance_report(config, limits=Limits(lock_timeout_s=0.2))
        took_s = time.monotonic() - started

    lock_error = "canceling statement due to lock timeout"
    tables = tables_of(report)
    locked = tables["public.orders"]
    assert (locked["status"], locked["error"]) == ("failed", lock_error)
    assert steps_of(locked) == [
        ("ANALYZE", "failed", lock_error),
        ("VACUUM (ANALYZE)", "failed", lock_error),
    ]
    # The statistics need no lock; the sizes do.
    assert locked["before"]["dead_tuples"] == 600
    assert locked["before"]["table_bytes"] is None
    assert locked["before"]["notes"] == [f"sizes not read: {lock_error}"]
    assert locked["dead_tuples_after"] == 600
    for name in ("public.events", 'Odd Schema.line "items"'):
        assert (tables[name]["status"], tables[name]["dead_tuples_after"]) == ("ok", 0)
    assert (report["tables_ok"], report["tables_failed"]) == (2, 1)
    assert report["databases"][0]["status"] == report["overall"] == "failed"
    # Three lock waits of 0.2 s, not a hang.
    assert took_s < 5
    assert dead_tuples(scratch, "public.orders") == 600


def test_a_table_dropped_meanwhile_fails_alone(
    scratch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bloat(scratch)
    listed = dbmaint.list_tables

    def list_then_drop(session: Session) -> list[Table]:
        tables = listed(session)
        run(scratch, "DROP TABLE public.events")
        return tables

    monkeypatch.setattr(dbmaint, "list_tables", list_then_drop)

    report = maintenance_report(config_for({"scratch": scratch}))

    tables = tables_of(report)
    gone = tables["public.events"]
    missing = 'relation "public.events" does not exist'
    assert (gone["status"], gone["error"]) == ("failed", missing)
    assert steps_of(gone) == [
        ("ANALYZE", "failed", missing),
        ("VACUUM (ANALYZE)", "failed", missing),
    ]
    assert gone["before"]["dead_tuples"] is None
    assert tables["public.orders"]["status"] == "ok"
    assert tables['Odd Schema.line "items"']["status"] == "ok"


def test_pgstattuple_gives_the_shares_where_installed(scratch: str) -> None:
    run(scratch, "CREATE EXTENSION pgstattuple")
    bloat(scratch)
    shares = "SELECT dead_tuple_percent, approx_free_percent FROM pgstattuple_approx(%s::regclass)"
    expected = {table: first_row(scratch, shares, table) for table in TABLES}

    report = maintenance_report(config_for({"scratch": scratch}))

    assert report["databases"][0]["pgstattuple"] is True
    tables = tables_of(report)
    for written, (rows, deleted) in TABLES.items():
        before = tables[SHOWN[written]]["before"]
        dead_pct, free_pct = expected[written]
        assert before["source"] == "pgstattuple_approx"
        assert (before["dead_pct"], before["free_pct"]) == (round(dead_pct, 2), round(free_pct, 2))
        # Bytes, not tuples: page headers and free space are part of the table too.
        assert 0 < before["dead_pct"] < 100 * deleted / rows
        assert before["dead_ratio"] == deleted / rows
        assert tables[SHOWN[written]]["dead_tuples_after"] == 0


def test_a_table_the_role_may_not_vacuum_fails(stats_pg: TunedPostgres, private_db: str) -> None:
    run(private_db, "CREATE EXTENSION pgstattuple")
    bloat(private_db, {"public.orders": (100, 10)})
    run(
        private_db, "CREATE TABLE public.mine (id int)", "ALTER TABLE public.mine OWNER TO outsider"
    )
    as_outsider = private_db.replace("postgres@", "outsider@")

    report = maintenance_report(config_for({"shop": as_outsider}))

    tables = tables_of(report)
    refused = tables["public.orders"]
    assert refused["status"] == "failed"
    assert steps_of(refused) == [
        ("ANALYZE", "failed", 'skipping "orders" --- only table or database owner can analyze it'),
        (
            "VACUUM (ANALYZE)",
            "failed",
            'skipping "orders" --- only table or database owner can vacuum it',
        ),
    ]
    # pgstattuple needs pg_stat_scan_tables: the statistics system is read instead.
    assert refused["before"]["source"] == "pg_stat_user_tables"
    assert refused["before"]["dead_ratio"] == 0.1
    assert refused["before"]["notes"] == [
        "pgstattuple not read: permission denied for function pgstattuple_approx"
    ]
    assert dead_tuples(private_db, "public.orders") == 10
    assert tables["public.mine"]["status"] == "ok"
    statements = report["databases"][0]["statements"]
    assert statements["action"] == "failed"
    assert statements["reason"] == (
        "counters not reset: permission denied for function pg_stat_statements_reset"
    )
    assert report["databases"][0]["status"] == "failed"


def stats_reset(dsn: str) -> datetime:
    found: datetime = scalar(dsn, "SELECT stats_reset FROM pg_stat_statements_info")
    return found


def performance_report(db: psycopg.Connection[dict[str, Any]], target: str, dsn: str) -> int:
    """Store a weekly review that read pg_stat_statements through check target `target`."""
    reading = slowest_queries(dsn)
    assert reading.available
    report = {
        "kind": "performance",
        "period_start": (reading.read_at - timedelta(days=7)).isoformat(),
        "period_end": reading.read_at.isoformat(),
        "series": [],
        "databases": [{"target": target} | reading.to_json()],
        "recommendations": [],
    }
    return reports.store(db, report)


def test_statements_are_reset_only_after_the_review_read_them(
    private_db: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    config = config_for({"app": private_db}, review={"app-db": private_db})
    run(private_db, "SELECT pg_stat_statements_reset()")
    first_reset = stats_reset(private_db)
    # A review that could not read the statements counts for nothing.
    reports.store(
        db,
        {
            "kind": "performance",
            "period_start": first_reset.isoformat(),
            "period_end": datetime.now(first_reset.tzinfo).isoformat(),
            "databases": [
                {"target": "app-db", "available": False, "reason": "down", "queries": []}
            ],
        },
    )

    unread = maintenance_report(config)["databases"][0]["statements"]
    report_id = performance_report(db, "app-db", private_db)
    read = maintenance_report(config)["databases"][0]["statements"]
    again = maintenance_report(config)["databases"][0]["statements"]

    assert unread["action"] == "skipped"
    assert unread["reason"] == "no performance review has read it yet (review databases: app-db)"
    assert unread["last_reset_at"] == first_reset.isoformat()
    assert read["action"] == "reset"
    assert read["reason"].startswith("read by the performance review at ")
    assert read["reason"].endswith(f" (report {report_id})")
    assert read["last_reset_at"] == first_reset.isoformat()
    assert first_reset < datetime.fromisoformat(read["reviewed_at"])
    reset_at = datetime.fromisoformat(read["reset_at"])
    assert datetime.fromisoformat(read["reviewed_at"]) < reset_at
    assert abs(stats_reset(private_db) - reset_at) < timedelta(seconds=1)
    assert again["action"] == "skipped"
    assert again["reason"].startswith("not read by a performance review since the last reset at ")
    assert again["reviewed_at"] == read["reviewed_at"]
    assert stats_reset(private_db) < reset_at + timedelta(seconds=1)
    assert abs(datetime.fromisoformat(again["last_reset_at"]) - reset_at) < timedelta(seconds=1)


def test_statements_are_reset_when_no_review_reads_the_server(
    stats_pg: TunedPostgres, private_db: str, db: psycopg.Connection[dict[str, Any]]
) -> None:
    second = private_db + "_2"
    name = second.rsplit("/", 1)[1]
    run(stats_pg.dsn(), f"CREATE DATABASE {name}")
    run(second, "CREATE EXTENSION pg_stat_statements")
    # Reviewed, but on the shared server: not this one.
    config = config_for(
        {"app": private_db, "app2": second}, review={"elsewhere": f"{PG_HOST}/postgres"}
    )
    before = stats_reset(private_db)

    try:
        report = maintenance_report(config)
    finally:
        run(stats_pg.dsn(), f"DROP DATABASE {name} WITH (FORCE)")

    first, other = (database["statements"] for database in report["databases"])
    assert first["action"] == "reset"
    assert first["reason"] == "no performance review reads this server"
    assert stats_reset(private_db) > before
    assert other == {
        "action": "skipped",
        "reason": "reset in this run through database app",
        "reset_at": None,
        "last_reset_at": None,
        "reviewed_at": None,
    }
    assert report["overall"] == "ok"


def test_without_stats_reset_the_recorded_reset_decides(
    stats_pg: TunedPostgres, db: psycopg.Connection[dict[str, Any]]
) -> None:
    # Version 1.7 has no pg_stat_statements_info: the server does not say when it last reset.
    name = f"legacy_{uuid.uuid4().hex[:6]}"
    run(stats_pg.dsn(), f"CREATE DATABASE {name}")
    legacy = stats_pg.dsn(name)
    run(legacy, "CREATE EXTENSION pg_stat_statements VERSION '1.7'")
    config = config_for({"legacy": legacy}, review={"legacy-db": legacy})

    try:
        performance_report(db, "legacy-db", legacy)
        first = maintenance_report(config)
        dbmaint.store_report(first)
        second = maintenance_report(config)
    finally:
        run(stats_pg.dsn(), f"DROP DATABASE {name} WITH (FORCE)")

    reset = first["databases"][0]["statements"]
    assert (reset["action"], reset["last_reset_at"]) == ("reset", None)
    skipped = second["databases"][0]["statements"]
    assert skipped["action"] == "skipped"
    assert skipped["last_reset_at"] == reset["reset_at"]
    assert skipped["reason"].startswith("not read by a performance review since the last reset")


def test_the_task_stores_the_report(
    scratch: str, db: psycopg.Connection[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bloat(scratch, {"public.orders": (100, 40)})
    monkeypatch.setattr(dbmaint, "get_config", lambda: config_for({"scratch": scratch}))

    report_id = dbmaint.maintain_databases()

    stored = reports.latest(db, "maintenance")
    assert stored is not None and stored["id"] == report_id
    assert stored["overall"] == "ok"
    [table] = stored["databases"][0]["tables"]
    assert (table["table"], table["status"], table["before"]["dead_ratio"]) == (
        "public.orders",
        "ok",
        0.4,
    )
    row = db.execute("SELECT period_start, period_end FROM reports WHERE id = %s", (report_id,))
    period = row.fetchone()
    assert period is not None and period["period_start"] <= period["period_end"]


def test_past_the_deadline_tables_are_skipped(scratch: str) -> None:
    bloat(scratch, {"public.orders": (100, 40)})

    report = maintenance_report(
        config_for({"scratch": scratch}), limits=Limits(deadline=time.monotonic() - 1)
    )

    [table] = report["databases"][0]["tables"]
    assert (table["status"], table["error"]) == ("skipped", "no time left in this run")
    assert table["steps"] == [] and table["before"] is None
    assert report["tables_skipped"] == 1
    assert report["overall"] == report["databases"][0]["status"] == "incomplete"
    assert dead_tuples(scratch, "public.orders") == 40


def test_the_password_never_shows(
    scratch: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The shared server trusts local connections: the password is sent and ignored.
    monkeypatch.setenv("MAINT_DSN", scratch.replace("postgres@", f"postgres:{SECRET}@"))
    monkeypatch.setenv("MAINT_DOWN", f"postgresql://postgres:{SECRET}@127.0.0.1:{free_port()}/down")
    bloat(scratch, {"public.orders": (10, 5)})
    config = parse_config(
        {
            "backups": {
                "databases": [
                    {"name": "scratch", "dsn_env": "MAINT_DSN"},
                    {"name": "down", "dsn_env": "MAINT_DOWN"},
                    {"name": "unset", "dsn_env": "MAINT_UNSET"},
                ]
            }
        }
    )
    caplog.set_level(logging.DEBUG)

    report = maintenance_report(config)

    up, down, unset = report["databases"]
    assert up["status"] == "ok" and up["tables"][0]["status"] == "ok"
    assert down["status"] == "failed"
    assert down["error"].startswith("cannot connect: connection failed: ")
    assert unset["error"] == (
        "environment variable 'MAINT_UNSET' named by a secret reference is not set"
    )
    assert SECRET not in json.dumps(report)
    assert SECRET not in caplog.text
    assert SECRET not in render_maintenance(report)


def test_an_unknown_target_is_refused(scratch: str) -> None:
    config = config_for({"scratch": scratch, "other": scratch})

    with pytest.raises(NotFound) as raised:
        maintenance_report(config, "nope")

    assert str(raised.value) == (
        "no database named 'nope' in backups.databases (configured: scratch, other)"
    )


def test_the_text_report_shows_each_table(scratch: str) -> None:
    bloat(scratch, {"public.orders": (1000, 600)})

    text = render_maintenance(maintenance_report(config_for({"scratch": scratch})))

    lines = text.splitlines()
    assert lines[0].endswith(": overall ok; tables 1 ok, 0 failed, 0 skipped")
    assert lines[1].startswith("  database scratch (localhost:5432/caretaker_maint_")
    assert lines[2].split() == ["public.orders", "ok", lines[2].split()[2], "s"]
    assert "dead 60.0% free - (pg_stat_user_tables)" in lines[3]
    assert lines[3].endswith("last vacuum never; dead tuples 600 -> 0")
    assert lines[4] == (
        "    pg_stat_statements skipped: pg_stat_statements is not installed in this database"
    )


def cli(config: dict[str, Any], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`caretaker db maintain ARGS` in a process of its own, with this configuration file."""
    path = tmp_path / "config.yml"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "db", "maintain", *args],
        cwd=ROOT,
        env={**os.environ, "CARETAKER_CONFIG": str(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_command_maintains_one_target(
    scratch: str, db: psycopg.Connection[dict[str, Any]], tmp_path: Path
) -> None:
    bloat(scratch, {"public.orders": (1000, 600), "public.events": (500, 100)})
    # Maintaining it would fail: the command must leave it alone.
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/down"
    config = {
        "backups": {
            "databases": [{"name": "down", "dsn": down}, {"name": "scratch", "dsn": scratch}]
        }
    }

    done = cli(config, tmp_path, "--target", "scratch", "--json")

    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert [database["name"] for database in printed["databases"]] == ["scratch"]
    tables = tables_of(printed)
    assert {name: table["status"] for name, table in tables.items()} == {
        "public.events": "ok",
        "public.orders": "ok",
    }
    assert tables["public.orders"]["before"]["dead_ratio"] == 0.6
    assert tables["public.orders"]["dead_tuples_after"] == 0
    stored = reports.latest(db, "maintenance")
    assert stored is not None and stored["id"] == printed["id"]


def test_the_command_fails_in_one_line(
    scratch: str, db: psycopg.Connection[dict[str, Any]], tmp_path: Path
) -> None:
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/down"
    config = {
        "backups": {
            "databases": [{"name": "scratch", "dsn": scratch}, {"name": "down", "dsn": down}]
        }
    }

    unknown = cli(config, tmp_path, "--target", "nope")
    failed = cli(config, tmp_path)

    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert unknown.stderr.splitlines() == [
        "Error: no database named 'nope' in backups.databases (configured: scratch, down)"
    ]
    assert failed.returncode == 1
    assert "  database down (localhost:" in failed.stdout
    assert "    error: cannot connect: connection failed: " in failed.stdout
    assert failed.stderr.splitlines()[-1] == "Error: maintenance failed in down: 0 tables failed"

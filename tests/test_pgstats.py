"""Tests of tasks.pgstats on a private cluster preloading pg_stat_statements and the shared one."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tasks.pgstats import (
    HIDDEN_TEXT,
    MARKER,
    NOT_INSTALLED,
    NOT_PRELOADED,
    QUERY_TEXT_CHARS,
    slowest_queries,
)
from tests.conftest import PG_HOST, free_port
from tests.replica import TunedPostgres
from workers.errors import SourceError

SECRET = "s3cret-Token-x9"
SLEEP_S = 0.2
SLOW_CALLS = 3
FAST_CALLS = 50
# pg_sleep sleeps at least as long as asked; the rest is a loaded machine's slack.
SLOW_TOTAL_MS = (SLOW_CALLS * SLEEP_S * 1000, SLOW_CALLS * SLEEP_S * 1000 + 200)


@pytest.fixture(scope="module")
def stats_pg() -> Iterator[TunedPostgres]:
    """A private cluster preloading pg_stat_statements, created in its postgres database."""
    server = TunedPostgres(shared_preload_libraries="pg_stat_statements")
    server.start()
    run(server.dsn(), "CREATE EXTENSION pg_stat_statements", "CREATE ROLE outsider LOGIN")
    yield server
    server.destroy()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (via the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A database of its own on the shared server, with the extension created; dropped after."""
    name = f"caretaker_pgstats_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
        assert row is not None
        if "pg_stat_statements" in row[0]:
            pytest.fail("the shared server preloads pg_stat_statements", pytrace=False)
        conn.execute(f"CREATE DATABASE {name}")
    try:
        run(f"{PG_HOST}/{name}", "CREATE EXTENSION pg_stat_statements")
        yield f"{PG_HOST}/{name}"
    finally:
        with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def workload(server: TunedPostgres) -> None:
    """From zeroed counters: three calls of a 0.2 s statement and fifty of a fast one."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        for _ in range(SLOW_CALLS):
            conn.execute(f"SELECT pg_sleep({SLEEP_S})")
        for _ in range(FAST_CALLS):
            conn.execute("SELECT 1 + 1")


def test_the_slowest_statement_comes_first(stats_pg: TunedPostgres) -> None:
    workload(stats_pg)

    result = slowest_queries(stats_pg.dsn(), limit=3)

    assert result.available is True
    assert result.reason is None
    assert len(result.queries) == 3
    slow = result.queries[0]
    assert slow.query == "SELECT pg_sleep($1)"
    assert slow.calls == SLOW_CALLS
    assert SLOW_TOTAL_MS[0] <= slow.total_ms < SLOW_TOTAL_MS[1]
    assert slow.mean_ms == pytest.approx(slow.total_ms / SLOW_CALLS, abs=0.01)
    assert slow.rows == SLOW_CALLS
    assert (slow.database, slow.user) == ("postgres", "postgres")
    assert isinstance(slow.queryid, int)
    assert slow.share_pct > 90
    assert 0 < sum(found.share_pct for found in result.queries) <= 100
    assert result.stats_reset is not None
    assert result.stats_reset < result.read_at < result.stats_reset + timedelta(seconds=10)
    assert result.reset_at is None
    assert result.notes == []


def test_the_limit_holds_and_own_statements_are_left_out(stats_pg: TunedPostgres) -> None:
    workload(stats_pg)
    # Records this module's own statements, so that there are some to leave out.
    slowest_queries(stats_pg.dsn())

    everything = slowest_queries(stats_pg.dsn(), limit=100)
    first = slowest_queries(stats_pg.dsn(), limit=1)

    [fast] = [found for found in everything.queries if found.calls == FAST_CALLS]
    assert fast.query == "SELECT $1 + $2"
    assert fast.rows == FAST_CALLS
    assert not any(MARKER in found.query for found in everything.queries)
    assert 90 < sum(found.share_pct for found in everything.queries) <= 100
    assert len(first.queries) == 1
    assert first.queries[0].query == "SELECT pg_sleep($1)"


def test_a_long_statement_text_is_cut(stats_pg: TunedPostgres) -> None:
    run(stats_pg.dsn(), "SELECT 1 -- " + "padding " * 100)

    result = slowest_queries(stats_pg.dsn(), limit=100)

    [long] = [found for found in result.queries if "padding" in found.query]
    assert len(long.query) == QUERY_TEXT_CHARS
    assert long.query.startswith("SELECT $1 -- padding padding")


def test_a_reset_comes_after_the_read(stats_pg: TunedPostgres) -> None:
    workload(stats_pg)

    kept = slowest_queries(stats_pg.dsn())
    before = slowest_queries(stats_pg.dsn(), reset=True)
    after = slowest_queries(stats_pg.dsn())

    assert kept.queries[0].calls == SLOW_CALLS
    assert kept.reset_at is None
    assert before.queries[0].calls == SLOW_CALLS
    assert before.queries[0].total_ms >= SLOW_TOTAL_MS[0]
    assert before.stats_reset is not None and before.reset_at is not None
    assert before.stats_reset < before.read_at <= before.reset_at
    # The next period starts at the reset, and holds nothing but this module's own statements.
    assert after.queries == []
    assert after.stats_reset is not None
    assert abs(after.stats_reset - before.reset_at) < timedelta(seconds=1)


def test_old_column_names_are_read(stats_pg: TunedPostgres) -> None:
    # Version 1.7 is the last with total_time and mean_time, and has no pg_stat_statements_info.
    run(stats_pg.dsn(), "CREATE DATABASE old_columns")
    run(stats_pg.dsn("old_columns"), "CREATE EXTENSION pg_stat_statements VERSION '1.7'")
    workload(stats_pg)

    result = slowest_queries(stats_pg.dsn("old_columns"), reset=True)
    after = slowest_queries(stats_pg.dsn("old_columns"))

    assert result.available is True
    slow = result.queries[0]
    assert slow.query == "SELECT pg_sleep($1)"
    assert slow.calls == SLOW_CALLS
    assert SLOW_TOTAL_MS[0] <= slow.total_ms < SLOW_TOTAL_MS[1]
    assert slow.mean_ms == pytest.approx(slow.total_ms / SLOW_CALLS, abs=0.01)
    assert result.stats_reset is None
    assert result.notes == [
        "start of the period unknown: pg_stat_statements before 1.9 does not say"
    ]
    assert result.reset_at is not None
    assert after.queries == []


def test_a_database_without_the_extension_says_how_to_enable_it(stats_pg: TunedPostgres) -> None:
    run(stats_pg.dsn(), "CREATE DATABASE plain")

    result = slowest_queries(stats_pg.dsn("plain"), reset=True)

    assert result.available is False
    assert result.reason == NOT_INSTALLED.format(dbname="plain")
    assert "shared_preload_libraries = 'pg_stat_statements'" in result.reason
    assert "CREATE EXTENSION pg_stat_statements" in result.reason
    assert result.queries == []
    assert result.stats_reset is None
    assert result.reset_at is None


def test_an_extension_without_its_library_is_unavailable(shared_database: str) -> None:
    result = slowest_queries(shared_database)

    assert result.available is False
    assert result.reason == NOT_PRELOADED
    assert "shared_preload_libraries = 'pg_stat_statements'" in result.reason
    assert result.queries == []


def test_a_role_that_may_not_read_the_view_gets_a_reason(stats_pg: TunedPostgres) -> None:
    run(stats_pg.dsn(), "CREATE DATABASE locked")
    run(
        stats_pg.dsn("locked"),
        "CREATE EXTENSION pg_stat_statements",
        "REVOKE SELECT ON pg_stat_statements, pg_stat_statements_info FROM PUBLIC",
    )

    result = slowest_queries(f"postgresql://outsider@127.0.0.1:{stats_pg.port}/locked")

    assert result.available is False
    assert result.reason is not None
    assert result.reason.startswith("role outsider may not read pg_stat_statements: ")
    assert "permission denied for view pg_stat_statements" in result.reason


def test_a_role_that_may_not_reset_keeps_its_reading(stats_pg: TunedPostgres) -> None:
    workload(stats_pg)
    outsider = f"postgresql://outsider@127.0.0.1:{stats_pg.port}/postgres"

    result = slowest_queries(outsider, reset=True)
    untouched = slowest_queries(stats_pg.dsn())

    assert result.available is True
    assert result.reset_at is None
    slow = result.queries[0]
    assert slow.query == HIDDEN_TEXT
    assert slow.queryid is None
    assert slow.calls == SLOW_CALLS
    assert result.notes == [
        "other roles' statement texts are hidden: grant pg_read_all_stats to outsider",
        "counters not reset: permission denied for function pg_stat_statements_reset",
    ]
    assert untouched.queries[0].calls == SLOW_CALLS


def test_the_reading_stores_as_jsonb(stats_pg: TunedPostgres) -> None:
    workload(stats_pg)
    result = slowest_queries(stats_pg.dsn(), limit=2)

    with psycopg.connect(stats_pg.dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT %s::jsonb", (Jsonb(result.to_json()),)).fetchone()

    assert row is not None
    stored = row[0]
    assert stored == json.loads(json.dumps(result.to_json()))
    assert datetime.fromisoformat(stored["read_at"]) == result.read_at
    assert stored["reset_at"] is None
    assert stored["queries"][0]["calls"] == SLOW_CALLS
    assert set(stored["queries"][0]) == {
        *("queryid", "database", "user", "calls", "total_ms", "mean_ms", "rows", "share_pct"),
        "query",
    }


def test_a_closed_port_raises_quickly() -> None:
    port = free_port()
    started = time.monotonic()

    with pytest.raises(SourceError) as raised:
        slowest_queries(f"postgresql://postgres@127.0.0.1:{port}/db")

    assert time.monotonic() - started < 1
    message = str(raised.value)
    assert message.startswith(f"cannot read pg_stat_statements of 127.0.0.1:{port}/db: ")
    assert "Connection refused" in message
    assert "\n" not in message


def test_a_silent_server_raises_within_the_timeout(silent_port: int) -> None:
    started = time.monotonic()

    with pytest.raises(SourceError) as raised:
        slowest_queries(f"postgresql://postgres@127.0.0.1:{silent_port}/db", timeout_s=1)

    assert 1 <= time.monotonic() - started < 2
    assert str(raised.value) == (
        f"cannot read pg_stat_statements of 127.0.0.1:{silent_port}/db: no answer within 1s"
    )


def test_the_password_never_shows() -> None:
    dsn = f"postgresql://watcher:{SECRET}@127.0.0.1:{free_port()}/db"

    with pytest.raises(SourceError) as raised:
        slowest_queries(dsn)

    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    ("dsn", "limit", "timeout_s"),
    [
        (f"host=db.example password={SECRET} nonsense", 10, 10.0),
        ("postgresql://db.example/app", 0, 10.0),
        ("postgresql://db.example/app", 10, 0.0),
    ],
)
def test_unusable_arguments_are_refused(dsn: str, limit: int, timeout_s: float) -> None:
    with pytest.raises(ValueError) as raised:
        slowest_queries(dsn, limit=limit, timeout_s=timeout_s)

    assert SECRET not in str(raised.value)


def test_the_weekly_review_lists_the_slowest_statements_and_advises(
    stats_pg: TunedPostgres,
) -> None:
    from datetime import UTC, datetime

    from tasks.review import performance_review
    from workers.config import parse_config
    from workers.settings import get_settings

    workload(stats_pg)
    config = parse_config(
        {
            "checks": {
                "database": [
                    {"name": "stats-db", "check": "postgres", "params": {"dsn": stats_pg.dsn()}}
                ]
            },
            "analysis": {"review_databases": ["stats-db"]},
        }
    )

    report = performance_review(config, get_settings(), datetime.now(UTC))

    [database] = report["databases"]
    assert database["target"] == "stats-db"
    assert database["available"] is True
    slowest = database["queries"][0]
    assert "pg_sleep" in slowest["query"]
    assert slowest["calls"] == 3
    assert any(
        r.startswith("stats-db: one statement takes") and "3 calls" in r
        for r in report["recommendations"]
    )

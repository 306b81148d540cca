"""The slowest statements of a PostgreSQL server by total time, from pg_stat_statements."""

from __future__ import annotations

import logging
import math
import queue
import threading
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import conninfo, sql

from workers.errors import SourceError

log = logging.getLogger(__name__)

# Characters of a statement's text kept in a result.
QUERY_TEXT_CHARS = 500
APPLICATION_NAME = "caretaker-pgstats"
# pg_stat_statements does not record the application name; this leading comment, which it
# keeps in the stored text, is how this module's own statements are told apart and left out.
MARKER = "/* caretaker-pgstats */"
# What the view shows, instead of the text, of other roles' statements to a role that lacks
# pg_read_all_stats.
HIDDEN_TEXT = "<insufficient privilege>"

NOT_INSTALLED = (
    "pg_stat_statements is not installed in database {dbname}: set "
    "shared_preload_libraries = 'pg_stat_statements' in postgresql.conf (keeping any library "
    "already listed), restart the server, then run CREATE EXTENSION pg_stat_statements in "
    "that database"
)
NOT_PRELOADED = (
    "pg_stat_statements is installed but its library is not loaded: set "
    "shared_preload_libraries = 'pg_stat_statements' in postgresql.conf (keeping any library "
    "already listed) and restart the server"
)

CATALOG_SQL = f"""{MARKER}
SELECT n.nspname,
       array(SELECT a.attname::text FROM pg_attribute a
             WHERE a.attrelid = v.oid AND a.attnum > 0 AND NOT a.attisdropped),
       EXISTS (SELECT 1 FROM pg_class i
               WHERE i.relnamespace = n.oid AND i.relname = 'pg_stat_statements_info')
FROM pg_extension e
JOIN pg_namespace n ON n.oid = e.extnamespace
LEFT JOIN pg_class v ON v.relnamespace = n.oid AND v.relname = 'pg_stat_statements'
WHERE e.extname = 'pg_stat_statements'
"""
# pg_stat_statements_info arrived with version 1.9 (PostgreSQL 14).
INFO_SQL = f"{MARKER} SELECT clock_timestamp(), stats_reset, dealloc FROM {{schema}}.{{view}}"
NO_INFO_SQL = f"{MARKER} SELECT clock_timestamp(), NULL::timestamptz, NULL::bigint"
# Each share is of all the time recorded, this module's own statements included: the listed
# shares add up to 100 at most.
TOP_SQL = f"""{MARKER}
SELECT queryid, datname, rolname, calls, total_ms, mean_ms, rows, share_pct, left(query, %s)
FROM (SELECT s.queryid, d.datname, r.rolname, s.calls, s.{{total}} AS total_ms,
             s.{{mean}} AS mean_ms, s.rows, s.query,
             coalesce(100 * s.{{total}} / nullif(sum(s.{{total}}) OVER (), 0), 0) AS share_pct
      FROM {{schema}}.{{view}} s
      LEFT JOIN pg_database d ON d.oid = s.dbid
      LEFT JOIN pg_roles r ON r.oid = s.userid
      WHERE {{toplevel}}) AS recorded
WHERE query NOT LIKE %s
ORDER BY total_ms DESC
LIMIT %s
"""
RESET_SQL = f"{MARKER} SELECT {{schema}}.pg_stat_statements_reset(), clock_timestamp()"


@dataclass
class SlowQuery:
    """One normalised statement, as pg_stat_statements sums it up since its last reset."""

    queryid: int | None
    database: str | None
    user: str | None
    calls: int
    total_ms: float
    mean_ms: float
    rows: int
    share_pct: float
    query: str


@dataclass
class QueryStats:
    """The slowest statements of a server, or why they cannot be read (available is False).

    The period covered runs from stats_reset (None before pg_stat_statements 1.9) to read_at,
    both on the server's clock; read_at is caretaker's clock when nothing was read. reset_at is
    when the counters were zeroed after the read, None when they were not.
    """

    available: bool
    read_at: datetime
    reason: str | None = None
    stats_reset: datetime | None = None
    reset_at: datetime | None = None
    queries: list[SlowQuery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A dict of JSON types, for a JSONB column."""
        data = asdict(self)
        for key in ("read_at", "stats_reset", "reset_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return data


def slowest_queries(
    dsn: str, limit: int = 10, timeout_s: float = 10.0, reset: bool = False
) -> QueryStats:
    """The `limit` statements with the most total execution time on the server behind dsn.

    pg_stat_statements counts for the whole server, but its view exists only in the databases
    where CREATE EXTENSION was run: dsn must name one of those. A missing, unloaded or
    forbidden extension gives available=False and a reason; a server that cannot be reached or
    does not answer within timeout_s raises SourceError. With reset=True the counters are zeroed
    after they have been read, in the same session; the session is read-only otherwise.
    """
    if limit < 1 or timeout_s <= 0:
        raise ValueError(f"limit must be at least 1 and timeout_s positive: {limit}, {timeout_s}")
    parts = _connection_parts(dsn, timeout_s, reset)
    target = _target(parts)

    try:
        stats = _exchange(parts, limit, reset, timeout_s)
    except (psycopg.Error, TimeoutError) as exc:
        reason = _describe(exc, parts)
        raise SourceError(f"cannot read pg_stat_statements of {target}: {reason}") from exc

    if stats.available:
        log.info(
            "slowest queries read target=%s queries=%d reset=%s",
            target,
            len(stats.queries),
            stats.reset_at is not None,
        )
    else:
        log.warning("pg_stat_statements unavailable target=%s reason=%s", target, stats.reason)
    return stats


def _connection_parts(dsn: str, timeout_s: float, reset: bool) -> dict[str, Any]:
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's reason may quote part of the string, password included.
        raise ValueError("dsn is not a valid libpq connection string") from None

    # Set at connection start, so even the first statement cannot run past the timeout.
    options = f"-c statement_timeout={math.ceil(timeout_s * 1000)}"
    if not reset:
        options += " -c default_transaction_read_only=on"
    parts["options"] = f"{parts.get('options') or ''} {options}".strip()
    # libpq waits at least 2 s whatever is asked.
    parts["connect_timeout"] = max(2, math.ceil(timeout_s))
    parts.setdefault("application_name", APPLICATION_NAME)
    return parts


def _target(parts: dict[str, Any]) -> str:
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


def _exchange(parts: dict[str, Any], limit: int, reset: bool, timeout_s: float) -> QueryStats:
    # pg_stat_statements keeps its counters in shared memory, outside MVCC: a transaction
    # does not freeze them, and no function reads and zeroes them at once. Statements that
    # finish between the read and the reset, one round trip here, are counted in neither
    # period; a statement running across the reset is counted whole in the next one. Sending
    # both in one pipeline would close that gap, but the server would then zero counters
    # whose reading may never reach us, so the reset waits until the caller holds the
    # reading. A lossless week would need diffs of cumulative readings and no reset at all.
    #
    # The session lives in one thread so that a silent server cannot hang the caller; the
    # thread resets only when told to, so an abandoned read is never followed by a reset.
    answers: queue.SimpleQueue[object] = queue.SimpleQueue()
    go_reset = threading.Event()
    session = (parts, limit, reset, timeout_s, answers, go_reset)
    threading.Thread(target=_session, args=session, name="pgstats", daemon=True).start()
    stats = _take(answers, timeout_s)
    assert isinstance(stats, QueryStats)
    if not (reset and stats.available):
        return stats

    go_reset.set()
    try:
        reset_at = _take(answers, timeout_s)
    except (psycopg.Error, TimeoutError) as exc:
        reason = _describe(exc, parts)
        # Past the deadline the reset may still have happened: the server did not say.
        outcome = "reset not confirmed" if isinstance(exc, TimeoutError) else "counters not reset"
        stats.notes.append(f"{outcome}: {reason}")
        log.warning("pg_stat_statements not reset target=%s error=%s", _target(parts), reason)
        return stats
    assert isinstance(reset_at, datetime)
    stats.reset_at = reset_at.astimezone(UTC)
    return stats


def _session(
    parts: dict[str, Any],
    limit: int,
    reset: bool,
    timeout_s: float,
    answers: queue.SimpleQueue[object],
    go_reset: threading.Event,
) -> None:
    """Read, then reset if asked and told to go; every answer or error goes to `answers`."""
    try:
        with psycopg.connect(autocommit=True, **parts) as conn:
            stats, schema = _read(conn, limit)
            answers.put(stats)
            if reset and schema is not None and go_reset.wait(timeout_s):
                answers.put(_reset(conn, schema))
    except BaseException as exc:  # handed to the caller's thread as it is
        answers.put(exc)


def _take(answers: queue.SimpleQueue[object], timeout_s: float) -> object:
    try:
        answer = answers.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"no answer within {timeout_s:g}s") from None
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _read(conn: psycopg.Connection[Any], limit: int) -> tuple[QueryStats, str | None]:
    """The reading, and the extension's schema when it can be reset."""
    found = conn.execute(CATALOG_SQL).fetchone()
    if found is None:
        reason = NOT_INSTALLED.format(dbname=conn.info.dbname)
        return QueryStats(available=False, read_at=datetime.now(UTC), reason=reason), None
    schema, columns, has_info = found

    try:
        stats = _read_view(conn, sql.Identifier(schema), columns, has_info, limit)
    except psycopg.errors.ObjectNotInPrerequisiteState as exc:
        if "shared_preload_libraries" not in str(exc):
            raise
        return QueryStats(available=False, read_at=datetime.now(UTC), reason=NOT_PRELOADED), None
    except psycopg.errors.InsufficientPrivilege as exc:
        reason = f"role {conn.info.user} may not read pg_stat_statements: {exc}"
        return QueryStats(available=False, read_at=datetime.now(UTC), reason=reason), None
    return stats, schema


def _read_view(
    conn: psycopg.Connection[Any],
    schema: sql.Identifier,
    columns: list[str],
    has_info: bool,
    limit: int,
) -> QueryStats:
    info_sql = INFO_SQL if has_info else NO_INFO_SQL
    info = sql.SQL(info_sql).format(schema=schema, view=sql.Identifier("pg_stat_statements_info"))
    row = conn.execute(info).fetchone()
    assert row is not None, "the info view has one row"
    read_at, stats_reset, dealloc = row
    top = _top_sql(schema, columns)
    rows = conn.execute(top, (QUERY_TEXT_CHARS, f"{MARKER}%", limit)).fetchall()

    stats = QueryStats(
        available=True,
        read_at=read_at.astimezone(UTC),
        stats_reset=None if stats_reset is None else stats_reset.astimezone(UTC),
        queries=[_slow_query(row) for row in rows],
    )
    stats.notes = _notes(stats, dealloc, conn.info.user)
    return stats


def _top_sql(schema: sql.Identifier, columns: list[str]) -> sql.Composed:
    # Version 1.8 (PostgreSQL 13) split planning from execution time and renamed the columns.
    new_names = "total_exec_time" in columns
    total, mean = (
        ("total_exec_time", "mean_exec_time") if new_names else ("total_time", "mean_time")
    )
    # With pg_stat_statements.track = all, statements inside functions are recorded as well
    # and their time counted twice: once alone and once in the call that ran them.
    toplevel = "s.toplevel" if "toplevel" in columns else "true"
    return sql.SQL(TOP_SQL).format(
        total=sql.Identifier(total),
        mean=sql.Identifier(mean),
        schema=schema,
        view=sql.Identifier("pg_stat_statements"),
        toplevel=sql.SQL(toplevel),
    )


def _slow_query(row: tuple[Any, ...]) -> SlowQuery:
    queryid, database, user, calls, total_ms, mean_ms, rows, share_pct, query = row
    return SlowQuery(
        queryid=queryid,
        database=database,
        user=user,
        calls=calls,
        total_ms=round(total_ms, 3),
        mean_ms=round(mean_ms, 3),
        rows=rows,
        share_pct=round(share_pct, 2),
        query=query,
    )


def _notes(stats: QueryStats, dealloc: int | None, user: str) -> list[str]:
    notes = []
    if stats.stats_reset is None:
        notes.append("start of the period unknown: pg_stat_statements before 1.9 does not say")
    if dealloc:
        notes.append(
            f"statements evicted {dealloc} times since the reset: the least run ones are "
            "missing; raise pg_stat_statements.max"
        )
    if any(found.query == HIDDEN_TEXT for found in stats.queries):
        notes.append(f"other roles' statement texts are hidden: grant pg_read_all_stats to {user}")
    return notes


def _reset(conn: psycopg.Connection[Any], schema: str) -> datetime:
    reset = sql.SQL(RESET_SQL).format(schema=sql.Identifier(schema))
    row = conn.execute(reset).fetchone()
    assert row is not None, "a function call returns one row"
    reset_at: datetime = row[1]
    return reset_at


def _describe(exc: BaseException, parts: dict[str, Any]) -> str:
    # libpq's messages run over several lines; a reason is one.
    reason = " ".join(str(exc).split()) or type(exc).__name__
    password = str(parts.get("password") or "")
    return reason.replace(password, "***") if password else reason

"""Weekly database maintenance (queue `maintenance`): ANALYZE and VACUUM of every user table,
a bloat report, and the reset of pg_stat_statements once the weekly review has read it."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import conninfo, sql

from tasks.datachecks import PostgresParams
from tasks.pgstats import slowest_queries
from workers import reports
from workers.app import app
from workers.config import BackupDatabase, Config, get_config
from workers.db import transaction
from workers.errors import NotFound, SourceError
from workers.settings import get_settings, read_env_secret

log = logging.getLogger(__name__)

APPLICATION_NAME = "caretaker-maintenance"
# Seconds a statement waits for a table's lock: a table in use is failed for this run, and
# the run goes on with the next one.
LOCK_TIMEOUT_S = 10.0
# Seconds one statement may run; the VACUUM of a large table is what takes long.
STATEMENT_TIMEOUT_S = 3600.0
# Seconds to connect; libpq waits at least 2 s whatever is asked.
CONNECT_TIMEOUT_S = 10
# The scheduled run stops its statements at this share of the task's soft time limit, so it
# still stores its report before Celery stops it or Redis hands the task to another worker.
RUN_SHARE_OF_LIMIT = 0.8
# Names of this host: DSNs naming the local server either way name one server.
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")
LAST_TIMES = ("last_vacuum_at", "last_autovacuum_at", "last_analyze_at", "last_autoanalyze_at")
# Each alone: ANALYZE first refreshes the planner's statistics even when VACUUM cannot run.
STATEMENTS = ("ANALYZE", "VACUUM (ANALYZE)")

EXTENSIONS_SQL = """
SELECT e.extname, n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname IN ('pgstattuple', 'pg_stat_statements')
"""
# Ordinary tables and materialized views, the longest unvacuumed first: a run cut short by its
# deadline leaves the recently vacuumed ones for the next. Partitioned parents are left out,
# their partitions are listed themselves; so are other sessions' temporary tables.
TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'm') AND c.relpersistence <> 't'
   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
 ORDER BY greatest(pg_stat_get_last_vacuum_time(c.oid), pg_stat_get_last_autovacuum_time(c.oid))
          NULLS FIRST, n.nspname, c.relname
"""
# Read from the statistics system: takes no lock on the table.
STATS_SQL = """
SELECT n_live_tup, n_dead_tup, last_vacuum, last_autovacuum, last_analyze, last_autoanalyze
  FROM pg_stat_user_tables WHERE relid = %s::oid
"""
SIZES_SQL = "SELECT pg_table_size(%s::oid::regclass), pg_indexes_size(%s::oid::regclass)"
PGSTATTUPLE_SQL = (
    "SELECT dead_tuple_percent, approx_free_percent FROM {schema}.pgstattuple_approx(%s::oid)"
)
DEAD_AFTER_SQL = "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = %s::oid"
# The newest reading by the weekly review of any of the given check targets.
REVIEW_READING_SQL = """
SELECT r.id, (d->>'read_at')::timestamptz AS read_at, (d->>'reset_at')::timestamptz AS reset_at
  FROM reports r CROSS JOIN LATERAL jsonb_array_elements(r.body->'databases') d
 WHERE r.kind = 'performance' AND d->>'target' = ANY(%s) AND d->>'available' = 'true'
 ORDER BY 2 DESC NULLS LAST LIMIT 1
"""
# Resets made by earlier maintenance runs: the last reset of a server that does not say it.
RECORDED_RESET_SQL = """
SELECT max((d->'statements'->>'reset_at')::timestamptz) AS reset_at
  FROM reports r CROSS JOIN LATERAL jsonb_array_elements(r.body->'databases') d
 WHERE r.kind = 'maintenance' AND d->>'server' = %s
"""


@dataclass(frozen=True)
class Limits:
    """How long a statement may wait for a lock and run, and the monotonic time past which
    no statement runs (None: no deadline)."""

    lock_timeout_s: float = LOCK_TIMEOUT_S
    statement_timeout_s: float = STATEMENT_TIMEOUT_S
    deadline: float | None = None

    def left_s(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


@dataclass(frozen=True)
class Table:
    oid: int
    schema: str
    name: str

    @property
    def shown(self) -> str:
        return f"{self.schema}.{self.name}"


class _DatabaseFailed(Exception):
    """The database cannot be connected to, or listed: the rest of its tables wait."""


class Session:
    """The maintenance connection to one database, in autocommit (VACUUM cannot run in a
    transaction block), opened again when the server drops it. Statements are sent alone."""

    def __init__(self, dsn: str, limits: Limits) -> None:
        self.limits = limits
        self.warnings: list[str] = []
        self._parts = connection_parts(dsn, limits)
        self._conn: psycopg.Connection[Any] | None = None
        self._timeout_ms = 0

    def execute(self, query: Any, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        conn = self._connection()
        self._keep_deadline(conn)
        self.warnings.clear()
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description is not None else []

    def describe(self, exc: BaseException) -> str:
        """The error as one line, without the password."""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        password = str(self._parts.get("password") or "")
        return reason.replace(password, "***") if password else reason

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(autocommit=True, **self._parts)
            except psycopg.Error as exc:
                raise _DatabaseFailed(f"cannot connect: {self.describe(exc)}") from exc
            self._conn.add_notice_handler(self._notice)
            self._timeout_ms = _ms(self.limits.statement_timeout_s)
        return self._conn

    def _keep_deadline(self, conn: psycopg.Connection[Any]) -> None:
        # Near the deadline a statement gets only the time left (0 would mean no limit).
        left_ms = max(1, _ms(min(self.limits.left_s(), self.limits.statement_timeout_s)))
        if left_ms < self._timeout_ms:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{left_ms}ms",))
            self._timeout_ms = left_ms

    def _notice(self, diag: psycopg.errors.Diagnostic) -> None:
        # VACUUM and ANALYZE skip a table they may not lock or touch with a warning, no error.
        if diag.severity_nonlocalized == "WARNING":
            self.warnings.append(diag.message_primary or "warning without a message")


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def connection_parts(dsn: str, limits: Limits) -> dict[str, Any]:
    """libpq parameters of a maintenance session: the DSN's, with timeouts set at start."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq's reason may quote part of the string, password included.
        raise ValueError("the DSN is not a valid PostgreSQL connection string") from None
    options = (
        f"-c statement_timeout={_ms(limits.statement_timeout_s)}"
        f" -c lock_timeout={_ms(limits.lock_timeout_s)}"
    )
    parts["options"] = f"{parts.get('options') or ''} {options}".strip()
    parts["connect_timeout"] = CONNECT_TIMEOUT_S
    parts.setdefault("application_name", APPLICATION_NAME)
    return parts


def server_of(dsn: str) -> str:
    """The server a DSN names, as host:port, with the local host under one name."""
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ValueError("the DSN is not a valid PostgreSQL connection string") from None
    host = str(parts.get("host") or parts.get("hostaddr") or "")
    if host in LOCAL_HOSTS or host.startswith("/"):
        host = "localhost"
    return f"{host}:{parts.get('port') or 5432}"


def select_databases(config: Config, name: str | None) -> list[BackupDatabase]:
    """Every database of backups.databases, or the one named; NotFound for an unknown name."""
    databases = config.backups.databases
    if name is None:
        return list(databases)
    found = [database for database in databases if database.name == name]
    if not found:
        known = ", ".join(database.name for database in databases) or "none"
        raise NotFound(f"no database named {name!r} in backups.databases (configured: {known})")
    return found


def list_tables(session: Session) -> list[Table]:
    return [Table(oid, schema, name) for oid, schema, name in session.execute(TABLES_SQL)]


def read_bloat(session: Session, table: Table, pgstattuple: str | None) -> dict[str, Any]:
    """The table's state before maintenance: dead tuples against all from the statistics
    system or, where pgstattuple is installed (`pgstattuple` names its schema), its estimate
    of the dead and free shares of the table's bytes. What cannot be read is None, and why is
    in `notes`."""
    notes: list[str] = []
    stats = _read(session, "statistics", STATS_SQL, (table.oid,), notes)
    live, dead, *last = stats[0] if stats else (None,) * (2 + len(LAST_TIMES))
    sizes = _read(session, "sizes", SIZES_SQL, (table.oid, table.oid), notes)
    table_bytes, index_bytes = sizes[0] if sizes else (None, None)
    ratio = None if live is None or dead is None or live + dead == 0 else dead / (live + dead)

    bloat = {
        "live_tuples": live,
        "dead_tuples": dead,
        "dead_ratio": ratio,
        **dict(zip(LAST_TIMES, map(_iso, last), strict=True)),
        "table_bytes": table_bytes,
        "index_bytes": index_bytes,
        "source": "pg_stat_user_tables",
        "dead_pct": None if ratio is None else round(100 * ratio, 2),
        "free_pct": None,
        "notes": notes,
    }
    if pgstattuple is not None:
        query = sql.SQL(PGSTATTUPLE_SQL).format(schema=sql.Identifier(pgstattuple))
        found = _read(session, "pgstattuple", query, (table.oid,), notes)
        if found:
            dead_pct, free_pct = found[0]
            bloat |= {"source": "pgstattuple_approx", "dead_pct": round(dead_pct, 2)}
            bloat["free_pct"] = round(free_pct, 2)
    return bloat


def _read(
    session: Session, what: str, query: Any, params: tuple[Any, ...], notes: list[str]
) -> list[tuple[Any, ...]]:
    try:
        return session.execute(query, params)
    except psycopg.Error as exc:
        notes.append(f"{what} not read: {session.describe(exc)}")
        return []


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def run_statement(session: Session, statement: str, table: Table) -> dict[str, Any]:
    """Run one maintenance statement on the table: ok, or failed with the error or warning."""
    query = sql.SQL("{} {}").format(sql.SQL(statement), sql.Identifier(table.schema, table.name))
    started = time.monotonic()
    try:
        session.execute(query)
        error = "; ".join(session.warnings) or None
    except psycopg.Error as exc:
        error = session.describe(exc)
    return {
        "statement": statement,
        "status": "failed" if error else "ok",
        "error": error,
        "seconds": round(time.monotonic() - started, 3),
    }


def maintain_table(session: Session, table: Table, pgstattuple: str | None) -> dict[str, Any]:
    """Read the table's bloat, then ANALYZE and VACUUM it; a failure is recorded, not raised."""
    started = time.monotonic()
    before = read_bloat(session, table, pgstattuple)

    steps = [run_statement(session, statement, table) for statement in STATEMENTS]

    after = _read(session, "dead tuples after", DEAD_AFTER_SQL, (table.oid,), before["notes"])
    failed = [step for step in steps if step["status"] == "failed"]
    entry = _table_entry(
        table, "failed" if failed else "ok", failed[0]["error"] if failed else None
    )
    entry |= {"seconds": round(time.monotonic() - started, 3), "before": before, "steps": steps}
    entry["dead_tuples_after"] = after[0][0] if after else None
    if failed:
        log.warning("table maintenance failed table=%s error=%s", table.shown, entry["error"])
    return entry


def _table_entry(table: Table, status: str, error: str | None) -> dict[str, Any]:
    return {
        "table": table.shown,
        "schema": table.schema,
        "name": table.name,
        "status": status,
        "error": error,
        "seconds": 0.0,
        "before": None,
        "steps": [],
        "dead_tuples_after": None,
    }


def maintain_database(
    target: BackupDatabase, config: Config, limits: Limits, reset_servers: dict[str, str]
) -> dict[str, Any]:
    """Maintain every user table of one database, then reset pg_stat_statements if due.
    `reset_servers` maps the servers already reset in this run to the database it was done in."""
    started = time.monotonic()
    entry: dict[str, Any] = {
        "name": target.name,
        "server": None,
        "dbname": None,
        "status": "ok",
        "error": None,
        "seconds": 0.0,
        "pgstattuple": False,
        "tables": [],
        "statements": None,
    }
    dsn, installed = "", False
    try:
        dsn = target.reveal()
        entry["server"] = server_of(dsn)
        entry["dbname"] = conninfo.conninfo_to_dict(dsn).get("dbname")
        installed = _maintain_tables(Session(dsn, limits), entry, limits)
    except KeyError as exc:
        entry["error"] = str(exc.args[0])
    except (ValueError, _DatabaseFailed) as exc:
        entry["error"] = str(exc)

    if entry["error"] is None:
        # After the tables, so the new period does not start with maintenance's own statements.
        entry["statements"] = reset_statements(dsn, entry, installed, config, reset_servers)
    entry["status"] = _database_status(entry)
    entry["seconds"] = round(time.monotonic() - started, 3)
    log.info(
        "database maintained database=%s server=%s status=%s tables=%d seconds=%.1f",
        target.name,
        entry["server"],
        entry["status"],
        len(entry["tables"]),
        entry["seconds"],
    )
    return entry


def _maintain_tables(session: Session, entry: dict[str, Any], limits: Limits) -> bool:
    """Fill entry's tables; return whether pg_stat_statements is installed."""
    try:
        extensions = dict(session.execute(EXTENSIONS_SQL))
        tables = list_tables(session)
    except psycopg.Error as exc:
        session.close()
        raise _DatabaseFailed(f"cannot list tables: {session.describe(exc)}") from exc

    entry["pgstattuple"] = "pgstattuple" in extensions
    try:
        for table in tables:
            if limits.left_s() <= 0:
                entry["tables"].append(_table_entry(table, "skipped", "no time left in this run"))
                continue
            entry["tables"].append(maintain_table(session, table, extensions.get("pgstattuple")))
    finally:
        session.close()
    return "pg_stat_statements" in extensions


def _database_status(entry: dict[str, Any]) -> str:
    statuses = {table["status"] for table in entry["tables"]}
    statements = entry["statements"] or {}
    if entry["error"] or "failed" in statuses or statements.get("action") == "failed":
        return "failed"
    return "incomplete" if "skipped" in statuses else "ok"


def reset_statements(
    dsn: str,
    entry: dict[str, Any],
    installed: bool,
    config: Config,
    reset_servers: dict[str, str],
) -> dict[str, Any]:
    """Reset pg_stat_statements of the database's server once the weekly review has read it
    (or when no review reads that server); otherwise skip, and say why."""
    server = entry["server"]
    if not installed:
        return _statements("skipped", "pg_stat_statements is not installed in this database")
    if server in reset_servers:
        return _statements("skipped", f"reset in this run through database {reset_servers[server]}")
    try:
        reading = slowest_queries(dsn, limit=1)
    except SourceError as exc:
        return _statements("failed", str(exc))
    if not reading.available:
        return _statements("skipped", str(reading.reason))

    due, reason, times = reset_due(server, reading.stats_reset, config)
    if not due:
        log.info("statements not reset database=%s reason=%s", entry["name"], reason)
        return _statements("skipped", reason, **times)
    try:
        done = slowest_queries(dsn, limit=1, reset=True)
    except SourceError as exc:
        return _statements("failed", str(exc), **times)
    if done.reset_at is None:
        # pgstats notes a refused reset last.
        return _statements("failed", done.notes[-1] if done.notes else str(done.reason), **times)

    reset_servers[server] = entry["name"]
    log.info("statements reset database=%s server=%s", entry["name"], server)
    return _statements("reset", reason, reset_at=_iso(done.reset_at), **times)


def _statements(
    action: str,
    reason: str,
    reset_at: str | None = None,
    last_reset_at: str | None = None,
    reviewed_at: str | None = None,
) -> dict[str, Any]:
    return {
        "action": action,
        "reason": reason,
        "reset_at": reset_at,
        "last_reset_at": last_reset_at,
        "reviewed_at": reviewed_at,
    }


def reset_due(
    server: str, stats_reset: datetime | None, config: Config
) -> tuple[bool, str, dict[str, str | None]]:
    """Whether the server's statements may be reset, why, and the times that decided it.

    Due when no review database is on the server, or when the newest review reading of one
    is later than the last reset. Both times come from the server's clock: the review keeps
    the server's read_at, and the last reset is the server's own stats_reset, or for an
    extension older than 1.9 the latest reset caretaker recorded.
    """
    reviewed = reviewed_targets(server, config)
    if not reviewed:
        times = {"last_reset_at": _iso(stats_reset), "reviewed_at": None}
        return True, "no performance review reads this server", times
    with transaction() as conn:
        reading = conn.execute(REVIEW_READING_SQL, (reviewed,)).fetchone()
        recorded = conn.execute(RECORDED_RESET_SQL, (server,)).fetchone()

    read_at = reading["read_at"] if reading else None
    resets: list[datetime | None] = [stats_reset, recorded["reset_at"] if recorded else None]
    resets.append(reading["reset_at"] if reading else None)
    last_reset = max((at for at in resets if at is not None), default=None)
    times = {"last_reset_at": _iso(last_reset), "reviewed_at": _iso(read_at)}
    if reading is None or read_at is None:
        names = ", ".join(reviewed)
        return False, f"no performance review has read it yet (review databases: {names})", times
    if last_reset is not None and read_at <= last_reset:
        return (
            False,
            f"not read by a performance review since the last reset at {_shown(last_reset)}"
            f" (latest reading {_shown(read_at)}, report {reading['id']})",
            times,
        )
    return (
        True,
        f"read by the performance review at {_shown(read_at)} (report {reading['id']})",
        times,
    )


def _shown(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def reviewed_targets(server: str, config: Config) -> list[str]:
    """The review databases on this server. One whose DSN cannot be read counts as on every
    server: a reset then waits for its review rather than taking a week from it."""
    from_server = []
    for name in config.analysis.review_databases:
        found = config.checks.find(name)
        if found is None:
            continue
        params = PostgresParams.model_validate(found[1].params)
        try:
            dsn = read_env_secret(params.dsn_env) if params.dsn_env else str(params.dsn)
            on_server = server_of(dsn) == server
        except (KeyError, ValueError):
            on_server = True
        if on_server:
            from_server.append(name)
    return from_server


def maintenance_report(
    config: Config, target: str | None = None, limits: Limits | None = None
) -> dict[str, Any]:
    """Maintain every configured database, or the one named, and build the report."""
    databases = select_databases(config, target)
    limits = limits or Limits()
    started_at = datetime.now(UTC)
    reset_servers: dict[str, str] = {}

    entries = [maintain_database(found, config, limits, reset_servers) for found in databases]

    tables = [table["status"] for entry in entries for table in entry["tables"]]
    statuses = {entry["status"] for entry in entries}
    return {
        "kind": "maintenance",
        "period_start": started_at.isoformat(),
        "period_end": datetime.now(UTC).isoformat(),
        "overall": next((s for s in ("failed", "incomplete") if s in statuses), "ok"),
        "tables_ok": tables.count("ok"),
        "tables_failed": tables.count("failed"),
        "tables_skipped": tables.count("skipped"),
        "databases": entries,
    }


def store_report(report: dict[str, Any]) -> int:
    with transaction() as conn:
        report_id = reports.store(conn, report)
    log.info(
        "maintenance stored report_id=%s overall=%s tables_ok=%d tables_failed=%d",
        report_id,
        report["overall"],
        report["tables_ok"],
        report["tables_failed"],
    )
    return report_id


def maintain_now(target: str | None = None) -> dict[str, Any]:
    """Maintain now, in this process and without a deadline; store the report and return it
    with its id."""
    report = maintenance_report(get_config(), target)
    report["id"] = store_report(report)
    return report


@app.task(
    name="caretaker.maintenance.maintain_databases", acks_late=True, reject_on_worker_lost=True
)
def maintain_databases() -> int:
    """ANALYZE and VACUUM every user table of every database in backups.databases, report
    their bloat, reset pg_stat_statements where the weekly review has read it; store the
    report and return its id. Statements stop at RUN_SHARE_OF_LIMIT of the soft time limit;
    the tables not reached are the first of the next run. Harmless twice: a second run finds
    nothing read since its reset to reset again. Not retried. Changes table statistics,
    visibility maps and free space, and the pg_stat_statements counters."""
    deadline = time.monotonic() + get_settings().task_soft_time_limit_s * RUN_SHARE_OF_LIMIT
    report = maintenance_report(get_config(), limits=Limits(deadline=deadline))
    return store_report(report)

"""PostgreSQL access: one connection pool per process, and versioned migrations."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from workers.errors import DatabaseConflict, DatabaseUnavailable
from workers.settings import get_settings

log = logging.getLogger(__name__)

Row = dict[str, Any]
Connection = psycopg.Connection[Row]

_pool: ConnectionPool[Connection] | None = None
_pool_lock = threading.Lock()
# Serialises migrations across processes that start at the same time.
_MIGRATION_LOCK_ID = 0x63617265
# SQLSTATE classes and codes that mean PostgreSQL is out of reach rather than the query wrong:
# connection exceptions, insufficient resources, operator intervention (shutdown, crash).
UNAVAILABLE_CLASSES = ("08", "53")
UNAVAILABLE_STATES = ("57P01", "57P02", "57P03")
# Seconds the pool keeps retrying a lost connection before it lets a new request try afresh.
DB_RECONNECT_GIVE_UP_S = 10.0


def _reset_after_fork() -> None:
    # A pool's sockets and threads belong to the parent; a forked worker child opens its own.
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_reset_after_fork)


def get_pool() -> ConnectionPool[Connection]:
    """The process's pool, opened on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            settings = get_settings()
            _pool = ConnectionPool(
                settings.database_url,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                kwargs={"row_factory": dict_row, "connect_timeout": settings.db_connect_timeout_s},
                timeout=settings.db_connect_timeout_s,
                # The pool's retry delay doubles without bound; giving up early lets the next
                # request start a fresh attempt, so service resumes soon after PostgreSQL does.
                reconnect_timeout=DB_RECONNECT_GIVE_UP_S,
                open=True,
                check=ConnectionPool.check_connection,
                name="caretaker",
            )
        return _pool


def close_pool() -> None:
    """Close the process's pool, if open."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


@contextmanager
def transaction() -> Iterator[Connection]:
    """A pooled connection inside one transaction.

    PostgreSQL out of reach raises DatabaseUnavailable and a deadlock or serialisation
    failure DatabaseConflict, both transient; any other database error is raised as it is.
    """
    pool = get_pool()
    try:
        with pool.connection() as conn, conn.transaction():
            yield conn
    except PoolTimeout as exc:
        _discard(pool)
        raise DatabaseUnavailable(f"postgresql unavailable: {_describe(exc)}") from exc
    except psycopg.OperationalError as exc:
        raise _classify(exc) from exc


def _classify(exc: psycopg.OperationalError) -> Exception:
    state = exc.sqlstate or ""
    if state.startswith("40"):
        return DatabaseConflict(f"postgresql conflict, retry: {_describe(exc)}")
    if not state or state[:2] in UNAVAILABLE_CLASSES or state in UNAVAILABLE_STATES:
        return DatabaseUnavailable(f"postgresql unavailable: {_describe(exc)}")
    return exc


def _discard(pool: ConnectionPool[Connection]) -> None:
    # After an outage the pool may sit in a long reconnect backoff; a fresh pool connects at
    # once. The old one is closed in the background, without holding up the caller.
    global _pool
    with _pool_lock:
        if _pool is not pool:
            return
        _pool = None
    threading.Thread(target=pool.close, kwargs={"timeout": 1.0}, daemon=True).start()


def _describe(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _unavailable(url: str, exc: Exception) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"postgresql unavailable at {redact(url)}: {_describe(exc)}")


def redact(url: str) -> str:
    """The database URL without its password, fit for logs and messages."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable database url>"
    params.pop("password", None)
    return make_conninfo("", **params)


def ensure_database(url: str) -> bool:
    """Create the database named in url if it does not exist; True when it was created."""
    params = conninfo_to_dict(url)
    name = params.get("dbname") or params.get("user") or "postgres"
    admin = make_conninfo(url, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone():
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(name))))
    except psycopg.errors.DuplicateDatabase:
        return False
    except psycopg.OperationalError as exc:
        raise _unavailable(url, exc) from exc
    log.info("created database name=%s", name)
    return True


def migrations() -> list[tuple[int, str, str]]:
    """Every migration shipped with caretaker, as (version, name, sql), in order."""
    found = []
    for entry in resources.files("workers.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


def migrate(url: str) -> list[str]:
    """Create the database if missing and apply pending migrations; return their names."""
    ensure_database(url)
    applied: list[str] = []
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.commit()
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, text in migrations():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(text)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (version, name),
                    )
                log.info("applied migration name=%s", name)
                applied.append(name)
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
    except psycopg.OperationalError as exc:
        raise _unavailable(url, exc) from exc
    return applied

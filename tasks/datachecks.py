"""Health checks of PostgreSQL (connections, queries, replica lag) and Redis (memory, stats)."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import redis
from psycopg import conninfo
from pydantic import ConfigDict, Field, field_validator, model_validator
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.checks import CheckResult, Params, Status, grade, run_within, timed, worst
from workers.settings import read_env_secret

# Long-running queries are all counted; only the longest this many are listed in a result.
LONG_QUERIES_LISTED = 20
# Characters of a long query's text kept in a result.
QUERY_TEXT_CHARS = 200
# Keyspace lookups (hits + misses) needed before a Redis hit rate is graded.
HIT_RATE_MIN_LOOKUPS = 1000
APPLICATION_NAME = "caretaker-check"

CONNECTIONS_SQL = """
SELECT current_setting('max_connections')::int,
       count(*) FILTER (WHERE backend_type = 'client backend'),
       pg_is_in_recovery()
FROM pg_stat_activity
"""
LONG_QUERIES_SQL = """
SELECT pid, extract(epoch FROM now() - query_start)::float8, left(query, %s)
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND state = 'active' AND pid <> pg_backend_pid()
  AND now() - query_start > make_interval(secs => %s)
ORDER BY query_start
"""
IDLE_IN_TRANSACTION_SQL = """
SELECT count(*) FROM pg_stat_activity
WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND now() - state_change > make_interval(secs => %s)
"""
# Replay timestamps only move when a transaction commits: a caught-up replica of an idle
# primary would otherwise show a lag growing for ever.
REPLICATION_LAG_SQL = """
SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END,
       (SELECT status FROM pg_stat_wal_receiver)
"""


class PostgresParams(Params):
    """Exactly one of dsn_env (the variable holding the DSN) and dsn (one without password)."""

    # A rejected DSN must not be echoed into logs by the validation error.
    model_config = ConfigDict(hide_input_in_errors=True)

    dsn_env: str | None = None
    dsn: str | None = None
    # libpq waits at least 2 s whatever is asked.
    connect_timeout_s: int = Field(default=5, ge=2, le=300)
    statement_timeout_ms: int = Field(default=5000, ge=1, le=300_000)
    connections_warning_pct: float = Field(default=80.0, ge=0, le=100)
    connections_critical_pct: float = Field(default=95.0, ge=0, le=100)
    long_query_s: float = Field(default=300.0, gt=0)
    idle_in_transaction_s: float = Field(default=60.0, gt=0)
    replication_lag_warning_s: float = Field(default=30.0, ge=0)
    replication_lag_critical_s: float = Field(default=300.0, ge=0)

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError:
            # libpq's reason may quote part of the string, password included.
            raise ValueError("dsn is not a valid libpq connection string") from None
        if "password" in parts:
            raise ValueError(
                "dsn must not contain a password: put the whole dsn in an environment "
                "variable and name it in dsn_env"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> PostgresParams:
        if (self.dsn is None) == (self.dsn_env is None):
            raise ValueError("give exactly one of dsn and dsn_env")
        return self


def check_postgres(params: PostgresParams) -> CheckResult:
    """Connections, long queries, idle transactions and replica lag of a PostgreSQL server.

    Read-only. The role needs pg_monitor to see other roles' sessions.
    """
    started = time.monotonic()
    try:
        parts = _connection_parts(params)
    except ValueError as exc:
        return timed(started, "critical", str(exc), {"error": str(exc)})
    target = _postgres_target(parts)

    # libpq bounds connecting and the server bounds each statement; this also bounds name
    # lookups and a server that stops answering. An abandoned thread lingers until it answers.
    deadline_s = params.connect_timeout_s + params.statement_timeout_ms / 1000
    try:
        readings = run_within(lambda: _read_postgres(parts, params), deadline_s, "check-postgres")
    except (psycopg.Error, TimeoutError) as exc:
        return _failed(started, target, exc, str(parts.get("password") or ""))

    status, summary = _grade_postgres(readings, params)
    pct = readings["connections_pct"]
    return timed(started, status, f"postgresql {target}: {summary}", readings, value=pct)


def _connection_parts(params: PostgresParams) -> dict[str, Any]:
    """libpq parameters of the DSN with this check's timeouts; ValueError when it is unusable."""
    if params.dsn_env is not None:
        try:
            dsn = read_env_secret(params.dsn_env)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    else:
        assert params.dsn is not None
        dsn = params.dsn
    try:
        parts = conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ValueError(f"the dsn in {params.dsn_env} is not a valid connection string") from None

    # Set at connection start, so even the first statement cannot hang past the timeout.
    options = f"-c statement_timeout={params.statement_timeout_ms}"
    options += " -c default_transaction_read_only=on"
    parts["options"] = f"{parts.get('options') or ''} {options}".strip()
    parts["connect_timeout"] = params.connect_timeout_s
    parts.setdefault("application_name", APPLICATION_NAME)
    return parts


def _postgres_target(parts: dict[str, Any]) -> str:
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or parts.get('user') or ''}"


def _read_postgres(parts: dict[str, Any], params: PostgresParams) -> dict[str, Any]:
    with psycopg.connect(autocommit=True, **parts) as conn:
        max_connections, connections, is_replica = _one_row(conn, CONNECTIONS_SQL)
        long_queries = conn.execute(LONG_QUERIES_SQL, (QUERY_TEXT_CHARS, params.long_query_s))
        found = long_queries.fetchall()
        (idle,) = _one_row(conn, IDLE_IN_TRANSACTION_SQL, (params.idle_in_transaction_s,))
        lag_s = receiver = None
        if is_replica:
            lag_s, receiver = _one_row(conn, REPLICATION_LAG_SQL)

    return {
        "connections": connections,
        "max_connections": max_connections,
        "connections_pct": round(100 * connections / max_connections, 1),
        "long_query_count": len(found),
        "long_queries": [
            {"pid": pid, "duration_s": round(duration_s, 1), "query": query}
            for pid, duration_s, query in found[:LONG_QUERIES_LISTED]
        ],
        "idle_in_transaction": idle,
        "is_replica": is_replica,
        "replication_lag_s": None if lag_s is None else round(max(lag_s, 0.0), 1),
        "wal_receiver_status": receiver,
    }


def _one_row(conn: psycopg.Connection[Any], sql: str, args: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    assert row is not None, "an aggregate query returns one row"
    return row


def _grade_postgres(readings: dict[str, Any], params: PostgresParams) -> tuple[Status, str]:
    pct = readings["connections_pct"]
    statuses = [grade(pct, params.connections_warning_pct, params.connections_critical_pct)]
    notes = [f"{readings['connections']}/{readings['max_connections']} connections ({pct:g}%)"]
    if readings["long_query_count"]:
        statuses.append("warning")
        notes.append(f"queries over {params.long_query_s:g}s: {readings['long_query_count']}")
    if readings["idle_in_transaction"]:
        statuses.append("warning")
        notes.append(
            f"sessions idle in transaction over {params.idle_in_transaction_s:g}s: "
            f"{readings['idle_in_transaction']}"
        )
    if readings["is_replica"]:
        lag_s = readings["replication_lag_s"]
        if lag_s is None:
            statuses.append("unknown")
            notes.append("replica, lag unknown: nothing replayed yet")
        else:
            limits_s = (params.replication_lag_warning_s, params.replication_lag_critical_s)
            statuses.append(grade(lag_s, *limits_s))
            notes.append(f"replica lag {lag_s:g}s")
        # Everything received is replayed, so a replica cut off from its primary shows no lag:
        # only its WAL receiver tells that nothing more is coming.
        if readings["wal_receiver_status"] != "streaming":
            statuses.append("warning")
            notes.append(f"replica not streaming (wal receiver: {readings['wal_receiver_status']})")
    return worst(statuses), ", ".join(notes)


def _failed(started: float, target: str, exc: Exception, password: str) -> CheckResult:
    # libpq's messages run over several lines; a summary is one.
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if password:
        reason = reason.replace(password, "***")
    details = {"target": target, "error": reason}
    return timed(started, "critical", f"cannot check postgresql {target}: {reason}", details)


class RedisParams(Params):
    """A Redis URL without password; password_env names the variable holding one."""

    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field(pattern=r"^(redis|rediss|unix)://")
    password_env: str | None = None
    timeout_s: float = Field(default=3.0, gt=0, le=300)
    memory_warning_pct: float = Field(default=80.0, ge=0, le=100)
    memory_critical_pct: float = Field(default=95.0, ge=0, le=100)
    # keyspace hits, misses and evicted_keys count from the server's start or CONFIG RESETSTAT.
    hit_rate_warning_pct: float | None = Field(default=None, ge=0, le=100)
    evictions_warning: int | None = Field(default=None, ge=0)
    clients_warning: int | None = Field(default=None, ge=0)

    @field_validator("url")
    @classmethod
    def _no_password(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.password is not None or "password" in parse_qs(parts.query):
            raise ValueError(
                "url must not contain a password: name an environment variable "
                "holding it in password_env"
            )
        return value


def check_redis(params: RedisParams) -> CheckResult:
    """Ping time, memory against maxmemory, hit rate, evictions and clients of a Redis server."""
    started = time.monotonic()
    parts = urlsplit(params.url)
    target = parts.netloc.rpartition("@")[2] + parts.path
    try:
        password = None if params.password_env is None else read_env_secret(params.password_env)
    except KeyError as exc:
        return timed(started, "critical", exc.args[0], {"target": target, "error": exc.args[0]})

    # Socket timeouts bound each connect and read; this bounds the whole exchange and lookups.
    try:
        readings = run_within(
            lambda: _read_redis(params, password), params.timeout_s, "check-redis"
        )
    except (TimeoutError, redis.TimeoutError):
        summary = f"no answer from redis {target} within {params.timeout_s:g}s"
        return timed(started, "critical", summary, {"target": target, "error": "timeout"})
    except (redis.RedisError, ValueError) as exc:  # ValueError: a URL redis-py cannot use
        reason = " ".join(str(exc).split()) or type(exc).__name__
        summary = f"cannot check redis {target}: {reason}"
        return timed(started, "critical", summary, {"target": target, "error": reason})

    statuses, notes = _grade_redis(readings, params)
    used_pct = readings.pop("used_memory_pct")
    summary = f"redis {target}: ping {readings['ping_ms']:g} ms, " + ", ".join(notes)
    return timed(started, worst(statuses), summary, readings, value=used_pct)


def _read_redis(params: RedisParams, password: str | None) -> dict[str, Any]:
    # No retries: each would add a whole timeout_s to a check of a server that does not answer.
    client = redis.Redis.from_url(
        params.url,
        password=password,
        socket_connect_timeout=params.timeout_s,
        socket_timeout=params.timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
    with client:
        # INFO first opens the connection, so the ping times one round trip only.
        info = client.info()
        ping_started = time.monotonic()
        client.ping()
        ping_ms = round((time.monotonic() - ping_started) * 1000, 2)

    used, maxmemory = int(info["used_memory"]), int(info["maxmemory"])
    lookups = int(info["keyspace_hits"]) + int(info["keyspace_misses"])
    return {
        "ping_ms": ping_ms,
        "used_memory": used,
        "maxmemory": maxmemory,
        "used_memory_pct": round(100 * used / maxmemory, 1) if maxmemory else None,
        "keyspace_lookups": lookups,
        "hit_rate_pct": round(100 * int(info["keyspace_hits"]) / lookups, 1) if lookups else None,
        "evicted_keys": int(info["evicted_keys"]),
        "connected_clients": int(info["connected_clients"]),
    }


def _grade_redis(readings: dict[str, Any], params: RedisParams) -> tuple[list[Status], list[str]]:
    statuses: list[Status] = []
    notes = ["no maxmemory"]
    used_pct = readings["used_memory_pct"]
    if used_pct is not None:
        statuses.append(grade(used_pct, params.memory_warning_pct, params.memory_critical_pct))
        notes = [f"memory {used_pct:g}% of maxmemory"]
    hit_rate = readings["hit_rate_pct"]
    if (
        params.hit_rate_warning_pct is not None
        and readings["keyspace_lookups"] > HIT_RATE_MIN_LOOKUPS
        and hit_rate < params.hit_rate_warning_pct
    ):
        statuses.append("warning")
        notes.append(f"hit rate {hit_rate:g}% under {params.hit_rate_warning_pct:g}%")
    evicted = readings["evicted_keys"]
    if params.evictions_warning is not None and evicted > params.evictions_warning:
        statuses.append("warning")
        notes.append(f"{evicted} keys evicted, over {params.evictions_warning}")
    clients = readings["connected_clients"]
    if params.clients_warning is not None and clients > params.clients_warning:
        statuses.append("warning")
        notes.append(f"{clients} clients connected, over {params.clients_warning}")
    return statuses, notes

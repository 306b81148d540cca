"""Tests of tasks.datachecks against the shared servers (read only) and private instances."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import redis
from psycopg.rows import TupleRow
from pydantic import ValidationError

from tasks.datachecks import PostgresParams, RedisParams, check_postgres, check_redis
from tests.conftest import PG_HOST, REDIS_URL, free_port, wait_for
from tests.replica import PrivateReplica, TunedPostgres
from tests.services import PrivateRedis

SECRET = "s3cret-Token-x9"
# Longer than the 200 characters a result keeps of a query's text.
SLEEP_SQL = "SELECT pg_sleep(30) -- " + "padding " * 40


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (via the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.fixture(scope="module")
def quiet_pg() -> Iterator[TunedPostgres]:
    """A private cluster where only the test's own sessions run."""
    server = TunedPostgres()
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def sleeping_query(quiet_pg: TunedPostgres) -> Iterator[int]:
    """The pid of a session running a 30 s query in a thread; cancelled at teardown."""
    conn = psycopg.connect(quiet_pg.dsn(), autocommit=True)
    pid = conn.info.backend_pid

    def sleep() -> None:
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            conn.execute(SLEEP_SQL)

    thread = threading.Thread(target=sleep, name="pg-sleep", daemon=True)
    thread.start()
    yield pid
    with psycopg.connect(quiet_pg.dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
    thread.join(10)
    conn.close()


def is_active(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        sql = "SELECT state FROM pg_stat_activity WHERE pid = %s"
        row = conn.execute(sql, (pid,)).fetchone()
    return row is not None and row[0] == "active"


def test_shared_postgres_is_healthy() -> None:
    result = check_postgres(PostgresParams(dsn=f"{PG_HOST}/postgres"))

    details = result.details
    assert result.status == "healthy"
    assert details["max_connections"] >= 10
    assert 1 <= details["connections"] < details["max_connections"]
    assert result.value == round(100 * details["connections"] / details["max_connections"], 1)
    assert details["long_queries"] == []
    assert details["long_query_count"] == 0
    assert details["idle_in_transaction"] == 0
    assert details["is_replica"] is False
    assert details["replication_lag_s"] is None
    assert details["wal_receiver_status"] is None
    assert result.summary.startswith("postgresql ")
    assert result.summary.endswith(
        f"/postgres: {details['connections']}/{details['max_connections']} connections "
        f"({result.value:g}%)"
    )


def test_dsn_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARETAKER_TEST_CHECK_DSN", f"{PG_HOST}/postgres")

    result = check_postgres(PostgresParams(dsn_env="CARETAKER_TEST_CHECK_DSN"))

    assert result.status == "healthy"
    assert result.details["max_connections"] >= 10


def test_a_long_query_is_a_warning(quiet_pg: TunedPostgres, sleeping_query: int) -> None:
    wait_for(lambda: is_active(quiet_pg.dsn(), sleeping_query), 10, "the query to start")
    time.sleep(1.5)

    result = check_postgres(PostgresParams(dsn=quiet_pg.dsn(), long_query_s=1))

    assert result.status == "warning"
    assert result.details["long_query_count"] == 1
    [found] = result.details["long_queries"]
    assert found["pid"] == sleeping_query
    assert 1.5 <= found["duration_s"] < 10
    assert found["query"] == SLEEP_SQL[:200]
    assert result.summary.endswith(" connections (2%), queries over 1s: 1")


def test_a_query_under_long_query_s_is_healthy(
    quiet_pg: TunedPostgres, sleeping_query: int
) -> None:
    wait_for(lambda: is_active(quiet_pg.dsn(), sleeping_query), 10, "the query to start")

    result = check_postgres(PostgresParams(dsn=quiet_pg.dsn(), long_query_s=20))

    assert result.status == "healthy"
    assert result.details["long_query_count"] == 0


def test_idle_in_transaction_is_a_warning(quiet_pg: TunedPostgres) -> None:
    with psycopg.connect(quiet_pg.dsn()) as idle:
        idle.execute("SELECT 1")
        time.sleep(1.5)

        result = check_postgres(PostgresParams(dsn=quiet_pg.dsn(), idle_in_transaction_s=1))

    assert result.status == "warning"
    assert result.details["idle_in_transaction"] == 1
    assert result.details["long_query_count"] == 0
    assert result.summary.endswith(", sessions idle in transaction over 1s: 1")


@pytest.fixture(scope="module")
def small_pg() -> Iterator[TunedPostgres]:
    """A private cluster allowing 5 connections."""
    server = TunedPostgres(max_connections="5")
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def held(small_pg: TunedPostgres) -> Iterator[list[psycopg.Connection[TupleRow]]]:
    """Connections to the small cluster, closed at teardown; a test appends to the list."""
    connections: list[psycopg.Connection[TupleRow]] = []
    yield connections
    for conn in connections:
        conn.close()


def test_connections_near_max_are_graded(
    small_pg: TunedPostgres, held: list[psycopg.Connection[TupleRow]]
) -> None:
    held.extend(psycopg.connect(small_pg.dsn()) for _ in range(3))

    # Thresholds fire above their value: 80% is healthy at the default 80, a warning below it.
    at_default = check_postgres(PostgresParams(dsn=small_pg.dsn()))
    default = check_postgres(PostgresParams(dsn=small_pg.dsn(), connections_warning_pct=79))
    strict = check_postgres(
        PostgresParams(dsn=small_pg.dsn(), connections_warning_pct=70, connections_critical_pct=79)
    )

    # The check's own session is the fourth of five.
    assert at_default.status == "healthy"
    assert default.status == "warning"
    assert default.value == 80.0
    assert default.details["connections"] == 4
    assert default.details["max_connections"] == 5
    assert (
        default.summary == f"postgresql 127.0.0.1:{small_pg.port}/postgres: 4/5 connections (80%)"
    )
    assert strict.status == "critical"
    assert strict.value == 80.0

    held.append(psycopg.connect(small_pg.dsn()))
    full = check_postgres(PostgresParams(dsn=small_pg.dsn()))

    assert full.status == "critical"
    assert full.value == 100.0


def test_no_connection_left_is_critical(
    small_pg: TunedPostgres, held: list[psycopg.Connection[TupleRow]]
) -> None:
    held.extend(psycopg.connect(small_pg.dsn()) for _ in range(5))

    result = check_postgres(PostgresParams(dsn=small_pg.dsn()))

    assert result.status == "critical"
    assert result.value is None
    assert result.summary.startswith(f"cannot check postgresql 127.0.0.1:{small_pg.port}/")
    assert "too many clients already" in result.summary


@pytest.fixture
def replication() -> Iterator[tuple[TunedPostgres, PrivateReplica]]:
    """A private primary and a streaming replica of it on its own port."""
    primary = TunedPostgres(wal_level="replica")
    primary.start()
    replica: PrivateReplica | None = None
    try:
        replica = PrivateReplica(primary)
        replica.start()
        yield primary, replica
    finally:
        if replica is not None:
            replica.destroy()
        primary.destroy()


def write(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def count_beats(dsn: str) -> int:
    """Rows in the beats table; 0 before a replica has replayed its creation."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM beats").fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    assert row is not None
    return int(row[0])


def streaming(params: PostgresParams) -> bool:
    return bool(check_postgres(params).details["wal_receiver_status"] == "streaming")


def test_replica_lag_is_graded(replication: tuple[TunedPostgres, PrivateReplica]) -> None:
    primary, replica = replication
    lagging = PostgresParams(
        dsn=replica.dsn(), replication_lag_warning_s=1, replication_lag_critical_s=2.5
    )
    write(primary.dsn(), "CREATE TABLE beats (at timestamptz DEFAULT now())")
    write(primary.dsn(), "INSERT INTO beats DEFAULT VALUES")
    wait_for(lambda: count_beats(replica.dsn()) == 1, 10, "the replica to replay")

    caught_up = check_postgres(lagging)
    write(replica.dsn(), "SELECT pg_wal_replay_pause()")
    write(primary.dsn(), "INSERT INTO beats DEFAULT VALUES")
    time.sleep(1.2)
    behind = check_postgres(lagging)
    time.sleep(1.5)
    far_behind = check_postgres(lagging)

    assert caught_up.status == "healthy"
    assert caught_up.details["is_replica"] is True
    assert caught_up.details["wal_receiver_status"] == "streaming"
    assert caught_up.details["replication_lag_s"] == 0.0
    assert caught_up.summary.endswith(", replica lag 0s")
    assert behind.status == "warning"
    assert 1.2 <= behind.details["replication_lag_s"] < 2.5
    assert behind.summary.endswith(f", replica lag {behind.details['replication_lag_s']:g}s")
    assert far_behind.status == "critical"
    assert far_behind.details["replication_lag_s"] >= 2.5
    assert count_beats(replica.dsn()) == 1
    assert check_postgres(PostgresParams(dsn=primary.dsn())).details["is_replica"] is False


def test_a_replica_of_a_dead_primary_is_a_warning_though_it_reads_no_lag(
    replication: tuple[TunedPostgres, PrivateReplica],
) -> None:
    # Everything received is replayed, so the lag is 0: only the receiver's status tells.
    primary, replica = replication
    params = PostgresParams(dsn=replica.dsn(), replication_lag_warning_s=1)
    wait_for(lambda: streaming(params), 10, "the replica to stream")

    primary.stop()
    wait_for(lambda: not streaming(params), 10, "the replica to notice")
    result = check_postgres(params)

    assert result.status == "warning"
    assert result.details["replication_lag_s"] == 0.0
    assert result.details["wal_receiver_status"] != "streaming"
    assert "replica not streaming" in result.summary


def test_closed_port_is_critical_quickly() -> None:
    port = free_port()
    started = time.monotonic()

    result = check_postgres(PostgresParams(dsn=f"postgresql://postgres@127.0.0.1:{port}/db"))

    assert time.monotonic() - started < 1
    assert result.status == "critical"
    assert result.value is None
    assert result.summary.startswith(f"cannot check postgresql 127.0.0.1:{port}/db: ")
    assert "Connection refused" in result.summary
    assert result.details == {"target": f"127.0.0.1:{port}/db", "error": result.details["error"]}


def test_a_silent_listener_is_critical_within_the_connect_timeout(silent_port: int) -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{silent_port}/postgres"
    started = time.monotonic()

    result = check_postgres(PostgresParams(dsn=dsn, connect_timeout_s=2))

    assert 2 <= time.monotonic() - started < 3
    assert result.status == "critical"
    assert result.summary == (
        f"cannot check postgresql 127.0.0.1:{silent_port}/postgres: connection timeout expired"
    )


def test_the_password_never_shows(monkeypatch: pytest.MonkeyPatch, silent_port: int) -> None:
    closed = f"postgresql://watcher:{SECRET}@127.0.0.1:{free_port()}/postgres"
    silent = f"postgresql://watcher:{SECRET}@127.0.0.1:{silent_port}/postgres"
    monkeypatch.setenv("CARETAKER_TEST_CLOSED_DSN", closed)
    monkeypatch.setenv("CARETAKER_TEST_SILENT_DSN", silent)

    results = [
        check_postgres(PostgresParams(dsn_env="CARETAKER_TEST_CLOSED_DSN")),
        check_postgres(PostgresParams(dsn_env="CARETAKER_TEST_SILENT_DSN", connect_timeout_s=2)),
    ]

    for result in results:
        assert result.status == "critical"
        assert SECRET not in result.model_dump_json()


def test_a_missing_dsn_variable_is_critical() -> None:
    result = check_postgres(PostgresParams(dsn_env="CARETAKER_TEST_NO_SUCH_DSN"))

    assert result.status == "critical"
    assert result.summary == (
        "environment variable 'CARETAKER_TEST_NO_SUCH_DSN' named by a secret reference is not set"
    )


@pytest.mark.parametrize(
    "dsn",
    [f"postgresql://watcher:{SECRET}@db.example/app", f"host=db.example password={SECRET}"],
)
def test_a_dsn_with_a_password_is_rejected(dsn: str) -> None:
    with pytest.raises(ValidationError) as raised:
        PostgresParams(dsn=dsn)

    assert "dsn must not contain a password" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_exactly_one_dsn_source_is_required() -> None:
    for fields in ({}, {"dsn": "postgresql://db.example/app", "dsn_env": "DSN"}):
        with pytest.raises(ValidationError, match="give exactly one of dsn and dsn_env"):
            PostgresParams.model_validate(fields)


def test_shared_redis_is_healthy() -> None:
    result = check_redis(RedisParams(url=REDIS_URL))

    details = result.details
    assert result.status == "healthy"
    assert result.value is None
    assert details["maxmemory"] == 0
    assert details["used_memory"] > 0
    assert 0 < details["ping_ms"] < 1000
    assert details["connected_clients"] >= 1
    target = REDIS_URL.removeprefix("redis://")
    assert result.summary == f"redis {target}: ping {details['ping_ms']:g} ms, no maxmemory"


@dataclass
class RedisServer:
    url: str
    port: int
    client: redis.Redis


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A private redis-server and a client of it, stopped at teardown."""
    server = PrivateRedis()
    server.start()
    client = redis.Redis(port=server.port)
    yield RedisServer(server.url, server.port, client)
    client.close()
    server.stop()


def test_redis_memory_past_maxmemory_is_critical(private_redis: RedisServer) -> None:
    # An empty server already uses about 1 MB.
    private_redis.client.config_set("maxmemory", "2mb")
    before = check_redis(RedisParams(url=private_redis.url))
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for number in range(1000):
            private_redis.client.set(f"filler:{number}", b"x" * 10_000)

    result = check_redis(RedisParams(url=private_redis.url))

    assert before.status == "healthy"
    assert before.value is not None and before.value < 80
    assert result.status == "critical"
    assert result.details["maxmemory"] == 2 * 1024 * 1024
    assert result.value == round(100 * result.details["used_memory"] / (2 * 1024 * 1024), 1)
    assert result.value is not None and result.value >= 95
    assert result.summary.endswith(f" ms, memory {result.value:g}% of maxmemory")


def test_a_low_hit_rate_is_graded_after_enough_lookups(private_redis: RedisServer) -> None:
    params = RedisParams(url=private_redis.url, hit_rate_warning_pct=50)
    private_redis.client.set("present", "1")
    private_redis.client.get("present")
    for _ in range(999):
        private_redis.client.get("absent")
    few = check_redis(params)
    private_redis.client.get("absent")

    result = check_redis(params)

    assert few.status == "healthy"
    assert few.details["keyspace_lookups"] == 1000
    assert few.details["hit_rate_pct"] == 0.1
    assert result.status == "warning"
    assert result.details["keyspace_lookups"] == 1001
    assert result.details["hit_rate_pct"] == 0.1
    assert result.summary.endswith(", no maxmemory, hit rate 0.1% under 50%")


def test_evictions_are_a_warning(private_redis: RedisServer) -> None:
    private_redis.client.config_set("maxmemory", "4mb")
    private_redis.client.config_set("maxmemory-policy", "allkeys-lru")
    for number in range(800):
        private_redis.client.set(f"filler:{number}", b"x" * 10_000)
    # Emptied again so that memory is not what the check grades.
    private_redis.client.flushall()

    result = check_redis(RedisParams(url=private_redis.url, evictions_warning=0))

    evicted = result.details["evicted_keys"]
    assert evicted > 0
    assert result.status == "warning"
    assert result.value is not None and result.value < 80
    assert result.summary.endswith(f"% of maxmemory, {evicted} keys evicted, over 0")
    assert check_redis(RedisParams(url=private_redis.url)).status == "healthy"


def test_too_many_clients_is_a_warning(private_redis: RedisServer) -> None:
    # The server's start-up probe may still be connected until garbage collection.
    private_redis.client.client_kill_filter(_type="normal", skipme=True)

    result = check_redis(RedisParams(url=private_redis.url, clients_warning=1))

    # The test's client and the check's own.
    assert result.details["connected_clients"] == 2
    assert result.status == "warning"
    assert result.summary.endswith(", no maxmemory, 2 clients connected, over 1")


def test_redis_password_from_the_environment(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_redis.client.config_set("requirepass", SECRET)
    monkeypatch.setenv("CARETAKER_TEST_REDIS_PASSWORD", SECRET)
    url = private_redis.url

    with_password = check_redis(RedisParams(url=url, password_env="CARETAKER_TEST_REDIS_PASSWORD"))
    without = check_redis(RedisParams(url=url))

    assert with_password.status == "healthy"
    assert without.status == "critical"
    assert without.summary.startswith(f"cannot check redis 127.0.0.1:{private_redis.port}/0: ")
    assert "must be called with the client already authenticated" in without.summary


@pytest.mark.parametrize(
    "url", [f"redis://:{SECRET}@127.0.0.1:6379/0", f"redis://127.0.0.1/0?password={SECRET}"]
)
def test_a_redis_url_with_a_password_is_rejected(url: str) -> None:
    with pytest.raises(ValidationError) as raised:
        RedisParams(url=url)

    assert "url must not contain a password" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_redis_closed_port_is_critical_quickly() -> None:
    port = free_port()
    started = time.monotonic()

    result = check_redis(RedisParams(url=f"redis://127.0.0.1:{port}/0"))

    assert time.monotonic() - started < 1
    assert result.status == "critical"
    assert result.value is None
    assert result.summary == (
        f"cannot check redis 127.0.0.1:{port}/0: "
        f"Error 111 connecting to 127.0.0.1:{port}. Connection refused."
    )


def test_redis_silent_listener_is_critical_within_the_timeout(silent_port: int) -> None:
    started = time.monotonic()

    result = check_redis(RedisParams(url=f"redis://127.0.0.1:{silent_port}/0", timeout_s=1))

    assert 1 <= time.monotonic() - started < 2
    assert result.status == "critical"
    assert result.summary == f"no answer from redis 127.0.0.1:{silent_port}/0 within 1s"
    assert result.details == {"target": f"127.0.0.1:{silent_port}/0", "error": "timeout"}

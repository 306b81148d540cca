"""Backups with real pg_dump and pg_restore on the real PostgreSQL: made from one snapshot,
verified by a full restore, every kind of damage caught, retention, leases, S3 and the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import pytest
from click.testing import CliRunner

from tasks import backups
from tasks.backups import (
    Dated,
    apply_retention,
    backup_database,
    backup_directory,
    select_expired,
    target_lease,
    verify_backup,
)
from tasks.backupstore import BackupStore, LocalStore, S3Store
from tests.conftest import PG_HOST, free_port
from tests.services import MotoServer
from workers.cli import cli
from workers.config import (
    BackupDatabase,
    BackupDirectory,
    BackupsConfig,
    BackupStoreConfig,
    Config,
    RetentionConfig,
)

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

Conn = psycopg.Connection[dict[str, Any]]

SOURCE_NAME = f"caretaker_src_{uuid.uuid4().hex[:8]}"
SOURCE_DSN = f"{PG_HOST}/{SOURCE_NAME}"
SOURCE_ROWS = {"public.customers": 3, "public.orders": 5, "public.empty": 0, "Sales.Line Items": 2}
PROBE = "SELECT count(*) = 3 FROM public.customers"


@pytest.fixture(scope="module")
def source() -> Iterator[str]:
    """A database with a few tables and known rows, one of them in a schema and with a name
    that must be quoted; dropped at the end of the module."""
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {SOURCE_NAME}")
    with psycopg.connect(SOURCE_DSN, autocommit=True) as conn:
        conn.execute(
            """
            CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
            INSERT INTO customers VALUES (1, 'ada'), (2, 'grace'), (3, 'edsger');
            CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers);
            INSERT INTO orders (customer_id) VALUES (1), (1), (2), (3), (3);
            CREATE TABLE empty (id int);
            CREATE SCHEMA "Sales";
            CREATE TABLE "Sales"."Line Items" (id int, note text);
            INSERT INTO "Sales"."Line Items" VALUES (1, 'a;b'), (2, 'c"d');
            """
        )
    yield SOURCE_DSN
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {SOURCE_NAME} WITH (FORCE)")


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def shop(dsn: str = SOURCE_DSN, probes: tuple[str, ...] = (PROBE,)) -> BackupDatabase:
    return BackupDatabase(name="shop", dsn=dsn, probes=list(probes))


def config_of(*databases: BackupDatabase, **backups_section: Any) -> Config:
    return Config(backups=BackupsConfig(databases=list(databases), **backups_section))


def scratch_left() -> list[str]:
    with psycopg.connect(f"{PG_HOST}/postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'caretaker\\_verify\\_%'"
        ).fetchall()
    return [row[0] for row in rows]


def replace_object(
    store: BackupStore, db: Conn, row: dict[str, Any], data: bytes, record: bool, tmp: Path
) -> None:
    """Put other bytes under the backup's key; with record, as if they had been backed up."""
    path = tmp / "replacement"
    path.write_bytes(data)
    store.put(row["key"], path)
    if record:
        db.execute(
            "UPDATE backups SET size_bytes = %s, sha256 = %s WHERE id = %s",
            (len(data), hashlib.sha256(data).hexdigest(), row["id"]),
        )


def status_of(db: Conn, backup_id: int) -> tuple[str, str | None]:
    row = db.execute("SELECT status, reason FROM backups WHERE id = %s", (backup_id,)).fetchone()
    assert row is not None
    return row["status"], row["reason"]


def checks_of(db: Conn, backup_id: int) -> list[tuple[str, str | None]]:
    rows = db.execute(
        "SELECT status, reason FROM backup_checks WHERE backup_id = %s ORDER BY id", (backup_id,)
    ).fetchall()
    return [(row["status"], row["reason"]) for row in rows]


def test_backup_then_verify(db: Conn, source: str, store: LocalStore, tmp_path: Path) -> None:
    row = backup_database(shop(), store)

    manifest = row["manifest"]
    assert re.fullmatch(r"shop/\d{8}T\d{6}Z-[0-9a-f]{6}\.dump", row["key"])
    assert (row["status"], row["kind"], row["format"]) == (
        "unverified",
        "database",
        "pg_dump-custom",
    )
    assert manifest["tables"] == SOURCE_ROWS
    assert manifest["source"] == {
        "host": "127.0.0.1",
        "port": 5432,
        "dbname": SOURCE_NAME,
        "user": "postgres",
    }
    assert manifest["pg_dump_version"].startswith("pg_dump (PostgreSQL) ")
    stored = store.stat(row["key"])
    assert stored is not None
    assert (stored.size, stored.sha256) == (row["size_bytes"], row["sha256"])
    assert manifest["size"] == row["size_bytes"] and manifest["sha256"] == row["sha256"]
    copy = store.get(f"{row['key']}.manifest.json", tmp_path / "manifest.json")
    assert json.loads(copy.read_text()) == manifest

    verdict = verify_backup(row["id"], store, config_of(shop()))

    assert (verdict.status, verdict.reason) == ("verified", None)
    assert verdict.details["tables"] == 4 and verdict.details["rows"] == 10
    assert verdict.details["probes"] == 1
    assert status_of(db, row["id"]) == ("verified", None)
    assert checks_of(db, row["id"]) == [("verified", None)]
    assert scratch_left() == []


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flipped(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


# Each case: how the stored bytes change, whether the row was made from the damaged bytes
# (as when the dump was broken from the start) and the reason expected, {size}/{sha256}
# being the recorded values and {stored_*} those of the damaged file.
DAMAGE = {
    "truncated-archive": (
        _truncated,
        True,
        "pg_restore failed: pg_restore: error: could not read from input file: end of file",
    ),
    "truncated-after-upload": (
        _truncated,
        False,
        "size mismatch: recorded {size} bytes, stored {stored_size}",
    ),
    "empty-file": (lambda data: b"", True, "not a pg_dump archive: the file is empty"),
    "text-file": (
        lambda data: b"hello, this is not a dump\n",
        True,
        "not a pg_dump archive: it starts with b'hello', not b'PGDMP'",
    ),
    "bytes-changed-after-upload": (
        _flipped,
        False,
        "checksum mismatch: recorded sha256 {sha256}, stored {stored_sha256}",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_archive_is_invalid(
    db: Conn, source: str, store: LocalStore, tmp_path: Path, case: str
) -> None:
    damage, record, expected = DAMAGE[case]
    row = backup_database(shop(), store)
    data = damage(store.get(row["key"], tmp_path / "original").read_bytes())
    replace_object(store, db, row, data, record, tmp_path)

    verdict = verify_backup(row["id"], store, config_of(shop()))

    reason = expected.format(
        size=row["size_bytes"],
        sha256=row["sha256"],
        stored_size=len(data),
        stored_sha256=hashlib.sha256(data).hexdigest(),
    )
    assert (verdict.status, verdict.reason) == ("invalid", reason)
    assert status_of(db, row["id"]) == ("invalid", reason)
    assert checks_of(db, row["id"]) == [("invalid", reason)]
    assert scratch_left() == []


def test_row_count_mismatch_is_invalid(db: Conn, source: str, store: LocalStore) -> None:
    row = backup_database(shop(), store)
    db.execute(
        "UPDATE backups SET manifest = jsonb_set(manifest, '{tables,public.orders}', '6')"
        " WHERE id = %s",
        (row["id"],),
    )

    verdict = verify_backup(row["id"], store, config_of(shop()))

    reason = "row counts differ: public.orders: manifest 6, restored 5"
    assert (verdict.status, verdict.reason) == ("invalid", reason)
    assert verdict.details == {"differences": ["public.orders: manifest 6, restored 5"]}
    assert checks_of(db, row["id"]) == [("invalid", reason)]
    assert scratch_left() == []


def test_failing_probe_is_invalid(db: Conn, source: str, store: LocalStore) -> None:
    probes = (PROBE, "SELECT count(*) = 4 FROM public.customers")
    row = backup_database(shop(probes=probes), store)

    verdict = verify_backup(row["id"], store, config_of(shop(probes=probes)))

    reason = "probe failed: SELECT count(*) = 4 FROM public.customers: returned False"
    assert (verdict.status, verdict.reason) == ("invalid", reason)
    assert status_of(db, row["id"]) == ("invalid", reason)
    assert scratch_left() == []


def test_unreachable_server_fails_the_verification(
    db: Conn, source: str, store: LocalStore
) -> None:
    row = backup_database(shop(), store)
    closed = shop(dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/{SOURCE_NAME}")

    verdict = verify_backup(row["id"], store, config_of(closed))

    assert verdict.status == "verification_failed"
    assert verdict.reason is not None
    assert verdict.reason.startswith("server unreachable: ")
    assert "Connection refused" in verdict.reason
    assert status_of(db, row["id"]) == ("verification_failed", verdict.reason)
    assert checks_of(db, row["id"]) == [("verification_failed", verdict.reason)]
    assert scratch_left() == []


def test_counts_and_dump_share_one_snapshot(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows keep arriving in one table during the whole backup, and rows are committed in
    # another after the counts were taken and before pg_dump even starts.
    stop = threading.Event()

    def keep_inserting() -> None:
        with psycopg.connect(SOURCE_DSN, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO orders (customer_id) VALUES (2)")

    def dump_late(dsn: str, snapshot: str, dest: Path) -> None:
        with psycopg.connect(SOURCE_DSN, autocommit=True) as conn:
            conn.execute("INSERT INTO customers VALUES (4, 'barbara'), (5, 'frances')")
        run_pg_dump(dsn, snapshot, dest)

    run_pg_dump = backups._run_pg_dump
    monkeypatch.setattr(backups, "_run_pg_dump", dump_late)
    inserter = threading.Thread(target=keep_inserting)
    inserter.start()
    try:
        row = backup_database(shop(), store)
    finally:
        stop.set()
        inserter.join()
        with psycopg.connect(SOURCE_DSN, autocommit=True) as conn:
            now_orders = conn.execute("SELECT count(*) FROM orders").fetchone()
            conn.execute("DELETE FROM orders WHERE id > 5; DELETE FROM customers WHERE id > 3")

    assert now_orders is not None and now_orders[0] > row["manifest"]["tables"]["public.orders"]
    assert row["manifest"]["tables"]["public.customers"] == 3
    verdict = verify_backup(row["id"], store, config_of(shop()))
    assert (verdict.status, verdict.reason) == ("verified", None)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_retention_selection() -> None:
    found = [
        Dated(1, at("2026-03-02T01:00"), "unverified"),  # Monday, ISO week 10
        Dated(2, at("2026-03-02T23:00"), "unverified"),
        Dated(3, at("2026-03-01T12:00"), "verified"),  # Sunday, week 9
        Dated(4, at("2026-02-28T12:00"), "verified"),  # week 9, February
        Dated(5, at("2026-02-20T12:00"), "verified"),  # week 8
        Dated(6, at("2026-01-15T12:00"), "verified"),
        Dated(7, at("2025-12-31T12:00"), "unverified"),
        Dated(8, at("2025-12-01T12:00"), "invalid"),
        Dated(9, at("2026-03-03T00:30"), "invalid"),  # the newest, but invalid
    ]

    # Days: 2 (03-02), 3 (03-01); weeks: 2 (W10), 3 (W09); months: 2 (March), 4 (February);
    # the newest verified, 3, is kept already.
    kept = select_expired(found, RetentionConfig(daily=2, weekly=2, monthly=2))
    assert kept == {1, 5, 6, 7, 8, 9}
    # Weeks W10, W09, W08.
    kept = select_expired(found, RetentionConfig(daily=1, weekly=3, monthly=0))
    assert kept == {1, 4, 6, 7, 8, 9}
    # With nothing verified in the windows, the newest verified backup is kept besides.
    older = [k._replace(status="unverified") if k.id in (3, 4, 5) else k for k in found]
    kept = select_expired(older, RetentionConfig(daily=1, weekly=0, monthly=0))
    assert kept == {1, 3, 4, 5, 7, 8, 9}

    # ISO week 2026-W01 runs from Monday 2025-12-29 to Sunday 2026-01-04.
    new_year = [
        Dated(10, at("2025-12-28T12:00"), "unverified"),  # 2025-W52
        Dated(11, at("2025-12-29T12:00"), "unverified"),  # 2026-W01
        Dated(12, at("2026-01-04T12:00"), "unverified"),  # 2026-W01
    ]
    assert select_expired(new_year, RetentionConfig(daily=1, weekly=2, monthly=0)) == {11}
    # Months go by the calendar: 11 is December's newest, though in the week of 12.
    assert select_expired(new_year, RetentionConfig(daily=1, weekly=1, monthly=2)) == {10}
    assert select_expired(new_year, RetentionConfig(daily=1, weekly=0, monthly=1)) == {10, 11}


def test_retention_deletes_from_the_store(db: Conn, store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("a")
    target = BackupDirectory(name="files", path=tmp_path / "files")
    made = [backup_directory(target, store) for _ in range(3)]
    days_ago = {made[0]["id"]: 3, made[1]["id"]: 2, made[2]["id"]: 0}
    for backup_id, days in days_ago.items():
        db.execute(
            "UPDATE backups SET created_at = now() - make_interval(days => %s) WHERE id = %s",
            (days, backup_id),
        )
    db.execute("UPDATE backups SET status = 'verified' WHERE id = %s", (made[1]["id"],))

    deleted = apply_retention("files", store, RetentionConfig(daily=1, weekly=0, monthly=0))

    assert deleted == [made[0]["id"]]
    assert status_of(db, made[0]["id"])[0] == "deleted"
    assert store.stat(made[0]["key"]) is None
    assert store.stat(f"{made[0]['key']}.manifest.json") is None
    for kept in (made[1], made[2]):
        assert store.stat(kept["key"]) is not None
        assert status_of(db, kept["id"])[0] != "deleted"


def test_invalid_latest_backup_holds_one_finding(
    db: Conn, source: str, store: LocalStore, tmp_path: Path
) -> None:
    config = config_of(shop())
    older, latest = backup_database(shop(), store), backup_database(shop(), store)
    data = _flipped(store.get(latest["key"], tmp_path / "latest").read_bytes())
    replace_object(store, db, latest, data, False, tmp_path)

    verify_backup(older["id"], store, config)
    verify_backup(latest["id"], store, config)
    verify_backup(latest["id"], store, config)

    findings = db.execute(
        "SELECT status, labels FROM occurrences WHERE source = 'analysis'"
        " AND fingerprint = 'backup:shop'"
    ).fetchall()
    assert [f["status"] for f in findings] == ["firing"]
    assert findings[0]["labels"] == {
        "alertname": "BackupInvalid",
        "target": "shop",
        "severity": "critical",
    }

    newer = backup_database(shop(), store)
    assert verify_backup(newer["id"], store, config).status == "verified"
    statuses = db.execute(
        "SELECT status FROM occurrences WHERE fingerprint = 'backup:shop'"
    ).fetchall()
    assert [s["status"] for s in statuses] == ["resolved"]


def test_overlapping_verifications_of_a_target_are_refused(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(shop())
    first, second = backup_database(shop(), store), backup_database(shop(), store)
    restoring, go_on = threading.Event(), threading.Event()
    restore = backups._restore

    def slow_restore(path: Path, dsn: str, scratch: str) -> None:
        restoring.set()
        go_on.wait(30)
        restore(path, dsn, scratch)

    monkeypatch.setattr(backups, "_restore", slow_restore)
    verdicts: list[backups.Verdict] = []
    worker = threading.Thread(
        target=lambda: verdicts.append(verify_backup(first["id"], store, config))
    )
    worker.start()
    try:
        assert restoring.wait(30)
        refused = verify_backup(second["id"], store, config)
    finally:
        go_on.set()
        worker.join()

    assert refused.status == "busy"
    assert refused.reason is not None
    assert refused.reason.startswith("target shop is busy: verify by ")
    assert status_of(db, second["id"]) == ("unverified", None)
    assert checks_of(db, second["id"]) == []
    assert [v.status for v in verdicts] == ["verified"]
    assert verify_backup(second["id"], store, config).status == "verified"
    assert db.execute("SELECT count(*) AS n FROM target_leases").fetchone() == {"n": 0}


def test_an_expired_lease_is_taken_over(db: Conn, store: LocalStore, tmp_path: Path) -> None:
    db.execute(
        "INSERT INTO target_leases (target, holder, purpose, expires_at)"
        " VALUES ('files', 'gone:1:dead', 'verify', now() - interval '1 second')"
    )

    with target_lease("files", "verify") as holder:
        held = db.execute("SELECT holder FROM target_leases WHERE target = 'files'").fetchone()

    assert held == {"holder": holder}
    assert db.execute("SELECT count(*) AS n FROM target_leases").fetchone() == {"n": 0}


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Client:
    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return boto3.client("s3", endpoint_url=moto.url)


def test_backup_and_verify_through_s3(
    db: Conn, source: str, moto: MotoServer, s3: S3Client
) -> None:
    bucket = f"caretaker-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    store = S3Store(bucket, prefix="caretaker/", endpoint_url=moto.url)

    row = backup_database(shop(), store)
    verdict = verify_backup(row["id"], store, config_of(shop()))

    assert (verdict.status, verdict.reason) == ("verified", None)
    assert row["store"] == store.describe()
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="caretaker/shop/")
    keys = sorted(item["Key"] for item in listed.get("Contents", []))
    assert keys == [f"caretaker/{row['key']}", f"caretaker/{row['key']}.manifest.json"]
    assert scratch_left() == []


def test_directory_backup_and_verify(db: Conn, store: LocalStore, tmp_path: Path) -> None:
    root = tmp_path / "files"
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a" * 100)
    (root / "nested" / "b.bin").write_bytes(os.urandom(5000))
    (root / "nested" / "deeper" / "empty").touch()
    os.link(root / "a.txt", root / "nested" / "a-again.txt")
    (root / "outside").symlink_to("/etc/hostname")
    (root / "nested" / "up").symlink_to("../a.txt")

    row = backup_directory(BackupDirectory(name="files", path=root), store)
    verdict = verify_backup(row["id"], store, Config())

    counted = {"files": 4, "bytes": 5200, "symlinks": 2}
    assert {k: row["manifest"][k] for k in counted} == counted
    assert re.fullmatch(r"files/\d{8}T\d{6}Z-[0-9a-f]{6}\.tar\.gz", row["key"])
    assert (verdict.status, verdict.reason, verdict.details) == ("verified", None, counted)


def test_archive_member_escaping_the_directory_is_invalid(
    db: Conn, store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "files").mkdir()
    row = backup_directory(BackupDirectory(name="files", path=tmp_path / "files"), store)
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as archive:
        member = tarfile.TarInfo("../../escaped.txt")
        member.size = 3
        archive.addfile(member, io.BytesIO(b"bad"))
    replace_object(store, db, row, evil.getvalue(), True, tmp_path)
    # Extraction goes to <temp>/caretaker-verify-*/extracted: the member aims at <temp>.
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    verdict = verify_backup(row["id"], store, Config())

    reason = "member escapes the directory: ../../escaped.txt"
    assert (verdict.status, verdict.reason) == ("invalid", reason)
    assert list(temp.iterdir()) == []


def test_create_and_verify_tasks(
    db: Conn, source: str, store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("a")
    directories = [
        BackupDirectory(name="files", path=tmp_path / "files"),
        BackupDirectory(name="missing", path=tmp_path / "missing"),
    ]
    store_config = BackupStoreConfig(path=store.root)
    config = config_of(shop(), directories=directories, store=store_config)
    monkeypatch.setattr(backups, "get_config", lambda: config)

    created = backups.create_backups()
    verified = backups.verify_backups()

    assert {name: outcome["status"] for name, outcome in created.items()} == {
        "shop": "created",
        "files": "created",
        "missing": "failed",
    }
    assert "not a directory" in created["missing"]["error"]
    assert sorted((v["target"], v["status"]) for v in verified.values()) == [
        ("files", "verified"),
        ("shop", "verified"),
    ]


def test_a_redelivered_backup_task_makes_no_second_set(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(shop(), store=BackupStoreConfig(path=store.root))
    monkeypatch.setattr(backups, "get_config", lambda: config)

    first = backups.create_backups.apply(task_id="delivery-1").get()
    again = backups.create_backups.apply(task_id="delivery-1").get()
    other = backups.create_backups.apply(task_id="delivery-2").get()

    assert first["shop"]["status"] == "created"
    assert again["shop"] == {
        "status": "done before",
        "backup_id": first["shop"]["backup_id"],
        "deleted": [],
    }
    assert other["shop"]["status"] == "created"
    rows = db.execute("SELECT manifest->>'task_id' AS task FROM backups ORDER BY id").fetchall()
    assert rows == [{"task": "delivery-1"}, {"task": "delivery-2"}]


def test_credentials_reach_the_tools_only_through_the_environment(
    db: Conn,
    source: str,
    store: LocalStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The test server trusts every local connection, so any password is accepted.
    monkeypatch.setenv("SHOP_DSN", f"postgresql://postgres:hunter2@127.0.0.1:5432/{SOURCE_NAME}")
    target = BackupDatabase(name="shop", dsn_env="SHOP_DSN", probes=[PROBE])
    calls: list[tuple[list[str], dict[str, str]]] = []
    popen = subprocess.Popen

    def spy(argv: list[str], **options: Any) -> Any:
        calls.append((argv, options.get("env") or {}))
        return popen(argv, **options)

    monkeypatch.setattr(subprocess, "Popen", spy)
    caplog.set_level(logging.DEBUG)

    row = backup_database(target, store)
    verdict = verify_backup(row["id"], store, config_of(target))

    assert verdict.status == "verified"
    tools = [(argv, env) for argv, env in calls if "--version" not in argv]
    assert [argv[0] for argv, _ in tools] == ["pg_dump", "pg_restore"]
    for argv, env in tools:
        assert not any("hunter2" in arg or "127.0.0.1" in arg for arg in argv)
        assert (env["PGPASSWORD"], env["PGHOST"], env["PGPORT"]) == ("hunter2", "127.0.0.1", "5432")
    assert "hunter2" not in json.dumps(row["manifest"])
    assert "hunter2" not in caplog.text


def test_a_lease_is_renewed_while_its_work_runs(db: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backups, "LEASE_S", 0.6)
    query = "SELECT expires_at FROM target_leases WHERE target = 'files'"

    with target_lease("files", "verify"):
        first = db.execute(query).fetchone()
        time.sleep(0.5)
        renewed = db.execute(query).fetchone()

    assert first is not None and renewed is not None
    assert renewed["expires_at"] > first["expires_at"]


def test_cli_refuses_a_password_in_the_url(db: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any) -> None:
        raise AssertionError("a backup was started")

    monkeypatch.setattr(backups, "create_backup", never)

    done = CliRunner().invoke(cli, ["backups", "create", "--db", "postgresql://u:secret@host/db"])

    assert done.exit_code == 1
    assert "secret" not in done.output
    assert "~/.pgpass" in done.output and "PGPASSWORD" in done.output
    assert db.execute("SELECT count(*) AS n FROM backups").fetchone() == {"n": 0}


def test_cli_create_list_verify(
    db: Conn, source: str, store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(shop(), store=BackupStoreConfig(path=store.root))
    monkeypatch.setattr(backups, "get_config", lambda: config)
    runner = CliRunner()

    created = runner.invoke(cli, ["backups", "create", "--target", "shop"])
    adhoc = runner.invoke(cli, ["backups", "create", "--db", SOURCE_DSN])
    listed = json.loads(runner.invoke(cli, ["backups", "list", "--json"]).output)
    broken = next(row for row in listed if row["target"] == "shop")
    data = _flipped(store.get(broken["key"], tmp_path / "dump").read_bytes())
    replace_object(store, db, broken, data, False, tmp_path)
    verified = runner.invoke(cli, ["backups", "verify", "--days", "7"])

    assert created.exit_code == 0, created.output
    assert adhoc.exit_code == 0, adhoc.output
    adhoc_name = f"adhoc-{SOURCE_NAME}"
    assert [row["target"] for row in listed] == [adhoc_name, "shop"]
    assert verified.exit_code == 1
    lines = verified.output.splitlines()
    assert lines[0].startswith(f"backup {broken['id']} shop: invalid: checksum mismatch: ")
    assert lines[1] == f"backup {listed[0]['id']} {adhoc_name}: verified"
    assert lines[-1] == "Error: 1 of 2 backups invalid or not verified"
    assert scratch_left() == []


BAD_DSN = f"postgresql://postgres:Pa%zzword@127.0.0.1:5432/{SOURCE_NAME}"
BAD_DSN_ERROR = "target shop: the dsn is not a valid PostgreSQL connection string"


def test_a_malformed_dsn_fails_every_path_in_one_line_without_its_password(
    db: Conn,
    source: str,
    store: LocalStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    row = backup_database(shop(), store)
    monkeypatch.setenv("SHOP_DSN", BAD_DSN)
    bad = BackupDatabase(name="shop", dsn_env="SHOP_DSN", probes=[PROBE])
    config = config_of(bad, store=BackupStoreConfig(path=store.root))
    monkeypatch.setattr(backups, "get_config", lambda: config)
    caplog.set_level(logging.DEBUG)

    created = CliRunner().invoke(cli, ["backups", "create", "--target", "shop"])
    task = backups.create_backups()
    verdict = verify_backup(row["id"], store, config)

    assert created.exit_code == 1
    assert created.output == f"Error: backup of shop failed: {BAD_DSN_ERROR}\n"
    assert task["shop"]["status"] == "failed"
    assert task["shop"]["error"] == f"backup of shop failed: {BAD_DSN_ERROR}"
    assert (verdict.status, verdict.reason) == ("verification_failed", BAD_DSN_ERROR)
    assert status_of(db, row["id"]) == ("verification_failed", BAD_DSN_ERROR)
    assert checks_of(db, row["id"]) == [("verification_failed", BAD_DSN_ERROR)]
    summaries = db.execute("SELECT annotations::text AS a FROM occurrences").fetchall()
    seen = [created.output, json.dumps(task), caplog.text, *[s["a"] for s in summaries]]
    assert not any("zzword" in text for text in seen)


def test_a_probe_that_cannot_run_fails_the_check_and_retention_keeps_the_backup(
    db: Conn, source: str, store: LocalStore
) -> None:
    typo = "SELEC count(*) = 3 FROM public.customers"
    probes = (PROBE, typo, "SELECT count(*) > 0 FROM public.nowhere")
    rows = [backup_database(shop(), store) for _ in range(2)]

    verdicts = [verify_backup(r["id"], store, config_of(shop(probes=probes))) for r in rows]
    deleted = apply_retention("shop", store, RetentionConfig(daily=1, weekly=0, monthly=0))

    for verdict in verdicts:
        assert verdict.status == "verification_failed"
        assert verdict.reason is not None
        assert verdict.reason.startswith(f"probe could not run: {typo}: syntax error")
    # Both were made today: only the newest takes the one daily place, yet neither is
    # deleted while it is newer than any verified backup and verification still tries it.
    assert deleted == []
    assert [status_of(db, r["id"])[0] for r in rows] == ["verification_failed"] * 2
    assert scratch_left() == []


def test_server_side_failures_of_pg_restore_fail_the_check(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = backup_database(shop(), store)
    stderr = (
        'pg_restore: error: could not execute query: ERROR: could not extend file "base/1/2":'
        " No space left on device"
    )

    def full_disk(argv: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, 1, "", stderr)

    monkeypatch.setattr(backups, "run_pg_tool", full_disk)

    verdict = verify_backup(row["id"], store, config_of(shop()))

    assert (verdict.status, verdict.reason) == (
        "verification_failed",
        f"pg_restore failed on the server: {stderr}",
    )
    assert scratch_left() == []


def test_retention_keeps_backups_verification_still_tries() -> None:
    now = at("2026-03-20T12:00")
    found = [
        Dated(1, at("2026-03-01T12:00"), "verified"),
        Dated(2, at("2026-03-10T12:00"), "unverified"),  # older than RETRY_DAYS
        Dated(3, at("2026-03-15T12:00"), "verification_failed"),
        Dated(4, at("2026-03-18T12:00"), "unverified"),
        Dated(5, at("2026-03-19T12:00"), "invalid"),
        Dated(6, at("2026-03-20T01:00"), "unverified"),
    ]
    expired = select_expired(found, RetentionConfig(daily=1, weekly=0, monthly=0), now)
    assert expired == {2, 5}
    # Once a newer backup is verified, the older ones take their places as any other.
    found.append(Dated(7, at("2026-03-20T11:00"), "verified"))
    expired = select_expired(found, RetentionConfig(daily=1, weekly=0, monthly=0), now)
    assert expired == {1, 2, 3, 4, 5, 6}


def make_database(name: str) -> None:
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")


def test_a_verification_first_removes_what_dead_ones_left(
    db: Conn, source: str, store: LocalStore, tmp_path: Path
) -> None:
    row = backup_database(shop(), store)
    other = backup_directory(BackupDirectory(name="files", path=tmp_path), store)
    stale, leased = "caretaker_verify_999_deadbeef", f"caretaker_verify_{other['id']}_cafe"
    temp = Path(tempfile.gettempdir())
    host = backups.temp_prefix("verify").split("-")[2]
    dead = temp / f"caretaker-verify-{host}-999999999-{uuid.uuid4().hex[:8]}"
    old = temp / f"caretaker-restore-{uuid.uuid4().hex[:8]}"
    alive = temp / f"caretaker-backup-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    fresh = temp / f"caretaker-drill-{uuid.uuid4().hex[:8]}"
    for path, age_s in ((dead, 600), (old, backups.STALE_TEMP_S + 60), (alive, 600), (fresh, 60)):
        (path / "sub").mkdir(parents=True)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    make_database(stale)
    make_database(leased)
    try:
        with target_lease("files", "verify"):
            verdict = verify_backup(row["id"], store, config_of(shop()))
            left = scratch_left()
        gone = [p.name for p in (dead, old, alive, fresh) if not p.exists()]
    finally:
        for path in (dead, old, alive, fresh):
            subprocess.run(["rm", "-rf", str(path)], check=True)
        with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {leased} WITH (FORCE)")
            conn.execute(f"DROP DATABASE IF EXISTS {stale} WITH (FORCE)")

    assert verdict.status == "verified"
    assert left == [leased]
    assert gone == [dead.name, old.name]


def test_a_backup_not_checked_in_time_is_tried_again_past_verify_days(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = config_of(shop(), store=BackupStoreConfig(path=store.root), verify_days=1.0)
    monkeypatch.setattr(backups, "get_config", lambda: config)
    ancient, verified, missed, failed = (backup_database(shop(), store) for _ in range(4))
    db.execute("UPDATE backups SET status = 'verified' WHERE id = %s", (verified["id"],))
    db.execute("UPDATE backups SET status = 'verification_failed' WHERE id = %s", (failed["id"],))
    # Made the night before, checked (or found busy) at backup hour + 2, seen now at 26 h.
    for row, age_h in ((ancient, 50), (verified, 40), (missed, 26), (failed, 26)):
        db.execute(
            "UPDATE backups SET created_at = now() - make_interval(hours => %s) WHERE id = %s",
            (age_h, row["id"]),
        )

    verdicts = backups.verify_now()

    # The one older than the newest verified backup is left: a newer one is known good.
    assert [(v.backup_id, v.status) for v in verdicts] == [
        (missed["id"], "verified"),
        (failed["id"], "verified"),
    ]


def test_a_failed_backup_raises_a_finding_the_next_one_ends(
    db: Conn, source: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = BackupDatabase(name="shop", dsn_env="CARETAKER_TEST_SHOP_DSN", probes=[PROBE])
    config = config_of(target, store=BackupStoreConfig(path=store.root))
    monkeypatch.setattr(backups, "get_config", lambda: config)
    monkeypatch.delenv("CARETAKER_TEST_SHOP_DSN", raising=False)
    query = "SELECT fingerprint, status, labels, annotations FROM occurrences"

    failed = backups.create_backups()
    raised = db.execute(query).fetchall()
    monkeypatch.setenv("CARETAKER_TEST_SHOP_DSN", SOURCE_DSN)
    made = backups.create_backups()
    ended = db.execute(query).fetchall()

    assert failed["shop"]["status"] == "failed" and made["shop"]["status"] == "created"
    [finding] = raised
    assert (finding["fingerprint"], finding["status"]) == ("backup-failed:shop", "firing")
    assert finding["labels"] == {
        "alertname": "BackupFailed",
        "target": "shop",
        "severity": "critical",
    }
    assert finding["annotations"]["summary"].startswith("the backup of shop failed: ")
    assert [(f["fingerprint"], f["status"]) for f in ended] == [("backup-failed:shop", "resolved")]


def test_verify_refuses_an_unknown_target(db: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backups, "get_config", lambda: config_of(shop()))

    done = CliRunner().invoke(cli, ["backups", "verify", "--target", "nope"])

    assert done.exit_code == 1
    assert done.output == "Error: no backup target named 'nope' (configured: shop)\n"

"""Backups of databases and directories (queue `maintenance`), their retention, and their
verification by a full restore into a scratch database."""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from tasks.backupstore import BackupStore, StoreError, StoreUnavailable, file_sha256, store_from
from workers import dispatch, findings
from workers.app import app
from workers.config import (
    BackupDatabase,
    BackupDirectory,
    BackupStoreConfig,
    Config,
    RetentionConfig,
    get_config,
)
from workers.db import Connection, Row, transaction
from workers.errors import CaretakerError, NotFound

log = logging.getLogger(__name__)

DUMP_FORMAT = "pg_dump-custom"
ARCHIVE_FORMAT = "tar.gz"
# Every archive of pg_dump --format=custom starts with these bytes.
DUMP_MAGIC = b"PGDMP"
# Seconds to reach a backed-up server or the one a verification restores on.
CONNECT_TIMEOUT_S = 10
# Seconds pg_dump or pg_restore may run: a large database takes hours, a hung one forever.
TOOL_TIMEOUT_S = 4 * 3600
# Milliseconds a probe may run on the restored copy.
PROBE_TIMEOUT_MS = 300_000
# Characters of a tool's error output, or of a list of differences, kept in a reason.
REASON_CHARS = 600
# Seconds a target lease lasts unless renewed; its holder renews it every third of that.
LEASE_S = 120.0
# Seconds a backup or verification task may run; the hard limit follows a minute later.
TASK_SOFT_LIMIT_S = 6 * 3600
# Statuses of backups that verify_backups still has to verify.
PENDING_STATUSES = ("unverified", "verification_failed")
# Days a backup not yet verified, and newer than its target's newest verified one, is still
# tried by verify_backups past verify_days, and kept by retention meanwhile.
RETRY_DAYS = 7.0
# Seconds after which a temporary directory of caretaker's naming whose process cannot be
# told alive is removed: no task runs longer than its hard time limit.
STALE_TEMP_S = TASK_SOFT_LIMIT_S + 3600
# The scratch databases of verifications and drills: caretaker_verify_<backup id>_<hex>.
SCRATCH_NAME = re.compile(r"^caretaker_verify_(\d+)_[0-9a-f]+$")
# Temporary directories: caretaker-<purpose>-<host>-<pid>-<random>; older ones lack host-pid.
TEMP_NAME = re.compile(r"^caretaker-(?:verify|backup|restore|drill)-(?:(.+)-(\d+)-)?[^-]+$")
# pg_restore errors that come from the server or the connection, not from the archive.
SERVER_TROUBLE = (
    "connection to server",
    "server closed the connection",
    "terminating connection",
    "could not connect",
    "no space left on device",
    "could not extend file",
    "out of memory",
    "the database system is",
    "too many connections",
    "canceling statement due to",
    "could not write to file",
)

USER_TABLES = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'
   AND n.nspname NOT LIKE 'pg\\_%'
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                      AND d.objid = c.oid AND d.deptype = 'e')
 ORDER BY 1, 2
"""


class BackupFailed(CaretakerError):
    """A backup could not be made; nothing was recorded."""


class BackupInvalid(CaretakerError):
    """The backup cannot be restored as recorded; the message is the reason."""

    def __init__(self, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details or {}


class CheckBroken(CaretakerError):
    """The verification itself could not be carried out; it says nothing about the backup."""


class TargetBusy(CaretakerError):
    """Another process holds the target's lease."""


class DsnError(CaretakerError):
    """A target's DSN is missing or malformed; the message never quotes it."""


def target_dsn(target: BackupDatabase) -> str:
    """The target's DSN, parsed once up front; DsnError naming the target, never the DSN,
    which may hold a password (libpq's own parse errors quote it)."""
    try:
        dsn = target.reveal()
    except KeyError as exc:
        raise DsnError(f"target {target.name}: {exc.args[0]}") from None
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise DsnError(
            f"target {target.name}: the dsn is not a valid PostgreSQL connection string"
        ) from None
    return dsn


@dataclass(frozen=True)
class Verdict:
    """The outcome of one verification: verified, invalid or verification_failed; busy when
    refused for another process's lease; verified or deleted when settled before."""

    backup_id: int
    target: str
    status: str
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def open_store(config: BackupStoreConfig) -> BackupStore:
    """The store the backups section names."""
    if config.kind == "local":
        return store_from("local", path=config.path)
    options = {
        "bucket": config.bucket,
        "prefix": config.prefix,
        "endpoint_url": config.endpoint_url,
        "region": config.region,
    }
    return store_from("s3", **{name: value for name, value in options.items() if value})


# Leases


@contextmanager
def target_lease(target: str, purpose: str) -> Iterator[str]:
    """Hold the target's lease while the block runs, renewed in the background; TargetBusy
    when another holder's lease has not expired. Released at the end, also on failure."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _take_lease(target, holder, purpose)
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_lease, args=(target, holder, stop), name=f"lease-{target}", daemon=True
    )
    renewer.start()
    try:
        yield holder
    finally:
        stop.set()
        renewer.join()
        _release_lease(target, holder)


def _take_lease(target: str, holder: str, purpose: str) -> None:
    # The conflicting row is locked, so of two takers the second sees the first's fresh lease
    # and gets no row back. An expired lease means its holder died, so it may be taken over.
    with transaction() as conn:
        taken = conn.execute(
            """
            INSERT INTO target_leases (target, holder, purpose, expires_at)
            VALUES (%s, %s, %s, now() + make_interval(secs => %s))
            ON CONFLICT (target) DO UPDATE
               SET holder = EXCLUDED.holder, purpose = EXCLUDED.purpose,
                   expires_at = EXCLUDED.expires_at
             WHERE target_leases.expires_at < now()
            RETURNING holder
            """,
            (target, holder, purpose, LEASE_S),
        ).fetchone()
        if taken is not None:
            return
        held = conn.execute(
            "SELECT holder, purpose, expires_at FROM target_leases WHERE target = %s", (target,)
        ).fetchone()
    by = f": {held['purpose']} by {held['holder']} until {held['expires_at']}" if held else ""
    raise TargetBusy(f"target {target} is busy{by}")


def _renew_lease(target: str, holder: str, stop: threading.Event) -> None:
    while not stop.wait(LEASE_S / 3):
        try:
            with transaction() as conn:
                kept = conn.execute(
                    "UPDATE target_leases SET expires_at = now() + make_interval(secs => %s)"
                    " WHERE target = %s AND holder = %s",
                    (LEASE_S, target, holder),
                ).rowcount
        except (CaretakerError, psycopg.Error) as exc:
            log.warning("lease renewal failed target=%s error=%s", target, one_line(exc))
            continue
        if not kept:
            log.error("lease lost target=%s holder=%s", target, holder)
            return


def _release_lease(target: str, holder: str) -> None:
    try:
        with transaction() as conn:
            conn.execute(
                "DELETE FROM target_leases WHERE target = %s AND holder = %s", (target, holder)
            )
    except (CaretakerError, psycopg.Error) as exc:
        # Raising here would hide the work's own outcome; the lease expires by itself.
        log.warning("lease release failed target=%s error=%s", target, one_line(exc))


# Making backups


def create_backup(
    target: BackupDatabase | BackupDirectory, store: BackupStore, task_id: str | None = None
) -> Row:
    """Back up one target into the store and record it unverified; BackupFailed if it
    cannot be made. `task_id`, kept in the manifest, names the task that made it."""
    try:
        if isinstance(target, BackupDatabase):
            return backup_database(target, store, task_id)
        return backup_directory(target, store, task_id)
    except DsnError as exc:
        raise BackupFailed(f"backup of {target.name} failed: {exc}") from None
    except psycopg.OperationalError as exc:
        raise BackupFailed(f"cannot reach target {target.name}: {one_line(exc)}") from exc
    except StoreError as exc:
        raise BackupFailed(f"backup of {target.name} not stored: {exc}") from exc
    except (OSError, KeyError, subprocess.SubprocessError) as exc:
        raise BackupFailed(f"backup of {target.name} failed: {one_line(exc)}") from exc


def backup_database(target: BackupDatabase, store: BackupStore, task_id: str | None = None) -> Row:
    """pg_dump the database, with the row count of every table from the same snapshot;
    upload the dump and its manifest; record the backup."""
    created_at = datetime.now(UTC)
    key = new_key(target.name, created_at, "dump")
    dsn = target_dsn(target)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("backup")) as tmp:
        dump = Path(tmp) / "backup.dump"
        taken = dump_database(dsn, dump)
        manifest = _manifest_head(target.name, "database", created_at, DUMP_FORMAT) | taken
        manifest["task_id"] = task_id
        return _upload(store, key, dump, manifest)


def dump_database(dsn: str, dest: Path) -> dict[str, Any]:
    """Dump into dest; return the source, row counts per table and versions, all seen by
    the one snapshot the dump was taken from."""
    with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            # Held open while pg_dump runs, which a server's idle timeout must not end.
            conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
            snapshot = _scalar(conn, "SELECT pg_export_snapshot()")
            tables = count_rows(conn)
            database = _database_facts(conn)
            # The exported snapshot lives only while this transaction is open: pg_dump must
            # import it before the block ends, so the dump holds exactly the counted rows.
            _run_pg_dump(dsn, snapshot, dest)
        source = {
            "host": conn.info.host,
            "port": conn.info.port,
            "dbname": conn.info.dbname,
            "user": conn.info.user,
        }
        server_version = conn.info.server_version
    return {
        "source": source,
        "database": database,
        "tables": tables,
        "server_version": server_version,
        "pg_dump_version": _tool_version("pg_dump"),
    }


def _run_pg_dump(dsn: str, snapshot: str, dest: Path) -> None:
    argv = ["pg_dump", f"--snapshot={snapshot}", "--format=custom", "--no-password"]
    done = run_pg_tool([*argv, f"--file={dest}"], dsn)
    if done.returncode != 0:
        raise BackupFailed(f"pg_dump failed: {trimmed(done.stderr)}")


def count_rows(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Rows of every user table, as {"schema.table": rows}. Tables of extensions are left
    out: pg_dump leaves out their rows and CREATE EXTENSION makes its own."""
    counts: dict[str, int] = {}
    for schema, table in conn.execute(USER_TABLES).fetchall():
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
        counts[f"{schema}.{table}"] = int(_scalar(conn, query))
    return counts


def _database_facts(conn: psycopg.Connection[Any]) -> dict[str, str]:
    row = conn.execute(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database"
        " WHERE datname = current_database()"
    ).fetchone()
    assert row is not None
    return {"encoding": row[0], "lc_collate": row[1], "lc_ctype": row[2]}


def run_pg_tool(argv: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
    """Run pg_dump or pg_restore, the connection given in the environment: argv is visible
    to every user of the host, a process's environment only to its owner. The tool runs in
    a process group of its own, killed whole when this call ends by a timeout or an
    exception (a soft time limit), so no tool outlives the task that waits for it."""
    tool = subprocess.Popen(
        argv,
        env=pg_environment(dsn),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = tool.communicate(timeout=TOOL_TIMEOUT_S)
    finally:
        _kill_group(tool)
    return subprocess.CompletedProcess(argv, tool.returncode, stdout, stderr)


def _kill_group(tool: subprocess.Popen[str]) -> None:
    if tool.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.killpg(tool.pid, signal.SIGKILL)
    tool.wait()


def temp_prefix(purpose: str) -> str:
    """The prefix of a temporary directory: its host and process tell a stale one apart."""
    return f"caretaker-{purpose}-{_host_tag()}-{os.getpid()}-"


def _host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9.]+", ".", socket.gethostname()) or "host"


def remove_stale_temp_dirs(root: Path | None = None) -> list[str]:
    """Remove caretaker's temporary directories left by processes that died (kill -9); return
    their names. One of this host whose process is gone goes once older than a lease; any
    other once older than STALE_TEMP_S."""
    root = root or Path(tempfile.gettempdir())
    removed = []
    for entry in root.iterdir():
        found = TEMP_NAME.match(entry.name)
        if found is None or entry.is_symlink() or not entry.is_dir():
            continue
        if _stale_temp(entry, found.group(1), found.group(2)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        log.warning("stale temporary directories removed names=%s", removed)
    return removed


def _stale_temp(path: Path, host: str | None, pid: str | None) -> bool:
    try:
        age_s = time.time() - path.stat().st_mtime
    except OSError:
        return False
    ours = host is not None and host == _host_tag()
    if ours and pid is not None:
        return age_s > LEASE_S and not _alive(int(pid))
    return age_s > STALE_TEMP_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def pg_environment(dsn: str) -> dict[str, str]:
    """This process's environment with the DSN's parameters as libpq's PG* variables."""
    names = _libpq_variables()
    params = conninfo_to_dict(dsn)
    ignored = sorted(name for name in params if name not in names)
    if ignored:
        log.warning("connection options without a libpq variable ignored options=%s", ignored)
    given = {names[name]: str(value) for name, value in params.items() if name in names}
    return {**os.environ, **given}


@functools.cache
def _libpq_variables() -> dict[str, str]:
    return {
        option.keyword.decode(): option.envvar.decode()
        for option in pq.Conninfo.get_defaults()
        if option.envvar
    }


def _tool_version(tool: str) -> str:
    done = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def backup_directory(
    target: BackupDirectory, store: BackupStore, task_id: str | None = None
) -> Row:
    """Archive the directory as tar.gz (symlinks kept as links, never followed); upload it
    and its manifest; record the backup."""
    if not target.path.is_dir():
        raise BackupFailed(f"backup of {target.name}: not a directory: {target.path}")
    created_at = datetime.now(UTC)
    key = new_key(target.name, created_at, ARCHIVE_FORMAT)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("backup")) as tmp:
        archive = Path(tmp) / "backup.tar.gz"
        counted = write_archive(target.path, archive)
        manifest = _manifest_head(target.name, "directory", created_at, ARCHIVE_FORMAT)
        manifest["source"] = {"host": socket.gethostname(), "path": str(target.path)}
        manifest["task_id"] = task_id
        return _upload(store, key, archive, manifest | counted)


def write_archive(root: Path, dest: Path) -> dict[str, int]:
    """Archive root's contents into dest; count files, their bytes and symlinks as an
    extraction will find them. Sockets, fifos and devices are left out."""
    counted = {"files": 0, "bytes": 0, "symlinks": 0}
    sizes: dict[str, int] = {}

    def count(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if info.issym():
            counted["symlinks"] += 1
        elif info.isreg() or info.islnk():
            # A hard link's member is empty; extracted, it is its target's file again.
            size = sizes.get(info.linkname, 0) if info.islnk() else info.size
            sizes[info.name] = size
            counted["files"] += 1
            counted["bytes"] += size
        elif not info.isdir():
            return None
        return info

    with tarfile.open(dest, "w:gz", compresslevel=6) as archive:
        for entry in sorted(os.listdir(root)):
            archive.add(root / entry, arcname=entry, filter=count)
    return counted


def new_key(target: str, created_at: datetime, suffix: str) -> str:
    """`<target>/<YYYYmmddTHHMMSSZ>-<random>.<suffix>`: sorted by time, never reused."""
    return f"{target}/{created_at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}.{suffix}"


def _manifest_head(target: str, kind: str, created_at: datetime, fmt: str) -> dict[str, Any]:
    return {"target": target, "kind": kind, "created_at": created_at.isoformat(), "format": fmt}


def _upload(store: BackupStore, key: str, path: Path, manifest: dict[str, Any]) -> Row:
    size, sha256 = path.stat().st_size, file_sha256(path)
    manifest |= {"key": key, "size": size, "sha256": sha256}
    stored = store.put(key, path)
    if stored.size != size or stored.sha256 not in (None, sha256):
        raise BackupFailed(f"the store holds other bytes than were sent for {key}")
    described = path.with_name("manifest.json")
    described.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    store.put(f"{key}.manifest.json", described)

    with transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO backups (target, kind, store, key, format, size_bytes, sha256,
                                 manifest, created_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *
            """,
            (
                *(manifest["target"], manifest["kind"], store.describe(), key, manifest["format"]),
                *(size, sha256, Jsonb(manifest), manifest["created_at"]),
            ),
        ).fetchone()
    assert row is not None
    log.info("backup recorded target=%s backup_id=%s key=%s", row["target"], row["id"], key)
    return row


# Retention


class Dated(NamedTuple):
    """A backup as retention sees it: when it was made and what became of it."""

    id: int
    created_at: datetime
    status: str


def select_expired(
    backups: Sequence[Dated], retention: RetentionConfig, now: datetime | None = None
) -> set[int]:
    """Ids of the backups retention removes. Kept: the newest backup of each of the last
    `daily` days, `weekly` ISO weeks and `monthly` months that have one (UTC), the newest
    verified backup, and every backup not yet verified (unverified, verification_failed)
    that is newer than it and younger than RETRY_DAYS: verification still tries those, and
    one may be the best there is. An invalid backup never takes a place."""
    newest_first = sorted(backups, key=lambda b: (b.created_at, b.id), reverse=True)
    candidates = [b for b in newest_first if b.status != "invalid"]
    periods = (
        (retention.daily, lambda at: at.date()),
        (retention.weekly, lambda at: at.isocalendar()[:2]),
        (retention.monthly, lambda at: (at.year, at.month)),
    )
    kept: set[int] = set()
    for count, period in periods:
        seen: set[Any] = set()
        for backup in candidates:
            bucket = period(backup.created_at.astimezone(UTC))
            if bucket not in seen and len(seen) < count:
                seen.add(bucket)
                kept.add(backup.id)
    verified = [b for b in newest_first if b.status == "verified"]
    kept.update(b.id for b in verified[:1])
    kept.update(b.id for b in _still_tried(newest_first, verified[:1], now or datetime.now(UTC)))
    return {b.id for b in backups} - kept


def _still_tried(newest_first: list[Dated], verified: list[Dated], now: datetime) -> list[Dated]:
    since = now.timestamp() - RETRY_DAYS * 86400
    after = verified[0].created_at if verified else None
    return [
        b
        for b in newest_first
        if b.status in PENDING_STATUSES
        and b.created_at.timestamp() >= since
        and (after is None or b.created_at > after)
    ]


def apply_retention(target: str, store: BackupStore, retention: RetentionConfig) -> list[int]:
    """Delete the target's expired backups from the store and mark them deleted; return
    their ids. Holds the target's lease, so no backup is deleted while it is verified."""
    with target_lease(target, "retention"):
        with transaction() as conn:
            rows = conn.execute(
                "SELECT id, key, created_at, status FROM backups"
                " WHERE target = %s AND store = %s AND status <> 'deleted' ORDER BY id",
                (target, store.describe()),
            ).fetchall()
        found = [Dated(row["id"], row["created_at"], row["status"]) for row in rows]
        expired = select_expired(found, retention)
        for row in rows:
            if row["id"] in expired:
                _delete_backup(store, row)
    log.info(
        "retention applied target=%s deleted=%d kept=%d",
        target,
        len(expired),
        len(rows) - len(expired),
    )
    return sorted(expired)


def _delete_backup(store: BackupStore, row: Row) -> None:
    # The objects go first: a row marked deleted whose delete failed would be orphaned.
    store.delete(row["key"])
    store.delete(f"{row['key']}.manifest.json")
    with transaction() as conn:
        conn.execute("UPDATE backups SET status = 'deleted' WHERE id = %s", (row["id"],))


# Verification


def verify_backup(backup_id: int, store: BackupStore, config: Config) -> Verdict:
    """Restore one backup in full and check it against its manifest; record the attempt and
    open or end the target's finding. Refused (status busy) while another process holds the
    target. Harmless twice: a verified backup is not restored again."""
    row = load_backup(backup_id)
    try:
        with target_lease(row["target"], "verify") as holder:
            return _verify_leased(backup_id, store, config, holder)
    except TargetBusy as exc:
        log.info("verification refused backup_id=%s reason=%s", backup_id, exc)
        return Verdict(backup_id, row["target"], "busy", str(exc))


def load_backup(backup_id: int) -> Row:
    """The backup's row; NotFound when there is none."""
    with transaction() as conn:
        row = conn.execute("SELECT * FROM backups WHERE id = %s", (backup_id,)).fetchone()
    if row is None:
        raise NotFound(f"no backup with id {backup_id}")
    return row


def _verify_leased(backup_id: int, store: BackupStore, config: Config, holder: str) -> Verdict:
    # Read again under the lease: the holder before may have settled this backup.
    row = load_backup(backup_id)
    if row["status"] in ("verified", "deleted"):
        return Verdict(backup_id, row["target"], row["status"], row["reason"])
    started_at = datetime.now(UTC)

    verdict = _check(row, store, config, holder)

    new_ids, notification_ids = _record(row, verdict, started_at, config)
    dispatch.try_send("routing", dispatch.route_occurrences, new_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, notification_ids)
    level = {"verified": logging.INFO, "invalid": logging.ERROR}.get(
        verdict.status, logging.WARNING
    )
    log.log(
        level,
        "backup checked backup_id=%s target=%s status=%s reason=%s",
        *(backup_id, row["target"], verdict.status, verdict.reason),
    )
    return verdict


def _check(row: Row, store: BackupStore, config: Config, holder: str) -> Verdict:
    remove_stale_temp_dirs()
    try:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("verify")) as tmp:
            path = fetch_backup(row, store, Path(tmp))
            if row["kind"] == "database":
                details = verify_database(path, row, config, holder)
            else:
                details = _verify_directory(path, row, Path(tmp) / "extracted")
    except BackupInvalid as exc:
        return Verdict(row["id"], row["target"], "invalid", exc.reason, exc.details)
    except SoftTimeLimitExceeded:
        raise
    # Anything else broke the check itself and says nothing about the backup.
    except Exception as exc:
        reason = str(exc) if isinstance(exc, CheckBroken) else one_line(exc)
        return Verdict(row["id"], row["target"], "verification_failed", reason)
    return Verdict(row["id"], row["target"], "verified", None, details)


def fetch_backup(row: Row, store: BackupStore, tmp: Path) -> Path:
    """Download the backup and check that it is the file that was recorded."""
    if row["store"] != store.describe():
        raise CheckBroken(f"the backup is in {row['store']}, not in {store.describe()}")
    try:
        if store.stat(row["key"]) is None:
            raise BackupInvalid(f"missing from the store: {row['key']}")
        path = store.get(row["key"], tmp / "backup")
    except StoreUnavailable as exc:
        raise CheckBroken(f"store unreachable: {exc}") from exc
    except StoreError as exc:
        raise CheckBroken(f"store error: {exc}") from exc

    size = path.stat().st_size
    if size != row["size_bytes"]:
        raise BackupInvalid(f"size mismatch: recorded {row['size_bytes']} bytes, stored {size}")
    sha256 = file_sha256(path)
    if sha256 != row["sha256"]:
        raise BackupInvalid(f"checksum mismatch: recorded sha256 {row['sha256']}, stored {sha256}")
    return path


def verify_database(
    path: Path, row: Row, config: Config, holder: str | None = None
) -> dict[str, Any]:
    """Restore the dump into a scratch database, check it against the manifest and the
    target's probes, and drop it whatever happened; the details, with the restore's time.
    Scratch databases dead holders left on the server are dropped first; `holder` is the
    caller's lease of the backup's target."""
    check_dump_header(path)
    dsn = _server_dsn(row, config)
    admin = make_conninfo(dsn, dbname="postgres")
    drop_stale_scratch(admin, holder)
    scratch = f"caretaker_verify_{row['id']}_{secrets.token_hex(4)}"
    started = time.monotonic()
    created = False
    try:
        create_database(admin, scratch, row["manifest"].get("database") or {})
        created = True
        _restore(path, dsn, scratch)
        restore_s = time.monotonic() - started
        with psycopg.connect(
            make_conninfo(dsn, dbname=scratch), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
        ) as conn:
            counts = count_rows(conn)
            compare_counts(row["manifest"].get("tables") or {}, counts)
            probes = _probes(row["target"], config)
            run_probes(conn, probes)
    finally:
        if created:
            _drop_scratch(admin, scratch)
    return {
        "scratch": scratch,
        "restore_s": round(restore_s, 3),
        "tables": len(counts),
        "rows": sum(counts.values()),
        "probes": len(probes),
    }


def check_dump_header(path: Path) -> None:
    """BackupInvalid unless the file starts as a pg_dump custom archive does."""
    with path.open("rb") as file:
        head = file.read(len(DUMP_MAGIC))
    if not head:
        raise BackupInvalid("not a pg_dump archive: the file is empty")
    if head != DUMP_MAGIC:
        raise BackupInvalid(f"not a pg_dump archive: it starts with {head!r}, not {DUMP_MAGIC!r}")


def _server_dsn(row: Row, config: Config) -> str:
    """The server to restore on: the configured target's, or for an ad hoc backup the one it
    came from, reached as it was then (~/.pgpass or PGPASSWORD give any password)."""
    for target in config.backups.databases:
        if target.name == row["target"]:
            try:
                return target_dsn(target)
            except DsnError as exc:
                raise CheckBroken(str(exc)) from None
    source = row["manifest"].get("source") or {}
    return make_conninfo(
        "", **{k: source[k] for k in ("host", "port", "user", "dbname") if source.get(k)}
    )


def _probes(target: str, config: Config) -> list[str]:
    found = [t for t in config.backups.databases if t.name == target]
    return list(found[0].probes) if found else []


def create_database(admin: str, name: str, facts: dict[str, str]) -> None:
    """Create an empty database, in the source's encoding and locale when known."""
    # From template0, in the source's encoding and locale: template1 may hold objects of its
    # own that would collide with the restore.
    create = sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name))
    if facts:
        create += sql.SQL(" ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
            sql.Literal(facts["encoding"]),
            sql.Literal(facts["lc_collate"]),
            sql.Literal(facts["lc_ctype"]),
        )
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute(create)
    except psycopg.OperationalError as exc:
        raise CheckBroken(f"server unreachable: {one_line(exc)}") from exc


def _restore(path: Path, dsn: str, scratch: str) -> None:
    argv = ["pg_restore", "--exit-on-error", "--no-owner", "--no-privileges", "--no-password"]
    done = run_pg_tool([*argv, f"--dbname={scratch}", str(path)], dsn)
    if done.returncode == 0:
        return
    error = trimmed(done.stderr)
    if "connection to server" in error:
        raise CheckBroken(f"server unreachable: {error}")
    # The server failing (disk full, out of memory, a restart) says nothing of the archive.
    if any(trouble in error.lower() for trouble in SERVER_TROUBLE):
        raise CheckBroken(f"pg_restore failed on the server: {error}")
    raise BackupInvalid(f"pg_restore failed: {error}")


def compare_counts(expected: dict[str, int], restored: dict[str, int]) -> None:
    """BackupInvalid naming every table whose row count differs from the manifest's."""
    differences = [
        f"{name}: manifest {expected.get(name, 'none')}, restored {restored.get(name, 'none')}"
        for name in sorted(expected.keys() | restored.keys())
        if expected.get(name) != restored.get(name)
    ]
    if differences:
        reason = trimmed("row counts differ: " + "; ".join(differences))
        raise BackupInvalid(reason, {"differences": differences})


def run_probes(conn: psycopg.Connection[Any], probes: list[str]) -> None:
    """Each probe must return one row whose first column is true: BackupInvalid when one
    returns anything else, CheckBroken when one cannot run at all."""
    conn.execute(sql.SQL("SET statement_timeout = {}").format(PROBE_TIMEOUT_MS))
    for probe in probes:
        try:
            rows = conn.execute(probe).fetchmany(2)
        except psycopg.Error as exc:
            if conn.broken:
                raise
            # The row counts were compared first, so every table the backup should hold is
            # there: a syntax error, a missing table or a timeout is the probe's own fault.
            raise CheckBroken(f"probe could not run: {probe}: {one_line(exc)}") from exc
        if len(rows) != 1:
            raise BackupInvalid(f"probe failed: {probe}: returned {len(rows) or 'no'} rows")
        if rows[0][0] is not True:
            raise BackupInvalid(f"probe failed: {probe}: returned {rows[0][0]!r}")


def drop_stale_scratch(admin: str, holder: str | None) -> list[str]:
    """Drop the scratch databases on the server whose target's lease nobody else holds: a
    verification or drill killed (kill -9) before it could drop its own left them. Their
    restore, if still running, ends with its connection. Returns the names dropped."""
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            rows = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'caretaker\\_verify\\_%'"
            ).fetchall()
            stale = [row[0] for row in rows if _scratch_is_stale(row[0], holder)]
            for name in stale:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
    except psycopg.OperationalError as exc:
        raise CheckBroken(f"server unreachable: {one_line(exc)}") from exc
    if stale:
        log.warning("stale scratch databases dropped names=%s", stale)
    return stale


def _scratch_is_stale(name: str, holder: str | None) -> bool:
    # The lease is read after the name: a verification takes its lease before it creates its
    # scratch database, so a live one's lease is always seen.
    found = SCRATCH_NAME.match(name)
    if found is None:
        return False
    with transaction() as conn:
        lease = conn.execute(
            "SELECT l.holder FROM backups b JOIN target_leases l ON l.target = b.target"
            " WHERE b.id = %s AND l.expires_at > now()",
            (int(found.group(1)),),
        ).fetchone()
    return lease is None or lease["holder"] == holder


def _drop_scratch(admin: str, name: str) -> None:
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            conn.execute(drop)
    except psycopg.Error as exc:
        # Raising here would hide the verification's outcome; a person must drop it.
        log.error("scratch database left behind name=%s error=%s", name, one_line(exc))


def _verify_directory(path: Path, row: Row, dest: Path) -> dict[str, Any]:
    dest.mkdir()
    extract_archive(path, dest)
    return check_tree(dest, row["manifest"], "extracted")


def check_tree(root: Path, manifest: dict[str, Any], seen_as: str) -> dict[str, int]:
    """Count the tree under root; BackupInvalid naming each count that differs from the
    manifest's (`seen_as` says what the tree is: extracted, restored)."""
    found = count_tree(root)
    differences = [
        f"{name}: manifest {manifest.get(name)}, {seen_as} {value}"
        for name, value in found.items()
        if manifest.get(name) != value
    ]
    if differences:
        raise BackupInvalid("contents differ: " + "; ".join(differences))
    return found


def extract_archive(path: Path, dest: Path) -> None:
    """Extract a tar.gz into dest; BackupInvalid for an unreadable archive or a member that
    would land outside dest."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = archive.getmembers()
            for member in members:
                _refuse_escaping(member)
            # The "tar" filter also refuses writing through a symlink that leads out.
            archive.extractall(dest, members=members, filter="tar")
    except tarfile.FilterError as exc:
        name = exc.tarinfo.name
        raise BackupInvalid(f"member escapes the directory: {name}") from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BackupInvalid(f"not a readable tar.gz archive: {one_line(exc)}") from exc


def _refuse_escaping(member: tarfile.TarInfo) -> None:
    for name in (member.name, member.linkname if member.islnk() else ""):
        normal = os.path.normpath(name) if name else ""
        if os.path.isabs(name) or normal == ".." or normal.startswith("../"):
            raise BackupInvalid(f"member escapes the directory: {name}")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise BackupInvalid(f"unexpected member type: {member.name}")


def count_tree(root: Path) -> dict[str, int]:
    """Files, their bytes and symlinks under root, as a directory backup's manifest counts them."""
    found = {"files": 0, "bytes": 0, "symlinks": 0}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            info = os.lstat(os.path.join(folder, name))
            if stat.S_ISLNK(info.st_mode):
                found["symlinks"] += 1
            elif stat.S_ISREG(info.st_mode):
                found["files"] += 1
                found["bytes"] += info.st_size
    return found


def _record(
    row: Row, verdict: Verdict, started_at: datetime, config: Config
) -> tuple[list[int], list[int]]:
    """Store the attempt and the backup's new status; return new occurrences to route and
    notifications to send after commit."""
    with transaction() as conn:
        conn.execute(
            "UPDATE backups SET status = %s, reason = %s, checked_at = now()"
            " WHERE id = %s AND status <> 'deleted'",
            (verdict.status, verdict.reason, row["id"]),
        )
        conn.execute(
            "INSERT INTO backup_checks (backup_id, status, reason, details, started_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (row["id"], verdict.status, verdict.reason, Jsonb(verdict.details), started_at),
        )
        return _settle_finding(conn, row, verdict, config)


def _settle_finding(
    conn: Connection, row: Row, verdict: Verdict, config: Config
) -> tuple[list[int], list[int]]:
    """An invalid latest backup opens the target's finding; a verified latest ends it."""
    if verdict.status not in ("verified", "invalid"):
        return [], []
    latest = conn.execute(
        "SELECT id FROM backups WHERE target = %s AND status <> 'deleted'"
        " ORDER BY created_at DESC, id DESC LIMIT 1",
        (row["target"],),
    ).fetchone()
    if latest is None or latest["id"] != row["id"]:
        return [], []
    key = f"backup:{row['target']}"
    if verdict.status == "verified":
        return [], findings.clear_finding(conn, key, f"backup {row['id']} verified", config)
    labels = {"alertname": "BackupInvalid", "target": row["target"], "severity": "critical"}
    summary = f"the latest backup of {row['target']} is invalid: {verdict.reason}"
    new_id = findings.raise_finding(conn, key, labels, summary)
    return ([new_id] if new_id is not None else []), []


def pending_backups(days: float, target: str | None = None) -> list[int]:
    """Ids of the backups not yet verified (unverified, verification_failed) to verify, oldest
    first: those of the last `days`, and those of the last RETRY_DAYS newer than their
    target's newest verified backup. A backup a run could not check (busy, broken) is so
    tried again by the next run even once older than `days`."""
    with transaction() as conn:
        rows = conn.execute(
            """
            SELECT b.id FROM backups b
             WHERE b.status = ANY(%(statuses)s)
               AND (%(target)s::text IS NULL OR b.target = %(target)s)
               AND (b.created_at >= now() - make_interval(secs => %(seconds)s)
                    OR (b.created_at >= now() - make_interval(secs => %(retry_s)s)
                        AND NOT EXISTS (
                            SELECT 1 FROM backups v
                             WHERE v.target = b.target AND v.status = 'verified'
                               AND v.created_at >= b.created_at)))
             ORDER BY b.created_at, b.id
            """,
            {
                "seconds": days * 86400,
                "retry_s": max(days, RETRY_DAYS) * 86400,
                "statuses": list(PENDING_STATUSES),
                "target": target,
            },
        ).fetchall()
    return [row["id"] for row in rows]


# Entry points: the tasks and the command line


@app.task(
    name="caretaker.maintenance.create_backups",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=TASK_SOFT_LIMIT_S,
    time_limit=TASK_SOFT_LIMIT_S + 60,
)
def create_backups(self: Any) -> dict[str, Any]:
    """Back up every configured database and directory, then apply retention to each; one
    target failing leaves the others to be done. Returns the outcome per target.

    A long run outlives the broker's visibility timeout and is delivered again while it works:
    each target is backed up under its lease, and a target this task (same id) already backed
    up is skipped, so a redelivery makes no second set. Not retried."""
    config = get_config()
    store = open_store(config.backups.store)
    outcome: dict[str, Any] = {}
    for target in _targets(config):
        outcome[target.name] = _create_one(target, store, self.request.id)
        _settle_failure(target.name, outcome[target.name], config)
        outcome[target.name]["deleted"] = _retain(target.name, store, config.backups.retention)
    return outcome


def _targets(config: Config) -> list[BackupDatabase | BackupDirectory]:
    return [*config.backups.databases, *config.backups.directories]


def _create_one(
    target: BackupDatabase | BackupDirectory, store: BackupStore, task_id: str | None
) -> dict[str, Any]:
    try:
        with target_lease(target.name, "backup"):
            made = _made_by(target.name, task_id)
            if made is not None:
                return {"status": "done before", "backup_id": made}
            row = create_backup(target, store, task_id)
    except SoftTimeLimitExceeded:
        raise
    except TargetBusy as exc:
        log.info("backup skipped target=%s reason=%s", target.name, exc)
        return {"status": "busy", "error": str(exc)}
    except Exception as exc:
        log.error("backup failed target=%s error=%s", target.name, one_line(exc))
        return {"status": "failed", "error": one_line(exc)}
    return {"status": "created", "backup_id": row["id"], "key": row["key"]}


def _settle_failure(target: str, outcome: dict[str, Any], config: Config) -> None:
    """A failed backup opens the target's backup-failed finding; the next one made ends it."""
    if outcome["status"] == "busy":
        return
    key = f"backup-failed:{target}"
    new_ids: list[int] = []
    try:
        with transaction() as conn:
            if outcome["status"] != "failed":
                notes = findings.clear_finding(conn, key, f"backup of {target} made", config)
            else:
                labels = {"alertname": "BackupFailed", "target": target, "severity": "critical"}
                summary = f"the backup of {target} failed: {outcome['error']}"
                new_id = findings.raise_finding(conn, key, labels, summary)
                new_ids, notes = ([new_id] if new_id is not None else []), []
    except (CaretakerError, psycopg.Error) as exc:
        log.warning("backup finding not settled target=%s error=%s", target, one_line(exc))
        return
    dispatch.try_send("routing", dispatch.route_occurrences, new_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, notes)


def _made_by(target: str, task_id: str | None) -> int | None:
    if task_id is None:
        return None
    with transaction() as conn:
        row = conn.execute(
            "SELECT id FROM backups WHERE target = %s AND manifest->>'task_id' = %s",
            (target, task_id),
        ).fetchone()
    return None if row is None else int(row["id"])


def _retain(target: str, store: BackupStore, retention: RetentionConfig) -> list[int]:
    try:
        return apply_retention(target, store, retention)
    except TargetBusy as exc:
        log.info("retention skipped target=%s reason=%s", target, exc)
    except (CaretakerError, psycopg.Error) as exc:
        log.warning("retention failed target=%s error=%s", target, one_line(exc))
    return []


@app.task(
    name="caretaker.maintenance.verify_backups",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=TASK_SOFT_LIMIT_S,
    time_limit=TASK_SOFT_LIMIT_S + 60,
)
def verify_backups(days: float | None = None) -> dict[str, Any]:
    """Restore and check every backup of the last `days` (default backups.verify_days) not
    yet verified, oldest first. A target another process works on is left for the next
    run. Harmless twice; not retried. Returns the outcome per backup id."""
    outcome: dict[str, Any] = {}
    for verdict in verify_now(days):
        outcome[str(verdict.backup_id)] = asdict(verdict)
    return outcome


def verify_now(days: float | None = None, target: str | None = None) -> list[Verdict]:
    """Verify the pending backups, in this process, with the process's configuration."""
    config = get_config()
    if target is not None:
        _known_target(target, config)
    store = open_store(config.backups.store)
    ids = pending_backups(config.backups.verify_days if days is None else days, target)
    return [verify_backup(backup_id, store, config) for backup_id in ids]


def _known_target(target: str, config: Config) -> None:
    # An ad hoc target is in no configuration, but it has backups.
    if any(t.name == target for t in _targets(config)):
        return
    with transaction() as conn:
        found = conn.execute("SELECT 1 FROM backups WHERE target = %s LIMIT 1", (target,))
        if found.fetchone() is not None:
            return
    known = ", ".join(sorted(t.name for t in _targets(config))) or "none"
    raise NotFound(f"no backup target named {target!r} (configured: {known})")


def create_now(target_name: str | None = None, dsn: str | None = None) -> Row:
    """Back up a configured target, or any database by DSN (without a password), now."""
    config = get_config()
    if dsn is not None:
        target: BackupDatabase | BackupDirectory = BackupDatabase(name=_adhoc_name(dsn), dsn=dsn)
    else:
        configured = {t.name: t for t in _targets(config)}
        if target_name not in configured:
            known = ", ".join(sorted(configured)) or "none"
            raise NotFound(f"no backup target named {target_name!r} (configured: {known})")
        target = configured[target_name]
    return create_backup(target, open_store(config.backups.store))


def _adhoc_name(dsn: str) -> str:
    # Apart from configured targets, whose probes and findings are not for this database.
    dbname = str(conninfo_to_dict(dsn).get("dbname") or "")
    name = re.sub(r"[^a-z0-9._-]+", "-", dbname.lower()).strip("-._")
    if not name:
        raise BackupFailed("the connection string names no database (add /DBNAME)")
    return f"adhoc-{name}"


def backup_rows(target: str | None, limit: int) -> list[dict[str, Any]]:
    """Backups, newest first, as plain data; times in UTC ISO 8601."""
    with transaction() as conn:
        rows = conn.execute(
            """
            SELECT id, target, kind, status, created_at, checked_at, size_bytes, sha256, key,
                   store, reason
              FROM backups WHERE %(target)s::text IS NULL OR target = %(target)s
             ORDER BY created_at DESC, id DESC LIMIT %(limit)s
            """,
            {"target": target, "limit": limit},
        ).fetchall()
    return [
        {k: v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v for k, v in r.items()}
        for r in rows
    ]


def _scalar(conn: psycopg.Connection[Any], query: Any) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def one_line(exc: BaseException) -> str:
    """The first line of an error's message, for a reason or a log line."""
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(exc).__name__


def trimmed(text: str) -> str:
    """Text on one line, cut to REASON_CHARS."""
    joined = " ".join(text.split())
    return joined if len(joined) <= REASON_CHARS else joined[: REASON_CHARS - 3] + "..."

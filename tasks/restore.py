"""Disaster recovery: a backup target restored as a run (stop its dependants, restore a copy,
check it, swap it in, start them, check their health; on failure put the original back), and
the monthly drill that times a restore against the target's RTO and RPO."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field

from tasks.backups import (
    CONNECT_TIMEOUT_S,
    TASK_SOFT_LIMIT_S,
    TOOL_TIMEOUT_S,
    BackupInvalid,
    CheckBroken,
    DsnError,
    TargetBusy,
    check_dump_header,
    check_tree,
    compare_counts,
    count_rows,
    create_database,
    extract_archive,
    fetch_backup,
    load_backup,
    one_line,
    open_store,
    remove_stale_temp_dirs,
    run_pg_tool,
    run_probes,
    target_dsn,
    target_lease,
    temp_prefix,
    trimmed,
    verify_database,
)
from tasks.backupstore import BackupStore
from workers import dispatch
from workers.app import app
from workers.config import (
    BackupDatabase,
    BackupDirectory,
    Config,
    OnFailure,
    RunbookConfig,
    StepConfig,
    get_config,
)
from workers.db import Connection, Row, transaction
from workers.errors import ActionError, CaretakerError, Conflict, NotFound
from workers.occurrences import SOURCE_MANUAL, record_manual
from workers.runs import Outcome, StepContext

log = logging.getLogger(__name__)

RUNBOOK_PREFIX = "restore:"
# The alertname of a restore a person asked for; its labels name target and backup_id.
RESTORE_ALERT = "RestoreRequested"
RESTORE_STEP = "restore-copy"
SWAP_STEP = "swap-in"
STAMP_FORMAT = "%Y%m%d%H%M%S"
# PostgreSQL cuts longer names short, which would make the copy's name ambiguous.
MAX_NAME_BYTES = 63
# Seconds a dependant's stop or start command may run.
COMMAND_TIMEOUT_S = 600.0
# Seconds the copy's row counts and probes may take on a large database.
CHECK_TIMEOUT_S = 2 * 3600.0
# Renames tried while sessions that reconnect hold a database, and seconds between them.
RENAME_ATTEMPTS = 5
RENAME_RETRY_S = 1.0
# Milliseconds pg_terminate_backend waits for each session to end.
TERMINATE_WAIT_MS = 5000


class StampParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str
    # The run's UTC yyyymmddHHMMSS: names the copy, the original kept and a failed restore.
    stamp: str = Field(pattern=r"^\d{14}$")


class CopyParams(StampParams):
    # None: the latest verified backup of the target when the step runs.
    backup_id: int | None = None


class CopiedParams(StampParams):
    # The step whose result names the restored copy.
    from_step: str = RESTORE_STEP


@dataclass(frozen=True)
class Names:
    """What one restore calls things: the live database or directory, the restored copy, the
    original kept after the swap, and the restored one put aside when the swap is undone."""

    live: str
    copy: str
    before: str
    failed: str


def new_stamp() -> str:
    """Now, in UTC, as a run's stamp."""
    return datetime.now(UTC).strftime(STAMP_FORMAT)


def backup_target(name: str, config: Config) -> BackupDatabase | BackupDirectory:
    """The database or directory of the backups section named so; NotFound otherwise."""
    targets: list[BackupDatabase | BackupDirectory] = [
        *config.backups.databases,
        *config.backups.directories,
    ]
    found = next((t for t in targets if t.name == name), None)
    if found is None:
        known = ", ".join(sorted(t.name for t in targets)) or "none"
        raise NotFound(f"no backup target named {name!r} (configured: {known})")
    return found


def database_names(dsn: str, stamp: str) -> Names:
    """The names of a database restore; ActionError for a database that cannot be one."""
    live = str(conninfo_to_dict(dsn).get("dbname") or "")
    if not live or live == "postgres":
        # The swap runs on a connection to `postgres`, which cannot rename itself.
        raise ActionError(f"cannot restore database {live or '(none named in the dsn)'!r}")
    names = Names(
        live, f"{live}_restore_{stamp}", f"{live}_before_{stamp}", f"{live}_failed_{stamp}"
    )
    if len(names.copy.encode()) > MAX_NAME_BYTES:
        raise ActionError(f"database name {live!r} is too long to name its restored copy")
    return names


def directory_names(target: BackupDirectory, stamp: str) -> Names:
    """The paths of a directory restore, all beside the directory."""
    live = str(target.path)
    return Names(
        live, f"{live}.restore-{stamp}", f"{live}.before-{stamp}", f"{live}.failed-{stamp}"
    )


def dr_runbook(target: BackupDatabase | BackupDirectory, backup_id: int | None) -> RunbookConfig:
    """The run that restores a target from a backup (None: its latest verified one), and
    the rollback that puts the original back."""
    named = {"target": target.name, "stamp": new_stamp()}
    dependants = target.dependants
    # The copy is restored and checked beside the live target before the dependants stop:
    # a busy lease, a bad DSN or a bad backup then fail the run while they still serve, and
    # they are down only for the swap. The copy is made from the backup, so what they write
    # meanwhile changes nothing in it.
    steps = [
        _builtin(RESTORE_STEP, "restore_copy", named | {"backup_id": backup_id}, TOOL_TIMEOUT_S),
        _builtin("verify-copy", "verify_copy", named, CHECK_TIMEOUT_S),
    ]
    steps += [_command(f"stop-{n}", argv) for n, argv in enumerate(dependants.stop, 1)]
    steps += [_builtin(SWAP_STEP, "swap_in", named, 300.0)]
    steps += [_command(f"start-{n}", argv) for n, argv in enumerate(dependants.start, 1)]
    rollback = [_builtin("swap-back", "swap_back", named, 300.0)]
    rollback += [_command(f"start-again-{n}", argv) for n, argv in enumerate(dependants.start, 1)]
    if dependants.health is not None:
        steps.append(dependants.health.model_copy(update={"name": "health", "kind": "verify"}))
        rollback.append(
            dependants.health.model_copy(update={"name": "health-after-rollback", "kind": "verify"})
        )
    return RunbookConfig(
        name=f"{RUNBOOK_PREFIX}{target.name}",
        matchers=[f'alertname="{RESTORE_ALERT}"'],
        steps=steps,
        rollback=rollback,
        on_failure=OnFailure(escalate=True, severity="critical"),
    )


def _builtin(name: str, action: str, params: dict[str, Any], work_s: float) -> StepConfig:
    # Each of them looks at what exists before it acts, so running it again is harmless.
    return StepConfig(
        name=name,
        kind="recover",
        action=action,
        params=params,
        idempotent=True,
        timeout_s=work_s + 600,
    )


def _command(name: str, argv: list[str]) -> StepConfig:
    return StepConfig(
        name=name,
        kind="recover",
        action="run_command",
        params={"argv": argv, "timeout_s": COMMAND_TIMEOUT_S},
        timeout_s=COMMAND_TIMEOUT_S + 60,
    )


def planned_restore(config: Config, labels: dict[str, str]) -> RunbookConfig:
    """The run a RestoreRequested occurrence asks for; CaretakerError when it cannot be made."""
    target = backup_target(labels.get("target", ""), config)
    backup = labels.get("backup_id", "")
    if backup and not backup.isdigit():
        raise ActionError(f"backup_id {backup!r} is not a backup id")
    return dr_runbook(target, int(backup) if backup else None)


# Asking for a restore


def pick_backup(conn: Connection, target: str, backup_id: int | None, store: str) -> Row:
    """The backup a restore of the target uses: the one asked for, which must be the
    target's, in the configured store (`store`, as described) and neither invalid nor
    deleted, or else the target's latest verified one in that store."""
    if backup_id is None:
        row = conn.execute(
            "SELECT * FROM backups WHERE target = %s AND status = 'verified' AND store = %s"
            " ORDER BY created_at DESC, id DESC LIMIT 1",
            (target, store),
        ).fetchone()
        if row is None:
            raise NotFound(f"no verified backup of target {target} in {store}")
        return row
    row = conn.execute("SELECT * FROM backups WHERE id = %s", (backup_id,)).fetchone()
    if row is None:
        raise NotFound(f"no backup with id {backup_id}")
    if row["target"] != target:
        raise Conflict(f"backup {backup_id} is of target {row['target']}, not {target}")
    if row["status"] in ("invalid", "deleted"):
        because = f": {row['reason']}" if row["reason"] else ""
        raise Conflict(f"backup {backup_id} of {target} is {row['status']}{because}")
    if row["store"] != store:
        raise Conflict(f"backup {backup_id} is in {row['store']}, not in {store}")
    return row


def configured_store(config: Config) -> str:
    """The description of the configured store, as recorded with each backup in it."""
    return open_store(config.backups.store).describe()


def request_restore(conn: Connection, target: str, backup_id: int | None, person: str) -> int:
    """Record a restore asked for by a person as an occurrence to route; return its id. The
    target, its DSN, the backup, that no other restore of the target is under way and that
    nobody holds its lease are checked before anything is recorded."""
    config = get_config()
    configured = backup_target(target, config)
    if isinstance(configured, BackupDatabase):
        _dsn(configured)
    row = pick_backup(conn, target, backup_id, configured_store(config))
    _refuse_second_restore(conn, target)
    _refuse_leased(conn, target)
    labels = {
        "alertname": RESTORE_ALERT,
        "target": target,
        "backup_id": str(row["id"]),
        "severity": "critical",
    }
    summary = f"restore of {target} from backup {row['id']}, asked by {person}"
    fingerprint = f"restore:{target}:{row['id']}:{uuid.uuid4().hex[:8]}"
    return record_manual(conn, fingerprint, labels, summary, person)


def ask_for_restore(target: str, backup_id: int | None, person: str) -> int:
    """A person's restore request: recorded, then routed. Returns the occurrence id."""
    with transaction() as conn:
        occurrence_id = request_restore(conn, target, backup_id, person)
    dispatch.try_send("routing", dispatch.route_occurrences, [occurrence_id])
    return occurrence_id


def _refuse_second_restore(conn: Connection, target: str) -> None:
    # Two restores of one target would swap over each other; the lock makes a second request
    # wait for the first one's commit and then see it.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{RUNBOOK_PREFIX}{target}",))
    busy = conn.execute(
        """
        SELECT 'run ' || id AS what FROM runs
         WHERE runbook = %(runbook)s AND status IN ('running', 'waiting')
        UNION ALL
        SELECT 'occurrence ' || id FROM occurrences
         WHERE source = %(source)s AND routed_at IS NULL AND status = 'firing'
           AND labels->>'alertname' = %(alert)s AND labels->>'target' = %(target)s
        LIMIT 1
        """,
        {
            "runbook": f"{RUNBOOK_PREFIX}{target}",
            "source": SOURCE_MANUAL,
            "alert": RESTORE_ALERT,
            "target": target,
        },
    ).fetchone()
    if busy is not None:
        raise Conflict(f"a restore of {target} is already under way: {busy['what']}")


def _refuse_leased(conn: Connection, target: str) -> None:
    # The run checks again (restore-copy takes the lease); this only spares a run bound to
    # fail, such as one asked for while the nightly verification restores the target.
    held = conn.execute(
        "SELECT holder, purpose, expires_at FROM target_leases"
        " WHERE target = %s AND expires_at > now()",
        (target,),
    ).fetchone()
    if held is not None:
        raise Conflict(
            f"target {target} is busy: {held['purpose']} by {held['holder']}"
            f" until {held['expires_at']}"
        )


# The run's actions


def restore_copy(params: CopyParams, context: StepContext) -> Outcome:
    """Restore the backup in full beside the live target: a new database on its server, or
    a directory beside it, named by the run's stamp. A copy left by an earlier try is removed
    first. Holds the target's lease."""
    config = get_config()
    target = backup_target(params.target, config)
    if isinstance(target, BackupDatabase):
        _dsn(target)
    store = open_store(config.backups.store)
    with transaction() as conn:
        row = pick_backup(conn, target.name, params.backup_id, store.describe())

    started = time.monotonic()
    with target_lease(target.name, "restore"):
        with _opened(target, params.stamp) as (place, names):
            place.remove(names.copy)
        with tempfile.TemporaryDirectory(prefix=temp_prefix("restore")) as tmp:
            path = fetch_backup(row, store, Path(tmp))
            if isinstance(target, BackupDirectory):
                Path(names.copy).mkdir()
                extract_archive(path, Path(names.copy))
            else:
                _restore_database(target, row, path, names.copy)

    restore_s = round(time.monotonic() - started, 3)
    log.info(
        "restore copied target=%s backup_id=%s copy=%s restore_s=%s",
        *(target.name, row["id"], names.copy, restore_s),
    )
    result = {"copy": names.copy, "live": names.live, "backup_id": row["id"]}
    return Outcome(ok=True, result=result | {"restore_s": restore_s})


def _restore_database(target: BackupDatabase, row: Row, path: Path, copy: str) -> None:
    check_dump_header(path)
    dsn = _dsn(target)
    facts = row["manifest"].get("database") or {}
    try:
        create_database(make_conninfo(dsn, dbname="postgres"), copy, facts)
    except psycopg.Error as exc:
        raise ActionError(f"cannot create {copy}: {one_line(exc)}") from exc
    # Owners and grants are restored as they were: the dependants need their rights back.
    argv = ["pg_restore", "--exit-on-error", "--no-password", f"--dbname={copy}", str(path)]
    done = run_pg_tool(argv, dsn)
    if done.returncode != 0:
        raise ActionError(f"pg_restore into {copy} failed: {trimmed(done.stderr)}")


def verify_copy(params: CopiedParams, context: StepContext) -> Outcome:
    """Check the restored copy against its backup's manifest: a database's row count of
    every table and the target's probes, a directory's files, bytes and symlinks. Read-only;
    holds the target's lease."""
    copied = context.earlier.get(params.from_step, {})
    if "copy" not in copied:
        return Outcome(ok=False, result={}, error=f"step {params.from_step} recorded no copy")
    target = backup_target(params.target, get_config())
    row = load_backup(int(copied["backup_id"]))
    result: dict[str, Any] = {"copy": copied["copy"], "backup_id": row["id"]}

    try:
        with target_lease(target.name, "restore"):
            if isinstance(target, BackupDirectory):
                result |= check_tree(Path(copied["copy"]), row["manifest"], "restored")
            else:
                result |= _check_database(target, copied["copy"], row["manifest"])
    except BackupInvalid as exc:
        error = f"the copy differs from backup {row['id']}: {exc.reason}"
        return Outcome(ok=False, result=result | exc.details, error=error)
    except CheckBroken as exc:
        return Outcome(ok=False, result=result, error=f"cannot check {copied['copy']}: {exc}")
    return Outcome(ok=True, result=result)


def _check_database(target: BackupDatabase, copy: str, manifest: dict[str, Any]) -> dict[str, int]:
    dsn = make_conninfo(_dsn(target), dbname=copy)
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            counts = count_rows(conn)
            compare_counts(manifest.get("tables") or {}, counts)
            run_probes(conn, target.probes)
    except psycopg.Error as exc:
        raise ActionError(f"cannot check {copy}: {one_line(exc)}") from exc
    return {"tables": len(counts), "rows": sum(counts.values()), "probes": len(target.probes)}


def swap_in(params: CopiedParams, context: StepContext) -> Outcome:
    """Put the checked copy in the live target's place and keep the live one under its
    `before` name, for the rollback. A swap an earlier try made is reported, not repeated.
    Holds the target's lease."""
    copied = context.earlier.get(params.from_step, {})
    if "copy" not in copied:
        return Outcome(ok=False, result={}, error=f"step {params.from_step} recorded no copy")
    target = backup_target(params.target, get_config())

    with target_lease(target.name, "restore"), _opened(target, params.stamp) as (place, names):
        if copied["copy"] != names.copy:
            raise ActionError(
                f"step {params.from_step} restored {copied['copy']}, not {names.copy}"
            )
        present = place.present(names)
        if names.copy not in present and {names.live, names.before} <= present:
            done = {"live": names.live, "before": names.before, "copy": names.copy}
            return Outcome(ok=True, result=done)
        if names.copy not in present:
            raise ActionError(f"the restored copy {names.copy} does not exist")
        if {names.live, names.before} <= present:
            raise ActionError(f"both {names.live} and {names.before} exist: swap it by hand")
        keep = [(names.live, names.before)] if names.live in present else []
        place.rename([*keep, (names.copy, names.live)])

    kept = names.before if keep or names.before in present else None
    log.info("restore swapped in target=%s live=%s before=%s", target.name, names.live, kept)
    return Outcome(ok=True, result={"live": names.live, "before": kept, "copy": names.copy})


def swap_back(params: StampParams, context: StepContext) -> Outcome:
    """Undo the restore: once the copy was swapped in, the original goes back to the live
    name and the restored one is kept under its `failed` name; when there was no original
    (a real disaster), the restored copy stays live, there being nothing better. Before the
    swap, a copy is removed. Decided by what exists, so it is right whichever step failed,
    and harmless twice. Takes no lease: a rollback must not wait behind a verification."""
    target = backup_target(params.target, get_config())
    swapped = context.earlier.get(SWAP_STEP)

    try:
        result = _undo(target, params.stamp, swapped)
    except (ActionError, DsnError, psycopg.Error) as exc:
        if swapped is not None:
            raise
        # Before the swap the live target was never touched: failing here would leave the
        # dependants stopped (the rollback ends at a failed step) for a copy left beside.
        log.error("restore copy not removed target=%s error=%s", target.name, one_line(exc))
        result = {"nothing": "the live target was not touched", "error": one_line(exc)}
        return Outcome(ok=True, result=result)

    log.warning("restore undone target=%s result=%s", target.name, result)
    return Outcome(ok=True, result=result)


def _undo(
    target: BackupDatabase | BackupDirectory, stamp: str, swapped: dict[str, Any] | None
) -> dict[str, Any]:
    with _opened(target, stamp) as (place, names):
        present = place.present(names)
        if names.before in present:
            aside = [(names.live, names.failed)] if names.live in present else []
            place.rename([*aside, (names.before, names.live)])
            return {"live": names.live, "failed": names.failed if aside else None}
        if swapped is not None and swapped.get("before") is None and names.live in present:
            # There was no live target before the restore: putting the restored one aside
            # would leave none at all, so it stays live for a person to judge.
            return {
                "live": names.live,
                "kept": "the restored copy stays live: there was none before the restore",
            }
        if names.copy in present:
            place.remove(names.copy)
            return {"removed": names.copy}
        return {"nothing": "no restored copy to undo"}


class _Place(Protocol):
    """Where a target lives, as a swap sees it: which of its names exist, renaming, removing."""

    def present(self, names: Names) -> set[str]: ...

    def rename(self, pairs: list[tuple[str, str]]) -> None: ...

    def remove(self, name: str) -> None: ...


class _Server:
    """The databases of a target's server, through a connection to its `postgres`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def present(self, names: Names) -> set[str]:
        wanted = [names.live, names.copy, names.before, names.failed]
        rows = self.conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (wanted,)
        ).fetchall()
        return {row[0] for row in rows}

    def rename(self, pairs: list[tuple[str, str]]) -> None:
        # All renames in one transaction: the live name is never missing, even for a moment.
        # A session that reconnects between terminating and renaming makes the rename fail,
        # so both are tried again.
        for attempt in range(1, RENAME_ATTEMPTS + 1):
            self._terminate([old for old, _ in pairs])
            try:
                with self.conn.transaction():
                    for old, new in pairs:
                        self.conn.execute(
                            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                                sql.Identifier(old), sql.Identifier(new)
                            )
                        )
                return
            except psycopg.errors.ObjectInUse as exc:
                if attempt == RENAME_ATTEMPTS:
                    raise ActionError(f"sessions keep reconnecting: {one_line(exc)}") from exc
                log.warning("rename retried attempt=%s error=%s", attempt, one_line(exc))
                time.sleep(RENAME_RETRY_S)

    def _terminate(self, databases: list[str]) -> None:
        self.conn.execute(
            "SELECT pg_terminate_backend(pid, %s) FROM pg_stat_activity"
            " WHERE datname = ANY(%s) AND pid <> pg_backend_pid()",
            (TERMINATE_WAIT_MS, databases),
        )

    def remove(self, name: str) -> None:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        self.conn.execute(drop)


class _Filesystem:
    """Directories beside the target's path; renames there stay on one filesystem."""

    def present(self, names: Names) -> set[str]:
        wanted = [names.live, names.copy, names.before, names.failed]
        return {name for name in wanted if os.path.lexists(name)}

    def rename(self, pairs: list[tuple[str, str]]) -> None:
        for old, new in pairs:
            os.rename(old, new)

    def remove(self, name: str) -> None:
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name)
        elif os.path.lexists(name):
            os.unlink(name)


@contextmanager
def _opened(target: BackupDatabase | BackupDirectory, stamp: str) -> Iterator[tuple[_Place, Names]]:
    if isinstance(target, BackupDirectory):
        yield _Filesystem(), directory_names(target, stamp)
        return
    dsn = _dsn(target)
    names = database_names(dsn, stamp)
    admin = make_conninfo(dsn, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
            yield _Server(conn), names
    except psycopg.Error as exc:
        raise ActionError(f"target {target.name}: {one_line(exc)}") from exc


def _dsn(target: BackupDatabase) -> str:
    try:
        return target_dsn(target)
    except DsnError as exc:
        raise ActionError(str(exc)) from None


# The monthly drill


@dataclass(frozen=True)
class Drill:
    """One drill's outcome, as stored in `drills`."""

    status: str
    backup_id: int | None = None
    restore_s: float | None = None
    backup_age_s: float | None = None
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


@app.task(
    name="caretaker.maintenance.dr_drill",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=TASK_SOFT_LIMIT_S,
    time_limit=TASK_SOFT_LIMIT_S + 60,
)
def dr_drill(self: Any) -> dict[str, Any]:
    """Restore the latest verified backup of every database target into a scratch database,
    time it, and record in `drills` whether the target's rto_s and rpo_s were met. Changes no
    live database; the scratch one is always dropped. A redelivery skips the targets this
    task drilled or is drilling (their lease). Not retried. Returns the outcome per target."""
    return drill_now(task_id=self.request.id)


def drill_now(target_name: str | None = None, task_id: str | None = None) -> dict[str, Any]:
    """Drill every database target, or one, in this process; the outcome per target."""
    config = get_config()
    targets = config.backups.databases
    if target_name is not None:
        targets = [t for t in targets if t.name == target_name]
        if not targets:
            known = ", ".join(sorted(t.name for t in config.backups.databases)) or "none"
            raise NotFound(f"no database target named {target_name!r} (configured: {known})")
    store = open_store(config.backups.store)
    return {target.name: drill_target(target, store, config, task_id) for target in targets}


def drill_target(
    target: BackupDatabase, store: BackupStore, config: Config, task_id: str | None = None
) -> dict[str, Any]:
    """Drill one target under its lease and record the drill; busy when another process
    holds the target, and then nothing is recorded."""
    started_at = datetime.now(UTC)
    try:
        with target_lease(target.name, "drill") as holder:
            done = _drilled_by(target.name, task_id)
            if done is not None:
                return {"status": "done before", "drill_id": done}
            drill = _drill(target, store, config, started_at, holder)
            drill_id = _record_drill(target, drill, started_at, task_id)
    except TargetBusy as exc:
        log.warning("drill skipped target=%s reason=%s", target.name, exc)
        return {"status": "busy", "reason": str(exc)}

    level = logging.INFO if drill.status == "passed" else logging.ERROR
    log.log(
        level,
        "drill done target=%s status=%s restore_s=%s backup_age_s=%s reason=%s",
        *(target.name, drill.status, drill.restore_s, drill.backup_age_s, drill.reason),
    )
    keys = ("status", "backup_id", "restore_s", "backup_age_s", "reason")
    return {"drill_id": drill_id} | {key: getattr(drill, key) for key in keys}


def _drill(
    target: BackupDatabase,
    store: BackupStore,
    config: Config,
    started_at: datetime,
    holder: str,
) -> Drill:
    with transaction() as conn:
        try:
            row = pick_backup(conn, target.name, None, store.describe())
        except NotFound as exc:
            return Drill("failed", reason=str(exc))
    backup_age_s = round((started_at - row["created_at"]).total_seconds(), 3)
    failed = Drill("failed", row["id"], backup_age_s=backup_age_s)

    started = time.monotonic()
    remove_stale_temp_dirs()
    try:
        with tempfile.TemporaryDirectory(prefix=temp_prefix("drill")) as tmp:
            path = fetch_backup(row, store, Path(tmp))
            fetch_s = time.monotonic() - started
            checked = verify_database(path, row, config, holder)
    except BackupInvalid as exc:
        return replace(failed, reason=exc.reason, details=exc.details)
    except SoftTimeLimitExceeded:
        raise
    except Exception as exc:
        reason = str(exc) if isinstance(exc, CaretakerError) else one_line(exc)
        return replace(failed, reason=reason)
    # Time to a restored, checked copy: download, pg_restore, row counts and probes.
    restore_s = round(time.monotonic() - started, 3)

    missed = _missed(target, restore_s, backup_age_s)
    pg_restore_s = checked.pop("restore_s")
    details = checked | {"fetch_s": round(fetch_s, 3), "pg_restore_s": pg_restore_s}
    status = "missed" if missed else "passed"
    return Drill(status, row["id"], restore_s, backup_age_s, "; ".join(missed) or None, details)


def _missed(target: BackupDatabase, restore_s: float, backup_age_s: float) -> list[str]:
    missed = []
    if target.rto_s is not None and restore_s > target.rto_s:
        missed.append(f"rto missed: the restore took {restore_s:g} s, over {target.rto_s:g} s")
    if target.rpo_s is not None and backup_age_s > target.rpo_s:
        missed.append(f"rpo missed: the backup was {backup_age_s:g} s old, over {target.rpo_s:g} s")
    return missed


def _drilled_by(target: str, task_id: str | None) -> int | None:
    if task_id is None:
        return None
    with transaction() as conn:
        row = conn.execute(
            "SELECT id FROM drills WHERE target = %s AND details->>'task_id' = %s",
            (target, task_id),
        ).fetchone()
    return None if row is None else int(row["id"])


def _record_drill(
    target: BackupDatabase, drill: Drill, started_at: datetime, task_id: str | None
) -> int:
    with transaction() as conn:
        row = conn.execute(
            """
            INSERT INTO drills (target, backup_id, status, restore_s, backup_age_s, rto_s,
                                rpo_s, reason, details, started_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id
            """,
            (
                *(target.name, drill.backup_id, drill.status, drill.restore_s),
                *(drill.backup_age_s, target.rto_s, target.rpo_s, drill.reason),
                *(Jsonb(drill.details | {"task_id": task_id}), started_at),
            ),
        ).fetchone()
    assert row is not None
    return int(row["id"])


def render_drill(target: str, outcome: dict[str, Any]) -> str:
    """One line of `caretaker backups drill`."""
    status = outcome["status"]
    if status in ("passed", "missed"):
        measured = f"restore {outcome['restore_s']:g} s, backup age {outcome['backup_age_s']:g} s"
        because = f": {outcome['reason']}" if outcome["reason"] else ""
        return f"drill {target}: {status} ({measured}){because}"
    because = f": {outcome['reason']}" if outcome.get("reason") else ""
    return f"drill {target}: {status}{because}"

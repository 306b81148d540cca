"""System updates as runs: archive the target's code and environment, dump its database, check
out the release tag, install its requirements, migrate, restart, verify, then ask for the next
stage; on any failure put the archives and the dump back, restart, verify, and escalate.

The version is a tag of the target's repository. It is checked (a plain name, no leading "-",
`git check-ref-format`) before anything is recorded, and checked out by the commit that
`refs/tags/VERSION` names, so nothing from a command line can become a git option.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo
from pydantic import Field, field_validator

from tasks import backups
from tasks.backupstore import file_sha256
from tasks.commands import CommandParams, CommandResult, execute
from tasks.hotfix import TargetParams, index_options, installed_versions
from workers import dispatch
from workers.config import (
    Config,
    OnFailure,
    RunbookConfig,
    ServiceTarget,
    StepConfig,
    get_config,
)
from workers.db import Connection, transaction
from workers.errors import ActionError
from workers.occurrences import SOURCE_MANUAL, record_manual
from workers.runs import Outcome, StepContext

log = logging.getLogger(__name__)

RUNBOOK_PREFIX = "update:"
UPDATE_ALERT = "UpdateRequested"
# The run's private work directory, under the system's temporary directory.
WORK_PREFIX = "caretaker-update-"
# Steps whose results later steps read, and the step that asks for the next stage.
ARCHIVE_STEP = "archive"
DUMP_STEP = "dump"
CONTINUE_STEP = "continue"
# Main steps after which the code or environment, or the database, may differ from the copies.
CHANGES_APP = ("checkout", "install")
CHANGES_DATABASE = ("migrate", "restart")
# Seconds of one git command, of pip installing a release, of archiving or extracting a tree,
# of a migration or restart command, and of asking for the next stage.
GIT_TIMEOUT_S = 60.0
PIP_TIMEOUT_S = 900.0
ARCHIVE_TIMEOUT_S = 1800.0
COMMAND_TIMEOUT_S = 1800.0
CONTINUE_TIMEOUT_S = 60.0
# A database is renamed only without sessions: tries, and seconds between them.
RENAME_TRIES = 10
RENAME_RETRY_S = 0.5
# Letters, digits and . _ / + @ -, starting with a letter or digit; git's rules come after.
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+@-]{0,127}")


def version_tag(text: str) -> str:
    """The name of a release tag, or ValueError: nothing an option or a path trick could
    hide in, and a valid ref name by `git check-ref-format`."""
    if not _TAG.fullmatch(text):
        raise ValueError(
            f"{text!r} is not a release tag: letters, digits and . _ / + @ - only,"
            " starting with a letter or digit"
        )
    done = execute(
        CommandParams(argv=[_git(), "check-ref-format", f"refs/tags/{text}"], timeout_s=30)
    )
    if done.exit_code is None or done.timed_out:
        raise ValueError(f"cannot check the tag {text!r}: {_tail(done)}")
    if done.exit_code != 0:
        raise ValueError(f"{text!r} is not a release tag: git refuses it as a tag name")
    return text


def update_tree(target: ServiceTarget) -> Path:
    """The directory an update checks out and archives: the target's app_dir, or its
    repository when it names none. The repository must be that directory or inside it, so
    the archive holds every file a checkout changes."""
    if target.repository is None:
        raise ValueError(f"target {target.name} names no repository to update")
    tree = target.app_dir or target.repository
    if not (tree.is_absolute() and target.repository.is_absolute()):
        raise ValueError(f"target {target.name}: app_dir and repository must be absolute paths")
    if not target.repository.is_relative_to(tree):
        raise ValueError(
            f"target {target.name}: the repository {target.repository} is not app_dir {tree}"
            " or inside it"
        )
    return tree


def environment(target: ServiceTarget) -> Path:
    """The virtual environment of the target's interpreter: bin/python's grandparent, links
    not followed (a venv's python is a link to the system's)."""
    if not target.python.is_absolute():
        raise ValueError(f"target {target.name}: python must be an absolute path")
    return target.python.parent.parent


class CheckoutParams(TargetParams):
    version: str

    @field_validator("version")
    @classmethod
    def _tag(cls, value: str) -> str:
        return version_tag(value)


class ContinueParams(CheckoutParams):
    # The later targets, in order of stage; the first stage of them is asked for next.
    targets: list[str] = Field(min_length=1)


def update_runbook(target: ServiceTarget, version: str, then: list[str]) -> RunbookConfig:
    """The run that updates a target to a release tag: the steps its configuration allows,
    asking for the targets of `then` at the end, and the rollback that undoes them."""
    tag = version_tag(version)
    tree = update_tree(target)
    environment(target)
    name = {"target": target.name}
    steps = [_builtin(ARCHIVE_STEP, "archive_app", name, ARCHIVE_TIMEOUT_S, idempotent=True)]
    if target.database is not None:
        dump_s = backups.TOOL_TIMEOUT_S
        steps.append(_builtin(DUMP_STEP, "dump_database", name, dump_s, idempotent=True))
    steps.append(_builtin("checkout", "checkout_version", name | {"version": tag}, GIT_TIMEOUT_S))
    if target.requirements is not None:
        steps.append(_builtin("install", "install_requirements", name, PIP_TIMEOUT_S))
    if target.migrate_command:
        steps.append(_command("migrate", target.migrate_command, cwd=tree))
    if target.restart_command:
        steps.append(_command("restart", target.restart_command))
    if target.health is not None:
        steps.append(target.health.model_copy(update={"name": "verify", "kind": "verify"}))
    if then:
        params = name | {"version": tag, "targets": then}
        steps.append(
            _builtin(CONTINUE_STEP, "continue_update", params, CONTINUE_TIMEOUT_S, idempotent=True)
        )

    # Re-runnable: a worker lost in the middle is replaced and the rollback goes on.
    rollback = [_builtin("restore-app", "restore_app", name, ARCHIVE_TIMEOUT_S, idempotent=True)]
    if target.database is not None:
        restore_s = backups.TOOL_TIMEOUT_S
        rollback.append(_builtin("restore-database", "restore_database", name, restore_s))
    if target.restart_command:
        rollback.append(_command("restart-after-rollback", target.restart_command))
    if target.health is not None:
        rollback.append(
            target.health.model_copy(update={"name": "verify-after-rollback", "kind": "verify"})
        )
    return RunbookConfig(
        name=f"{RUNBOOK_PREFIX}{target.name}",
        matchers=[f'alertname="{UPDATE_ALERT}"'],
        steps=steps,
        rollback=rollback,
        on_failure=OnFailure(escalate=True, severity="critical"),
    )


def planned_update(config: Config, labels: dict[str, str]) -> RunbookConfig:
    """The update run an UpdateRequested occurrence asks for; ValueError when none can be
    made of its labels and the configuration."""
    targets = {target.name: target for target in config.targets}
    target = targets.get(labels.get("target", ""))
    if target is None:
        raise ValueError(f"no target named {labels.get('target')!r} to update")
    then = [name for name in labels.get("then", "").split(",") if name]
    unknown = [name for name in then if name not in targets]
    if unknown:
        raise ValueError(f"no target named {unknown[0]!r} to update after {target.name}")
    return update_runbook(target, labels.get("version", ""), then)


def _builtin(
    name: str, action: str, params: dict[str, Any], work_s: float, idempotent: bool = False
) -> StepConfig:
    return StepConfig(
        name=name,
        kind="recover",
        action=action,
        params=params,
        timeout_s=work_s + 60,
        idempotent=idempotent,
    )


def _command(name: str, argv: list[str], cwd: Path | None = None) -> StepConfig:
    params: dict[str, Any] = {"argv": argv, "timeout_s": COMMAND_TIMEOUT_S}
    if cwd is not None:
        params["cwd"] = str(cwd)
    return StepConfig(
        name=name,
        kind="recover",
        action="run_command",
        params=params,
        timeout_s=COMMAND_TIMEOUT_S + 60,
    )


# The steps


def archive_app(params: TargetParams, context: StepContext) -> Outcome:
    """Archive the target's app directory and its environment (tar.gz, links kept as links)
    into a new private work directory, for the rollback. Changes nothing of the target."""
    roots = _roots(_target(params.target))
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{context.run_id}-"))
    archives = [_archive(root, work / f"{label}.tar.gz") for label, root in roots]
    return Outcome(ok=True, result={"work_dir": str(work), "archives": archives})


def _roots(target: ServiceTarget) -> list[tuple[str, Path]]:
    try:
        tree, venv = update_tree(target), environment(target)
    except ValueError as exc:
        raise ActionError(str(exc)) from exc
    if not (venv / "pyvenv.cfg").is_file():
        raise ActionError(f"{target.python} is not the python of a virtual environment")
    for root in (tree, venv):
        if root.is_symlink() or not root.is_dir():
            raise ActionError(f"{root} is not a directory (links are not followed)")
    # One holding the other is archived once, as the larger.
    if venv.is_relative_to(tree):
        return [("app", tree)]
    if tree.is_relative_to(venv):
        return [("environment", venv)]
    return [("app", tree), ("environment", venv)]


def _archive(root: Path, dest: Path) -> dict[str, Any]:
    counted = backups.write_archive(root, dest)
    found = root.stat()
    owner = {"mode": stat.S_IMODE(found.st_mode), "uid": found.st_uid, "gid": found.st_gid}
    described = {"path": str(root), "archive": str(dest), "sha256": file_sha256(dest)}
    return described | owner | counted


def dump_database(params: TargetParams, context: StepContext) -> Outcome:
    """pg_dump the target's database (custom format, with its row counts from the same
    snapshot) into the run's work directory, for the rollback. Changes nothing."""
    target = _target(params.target)
    if target.database is None:
        return Outcome(ok=True, result={"skipped": "the target names no database"})
    dest = _work_dir(context) / "database.dump"
    try:
        taken = backups.dump_database(target.database.reveal(), dest)
    except KeyError as exc:
        return Outcome(ok=False, result={}, error=str(exc.args[0]))
    except psycopg.Error as exc:
        return Outcome(ok=False, result={}, error=f"cannot dump the database: {_one_line(exc)}")
    result = {
        "path": str(dest),
        "sha256": file_sha256(dest),
        "size_bytes": dest.stat().st_size,
        "dbname": taken["source"]["dbname"],
        "tables": taken["tables"],
        "dumped_at": datetime.now(UTC).isoformat(),
    }
    return Outcome(ok=True, result=result)


def checkout_version(params: CheckoutParams, context: StepContext) -> Outcome:
    """Check out, detached, the commit of `refs/tags/VERSION` in the target's repository;
    the HEAD before is recorded. Nothing is fetched: the tag must be there already."""
    repo = _target(params.target).repository
    assert repo is not None  # update_runbook refused a target without one
    found = _run_git(
        repo, "rev-parse", "--verify", "--quiet", f"refs/tags/{params.version}^{{commit}}"
    )
    if not found.ok:
        return Outcome(ok=False, result={}, error=f"no tag {params.version} in {repo}")
    commit = found.stdout.strip()
    changed = _git_out(repo, "status", "--porcelain", "--untracked-files=no")
    if changed:
        return Outcome(
            ok=False,
            result={"changed": changed.splitlines()},
            error=f"the working tree of {repo} has local changes: {' '.join(changed.split())}",
        )
    previous = _git_out(repo, "rev-parse", "--verify", "HEAD")
    branch = _run_git(repo, "symbolic-ref", "--quiet", "--short", "HEAD").stdout.strip()

    _git_out(repo, "checkout", "--quiet", "--detach", commit)
    log.info("tag checked out run_id=%s tag=%s commit=%s", context.run_id, params.version, commit)

    result = {"tag": params.version, "commit": commit, "previous": previous, "branch": branch}
    return Outcome(ok=True, result=result)


def install_requirements(params: TargetParams, context: StepContext) -> Outcome:
    """Install the checked-out release's requirements into the target's environment with
    caretaker's own pip, from the configured package index."""
    target = _target(params.target)
    if target.requirements is None or target.repository is None:
        return Outcome(ok=True, result={"skipped": "the target names no requirements file"})
    path = target.repository / target.requirements
    argv = [sys.executable, "-m", "pip", "--python", str(target.python), "install"]
    argv += ["--no-input", "--disable-pip-version-check", *index_options()]
    done = execute(CommandParams(argv=[*argv, "--requirement", str(path)], timeout_s=PIP_TIMEOUT_S))
    result = done.model_dump()
    if not done.ok:
        return Outcome(ok=False, result=result, error=f"pip install failed: {_tail(done)}")
    result["versions"] = installed_versions(target.python)
    return Outcome(ok=True, result=result)


def continue_update(params: ContinueParams, context: StepContext) -> Outcome:
    """Ask for the update of the next stage once every target of this stage verified it: the
    last of them to get here records the next stage's occurrences and routes them.
    Idempotent: under the update's lock, a stage asked for before is not asked for again."""
    update_id, stage = context.labels.get("update_id"), context.labels.get("stage")
    if not update_id or stage is None:
        return Outcome(ok=False, result={}, error="the occurrence has no update_id or stage label")
    config = get_config()
    with transaction() as conn:
        # Targets of one stage get here at the same time: one at a time decides.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"update:{update_id}",))
        before = _asked_before(conn, update_id, params.targets)
        if before:
            return Outcome(ok=True, result={"requested_before": before})
        waiting = _stage_waiting(conn, update_id, stage, context.run_id)
        if waiting:
            return Outcome(ok=True, result={"waiting_for": waiting})
        targets = [_configured(config, name) for name in params.targets]
        in_window = context.labels.get("window") == "true"
        requested = _ask(conn, targets, params.version, update_id, "caretaker", in_window)

    dispatch.try_send("routing", dispatch.route_occurrences, list(requested.values()))
    log.info("next stage requested update_id=%s targets=%s", update_id, ",".join(requested))
    return Outcome(ok=True, result={"requested": requested})


def _asked_before(conn: Connection, update_id: str, targets: list[str]) -> dict[str, int]:
    rows = conn.execute(
        """
        SELECT id, labels->>'target' AS target FROM occurrences
         WHERE source = %s AND labels->>'alertname' = %s AND labels->>'update_id' = %s
           AND labels->>'target' = ANY(%s)
        """,
        (SOURCE_MANUAL, UPDATE_ALERT, update_id, targets),
    ).fetchall()
    return {row["target"]: row["id"] for row in rows}


def _stage_waiting(conn: Connection, update_id: str, stage: str, run_id: int) -> list[str]:
    """The other targets of the stage whose run has not yet verified the update (every step
    before its continue step succeeded)."""
    rows = conn.execute(
        """
        SELECT o.labels->>'target' AS target FROM occurrences o
         WHERE o.source = %(source)s AND o.labels->>'alertname' = %(alert)s
           AND o.labels->>'update_id' = %(update_id)s AND o.labels->>'stage' = %(stage)s
           AND o.id <> (SELECT occurrence_id FROM runs WHERE id = %(run_id)s)
           AND NOT EXISTS (
               SELECT 1 FROM runs r JOIN steps s ON s.run_id = r.id
                WHERE r.occurrence_id = o.id AND s.name = %(step)s
                  AND NOT EXISTS (SELECT 1 FROM steps e
                                   WHERE e.run_id = r.id AND e.position < s.position
                                     AND e.status <> 'succeeded'))
         ORDER BY o.id
        """,
        {
            "source": SOURCE_MANUAL,
            "alert": UPDATE_ALERT,
            "update_id": update_id,
            "stage": stage,
            "run_id": run_id,
            "step": CONTINUE_STEP,
        },
    ).fetchall()
    return [row["target"] for row in rows]


def restore_app(params: TargetParams, context: StepContext) -> Outcome:
    """Put the app directory and environment back from the archives of the archive step: each
    is extracted beside itself and swapped in by rename; the replaced copies are removed once
    all are back. Idempotent: a second try after a lost worker finishes what the first began."""
    archived = context.earlier.get(ARCHIVE_STEP)
    if not archived:
        return Outcome(ok=True, result={"skipped": "nothing was archived, nothing changed"})
    if not _reached(context.run_id, CHANGES_APP):
        return Outcome(ok=True, result={"skipped": "no step that changes the code ran"})
    replaced: list[Path] = []
    try:
        for entry in archived["archives"]:
            replaced.append(_swap_in(entry, context.run_id))
    except (OSError, tarfile.TarError, ActionError) as exc:
        kept = f"; replaced copies kept: {', '.join(map(str, replaced))}" if replaced else ""
        return Outcome(ok=False, result={}, error=f"restore failed: {_one_line(exc)}{kept}")
    for aside in replaced:
        shutil.rmtree(aside)
    target = _target(params.target)
    restored = [entry["path"] for entry in archived["archives"]]
    log.info("app restored run_id=%s target=%s", context.run_id, target.name)
    return Outcome(
        ok=True, result={"restored": restored, "versions": installed_versions(target.python)}
    )


def _swap_in(entry: dict[str, Any], run_id: int) -> Path:
    """Extract one archive beside its directory and swap it in; return the replaced copy."""
    root, archive = Path(entry["path"]), Path(entry["archive"])
    if file_sha256(archive) != entry["sha256"]:
        raise ActionError(f"the archive {archive} changed since it was made")
    fresh = root.with_name(f".{root.name}.caretaker-{run_id}-restored")
    aside = root.with_name(f".{root.name}.caretaker-{run_id}-replaced")
    if aside.exists() or aside.is_symlink():
        # An earlier try of this run's rollback (its worker died) got this far: the restored
        # tree is complete before the first rename, so only the second may be missing.
        if not root.exists() and fresh.is_dir():
            os.rename(fresh, root)
        if root.exists():
            return aside
        raise ActionError(f"{aside} is left from an earlier restore: look at it, then remove it")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as opened:
            opened.extractall(fresh, filter=_archived_mode)
        fresh.chmod(entry["mode"])
        if os.geteuid() == 0:
            # Extracted as root, every member gets its owner back, but not the directory.
            os.chown(fresh, entry["uid"], entry["gid"])
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise

    # Two renames in one directory: whoever looks finds the old tree or the restored one
    # (or, between the two, for an instant, none), never a half-extracted one.
    os.rename(root, aside)
    try:
        os.rename(fresh, root)
    except OSError:
        os.rename(aside, root)
        raise
    return aside


def _archived_mode(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # The "tar" filter refuses paths that leave the directory; the permissions are put back
    # as archived (it would drop group and other write bits), the archive being caretaker's.
    return tarfile.tar_filter(member, dest).replace(mode=member.mode, deep=False)


def restore_database(params: TargetParams, context: StepContext) -> Outcome:
    """Put the target's database back as the dump step dumped it: the changed one renamed
    aside, the dump restored by `pg_restore --create` (with the database's settings and
    grants), its row counts checked, the renamed one dropped. What was written since the dump
    is lost."""
    dumped = context.earlier.get(DUMP_STEP) or {}
    if "path" not in dumped:
        return Outcome(ok=True, result={"skipped": "no dump was taken"})
    if not _reached(context.run_id, CHANGES_DATABASE):
        return Outcome(ok=True, result={"skipped": "no migration or restart ran"})
    database = _target(params.target).database
    if database is None:
        return Outcome(ok=False, result={}, error="the target no longer names a database")
    dump, name = Path(dumped["path"]), str(dumped["dbname"])
    if file_sha256(dump) != dumped["sha256"]:
        return Outcome(ok=False, result={}, error=f"the dump {dump} changed since it was made")
    try:
        return _restore_dump(database.reveal(), dump, name, dumped, context.run_id)
    except KeyError as exc:
        return Outcome(ok=False, result={}, error=str(exc.args[0]))
    except psycopg.Error as exc:
        return Outcome(ok=False, result={}, error=f"restore failed: {_one_line(exc)}")


def _restore_dump(dsn: str, dump: Path, name: str, dumped: dict[str, Any], run_id: int) -> Outcome:
    # The server's maintenance database: pg_restore --create connects there to create.
    maintenance = "template1" if name == "postgres" else "postgres"
    admin = make_conninfo(dsn, dbname=maintenance)
    aside = f"{name[:40]}_caretaker_{run_id}_replaced"
    _rename_database(admin, name, aside)

    argv = ["pg_restore", "--create", "--exit-on-error", "--no-password"]
    try:
        done = backups.run_pg_tool([*argv, f"--dbname={maintenance}", str(dump)], dsn)
    except subprocess.SubprocessError as exc:
        return _put_back(admin, name, aside, f"pg_restore failed: {_one_line(exc)}")
    if done.returncode != 0:
        return _put_back(admin, name, aside, f"pg_restore failed: {_trimmed(done.stderr)}")
    try:
        with psycopg.connect(dsn, connect_timeout=backups.CONNECT_TIMEOUT_S) as conn:
            tables = backups.count_rows(conn)
    except psycopg.Error as exc:
        error = f"cannot count the restored rows: {_one_line(exc)}; the replaced one is {aside}"
        return Outcome(ok=False, result={}, error=error)
    if tables != dumped["tables"]:
        error = f"row counts differ from the dump's; the replaced database is kept as {aside}"
        return Outcome(ok=False, result={"tables": tables}, error=error)

    result = {"restored": name, "dumped_at": dumped.get("dumped_at"), "tables": tables}
    log.info("database restored run_id=%s database=%s", run_id, name)
    try:
        _drop_database(admin, aside)
    except psycopg.Error as exc:
        # The restore itself is done; the copy it replaced is a person's to drop.
        log.warning("replaced database left database=%s error=%s", aside, _one_line(exc))
        result["left"] = aside
    return Outcome(ok=True, result=result)


def _put_back(admin: str, name: str, aside: str, error: str) -> Outcome:
    """After a failed pg_restore: drop what it made and give the database its name again."""
    try:
        _drop_database(admin, name)
        _rename_database(admin, aside, name)
    except psycopg.Error as exc:
        error += f"; putting it back failed ({_one_line(exc)}): it is kept as {aside}"
        return Outcome(ok=False, result={}, error=error)
    return Outcome(ok=False, result={}, error=f"{error}; the database was left as it was")


def _rename_database(admin: str, old: str, new: str) -> None:
    rename = sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
        sql.Identifier(old), sql.Identifier(new)
    )
    with psycopg.connect(admin, autocommit=True, connect_timeout=backups.CONNECT_TIMEOUT_S) as conn:
        for attempt in range(1, RENAME_TRIES + 1):
            # The service's sessions go; one that connects again in between is ended next try.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (old,),
            )
            try:
                conn.execute(rename)
                return
            except psycopg.errors.ObjectInUse:
                if attempt == RENAME_TRIES:
                    raise
                time.sleep(RENAME_RETRY_S)


def _drop_database(admin: str, name: str) -> None:
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(admin, autocommit=True, connect_timeout=backups.CONNECT_TIMEOUT_S) as conn:
        conn.execute(drop)


# Asking for updates


def request_update(
    conn: Connection, version: str, target: str | None, person: str, in_window: bool = False
) -> list[int]:
    """Record an update to the tag `version` asked for by a person, of one target or of every
    target stage by stage: the first stage now, each next one once the one before verified
    it. Returns the occurrence ids to route. Everything is checked before anything is
    recorded."""
    tag = version_tag(version)
    config = get_config()
    if target is not None:
        chosen = [_configured(config, target)]
    elif config.targets:
        chosen = list(config.targets)
    else:
        raise ActionError("no targets in the configuration to update")
    for each in chosen:
        update_tree(each)
        environment(each)

    requested = _ask(conn, chosen, tag, uuid.uuid4().hex[:12], person, in_window)
    return list(requested.values())


def ask_for_update(
    version: str, target: str | None, person: str, in_window: bool = False
) -> list[int]:
    """A person's update request: recorded, then routed; with `in_window` each run waits for
    a change window. Returns the occurrence ids."""
    tag = version_tag(version)
    config = get_config()
    # A typo must not archive, dump, restart and page: the tag is looked for first.
    for each in [_configured(config, target)] if target else config.targets:
        if each.repository is None:
            continue  # request_update names the problem
        ref = f"refs/tags/{tag}^{{commit}}"
        if not _run_git(each.repository, "rev-parse", "--verify", "--quiet", ref).ok:
            raise ActionError(f"no tag {tag} in {each.repository} (target {each.name})")
    with transaction() as conn:
        ids = request_update(conn, version, target, person, in_window)
    dispatch.try_send("routing", dispatch.route_occurrences, ids)
    return ids


def _ask(
    conn: Connection,
    targets: list[ServiceTarget],
    version: str,
    update_id: str,
    person: str,
    in_window: bool = False,
) -> dict[str, int]:
    """Record the occurrences of the first stage of these targets; the later ones go along,
    in order of stage, as the label `then`. Returns the occurrence id of each target."""
    ordered = sorted(targets, key=lambda target: target.stage)
    first = [target for target in ordered if target.stage == ordered[0].stage]
    then = ",".join(target.name for target in ordered[len(first) :])
    requested: dict[str, int] = {}
    for target in first:
        labels = {
            "alertname": UPDATE_ALERT,
            "target": target.name,
            "version": version,
            "then": then,
            "update_id": update_id,
            "stage": str(target.stage),
        } | ({"window": "true"} if in_window else {})
        summary = f"update of {target.name} to {version}, asked by {person}"
        fingerprint = f"update:{target.name}:{version}:{update_id}"
        requested[target.name] = record_manual(conn, fingerprint, labels, summary, person)
    log.info("update requested version=%s targets=%s then=%s", version, ",".join(requested), then)
    return requested


# Helpers


def _target(name: str) -> ServiceTarget:
    return _configured(get_config(), name)


def _configured(config: Config, name: str) -> ServiceTarget:
    found = next((target for target in config.targets if target.name == name), None)
    if found is None:
        raise ActionError(f"no target named {name!r} in the configuration")
    return found


def _work_dir(context: StepContext) -> Path:
    archived = context.earlier.get(ARCHIVE_STEP)
    if not archived:
        raise ActionError(f"step {ARCHIVE_STEP} made no work directory")
    return Path(archived["work_dir"])


def _reached(run_id: int, names: tuple[str, ...]) -> bool:
    """Whether one of these main steps of the run started: what it changes may have changed."""
    with transaction() as conn:
        row = conn.execute(
            "SELECT 1 FROM steps WHERE run_id = %s AND name = ANY(%s)"
            " AND status IN ('running', 'succeeded', 'failed') LIMIT 1",
            (run_id, list(names)),
        ).fetchone()
    return row is not None


def _git() -> str:
    return shutil.which("git") or "git"


def _run_git(repo: Path, *args: str) -> CommandResult:
    return execute(CommandParams(argv=[_git(), "-C", str(repo), *args], timeout_s=GIT_TIMEOUT_S))


def _git_out(repo: Path, *args: str) -> str:
    done = _run_git(repo, *args)
    if not done.ok:
        raise ActionError(f"git {args[0]} failed in {repo}: {_tail(done)}")
    return done.stdout.strip()


def _tail(done: CommandResult, limit: int = 400) -> str:
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return " ".join(text[-5:])[-limit:] if text else f"exit code {done.exit_code}"


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(exc).__name__


def _trimmed(text: str, limit: int = 600) -> str:
    joined = " ".join(text.split())
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."

"""System updates on a real worker: a git repository with release tags, a venv filled from
local wheels, a PostgreSQL database with a migration, and an HTTP service run from the working
tree. A good release is checked out, installed, migrated and verified; a bad one is rolled back
in full (checkout, environment, data) and escalated; production waits for staging."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from click.testing import CliRunner
from psycopg import sql

from tasks import update
from tasks.alerts import route_one
from tasks.backupstore import file_sha256
from tasks.hotfix import TargetParams
from tasks.update import (
    CheckoutParams,
    ContinueParams,
    archive_app,
    checkout_version,
    continue_update,
    planned_update,
    request_update,
    restore_app,
    restore_database,
    update_runbook,
    version_tag,
)
from tests.conftest import DATA, PG_HOST, TEST_ENV, free_port, running_worker, wait_for
from tests.wheels import ScratchEnv, build_wheel
from workers import dispatch
from workers.cli import cli
from workers.config import Config, parse_config
from workers.db import Connection, transaction
from workers.errors import ActionError
from workers.runs import StepContext, create_run

Conn = psycopg.Connection[dict[str, Any]]
PYTHON = sys.executable
APP = DATA / "update_app"
RESTART = DATA / "restart_app.py"
ROWS_V1 = [(1, "apple"), (2, "pear")]
ROWS_V2 = [(1, "APPLE", 10), (2, "PEAR", 20)]
HOSTILE = ["--upload-pack=touch /tmp/owned", "; rm -rf /", "../x"]


@dataclass(frozen=True)
class Site:
    """Where one target lives: its working tree, environment, database and port."""

    name: str
    stage: int
    root: Path
    port: int
    dbname: str

    @property
    def tree(self) -> Path:
        return self.root / "app"

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def dsn(self) -> str:
        return f"{PG_HOST}/{self.dbname}"

    def restart(self) -> list[str]:
        pidfile = self.root / "app.pid"
        return [
            PYTHON,
            str(RESTART),
            str(pidfile),
            str(self.port),
            str(self.tree),
            str(self.python),
        ]

    def target(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "stage": self.stage,
            "python": str(self.python),
            "repository": str(self.tree),
            "requirements": "requirements.txt",
            "migrate_command": [PYTHON, "migrate.py", self.dsn],
            "restart_command": self.restart(),
            "health": {
                "name": "health",
                "kind": "verify",
                "action": "check_http",
                "params": {"url": f"http://127.0.0.1:{self.port}/health", "timeout_s": 2},
                "attempts": 3,
                "delay_s": 0.3,
            },
            "database": {"dsn": self.dsn},
        }


def git(tree: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """Everything of this module's targets, and the worker's temporary directory."""
    path = Path(tempfile.mkdtemp(prefix="caretaker-update-test-"))
    (path / "tmp").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def sites(work: Path) -> dict[str, Site]:
    suffix = uuid.uuid4().hex[:8]
    return {
        name: Site(name, stage, work / name, free_port(), f"caretaker_{name}_{suffix}")
        for name, stage in (("staging", 0), ("production", 1))
    }


@pytest.fixture(scope="module")
def config(work: Path, sites: dict[str, Site]) -> Config:
    data = {"actions": {"allowlist": [PYTHON]}, "targets": [s.target() for s in sites.values()]}
    (work / "config.yml").write_text(json.dumps(data, indent=2))
    return parse_config(data)


@pytest.fixture(scope="module")
def pristine(work: Path) -> Path:
    """The environment every target starts from: caretaker-demo 1.0; 2.0 in the index."""
    wheels = work / "wheels"
    for version in ("1.0", "2.0"):
        build_wheel("caretaker-demo", version, wheels)
    env = ScratchEnv(work / "pristine-venv", wheels)
    env.install("caretaker-demo==1.0")
    return env.root


@pytest.fixture(scope="module")
def update_worker(
    database: str, broker: redis.Redis, work: Path, config: Config
) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker on every queue with this module's configuration and index."""
    env = {
        **os.environ,
        **TEST_ENV,
        "CARETAKER_CONFIG": str(work / "config.yml"),
        "CARETAKER_PACKAGE_INDEX_URL": f"file://{work / 'wheels'}",
        "TMPDIR": str(work / "tmp"),
    }
    with running_worker(work / "worker.log", env) as process:
        yield process


@pytest.fixture
def deploy(sites: dict[str, Site], pristine: Path) -> Iterator[Callable[..., Site]]:
    """Put a target at release v1 (v2 tagged, its health answering `v2_health`) and start
    it; stop it and remove its tree, environment and database afterwards."""
    deployed: list[Site] = []

    def make(name: str, v2_health: int = 200) -> Site:
        site = sites[name]
        deployed.append(site)
        make_repository(site.tree, v2_health)
        shutil.copytree(pristine, site.venv, symlinks=True)
        make_database(site)
        subprocess.run(site.restart(), check=True, timeout=30)
        return site

    yield make
    for site in deployed:
        stop(site)
        drop_databases(site)
        shutil.rmtree(site.root, ignore_errors=True)


def make_repository(tree: Path, v2_health: int) -> None:
    """A repository on branch main at tag v1; v2 tagged on a branch of its own."""
    tree.mkdir(parents=True)
    git(tree, "init", "--quiet", "--initial-branch=main")
    commit_release(tree, "v1", 200, "1.0", APP / "migrate_v1.py")
    git(tree, "checkout", "--quiet", "-b", "next")
    commit_release(tree, "v2", v2_health, "2.0", APP / "migrate_v2.py")
    git(tree, "checkout", "--quiet", "main")


def commit_release(tree: Path, tag: str, health: int, demo: str, migration: Path) -> None:
    shutil.copy(APP / "app.py", tree / "app.py")
    shutil.copy(migration, tree / "migrate.py")
    (tree / "health.txt").write_text(f"{health}\n")
    (tree / "requirements.txt").write_text(f"caretaker-demo=={demo}\n")
    git(tree, "add", "--all")
    git(tree, "-c", "user.name=dev", "-c", "user.email=dev@example.com", "commit", "-qm", tag)
    git(tree, "tag", tag)


def make_database(site: Site) -> None:
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(site.dbname)))
    with psycopg.connect(site.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO items VALUES (1, 'apple'), (2, 'pear')")


def databases(site: Site) -> list[str]:
    """The target's database and any copy a restore renamed aside."""
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
            (f"{site.dbname}%",),
        ).fetchall()
    return [row[0] for row in rows]


def drop_databases(site: Site) -> None:
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        for name in databases(site):
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def stop(site: Site) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((site.root / "app.pid").read_text()), signal.SIGTERM)


def items(site: Site) -> list[tuple[Any, ...]]:
    with psycopg.connect(site.dsn) as conn:
        return conn.execute("SELECT * FROM items ORDER BY id").fetchall()


def tables(site: Site) -> list[str]:
    with psycopg.connect(site.dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


def installed(site: Site) -> str:
    script = "import importlib.metadata as m; print(m.version('caretaker-demo'))"
    done = subprocess.run(
        [str(site.python), "-c", script], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def served(site: Site, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{site.port}{path}", timeout=5)


@pytest.fixture
def ask(monkeypatch: pytest.MonkeyPatch, config: Config) -> Callable[..., list[int]]:
    """Ask for an update as the command line does, with this module's configuration."""
    monkeypatch.setattr(update, "get_config", lambda: config)

    def asked(version: str, target: str | None = None) -> list[int]:
        return update.ask_for_update(version, target, "ops")

    return asked


def ended(db: Conn, count: int) -> list[dict[str, Any]]:
    """The runs, once there are `count` of them and all have ended."""

    def probe() -> list[dict[str, Any]] | None:
        rows = db.execute("SELECT id, runbook, status, created_at FROM runs ORDER BY id").fetchall()
        active = [row for row in rows if row["status"] in ("running", "waiting")]
        return rows if len(rows) >= count and not active else None

    return wait_for(probe, timeout_s=60, what=f"{count} update runs to end")


def steps(db: Conn, run_id: int) -> list[tuple[str, str]]:
    rows = db.execute(
        "SELECT name, status FROM steps WHERE run_id = %s ORDER BY position", (run_id,)
    ).fetchall()
    return [(row["name"], row["status"]) for row in rows]


def result(db: Conn, run_id: int, name: str) -> dict[str, Any]:
    row = db.execute(
        "SELECT result FROM steps WHERE run_id = %s AND name = %s", (run_id, name)
    ).fetchone()
    assert row is not None
    return dict(row["result"])


@pytest.mark.parametrize(
    "version",
    [*HOSTILE, "-v2", ".v2", "v1..v2", "v2.lock", "v2/", "v2@{1}", "v 2", "v2\n", "", "x" * 200],
)
def test_anything_but_a_plain_tag_is_refused(version: str) -> None:
    with pytest.raises(ValueError, match="is not a release tag"):
        version_tag(version)


def test_plain_tags_pass() -> None:
    for version in ("v2", "2.0.1", "release/2026-12", "app@1.4.0", "v1.0.0-rc.1+build.5"):
        assert version_tag(version) == version


def test_hostile_versions_and_unknown_targets_record_nothing(
    db: Conn, ask: Callable[..., list[int]]
) -> None:
    for version in HOSTILE:
        with transaction() as conn, pytest.raises(ValueError, match="is not a release tag"):
            request_update(conn, version, "staging", "ops")
    with transaction() as conn, pytest.raises(ActionError, match="no target named 'nope'"):
        request_update(conn, "v2", "nope", "ops")
    runner = CliRunner()

    hostile = runner.invoke(cli, ["update", "--", "--upload-pack=touch /tmp/owned"])
    option = runner.invoke(cli, ["update", "--upload-pack=touch /tmp/owned"])
    unknown = runner.invoke(cli, ["update", "v2", "--target", "nope"])

    assert hostile.exit_code == 1 and "is not a release tag" in hostile.output
    assert option.exit_code == 2 and "No such option" in option.output
    assert unknown.exit_code == 1 and "no target named 'nope'" in unknown.output
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 0}


def test_the_run_follows_the_target_and_its_later_stages(config: Config) -> None:
    staging = config.targets[0]
    bare = staging.model_copy(
        update={
            "database": None,
            "requirements": None,
            "migrate_command": [],
            "restart_command": [],
            "health": None,
        }
    )

    full = update_runbook(staging, "v2", ["production"])
    least = update_runbook(bare, "v2", [])

    assert full.name == "update:staging"
    assert [s.name for s in full.steps] == [
        "archive",
        "dump",
        "checkout",
        "install",
        "migrate",
        "restart",
        "verify",
        "continue",
    ]
    assert [s.name for s in full.rollback] == [
        "restore-app",
        "restore-database",
        "restart-after-rollback",
        "verify-after-rollback",
    ]
    assert full.steps[-1].params == {
        "target": "staging",
        "version": "v2",
        "targets": ["production"],
    }
    assert full.steps[4].params["cwd"] == str(staging.repository)
    assert [s.name for s in least.steps] == ["archive", "checkout"]
    assert [s.name for s in least.rollback] == ["restore-app"]
    labels = {"target": "staging", "version": "v2", "then": "production,nope"}
    with pytest.raises(ValueError, match="no target named 'nope' to update after staging"):
        planned_update(config, labels)
    with pytest.raises(ValueError, match="names no repository"):
        update_runbook(bare.model_copy(update={"repository": None}), "v2", [])


@pytest.mark.parametrize("running", ["hotfix:staging", "update:staging"])
def test_one_update_or_hotfix_per_target_at_a_time(
    db: Conn, config: Config, ask: Callable[..., list[int]], running: str
) -> None:
    other = db.execute(
        "INSERT INTO occurrences (source, fingerprint, starts_at, status, labels)"
        " VALUES ('manual', 'other', now(), 'firing', '{}') RETURNING id"
    ).fetchone()
    assert other is not None
    db.execute(
        "INSERT INTO runs (occurrence_id, runbook, status, trigger, on_failure)"
        " VALUES (%s, %s, 'running', 'alert', '{}')",
        (other["id"], running),
    )
    with transaction() as conn:
        [occurrence_id] = request_update(conn, "v2", "staging", "ops")

    with transaction() as conn:
        deferred = route_one(conn, occurrence_id, config)
    db.execute("UPDATE runs SET status = 'recovered'")
    with transaction() as conn:
        routed = route_one(conn, occurrence_id, config)

    assert deferred is None
    assert routed is not None
    run = db.execute("SELECT runbook FROM runs WHERE occurrence_id = %s", (occurrence_id,))
    assert run.fetchone() == {"runbook": "update:staging"}


def test_the_next_stage_is_asked_for_once_every_target_of_the_stage_verified(
    db: Conn, config: Config, ask: Callable[..., list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    staging, production = config.targets
    twin = staging.model_copy(update={"name": "twin"})
    three = config.model_copy(update={"targets": [staging, twin, production]})
    monkeypatch.setattr(update, "get_config", lambda: three)
    routed: list[list[int]] = []
    monkeypatch.setattr(dispatch, "try_send", lambda _what, _send, ids: routed.append(ids))
    with transaction() as conn:
        ids = request_update(conn, "v2", None, "ops")
        contexts = [_run_up_to_continue(conn, three, occurrence_id) for occurrence_id in ids]
    twin_run = contexts[1].run_id
    db.execute(
        "UPDATE steps SET status = 'running' WHERE run_id = %s AND name = 'verify'", (twin_run,)
    )
    params = ContinueParams(target="staging", version="v2", targets=["production"])

    waiting = continue_update(params, contexts[0])
    db.execute("UPDATE steps SET status = 'succeeded' WHERE name = 'verify'")
    last = continue_update(params.model_copy(update={"target": "twin"}), contexts[1])
    again = continue_update(params, contexts[0])

    assert waiting.ok and waiting.result == {"waiting_for": ["twin"]}
    [asked] = routed
    assert last.ok and last.result == {"requested": {"production": asked[0]}}
    assert again.ok and again.result == {"requested_before": {"production": asked[0]}}
    row = db.execute("SELECT labels FROM occurrences WHERE id = %s", (asked[0],)).fetchone()
    assert row is not None
    assert (row["labels"]["stage"], row["labels"]["then"]) == ("1", "")
    assert row["labels"]["update_id"] == contexts[0].labels["update_id"]


def _run_up_to_continue(conn: Connection, config: Config, occurrence_id: int) -> StepContext:
    """The run of an update occurrence, every step before `continue` succeeded."""
    occurrence = conn.execute("SELECT labels FROM occurrences WHERE id = %s", (occurrence_id,))
    labels = occurrence.fetchone()["labels"]  # type: ignore[index]
    runbook = planned_update(config, labels)
    params = [step.params for step in [*runbook.steps, *runbook.rollback]]
    create_run(conn, occurrence_id, runbook, params, trigger="alert")
    run = conn.execute("SELECT id FROM runs WHERE occurrence_id = %s", (occurrence_id,))
    run_id = run.fetchone()["id"]  # type: ignore[index]
    conn.execute(
        "UPDATE steps SET status = 'succeeded' WHERE run_id = %s AND position < %s",
        (run_id, len(runbook.steps) - 1),
    )
    return StepContext(run_id=run_id, step_name="continue", labels=labels, earlier={})


def test_a_checkout_needs_the_tag_and_a_clean_tree(
    deploy: Callable[..., Site], ask: Callable[..., list[int]]
) -> None:
    staging = deploy("staging")
    context = StepContext(run_id=1, step_name="checkout", labels={}, earlier={})

    branch = checkout_version(CheckoutParams(target="staging", version="next"), context)
    (staging.tree / "health.txt").write_text("500\n")
    dirty = checkout_version(CheckoutParams(target="staging", version="v2"), context)

    assert not branch.ok and branch.error == f"no tag next in {staging.tree}"
    assert not dirty.ok and dirty.error is not None
    assert dirty.error.endswith("has local changes: M health.txt")
    assert git(staging.tree, "symbolic-ref", "HEAD") == "refs/heads/main"


def test_a_restore_refuses_a_changed_archive_and_survives_a_failed_pg_restore(
    db: Conn,
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    staging = deploy("staging")
    v1 = git(staging.tree, "rev-parse", "HEAD")
    monkeypatch.setattr(tempfile, "tempdir", str(work / "tmp"))
    monkeypatch.setattr(update, "_reached", lambda run_id, names: True)
    archived = archive_app(
        TargetParams(target="staging"),
        StepContext(run_id=99, step_name="archive", labels={}, earlier={}),
    )
    with Path(archived.result["archives"][0]["archive"]).open("ab") as archive:
        archive.write(b"changed")
    garbage = work / "tmp" / "garbage.dump"
    garbage.write_bytes(b"PGDMP, but not a dump")
    dumped = {"path": str(garbage), "sha256": file_sha256(garbage), "dbname": staging.dbname}
    earlier = {"archive": archived.result, "dump": dumped | {"tables": {"public.items": 2}}}
    rollback = StepContext(run_id=99, step_name="restore", labels={}, earlier=earlier)

    app = restore_app(TargetParams(target="staging"), rollback)
    data = restore_database(TargetParams(target="staging"), rollback)

    assert archived.ok
    assert not app.ok and app.error is not None and "changed since it was made" in app.error
    assert git(staging.tree, "rev-parse", "HEAD") == v1
    assert sorted(path.name for path in staging.root.iterdir()) == ["app", "app.pid", "venv"]
    assert not data.ok and data.error is not None
    assert data.error.startswith("pg_restore failed: pg_restore: error: ")
    assert data.error.endswith("; the database was left as it was")
    assert databases(staging) == [staging.dbname]
    assert items(staging) == ROWS_V1


def test_a_restore_of_the_app_interrupted_between_its_renames_finishes_on_a_second_try(
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    staging = deploy("staging")
    monkeypatch.setattr(tempfile, "tempdir", str(work / "tmp"))
    monkeypatch.setattr(update, "_reached", lambda run_id, names: True)
    archived = archive_app(
        TargetParams(target="staging"),
        StepContext(run_id=98, step_name="archive", labels={}, earlier={}),
    )
    rollback = StepContext(
        run_id=98, step_name="restore-app", labels={}, earlier={"archive": archived.result}
    )
    original = (staging.tree / "health.txt").read_text()
    # The first try died between its two renames: the restored tree complete beside the
    # changed one, which it had moved aside.
    fresh = staging.tree.with_name(f".{staging.tree.name}.caretaker-98-restored")
    shutil.copytree(staging.tree, fresh, symlinks=True)
    (staging.tree / "health.txt").write_text("500\n")
    aside = staging.tree.with_name(f".{staging.tree.name}.caretaker-98-replaced")
    staging.tree.rename(aside)

    again = restore_app(TargetParams(target="staging"), rollback)

    assert again.ok, again.error
    assert staging.tree.is_dir() and not aside.exists() and not fresh.exists()
    assert (staging.tree / "health.txt").read_text() == original


def test_a_good_release_is_checked_out_installed_migrated_and_verified(
    db: Conn,
    update_worker: subprocess.Popen[bytes],
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
    work: Path,
) -> None:
    staging = deploy("staging")
    v1 = git(staging.tree, "rev-parse", "HEAD")

    ask("v2", "staging")

    [run] = ended(db, 1)
    assert run["status"] == "recovered", steps(db, run["id"])
    assert steps(db, run["id"]) == [
        ("archive", "succeeded"),
        ("dump", "succeeded"),
        ("checkout", "succeeded"),
        ("install", "succeeded"),
        ("migrate", "succeeded"),
        ("restart", "succeeded"),
        ("verify", "succeeded"),
        ("restore-app", "skipped"),
        ("restore-database", "skipped"),
        ("restart-after-rollback", "skipped"),
        ("verify-after-rollback", "skipped"),
    ]
    assert git(staging.tree, "rev-parse", "HEAD") == git(staging.tree, "rev-parse", "v2^{commit}")
    assert installed(staging) == "2.0"
    assert served(staging, "/version").text == "2.0"
    assert items(staging) == ROWS_V2
    assert tables(staging) == ["audit", "items"]
    checkout = result(db, run["id"], "checkout")
    assert (checkout["previous"], checkout["branch"], checkout["tag"]) == (v1, "main", "v2")
    # The copies the rollback would have used: private, checksummed, of both directories.
    archive = result(db, run["id"], "archive")
    work_dir = Path(archive["work_dir"])
    assert work_dir.parent == work / "tmp"
    assert stat.S_IMODE(work_dir.stat().st_mode) == 0o700
    assert [entry["path"] for entry in archive["archives"]] == [
        str(staging.tree),
        str(staging.venv),
    ]
    for entry in archive["archives"]:
        assert file_sha256(Path(entry["archive"])) == entry["sha256"]
    dump = result(db, run["id"], "dump")
    assert dump["tables"] == {"public.items": 2}
    assert Path(dump["path"]).read_bytes()[:5] == b"PGDMP"
    assert db.execute("SELECT count(*) AS n FROM incidents").fetchone() == {"n": 0}


def test_a_broken_release_is_rolled_back_in_full_and_escalated(
    db: Conn,
    update_worker: subprocess.Popen[bytes],
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
) -> None:
    staging = deploy("staging", v2_health=500)
    v1 = git(staging.tree, "rev-parse", "HEAD")

    ask("v2", "staging")

    [run] = ended(db, 1)
    assert run["status"] == "escalated", steps(db, run["id"])
    assert steps(db, run["id"]) == [
        ("archive", "succeeded"),
        ("dump", "succeeded"),
        ("checkout", "succeeded"),
        ("install", "succeeded"),
        ("migrate", "succeeded"),
        ("restart", "succeeded"),
        ("verify", "failed"),
        ("restore-app", "succeeded"),
        ("restore-database", "succeeded"),
        ("restart-after-rollback", "succeeded"),
        ("verify-after-rollback", "succeeded"),
        ("escalate", "succeeded"),
    ]
    # The checkout, on its branch, as it was.
    assert git(staging.tree, "rev-parse", "HEAD") == v1
    assert git(staging.tree, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(staging.tree, "status", "--porcelain") == ""
    assert (staging.tree / "health.txt").read_text() == "200\n"
    # The environment, and the service restarted in it.
    assert installed(staging) == "1.0"
    assert served(staging, "/version").text == "1.0"
    assert served(staging, "/health").status_code == 200
    # The data: the new column, the changed rows and the new table are gone.
    assert items(staging) == ROWS_V1
    assert tables(staging) == ["items"]
    assert databases(staging) == [staging.dbname]
    assert sorted(path.name for path in staging.root.iterdir()) == ["app", "app.pid", "venv"]
    incident = wait_for(lambda: db.execute("SELECT id FROM incidents").fetchone())
    opened = db.execute(
        "SELECT message FROM events WHERE incident_id = %s AND kind = 'incident_opened'",
        (incident["id"],),
    ).fetchone()
    assert opened is not None
    assert "step verify failed: critical after 3 attempts" in opened["message"]
    assert "rolled back" in opened["message"]


def test_a_staging_failure_stops_production(
    db: Conn,
    update_worker: subprocess.Popen[bytes],
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
) -> None:
    staging = deploy("staging", v2_health=500)
    production = deploy("production")
    staging_v1 = git(staging.tree, "rev-parse", "HEAD")
    before = git(production.tree, "rev-parse", "HEAD")

    ask("v2")

    [run] = ended(db, 1)
    assert (run["runbook"], run["status"]) == ("update:staging", "escalated")
    assert ("continue", "skipped") in steps(db, run["id"])
    assert git(staging.tree, "rev-parse", "HEAD") == staging_v1
    occurrences = db.execute("SELECT labels FROM occurrences").fetchall()
    assert [row["labels"]["target"] for row in occurrences] == ["staging"]
    assert occurrences[0]["labels"]["then"] == "production"
    assert git(production.tree, "rev-parse", "HEAD") == before
    assert installed(production) == "1.0"
    assert items(production) == ROWS_V1


def test_production_is_updated_once_staging_verified(
    db: Conn,
    update_worker: subprocess.Popen[bytes],
    deploy: Callable[..., Site],
    ask: Callable[..., list[int]],
) -> None:
    staging = deploy("staging")
    production = deploy("production")

    [first] = ask("v2")

    runs = ended(db, 2)
    assert [(r["runbook"], r["status"]) for r in runs] == [
        ("update:staging", "recovered"),
        ("update:production", "recovered"),
    ]
    requested = result(db, runs[0]["id"], "continue")["requested"]
    assert list(requested) == ["production"]
    verified = db.execute(
        "SELECT finished_at FROM steps WHERE run_id = %s AND name = 'verify'", (runs[0]["id"],)
    ).fetchone()
    assert verified is not None and verified["finished_at"] <= runs[1]["created_at"]
    assert "continue" not in [name for name, _ in steps(db, runs[1]["id"])]
    for site in (staging, production):
        assert git(site.tree, "rev-parse", "HEAD") == git(site.tree, "rev-parse", "v2^{commit}")
        assert installed(site) == "2.0"
        assert items(site) == ROWS_V2
    labels = db.execute("SELECT labels FROM occurrences ORDER BY id").fetchall()
    assert [row["labels"]["target"] for row in labels] == ["staging", "production"]
    assert labels[0]["labels"]["update_id"] == labels[1]["labels"]["update_id"]
    assert first != requested["production"]

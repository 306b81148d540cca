"""Disaster recovery with real pg_dump and pg_restore on the real PostgreSQL: a broken database
restored by a run on a real worker, a failed restore put back, directories swapped, the
monthly drill against RTO and RPO, and the command line refusing what it cannot restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from tasks import restore
from tasks.alerts import route_one
from tasks.backups import (
    TargetBusy,
    backup_database,
    backup_directory,
    target_lease,
    verify_backup,
)
from tasks.backupstore import LocalStore
from tests.conftest import PG_HOST, STATE_DIR, TEST_ENV, free_port, running_worker, wait_for
from workers.cli import cli
from workers.config import Config, parse_config
from workers.db import transaction
from workers.errors import ActionError, Conflict
from workers.runs import StepContext

Conn = psycopg.Connection[dict[str, Any]]

LIVE = f"caretaker_dr_{uuid.uuid4().hex[:8]}"
LIVE_DSN = f"{PG_HOST}/{LIVE}"
ADMIN_DSN = f"{PG_HOST}/postgres"
APP_PORT = free_port()
MODULE_DIR = STATE_DIR / f"restore-{uuid.uuid4().hex[:6]}"
CONFIG_FILE = MODULE_DIR / "config.yml"
STORE_DIR = MODULE_DIR / "store"
FILES_DIR = MODULE_DIR / "files"
# Every stop and start of the dependants appends its word here, in order.
DEPENDANTS_LOG = MODULE_DIR / "dependants.log"
NOTE = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
PROBE = "SELECT count(*) = 3 FROM public.customers"


def config_data(**shop: Any) -> dict[str, Any]:
    python = sys.executable
    database = {
        "name": "shop",
        "dsn": LIVE_DSN,
        "probes": [PROBE],
        "dependants": {
            "stop": [[python, "-c", NOTE, str(DEPENDANTS_LOG), "stop"]],
            "start": [[python, "-c", NOTE, str(DEPENDANTS_LOG), "start"]],
            "health": {
                "name": "app",
                "kind": "verify",
                "action": "check_http",
                "params": {"url": f"http://127.0.0.1:{APP_PORT}/", "timeout_s": 3},
            },
        },
        "rto_s": 3600,
        "rpo_s": 86400,
    }
    return {
        "actions": {"allowlist": [python]},
        "backups": {
            "store": {"kind": "local", "path": str(STORE_DIR)},
            "databases": [database | shop],
            "directories": [{"name": "files", "path": str(FILES_DIR)}],
        },
    }


class App:
    """The dependant: answers 200 while its query runs on the live database, else 503."""

    query = "SELECT count(*) FROM public.orders"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            try:
                with psycopg.connect(LIVE_DSN, connect_timeout=3) as conn:
                    conn.execute(App.query)
                status = 200
            except psycopg.Error:
                status = 503
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass


@pytest.fixture(scope="module")
def app_server() -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", APP_PORT), App.Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    server.shutdown()


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch) -> Config:
    """The module's configuration, as the worker reads it from its file."""
    loaded = parse_config(config_data())
    monkeypatch.setattr(restore, "get_config", lambda: loaded)
    App.query = "SELECT count(*) FROM public.orders"
    MODULE_DIR.mkdir(parents=True, exist_ok=True)
    DEPENDANTS_LOG.unlink(missing_ok=True)
    for old in MODULE_DIR.glob("files*"):
        shutil.rmtree(old)
    FILES_DIR.mkdir()
    return loaded


def databases() -> list[str]:
    """The live database and every one a restore named after it."""
    with psycopg.connect(ADMIN_DSN) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY 1", (LIVE,)
        ).fetchall()
    return [row[0] for row in rows]


def drop_databases() -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        for name in databases():
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def live() -> Iterator[str]:
    """The live database with known rows; it and every database named after it are dropped
    at the end."""
    drop_databases()
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {LIVE}")
    sql(
        """
        CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
        INSERT INTO customers VALUES (1, 'ada'), (2, 'grace'), (3, 'edsger');
        CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers);
        INSERT INTO orders (customer_id) VALUES (1), (1), (2), (3), (3);
        """
    )
    yield LIVE
    drop_databases()


def sql(statement: str, database: str = LIVE) -> list[tuple[Any, ...]]:
    with psycopg.connect(f"{PG_HOST}/{database}", autocommit=True) as conn:
        cursor = conn.execute(statement)
        return cursor.fetchall() if cursor.description else []


def verified_backup(config: Config, store: LocalStore) -> dict[str, Any]:
    [shop] = config.backups.databases
    row = backup_database(shop, store)
    assert verify_backup(row["id"], store, config).status == "verified"
    return row


@pytest.fixture
def store() -> LocalStore:
    return LocalStore(STORE_DIR)


@pytest.fixture(scope="module")
def dr_worker(app_server: None) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker on every queue that reads this module's configuration."""
    MODULE_DIR.mkdir(parents=True, exist_ok=True)
    FILES_DIR.mkdir(exist_ok=True)
    CONFIG_FILE.write_text(json.dumps(config_data(), indent=2))
    env = {**os.environ, **TEST_ENV, "CARETAKER_CONFIG": str(CONFIG_FILE)}
    with running_worker(MODULE_DIR / "worker.log", env) as process:
        yield process


def finished_run(db: Conn) -> dict[str, Any]:
    return wait_for(
        lambda: db.execute(
            "SELECT * FROM runs WHERE status NOT IN ('running', 'waiting')"
        ).fetchone(),
        timeout_s=120,
        what="the restore run to finish",
    )


def steps_of(db: Conn) -> dict[str, tuple[str, dict[str, Any]]]:
    rows = db.execute("SELECT name, status, result FROM steps ORDER BY position").fetchall()
    return {row["name"]: (row["status"], row["result"]) for row in rows}


def test_a_broken_database_is_restored_by_a_run_on_a_real_worker(
    db: Conn, live: str, config: Config, store: LocalStore, dr_worker: Any
) -> None:
    backup = verified_backup(config, store)
    sql("DROP TABLE orders; DELETE FROM customers WHERE id = 3")

    asked = CliRunner().invoke(cli, ["backups", "restore", "--target", "shop"])

    assert asked.exit_code == 0, asked.output
    assert asked.output.splitlines() == [
        "restore of shop from its latest verified backup recorded as occurrence 1;",
        "follow it with `caretaker runs list`",
    ]
    run = finished_run(db)
    steps = steps_of(db)
    assert run["status"] == "recovered"
    assert run["runbook"] == "restore:shop"
    assert [(name, status) for name, (status, _) in steps.items()] == [
        ("restore-copy", "succeeded"),
        ("verify-copy", "succeeded"),
        ("stop-1", "succeeded"),
        ("swap-in", "succeeded"),
        ("start-1", "succeeded"),
        ("health", "succeeded"),
        ("swap-back", "skipped"),
        ("start-again-1", "skipped"),
        ("health-after-rollback", "skipped"),
    ]
    copied, swapped = steps["restore-copy"][1], steps["swap-in"][1]
    stamp = copied["copy"].removeprefix(f"{LIVE}_restore_")
    assert copied["backup_id"] == backup["id"]
    assert steps["verify-copy"][1] == {
        "copy": copied["copy"],
        "backup_id": backup["id"],
        "tables": 2,
        "rows": 8,
        "probes": 1,
    }
    assert swapped == {"live": LIVE, "before": f"{LIVE}_before_{stamp}", "copy": copied["copy"]}
    # The data is back under the live name; the broken database is kept beside it.
    assert sql("SELECT count(*) FROM orders") == [(5,)]
    assert sql("SELECT count(*) FROM customers") == [(3,)]
    assert databases() == [LIVE, f"{LIVE}_before_{stamp}"]
    assert sql("SELECT count(*) FROM customers", f"{LIVE}_before_{stamp}") == [(2,)]
    assert DEPENDANTS_LOG.read_text().split() == ["stop", "start"]
    assert db.execute("SELECT count(*) AS n FROM target_leases").fetchone() == {"n": 0}


def test_a_restore_whose_health_check_fails_puts_the_original_back_and_escalates(
    db: Conn, live: str, config: Config, store: LocalStore, dr_worker: Any
) -> None:
    verified_backup(config, store)
    # After the backup: a migration the app needs, and damage the restore was meant to undo.
    sql("ALTER TABLE customers ADD COLUMN note text; DELETE FROM orders")
    App.query = "SELECT note FROM public.customers"

    occurrence_id = restore.ask_for_restore("shop", None, "ops")

    run = finished_run(db)
    steps = steps_of(db)
    assert run["status"] == "escalated"
    assert [(name, status) for name, (status, _) in steps.items()] == [
        ("restore-copy", "succeeded"),
        ("verify-copy", "succeeded"),
        ("stop-1", "succeeded"),
        ("swap-in", "succeeded"),
        ("start-1", "succeeded"),
        ("health", "failed"),
        ("swap-back", "succeeded"),
        ("start-again-1", "succeeded"),
        ("health-after-rollback", "succeeded"),
        ("escalate", "succeeded"),
    ]
    stamp = steps["restore-copy"][1]["copy"].removeprefix(f"{LIVE}_restore_")
    assert steps["swap-back"][1] == {"live": LIVE, "failed": f"{LIVE}_failed_{stamp}"}
    # The original, migrated and damaged, is served under the live name again; the restored
    # copy is put aside, and no copy is left half-way.
    assert sql("SELECT count(*), count(note) FROM customers") == [(3, 0)]
    assert sql("SELECT count(*) FROM orders") == [(0,)]
    assert databases() == [LIVE, f"{LIVE}_failed_{stamp}"]
    assert DEPENDANTS_LOG.read_text().split() == ["stop", "start", "start"]
    incident = wait_for(
        lambda: db.execute("SELECT id, status, severity, source FROM incidents").fetchone(),
        what="the incident",
    )
    assert (incident["status"], incident["severity"], incident["source"]) == (
        "open",
        "critical",
        "manual",
    )
    joined = db.execute("SELECT occurrence_id, incident_id FROM runs").fetchone()
    assert joined == {"occurrence_id": occurrence_id, "incident_id": incident["id"]}
    reason = db.execute("SELECT params FROM steps WHERE name = 'escalate'").fetchone()
    assert reason is not None
    assert reason["params"]["reason"].startswith("step health failed: critical after 1 attempts")


def context(**earlier: dict[str, Any]) -> StepContext:
    return StepContext(run_id=1, step_name="test", labels={}, earlier=earlier)


def test_a_copy_failing_a_probe_is_dropped_and_the_live_database_untouched(
    db: Conn, live: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = parse_config(config_data(probes=[PROBE, "SELECT count(*) = 4 FROM customers"]))
    monkeypatch.setattr(restore, "get_config", lambda: strict)
    [shop] = strict.backups.databases
    backup = backup_database(shop, store)
    stamp = restore.new_stamp()
    params = {"target": "shop", "stamp": stamp}

    copied = restore.restore_copy(restore.CopyParams(**params, backup_id=backup["id"]), context())
    checked = restore.verify_copy(
        restore.CopiedParams(**params), context(**{"restore-copy": copied.result})
    )
    undone = restore.swap_back(restore.StampParams(**params), context())

    assert copied.ok and copied.result["backup_id"] == backup["id"]
    assert not checked.ok
    assert checked.error == (
        f"the copy differs from backup {backup['id']}: probe failed:"
        " SELECT count(*) = 4 FROM customers: returned False"
    )
    assert undone.result == {"removed": f"{LIVE}_restore_{stamp}"}
    assert databases() == [LIVE]
    assert sql("SELECT count(*) FROM orders") == [(5,)]


def test_a_busy_target_fails_the_restore_step_and_nothing_is_made(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    verified_backup(config, store)
    params = restore.CopyParams(target="shop", stamp=restore.new_stamp())

    with target_lease("shop", "verify"), pytest.raises(TargetBusy) as busy:
        restore.restore_copy(params, context())

    assert str(busy.value).startswith("target shop is busy: verify by ")
    assert databases() == [LIVE]


def test_a_directory_is_restored_beside_swapped_in_and_swapped_back(
    db: Conn, config: Config, store: LocalStore
) -> None:
    (FILES_DIR / "a.txt").write_text("original")
    (FILES_DIR / "link").symlink_to("a.txt")
    [files] = config.backups.directories
    backup = backup_directory(files, store)
    (FILES_DIR / "a.txt").write_text("damaged!!")
    (FILES_DIR / "new.txt").write_text("after the backup")
    params = {"target": "files", "stamp": restore.new_stamp()}
    names = restore.directory_names(files, params["stamp"])

    copied = restore.restore_copy(restore.CopyParams(**params, backup_id=backup["id"]), context())
    done = {"restore-copy": copied.result}
    checked = restore.verify_copy(restore.CopiedParams(**params), context(**done))
    swapped = restore.swap_in(restore.CopiedParams(**params), context(**done))
    again = restore.swap_in(restore.CopiedParams(**params), context(**done))
    restored = sorted(p.name for p in FILES_DIR.iterdir())
    undone = restore.swap_back(restore.StampParams(**params), context())

    assert copied.ok and checked.ok, (copied, checked)
    assert checked.result | {"copy": None} == {
        "copy": None,
        "backup_id": backup["id"],
        "files": 1,
        "bytes": 8,
        "symlinks": 1,
    }
    assert swapped.result == {"live": names.live, "before": names.before, "copy": names.copy}
    assert again.ok and again.result == swapped.result
    assert restored == ["a.txt", "link"]
    assert undone.result == {"live": names.live, "failed": names.failed}
    assert (FILES_DIR / "a.txt").read_text() == "damaged!!"
    assert (Path(names.failed) / "a.txt").read_text() == "original"
    assert not Path(names.copy).exists() and not Path(names.before).exists()


def test_the_runbook_follows_the_dependants_and_plan_gives_it_to_a_manual_request(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    backup = verified_backup(config, store)
    with transaction() as conn:
        occurrence_id = restore.request_restore(conn, "shop", backup["id"], "ops")
        first = route_one(conn, occurrence_id, config)

    assert first is not None and first.kind == "recover"
    rows = db.execute("SELECT name, action, params, spec FROM steps ORDER BY position").fetchall()
    assert [row["name"] for row in rows] == [
        "restore-copy",
        "verify-copy",
        "stop-1",
        "swap-in",
        "start-1",
        "health",
        "swap-back",
        "start-again-1",
        "health-after-rollback",
    ]
    assert rows[0]["action"] == "restore_copy"
    assert rows[0]["params"]["backup_id"] == backup["id"]
    assert {row["params"]["stamp"] for row in rows if "stamp" in row["params"]} == {
        rows[0]["params"]["stamp"]
    }
    assert all(row["spec"]["idempotent"] for row in rows if row["action"] != "run_command")
    assert [row["spec"]["phase"] for row in rows].count("rollback") == 3


def test_a_second_restore_of_a_target_is_refused_while_one_is_pending(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    backup = verified_backup(config, store)
    with transaction() as conn:
        first = restore.request_restore(conn, "shop", None, "ops")

    with transaction() as conn, pytest.raises(Conflict) as refused:
        restore.request_restore(conn, "shop", backup["id"], "ops")

    assert str(refused.value) == f"a restore of shop is already under way: occurrence {first}"
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 1}


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--target", "nope"], "no backup target named 'nope' (configured: files, shop)"),
        (
            ["--target", "shop", "--backup", "{files}"],
            "backup {files} is of target files, not shop",
        ),
        (["--target", "shop", "--backup", "999"], "no backup with id 999"),
        (["--target", "shop", "--backup", "{invalid}"], "backup {invalid} of shop is invalid: bad"),
        (["--target", "shop"], f"no verified backup of target shop in local directory {STORE_DIR}"),
    ],
)
def test_the_cli_refuses_what_it_cannot_restore_and_records_nothing(
    db: Conn, live: str, config: Config, store: LocalStore, args: list[str], error: str
) -> None:
    ids = {
        "files": backup_directory(config.backups.directories[0], store)["id"],
        "invalid": backup_database(config.backups.databases[0], store)["id"],
    }
    db.execute("UPDATE backups SET status = 'invalid', reason = 'bad' WHERE target = 'shop'")

    done = CliRunner().invoke(cli, ["backups", "restore", *[a.format(**ids) for a in args]])

    assert done.exit_code == 1
    assert done.output == f"Error: {error.format(**ids)}\n"
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 0}


def drills(db: Conn) -> list[dict[str, Any]]:
    return db.execute("SELECT * FROM drills ORDER BY id").fetchall()


def scratch_exists(name: str) -> bool:
    with psycopg.connect(ADMIN_DSN) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return found is not None


def test_a_drill_within_its_targets_passes(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    backup = verified_backup(config, store)

    done = CliRunner().invoke(cli, ["backups", "drill", "--json"])

    assert done.exit_code == 0, done.output
    outcome = json.loads(done.output)["shop"]
    [row] = drills(db)
    assert outcome == {
        "drill_id": row["id"],
        "status": "passed",
        "backup_id": backup["id"],
        "restore_s": row["restore_s"],
        "backup_age_s": row["backup_age_s"],
        "reason": None,
    }
    assert (row["target"], row["status"], row["rto_s"], row["rpo_s"]) == (
        "shop",
        "passed",
        3600,
        86400,
    )
    assert 0 < row["restore_s"] < 3600
    assert 0 <= row["backup_age_s"] < 300
    assert row["details"]["rows"] == 8 and row["details"]["probes"] == 1
    assert not scratch_exists(row["details"]["scratch"])
    assert databases() == [LIVE]


def test_a_drill_over_its_rto_and_rpo_is_missed(
    db: Conn, live: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tight = parse_config(config_data(rto_s=0.001, rpo_s=3600))
    monkeypatch.setattr(restore, "get_config", lambda: tight)
    backup = verified_backup(tight, store)
    db.execute(
        "UPDATE backups SET created_at = created_at - interval '2 hours' WHERE id = %s",
        (backup["id"],),
    )

    done = CliRunner().invoke(cli, ["backups", "drill", "--target", "shop"])

    [row] = drills(db)
    assert done.exit_code == 1
    assert done.output.splitlines() == [
        f"drill shop: missed (restore {row['restore_s']:g} s, backup age"
        f" {row['backup_age_s']:g} s): {row['reason']}",
        "Error: 1 of 1 drills missed or failed",
    ]
    assert (row["status"], row["backup_id"], row["rto_s"], row["rpo_s"]) == (
        "missed",
        backup["id"],
        0.001,
        3600,
    )
    assert row["restore_s"] > 0.001
    assert 7200 <= row["backup_age_s"] < 7200 + 300
    assert row["reason"] == (
        f"rto missed: the restore took {row['restore_s']:g} s, over 0.001 s; "
        f"rpo missed: the backup was {row['backup_age_s']:g} s old, over 3600 s"
    )
    assert not scratch_exists(row["details"]["scratch"])


def test_a_drill_without_a_verified_backup_fails(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    backup_database(config.backups.databases[0], store)

    outcome = restore.drill_now()

    [row] = drills(db)
    assert outcome["shop"]["status"] == "failed"
    assert (row["status"], row["backup_id"], row["reason"], row["restore_s"]) == (
        "failed",
        None,
        f"no verified backup of target shop in local directory {STORE_DIR}",
        None,
    )
    assert databases() == [LIVE]


def test_a_redelivered_drill_task_drills_once(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    verified_backup(config, store)

    first = restore.dr_drill.apply(task_id="drill-1").get()
    again = restore.dr_drill.apply(task_id="drill-1").get()

    assert first["shop"]["status"] == "passed"
    assert again == {"shop": {"status": "done before", "drill_id": first["shop"]["drill_id"]}}
    assert len(drills(db)) == 1


def test_a_rollback_with_no_live_database_before_keeps_the_restored_one_live(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    backup = verified_backup(config, store)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {LIVE} WITH (FORCE)")
    params = {"target": "shop", "stamp": restore.new_stamp()}

    copied = restore.restore_copy(restore.CopyParams(**params, backup_id=backup["id"]), context())
    done = {"restore-copy": copied.result}
    checked = restore.verify_copy(restore.CopiedParams(**params), context(**done))
    swapped = restore.swap_in(restore.CopiedParams(**params), context(**done))
    # The dependants' health check failed: the rollback runs.
    undone = restore.swap_back(
        restore.StampParams(**params), context(**done, **{"swap-in": swapped.result})
    )

    assert copied.ok and checked.ok and swapped.ok
    assert swapped.result["before"] is None
    assert undone.ok and undone.result == {
        "live": LIVE,
        "kept": "the restored copy stays live: there was none before the restore",
    }
    assert databases() == [LIVE]
    assert sql("SELECT count(*) FROM orders") == [(5,)]


def test_the_latest_verified_backup_is_picked_in_the_configured_store(
    db: Conn, live: str, config: Config, store: LocalStore, tmp_path: Path
) -> None:
    [shop] = config.backups.databases
    here = verified_backup(config, store)
    elsewhere = LocalStore(tmp_path / "old-store")
    there = backup_database(shop, elsewhere)
    db.execute("UPDATE backups SET status = 'verified' WHERE id = %s", (there["id"],))

    with transaction() as conn:
        picked = restore.pick_backup(conn, "shop", None, store.describe())
        with pytest.raises(Conflict) as refused:
            restore.pick_backup(conn, "shop", there["id"], store.describe())
    drilled = restore.drill_now()

    assert picked["id"] == here["id"]
    assert str(refused.value) == (
        f"backup {there['id']} is in {elsewhere.describe()}, not in {store.describe()}"
    )
    assert (drilled["shop"]["status"], drilled["shop"]["backup_id"]) == ("passed", here["id"])


def test_a_restore_is_refused_while_the_target_is_leased(
    db: Conn, live: str, config: Config, store: LocalStore
) -> None:
    verified_backup(config, store)

    with target_lease("shop", "verify"):
        done = CliRunner().invoke(cli, ["backups", "restore", "--target", "shop"])

    assert done.exit_code == 1
    assert done.output.startswith("Error: target shop is busy: verify by ")
    assert len(done.output.splitlines()) == 1
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 0}


def test_a_malformed_dsn_refuses_the_restore_and_the_rollback_still_goes_on(
    db: Conn, live: str, store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARETAKER_TEST_DR_DSN", "postgresql://postgres:Pa%zzword@127.0.0.1/x")
    bad = parse_config(config_data(dsn=None, dsn_env="CARETAKER_TEST_DR_DSN"))
    monkeypatch.setattr(restore, "get_config", lambda: bad)
    error = "target shop: the dsn is not a valid PostgreSQL connection string"
    params = {"target": "shop", "stamp": restore.new_stamp()}

    asked = CliRunner().invoke(cli, ["backups", "restore", "--target", "shop"])
    with pytest.raises(ActionError) as copy_failed:
        restore.restore_copy(restore.CopyParams(**params), context())
    undone = restore.swap_back(restore.StampParams(**params), context())

    assert (asked.exit_code, asked.output) == (1, f"Error: {error}\n")
    assert str(copy_failed.value) == error
    assert undone.ok
    assert undone.result == {"nothing": "the live target was not touched", "error": error}
    assert databases() == [LIVE]

"""The caretaker CLI against the real database, broker and a worker."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from click.testing import CliRunner

from tasks.alerts import route_one
from tests.conftest import PG_HOST, ROOT, TEST_ENV, alert, free_port, notification
from workers import incidents
from workers.cli import cli, postgres_help
from workers.config import get_config
from workers.db import migrate, transaction
from workers.errors import DatabaseUnavailable
from workers.occurrences import record_notification
from workers.payloads import Notification

Conn = psycopg.Connection[dict[str, Any]]


def escalated_incident() -> int:
    with transaction() as conn:
        payload = Notification.model_validate(notification(alert("Disk", fingerprint="c1")))
        recorded = record_notification(conn, payload, get_config())
        route_one(conn, recorded.new_ids[0], get_config())
        return incidents.escalate(
            conn,
            source="alertmanager",
            dedup_key="c1",
            severity="warning",
            title="disk full",
            labels={"alertname": "Disk"},
            reason="test",
            truncated_alerts=3,
            config=get_config(),
            run_id=1,
            occurrence_id=recorded.new_ids[0],
        ).incident_id


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_incidents_list_show_ack_resolve(db: Conn) -> None:
    incident_id = escalated_incident()

    listed = json.loads(invoke("incidents", "list", "--json").output)
    shown = invoke("incidents", "show", str(incident_id))
    acked = invoke("incidents", "ack", str(incident_id), "--by", "alice")
    resolved = invoke("incidents", "resolve", str(incident_id), "--by", "bob")
    again = invoke("incidents", "resolve", str(incident_id))

    assert [(i["id"], i["status"], i["severity"]) for i in listed] == [
        (incident_id, "open", "warning")
    ]
    assert "disk full" in shown.output
    assert "dropped 3 alerts" in shown.output
    assert "incident_opened" in shown.output
    assert acked.exit_code == 0 and resolved.exit_code == 0
    row = db.execute("SELECT * FROM incidents").fetchone()
    assert row is not None
    assert (row["status"], row["acknowledged_by"], row["resolved_by"]) == (
        "resolved",
        "alice",
        "bob",
    )
    actors = [
        e["actor"]
        for e in db.execute(
            "SELECT actor FROM events WHERE incident_id = %s ORDER BY id", (incident_id,)
        )
    ]
    assert actors[-2:] == ["person:alice", "person:bob"]
    assert again.exit_code == 1
    assert "incident 1 is already resolved" in again.output


def test_incidents_show_of_a_missing_id_is_an_error(db: Conn) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "workers.cli", "incidents", "show", "999"],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert process.returncode == 1
    assert process.stderr.strip() == "Error: no incident with id 999"


def test_runs_list_and_show(db: Conn) -> None:
    escalated_incident()

    listed = json.loads(invoke("runs", "list", "--json").output)
    shown = json.loads(invoke("runs", "show", "1", "--json").output)
    text = invoke("runs", "show", "1").output

    assert [(r["id"], r["runbook"], r["status"]) for r in listed] == [
        (1, "default-escalate", "running")
    ]
    assert [s["name"] for s in shown["steps"]] == ["escalate"]
    assert shown["occurrence"]["fingerprint"] == "c1"
    assert "run 1 (default-escalate): running" in text


def test_dispatch_waits_for_the_result_of_a_real_worker(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    result = invoke(
        "dispatch",
        "caretaker.health.check_system",
        "--arg",
        'disk_paths=["/"]',
        "--arg",
        "cpu_sample_s=0.1",
        "--wait",
        "--timeout",
        "60",
    )

    assert result.exit_code == 0
    body = json.loads(result.output.split("\n", 1)[1])
    assert body["status"] in ("healthy", "warning", "critical")
    assert "/" in body["details"]["disks"]


def test_dispatch_of_an_unknown_task_lists_the_known_ones(db: Conn) -> None:
    result = CliRunner().invoke(cli, ["dispatch", "caretaker.nope"])

    assert result.exit_code != 0
    assert "unknown task 'caretaker.nope'" in result.output
    assert "caretaker.health.check_http" in result.output


def test_celery_inspect_sees_the_worker(worker: subprocess.Popen[bytes]) -> None:
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.app",
            "inspect",
            "active_queues",
            "--timeout",
            "5",
        ],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert process.returncode == 0, process.stderr
    for queue in ("alerts", "checks", "remediation", "incidents"):
        assert f"'name': '{queue}'" in process.stdout or f"name: {queue}" in process.stdout


def test_acknowledging_twice_is_refused_and_records_nothing(db: Conn) -> None:
    incident_id = escalated_incident()
    invoke("incidents", "ack", str(incident_id), "--by", "alice")
    counts = [
        db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
        for table in ("events", "notifications")
    ]

    again = CliRunner().invoke(cli, ["incidents", "ack", str(incident_id), "--by", "bob"])

    assert again.exit_code == 1
    assert again.output == f"Error: incident {incident_id} is already acknowledged\n"
    row = db.execute("SELECT acknowledged_by FROM incidents").fetchone()
    assert row == {"acknowledged_by": "alice"}
    assert [
        db.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
        for table in ("events", "notifications")
    ] == counts


def test_bad_option_values_are_one_line_errors() -> None:
    cases = {
        ("incidents", "list", "--limit", "-5"): "Invalid value for '--limit': -5 is not in the",
        ("runs", "list", "--limit", "0"): "Invalid value for '--limit': 0 is not in the",
        ("runs", "list", "--status", "bogus"): "Invalid value for '--status': 'bogus' is not one",
        ("dispatch", "caretaker.health.check_system", "--wait", "--timeout", "0"): (
            "Invalid value for '--timeout': 0.0 is not in the range x>0"
        ),
    }

    for args, message in cases.items():
        result = CliRunner().invoke(cli, list(args))

        assert result.exit_code == 2, args
        assert result.exception is None or isinstance(result.exception, SystemExit)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0], result.output
    statuses = "'running', 'waiting', 'recovered', 'escalated', 'failed', 'cancelled'"
    assert statuses in CliRunner().invoke(cli, ["runs", "list", "--status", "x"]).output


def test_dispatch_says_when_no_result_arrives_in_time(db: Conn) -> None:
    # A server that takes the connection and never answers: the check outlasts the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        args = ["--arg", f"url={url}", "--arg", "timeout_s=5", "--wait", "--timeout", "1"]

        result = CliRunner().invoke(cli, ["dispatch", "caretaker.health.check_http", *args])

    assert result.exit_code == 1
    task_id = result.output.split("id=", 1)[1].split()[0]
    assert result.output.splitlines()[1] == (
        f"Error: no result within 1s; the task is still queued or running (id={task_id})"
    )


def test_dispatch_reports_a_failed_task_in_one_line(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    argv = 'argv=["/bin/echo", "hi"]'
    result = CliRunner().invoke(
        cli, ["dispatch", "caretaker.commands.run_command", "--arg", argv, "--wait"]
    )

    assert result.exit_code == 1
    lines = result.output.splitlines()
    task_id = lines[0].split("id=", 1)[1]
    assert lines[1:] == [
        f"Error: task failed (id={task_id}): NotAllowed:"
        " executable not on the allowlist: '/bin/echo'"
    ]


def _refusing_url() -> str:
    """A database URL naming a role the test server does not have."""
    server = urlsplit(PG_HOST)
    return f"postgresql://caretaker_no_such_role@{server.hostname}:{server.port}/caretaker_x"


def test_postgres_that_refuses_the_role_gets_create_role_advice() -> None:
    url = _refusing_url()
    with pytest.raises(DatabaseUnavailable) as raised:
        migrate(url)

    message = postgres_help(url, str(raised.value.__cause__).splitlines()[0])

    first, *advice = message.splitlines()
    assert first.startswith(f"PostgreSQL at {url} refused the connection: ")
    assert "caretaker_no_such_role" in first
    assert "sudo -u postgres createuser --createdb caretaker_no_such_role" in advice[0]
    assert "export CARETAKER_DATABASE_URL=" in advice[-1]
    assert "Start a local one" not in message


def test_postgres_that_does_not_answer_gets_start_server_advice() -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/caretaker"
    with pytest.raises(DatabaseUnavailable) as raised:
        migrate(url)

    message = postgres_help(url, str(raised.value.__cause__).splitlines()[0])

    assert message.startswith(f"PostgreSQL is not reachable at {url} (connection failed: ")
    assert "Connection refused" in message.splitlines()[0]
    assert "Start a local one:   sudo pg_ctlcluster" in message
    assert "refused the connection" not in message


def test_postgres_help_tells_refusals_from_silence() -> None:
    url = "postgresql://app:s3cret@db.example:5432/caretaker"
    answered = [
        'FATAL:  password authentication failed for user "app"',
        "permission denied to create database",
        'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app"',
    ]
    silent = ["timeout expired", 'could not translate host name "db.example"']

    for error in answered:
        message = postgres_help(url, error)
        assert message.splitlines()[0] == (
            "PostgreSQL at user=app dbname=caretaker host=db.example port=5432"
            f" refused the connection: {error}"
        )
        assert "createuser --createdb app" in message and "s3cret" not in message
    for error in silent:
        assert postgres_help(url, error).startswith("PostgreSQL is not reachable at user=app ")


def test_migrate_explains_a_refusing_server_in_its_error() -> None:
    url = _refusing_url()
    process = subprocess.run(
        [sys.executable, "-m", "workers.cli", "migrate"],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, "CARETAKER_DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert process.returncode == 1
    assert process.stderr.startswith(f"Error: PostgreSQL at {url} refused the connection: ")
    assert "Traceback" not in process.stderr


def test_runs_show_gives_step_durations_exit_codes_and_utc_times(db: Conn) -> None:
    escalated_incident()
    db.execute(
        "UPDATE steps SET status = 'succeeded', started_at = '2026-12-01 10:00:00+00',"
        " finished_at = '2026-12-01 10:00:00.25+00' WHERE run_id = 1"
    )
    recover = (
        "INSERT INTO steps (run_id, position, name, kind, action, params, spec, status,"
        " started_at, finished_at, result, error) VALUES (1, %s, %s, 'recover', 'run_command',"
        " '{}', '{}', 'failed', '2026-12-01 10:00:01+00', %s, %s, %s)"
    )
    db.execute(
        recover,
        (
            1,
            "restart",
            "2026-12-01 10:00:13.5+00",
            json.dumps({"exit_code": 3, "timed_out": False}),
            "command exited with 3",
        ),
    )
    db.execute(
        recover,
        (
            2,
            "restart-again",
            "2026-12-01 10:01:01+00",
            json.dumps({"exit_code": None, "timed_out": True}),
            "command timed out after 60.0s",
        ),
    )
    db.execute("UPDATE runs SET created_at = '2026-12-01 09:59:59+00'")
    first_event = db.execute("SELECT at FROM events WHERE run_id = 1 ORDER BY at, id").fetchone()

    lines = invoke("runs", "show", "1").output.splitlines()

    assert lines[1] == "  started 2026-12-01 09:59:59 UTC, finished -"
    assert lines[3:6] == [
        "  0. escalate               escalate  succeeded     0.25s",
        "  1. restart                recover   failed       12.50s  exit 3  command exited with 3",
        "  2. restart-again          recover   failed       60.00s  timed out"
        "  command timed out after 60.0s",
    ]
    assert first_event is not None
    assert lines[7].startswith(f"  {first_event['at'].astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC  ")


def test_incidents_show_and_list_give_utc_times(db: Conn) -> None:
    incident_id = escalated_incident()
    invoke("incidents", "ack", str(incident_id), "--by", "alice")
    db.execute(
        "UPDATE incidents SET opened_at = '2026-12-01 10:00:00+00',"
        " acknowledged_at = '2026-12-01 10:05:00+00'"
    )
    db.execute("UPDATE runs SET created_at = '2026-12-01 10:00:00+00'")

    lines = invoke("incidents", "show", str(incident_id)).output.splitlines()
    listed = invoke("incidents", "list").output.splitlines()

    assert lines[1] == "  status acknowledged, severity warning, opened 2026-12-01 10:00:00 UTC"
    assert lines[2] == "  acknowledged 2026-12-01 10:05:00 UTC by alice"
    assert "  run 1 (default-escalate): running, started 2026-12-01 10:00:00 UTC, took -" in lines
    timeline = lines[lines.index("timeline:") + 1 :]
    assert timeline and all(
        re.match(r"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  ", line) for line in timeline
    )
    assert listed[0].split() == ["ID", "STATUS", "SEVERITY", "OPENED_AT", "TITLE"]
    assert " acknowledged  warning   2026-12-01 10:00:00 UTC  disk full" in listed[1]


def test_dispatch_with_the_broker_down_is_one_line() -> None:
    broker_url = f"redis://127.0.0.1:{free_port()}/0"
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "dispatch",
            "caretaker.health.check_system",
            "--wait",
        ],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, "CARETAKER_BROKER_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert process.returncode == 1
    assert process.stderr.startswith("Error: cannot send caretaker.health.check_system: broker")
    assert process.stderr.rstrip().endswith(f"(broker {broker_url})")
    assert "Traceback" not in process.stderr


def test_a_built_in_step_shows_what_it_made_not_a_command_outcome() -> None:
    from workers.views import _step_line

    step = {
        "position": 1,
        "name": "restore-copy",
        "kind": "recover",
        "status": "succeeded",
        "started_at": "2026-12-01T10:00:00+00:00",
        "finished_at": "2026-12-01T10:00:02+00:00",
        "error": None,
        "result": {"copy": "shop_restore_20261201100000", "backup_id": 7, "tables": {"a": 1}},
    }

    assert _step_line(step) == (
        "  1. restore-copy           recover   succeeded     2.00s"
        "  copy=shop_restore_20261201100000, backup_id=7"
    )

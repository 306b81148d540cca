"""The caretaker CLI against the real database, broker and a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import psycopg
from click.testing import CliRunner

from tasks.alerts import route_one
from tests.conftest import ROOT, TEST_ENV, alert, notification
from workers import incidents
from workers.cli import cli
from workers.config import get_config
from workers.db import transaction
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

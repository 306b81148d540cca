"""Rollback steps: a failed step puts back what the run changed, then escalates."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import STATE_DIR, alert, free_port, wait_for
from tests.test_runs import claim, finish, routed_run, steps
from workers import dispatch
from workers.config import parse_config
from workers.errors import ConfigError
from workers.runs import Outcome

Conn = psycopg.Connection[dict[str, Any]]


def change_alert(fingerprint: str, state_file: Path, restore_to: str = "old") -> dict[str, Any]:
    found = alert("Change", fingerprint=fingerprint)
    found["annotations"] = {
        "state_file": str(state_file),
        "health_url": f"http://127.0.0.1:{free_port()}/",  # nothing listens: verify fails
        "restore_to": restore_to,
    }
    return found


def events(db: Conn) -> list[str]:
    return [row["kind"] for row in db.execute("SELECT kind FROM events ORDER BY id")]


def test_a_failed_verify_runs_the_rollback_then_escalates(db: Conn) -> None:
    apply = routed_run(change_alert("r1", STATE_DIR / "r1"))

    [confirm] = finish(claim(apply), Outcome(ok=True, result={"exit_code": 0}))
    [restore] = finish(claim(confirm), Outcome(ok=False, result={}, error="connection refused"))
    [escalation] = finish(claim(restore), Outcome(ok=True, result={"exit_code": 0}))

    assert (restore.kind, escalation.kind) == ("recover", "escalate")
    assert steps(db) == [
        ("apply", "succeeded"),
        ("confirm", "failed"),
        ("restore", "succeeded"),
        ("escalate", "pending"),
    ]
    reason = db.execute("SELECT params FROM steps WHERE name = 'escalate'").fetchone()
    assert reason is not None
    assert reason["params"]["reason"] == "step confirm failed: connection refused; rolled back"
    assert "rollback_started" in events(db)
    assert "rollback_done" in events(db)


def test_rollback_steps_are_skipped_when_the_run_succeeds(db: Conn) -> None:
    apply = routed_run(change_alert("r2", STATE_DIR / "r2"))

    [confirm] = finish(claim(apply), Outcome(ok=True, result={}))
    assert finish(claim(confirm), Outcome(ok=True, result={"status": "healthy"})) == []

    assert steps(db) == [("apply", "succeeded"), ("confirm", "succeeded"), ("restore", "skipped")]
    run = db.execute("SELECT status FROM runs").fetchone()
    assert run == {"status": "recovered"}


def test_a_failed_rollback_step_escalates_with_both_failures(db: Conn) -> None:
    apply = routed_run(change_alert("r3", STATE_DIR / "r3"))

    [restore] = finish(claim(apply), Outcome(ok=False, result={}, error="exit 2"))
    [escalation] = finish(claim(restore), Outcome(ok=False, result={}, error="exit 1"))

    assert escalation.kind == "escalate"
    assert steps(db) == [
        ("apply", "failed"),
        ("confirm", "skipped"),
        ("restore", "failed"),
        ("escalate", "pending"),
    ]
    row = db.execute("SELECT params FROM steps WHERE name = 'escalate'").fetchone()
    assert row is not None
    assert row["params"]["reason"] == (
        "rollback step restore failed: exit 1 after step apply failed: exit 2"
    )


def test_on_a_real_worker_the_change_is_put_back_and_an_incident_opened(
    db: Conn, worker: subprocess.Popen[bytes]
) -> None:
    state = STATE_DIR / "r4"
    state.write_text("old")

    dispatch.execute_steps([routed_run(change_alert("r4", state))])

    incident = wait_for(
        lambda: db.execute("SELECT status, title FROM incidents").fetchone(),
        timeout_s=60,
        what="the rolled-back change to be escalated",
    )
    assert incident["status"] == "open"
    assert state.read_text() == "old"  # written "new" by apply, put back by restore
    run = wait_for(
        lambda: db.execute("SELECT status FROM runs WHERE status <> 'running'").fetchone()
    )
    assert run == {"status": "escalated"}


def test_rollback_steps_are_only_recover_or_verify() -> None:
    runbook = {
        "name": "x",
        "matchers": ['alertname="X"'],
        "steps": [
            {
                "name": "a",
                "kind": "recover",
                "action": "run_command",
                "params": {"argv": ["/bin/true"]},
            }
        ],
        "rollback": [{"name": "b", "kind": "escalate", "action": "escalate"}],
    }
    with pytest.raises(ConfigError) as raised:
        parse_config({"actions": {"allowlist": ["/bin/true"]}, "runbooks": [runbook]})

    assert any(
        "rollback step 'b': kind must be recover or verify" in p for p in raised.value.problems
    )


def test_config_check_follows_rollback_steps_into_their_parameters() -> None:
    runbook = {
        "name": "x",
        "matchers": ['alertname="X"'],
        "steps": [
            {
                "name": "a",
                "kind": "recover",
                "action": "run_command",
                "params": {"argv": ["/bin/true"]},
            }
        ],
        "rollback": [
            {
                "name": "b",
                "kind": "recover",
                "action": "run_command",
                "params": {"argv": ["/bin/rm"]},
            }
        ],
    }
    with pytest.raises(ConfigError) as raised:
        parse_config({"actions": {"allowlist": ["/bin/true"]}, "runbooks": [runbook]})

    assert raised.value.problems == [
        "runbooks[0].rollback[0].params.argv[0]: executable '/bin/rm' is not in actions.allowlist"
    ]


def test_the_escalation_carries_the_end_of_the_failed_command_output(db: Conn) -> None:
    apply = routed_run(change_alert("r5", STATE_DIR / "r5"))
    output = {"exit_code": 1, "stdout": "collected 12 items", "stderr": "FAILED test_x\n1 failed"}

    [restore] = finish(claim(apply), Outcome(ok=False, result=output, error="exited with 1"))
    finish(claim(restore), Outcome(ok=True, result={"exit_code": 0}))

    row = db.execute("SELECT params FROM steps WHERE name = 'escalate'").fetchone()
    assert row is not None
    assert row["params"]["reason"] == (
        "step apply failed: exited with 1; rolled back; output: FAILED test_x 1 failed"
    )

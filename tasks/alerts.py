"""Routing occurrences to runbooks (queue `alerts`)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from tasks.hotfix import ADVISORY_ALERT, hotfix_runbook
from tasks.hotfix import RUNBOOK_PREFIX as HOTFIX_PREFIX
from tasks.restore import RESTORE_ALERT, planned_restore
from tasks.update import RUNBOOK_PREFIX as UPDATE_PREFIX
from tasks.update import UPDATE_ALERT, planned_update
from workers import dispatch, runs
from workers.app import app
from workers.config import (
    Config,
    OnFailure,
    RunbookConfig,
    StepConfig,
    get_config,
    resolve_references,
)
from workers.db import Connection, transaction
from workers.errors import CaretakerError
from workers.health import SOURCE_CHECK
from workers.matchers import matches_all
from workers.occurrences import SOURCE_ALERTMANAGER, SOURCE_MANUAL
from workers.runs import StepRef
from workers.windows import CHANGE_WINDOW, open_window

log = logging.getLogger(__name__)

DEFAULT_RUNBOOK = "default-escalate"
# Runbooks that change a target's code or environment: one of them per target at a time.
ONE_PER_TARGET = (HOTFIX_PREFIX, UPDATE_PREFIX)


def select_runbook(config: Config, labels: dict[str, str]) -> RunbookConfig:
    """The first runbook whose matchers all accept the labels, else the escalating default."""
    return matching_runbook(config, labels) or escalate_only(
        config, "no runbook matches this alert"
    )


def matching_runbook(config: Config, labels: dict[str, str]) -> RunbookConfig | None:
    """The first runbook whose matchers all accept the labels."""
    return next((rb for rb in config.runbooks if matches_all(rb.parsed_matchers(), labels)), None)


def plan(config: Config, occurrence: Any) -> RunbookConfig | None:
    """The runbook an occurrence gets; None for a warning nothing recovers, which is recorded."""
    labels = occurrence["labels"]
    if labels.get("alertname") == ADVISORY_ALERT and occurrence["source"] != SOURCE_ALERTMANAGER:
        return matching_runbook(config, labels) or _hotfix(config, labels)
    if labels.get("alertname") == RESTORE_ALERT and occurrence["source"] == SOURCE_MANUAL:
        # Only a person asks for a restore; an alert of that name gets no restore run.
        try:
            return planned_restore(config, labels)
        except CaretakerError as exc:
            return escalate_only(config, f"restore refused: {exc}")
    if labels.get("alertname") == UPDATE_ALERT and occurrence["source"] == SOURCE_MANUAL:
        # Only a person, or the stage before, asks for an update; an alert of that name
        # gets no update run.
        try:
            runbook = planned_update(config, labels)
            return runbook.model_copy(update={"change_window": labels.get("window") == "true"})
        except ValueError as exc:
            return escalate_only(config, f"update refused: {exc}")
    if occurrence["source"] != SOURCE_CHECK:
        return select_runbook(config, labels)
    if labels.get("severity") == "critical":
        summary = occurrence["annotations"].get("summary", labels.get("component", ""))
        return escalate_only(config, f"health check critical: {summary}")
    return matching_runbook(config, labels)


def _hotfix(config: Config, labels: dict[str, str]) -> RunbookConfig:
    """The built-in hotfix run of an advisory, or escalation when it cannot be made; a
    non-critical one is a planned change, made in a change window."""
    target = next((t for t in config.targets if t.name == labels.get("target")), None)
    if target is None:
        return escalate_only(config, f"no target named {labels.get('target')!r} to hotfix")
    fixed = labels.get("fixed_version")
    if not fixed:
        return escalate_only(config, f"advisory {labels.get('advisory')}: no fixed version known")
    try:
        runbook = hotfix_runbook(
            target, labels.get("package", ""), fixed, labels.get("advisory", "")
        )
    except ValueError as exc:
        return escalate_only(config, f"hotfix refused: {exc}")
    planned = labels.get("severity") != "critical"
    return runbook.model_copy(update={"change_window": planned})


def escalate_only(config: Config, reason: str) -> RunbookConfig:
    """The default runbook: hand the occurrence to a person."""
    return RunbookConfig(
        name=DEFAULT_RUNBOOK,
        matchers=['alertname=~".*"'],
        steps=[
            StepConfig(
                name="escalate", kind="escalate", action="escalate", params={"reason": reason}
            )
        ],
        on_failure=OnFailure(escalate=False, severity=config.default_severity),
    )


def route_one(conn: Connection, occurrence_id: int, config: Config) -> StepRef | None:
    """Give a firing, unrouted occurrence its run; None when it needs nothing (any more)."""
    occurrence = conn.execute(
        "SELECT * FROM occurrences WHERE id = %s FOR UPDATE", (occurrence_id,)
    ).fetchone()
    if occurrence is None or occurrence["routed_at"] is not None:
        return None
    conn.execute("UPDATE occurrences SET routed_at = now() WHERE id = %s", (occurrence_id,))
    if occurrence["status"] != "firing":
        return None

    _append_to_open_incident(conn, occurrence)
    runbook = plan(config, occurrence)
    if runbook is None:
        runs.event(
            conn,
            "not_routed",
            "caretaker",
            "no runbook recovers this warning; recorded",
            occurrence_id=occurrence_id,
        )
        return None
    if runbook.name.startswith(ONE_PER_TARGET) and _target_busy(
        conn, runbook.name, runbook.change_window
    ):
        # One hotfix or update per target at a time: this one is routed again by the sweeper.
        conn.execute("UPDATE occurrences SET routed_at = NULL WHERE id = %s", (occurrence_id,))
        log.info("run deferred occurrence_id=%s runbook=%s", occurrence_id, runbook.name)
        return None
    params, problems = _parameters(runbook, occurrence)
    if problems:
        reason = f"runbook {runbook.name} cannot run for this alert: {'; '.join(problems)}"
        log.warning("occurrence escalated occurrence_id=%s reason=%s", occurrence_id, reason)
        runbook = escalate_only(config, reason)
        params, _ = _parameters(runbook, occurrence)
    waiting_for = None
    if runbook.change_window and open_window(config.change_windows, datetime.now(UTC)) is None:
        if config.change_windows:
            waiting_for = CHANGE_WINDOW
        else:
            log.info(
                "planned change runs now: no change windows configured runbook=%s", runbook.name
            )
    first = runs.create_run(
        conn, occurrence_id, runbook, params, trigger="alert", waiting_for=waiting_for
    )
    log.info("occurrence routed occurrence_id=%s runbook=%s", occurrence_id, runbook.name)
    return first


def _target_busy(conn: Connection, runbook: str, planned: bool) -> bool:
    # Under the target's lock: of two routings for one target, the second sees the first run.
    # A run waiting for a change window holds back other planned changes, never an urgent one.
    target = runbook.split(":", 1)[1]
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"target:{target}",))
    statuses = ["running", "waiting"] if planned else ["running"]
    row = conn.execute(
        "SELECT 1 FROM runs WHERE runbook = ANY(%s) AND status = ANY(%s)",
        ([prefix + target for prefix in ONE_PER_TARGET], statuses),
    ).fetchone()
    return row is not None


def _parameters(runbook: RunbookConfig, occurrence: Any) -> tuple[list[dict[str, Any]], list[str]]:
    params, problems = [], []
    for step in [*runbook.steps, *runbook.rollback]:
        resolved, found = resolve_references(
            step.params, occurrence["labels"], occurrence["annotations"]
        )
        params.append(resolved)
        problems += [f"step {step.name}: {problem}" for problem in found]
    return params, problems


def _append_to_open_incident(conn: Connection, occurrence: Any) -> None:
    # While an incident for this fingerprint is open, a new firing episode joins its timeline.
    incident = conn.execute(
        "SELECT id FROM incidents WHERE source = %s AND dedup_key = %s AND status <> 'resolved'",
        (occurrence["source"], occurrence["fingerprint"]),
    ).fetchone()
    if incident is None:
        return
    runs.event(
        conn,
        "occurrence_appended",
        "caretaker",
        "the alert fired again",
        incident_id=incident["id"],
        occurrence_id=occurrence["id"],
    )


@app.task(name="caretaker.alerts.route_occurrences", acks_late=True, reject_on_worker_lost=True)
def route_occurrences(occurrence_ids: list[int]) -> int:
    """Create the runs of recorded occurrences and dispatch their first steps. Idempotent: an
    occurrence routed before is skipped. Not retried; the sweeper re-sends lost batches."""
    config = get_config()
    first_steps = []
    for occurrence_id in occurrence_ids:
        with transaction() as conn:
            step = route_one(conn, occurrence_id, config)
        if step is not None:
            first_steps.append(step)
    dispatch.try_send("first steps", dispatch.execute_steps, first_steps)
    return len(first_steps)

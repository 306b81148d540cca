"""The run state machine in PostgreSQL: steps go pending -> running -> succeeded | failed | skipped.

Every transition locks the run row first and its steps second, so a cancellation from the
webhook and a step finishing on a worker never interleave.

A runbook's steps run in order. When one fails, the rest are skipped and its rollback steps
(stored with the run, phase "rollback") run in order to put back what was changed; then the run
is escalated. A rollback step that fails ends the rollback and escalates at once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from workers.config import RunbookConfig, StepConfig
from workers.db import Connection, Row

log = logging.getLogger(__name__)

ACTIVE_RUN = ("running", "waiting")
MAIN = "main"
ROLLBACK = "rollback"
# The escalation a failure adds after everything else.
ESCALATION = "escalation"
# Steps whose worker died are re-run at most this many times in all, and only when idempotent.
MAX_TRIES = 3


@dataclass(frozen=True)
class StepRef:
    """A step to hand to the broker."""

    id: int
    kind: str
    timeout_s: float


@dataclass(frozen=True)
class Claim:
    """A step this worker now owns until its lease expires."""

    step: Row
    run: Row
    occurrence: Row
    tries: int


@dataclass(frozen=True)
class Outcome:
    """What a step produced: its result document and whether it passed."""

    ok: bool
    result: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class StepContext:
    """What a built-in action may know of its run: the results of the steps that succeeded
    before it, by name (a rollback reads what an earlier step recorded)."""

    run_id: int
    step_name: str
    labels: dict[str, str]
    earlier: dict[str, dict[str, Any]]


def step_context(conn: Connection, claim: Claim) -> StepContext:
    rows = conn.execute(
        "SELECT name, result FROM steps WHERE run_id = %s AND status = 'succeeded'"
        " ORDER BY position",
        (claim.run["id"],),
    ).fetchall()
    return StepContext(
        run_id=claim.run["id"],
        step_name=claim.step["name"],
        labels=claim.occurrence["labels"],
        earlier={row["name"]: row["result"] or {} for row in rows},
    )


def create_run(
    conn: Connection,
    occurrence_id: int,
    runbook: RunbookConfig,
    params: list[dict[str, Any]],
    trigger: str,
    waiting_for: str | None = None,
) -> StepRef | None:
    """Create the run of an occurrence with its steps, all pending; return the first step to
    dispatch. With `waiting_for`, the run waits instead (durably: nothing is sent) until
    resume_waiting releases it; None is returned."""
    run_id = conn.execute(
        """
        INSERT INTO runs (occurrence_id, runbook, status, trigger, on_failure, waiting_for)
        VALUES (%s, %s, %s, %s, %s, %s) RETURNING id
        """,
        (
            occurrence_id,
            runbook.name,
            "waiting" if waiting_for else "running",
            trigger,
            runbook.on_failure.model_dump_json(),
            waiting_for,
        ),
    ).fetchone()["id"]  # type: ignore[index]
    steps = [*runbook.steps, *runbook.rollback]
    for position, (step, step_params) in enumerate(zip(steps, params, strict=True)):
        phase = MAIN if position < len(runbook.steps) else ROLLBACK
        _insert_step(conn, run_id, position, step, step_params, phase)
    event(
        conn,
        "run_created",
        "caretaker",
        f"runbook {runbook.name}",
        run_id=run_id,
        occurrence_id=occurrence_id,
    )
    if waiting_for:
        conn.execute(
            "UPDATE steps SET status = 'waiting' WHERE run_id = %s AND position = 0", (run_id,)
        )
        event(conn, "run_waiting", "caretaker", f"waiting for {waiting_for}", run_id=run_id)
        return None
    return _mark_dispatched(conn, run_id, 0)


def resume_waiting(conn: Connection, waiting_for: str, reason: str) -> list[StepRef]:
    """Release every run waiting for `waiting_for`: its first step is dispatched."""
    resumed = conn.execute(
        """
        UPDATE runs SET status = 'running', waiting_for = NULL
         WHERE status = 'waiting' AND waiting_for = %s
        RETURNING id
        """,
        (waiting_for,),
    ).fetchall()
    first_steps = []
    for row in resumed:
        waiting = conn.execute(
            """
            UPDATE steps SET status = 'pending' WHERE run_id = %s AND status = 'waiting'
            RETURNING position
            """,
            (row["id"],),
        ).fetchone()
        event(conn, "run_resumed", "caretaker", reason, run_id=row["id"])
        if waiting is not None:
            first_steps.append(_mark_dispatched(conn, row["id"], waiting["position"]))
    return first_steps


def _insert_step(
    conn: Connection,
    run_id: int,
    position: int,
    step: StepConfig,
    params: dict[str, Any],
    phase: str = MAIN,
) -> None:
    spec = step.model_dump(include={"attempts", "delay_s", "accept", "idempotent", "timeout_s"})
    spec["phase"] = phase
    if spec["idempotent"] is None:
        spec["idempotent"] = step.kind in ("check", "verify", "escalate")
    conn.execute(
        """
        INSERT INTO steps (run_id, position, name, kind, action, params, spec, status)
        VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending')
        """,
        (
            run_id,
            position,
            step.name,
            step.kind,
            step.action,
            storable_json(params),
            storable_json(spec),
        ),
    )


def _mark_dispatched(conn: Connection, run_id: int, position: int) -> StepRef:
    row = conn.execute(
        """
        UPDATE steps SET dispatched_at = now() WHERE run_id = %s AND position = %s
        RETURNING id, kind, spec
        """,
        (run_id, position),
    ).fetchone()
    assert row is not None
    return StepRef(row["id"], row["kind"], float(row["spec"]["timeout_s"]))


def claim_step(conn: Connection, step_id: int, worker: str, lease_s: float) -> Claim | None:
    """Take a pending step of an active run; None when there is nothing to do."""
    run = conn.execute(
        "SELECT r.* FROM runs r JOIN steps s ON s.run_id = r.id WHERE s.id = %s FOR UPDATE OF r",
        (step_id,),
    ).fetchone()
    if run is None or run["status"] not in ACTIVE_RUN:
        return None
    step = conn.execute(
        """
        UPDATE steps SET status = 'running', tries = tries + 1, worker = %s,
               started_at = now(), lease_expires_at = now() + make_interval(secs => %s)
         WHERE id = %s AND status = 'pending'
        RETURNING *
        """,
        (worker, lease_s, step_id),
    ).fetchone()
    if step is None:
        return None
    occurrence = conn.execute(
        "SELECT * FROM occurrences WHERE id = %s", (run["occurrence_id"],)
    ).fetchone()
    assert occurrence is not None
    event(
        conn,
        "step_started",
        worker,
        f"step {step['name']} started (try {step['tries']})",
        run_id=run["id"],
        step_id=step_id,
    )
    return Claim(step=step, run=run, occurrence=occurrence, tries=step["tries"])


def renew_lease(conn: Connection, step_id: int, tries: int, lease_s: float) -> bool:
    """Extend a running step's lease; False when the step is no longer this worker's."""
    row = conn.execute(
        """
        UPDATE steps SET lease_expires_at = now() + make_interval(secs => %s)
         WHERE id = %s AND tries = %s AND status = 'running'
        RETURNING id
        """,
        (lease_s, step_id, tries),
    ).fetchone()
    return row is not None


def finish_step(conn: Connection, claim: Claim, outcome: Outcome, actor: str) -> list[StepRef]:
    """Record a step's result with its state change; return the steps to dispatch next."""
    step_id = claim.step["id"]
    run = conn.execute("SELECT * FROM runs WHERE id = %s FOR UPDATE", (claim.run["id"],)).fetchone()
    assert run is not None
    current = conn.execute("SELECT status, tries FROM steps WHERE id = %s", (step_id,)).fetchone()
    # The lease ran out and the sweeper gave the step to someone else: this result is stale.
    if current is None or current["status"] != "running" or current["tries"] != claim.tries:
        event(
            conn,
            "step_result_discarded",
            actor,
            "result arrived after the lease was lost",
            run_id=run["id"],
            step_id=step_id,
            data={"tries": claim.tries},
        )
        return []

    status = "succeeded" if outcome.ok else "failed"
    conn.execute(
        """
        UPDATE steps SET status = %s, result = %s, error = %s, finished_at = now(),
               lease_expires_at = NULL
         WHERE id = %s
        """,
        (status, storable_json(outcome.result), clean_text(outcome.error), step_id),
    )
    message = f"step {claim.step['name']} {status}"
    if outcome.error:
        message += f": {outcome.error}"
    event(
        conn,
        f"step_{status}",
        actor,
        message,
        run_id=run["id"],
        step_id=step_id,
        data={"result": outcome.result},
    )
    if run["status"] not in ACTIVE_RUN:
        return []
    if outcome.ok:
        return _advance(conn, run, claim.step)
    return fail_run(conn, run, claim.step, outcome.error or "step failed", actor)


def phase_of(step: Row) -> str:
    return str(step["spec"].get("phase", MAIN))


def _next_pending(conn: Connection, run_id: int, phase: str) -> Row | None:
    return conn.execute(
        """
        SELECT position FROM steps
         WHERE run_id = %s AND status = 'pending' AND coalesce(spec->>'phase', 'main') = %s
         ORDER BY position LIMIT 1
        """,
        (run_id, phase),
    ).fetchone()


def _skip(conn: Connection, run_id: int, phase: str, reason: str) -> None:
    conn.execute(
        """
        UPDATE steps SET status = 'skipped', finished_at = now(), error = %s
         WHERE run_id = %s AND status IN ('pending', 'waiting')
           AND coalesce(spec->>'phase', 'main') = %s
        """,
        (reason, run_id, phase),
    )


def _advance(conn: Connection, run: Row, step: Row) -> list[StepRef]:
    phase = phase_of(step)
    if phase == ESCALATION:
        _finish_run(conn, run["id"], "escalated")
        return []
    following = _next_pending(conn, run["id"], phase)
    if following is not None:
        return [_mark_dispatched(conn, run["id"], following["position"])]
    if phase == ROLLBACK:
        # Put back; the failure that started the rollback is still a person's business.
        event(conn, "rollback_done", "caretaker", "rollback done", run_id=run["id"])
        failed = conn.execute(
            """
            SELECT * FROM steps WHERE run_id = %s AND status = 'failed'
               AND coalesce(spec->>'phase', 'main') = 'main'
             ORDER BY position LIMIT 1
            """,
            (run["id"],),
        ).fetchone()
        assert failed is not None
        reason = f"step {failed['name']} failed: {failed['error']}; rolled back"
        return _escalate(conn, run, failed, reason, "caretaker")
    _skip(conn, run["id"], ROLLBACK, "not needed: the run succeeded")
    status = "escalated" if step["kind"] == "escalate" else "recovered"
    _finish_run(conn, run["id"], status)
    return []


def fail_run(conn: Connection, run: Row, step: Row, reason: str, actor: str) -> list[StepRef]:
    """Handle a failed step of a locked run: skip the rest, roll back what the runbook says,
    and escalate unless escalating is what failed."""
    _skip(conn, run["id"], MAIN, "an earlier step failed")
    if step["kind"] == "escalate":
        # Nobody has been told: this line in the log is the last resort.
        log.error("escalation failed run_id=%s error=%s", run["id"], reason)
        _finish_run(conn, run["id"], "failed")
        return []
    if phase_of(step) == ROLLBACK:
        _skip(conn, run["id"], ROLLBACK, "an earlier rollback step failed")
        failed = conn.execute(
            """
            SELECT name, error FROM steps WHERE run_id = %s AND status = 'failed'
               AND coalesce(spec->>'phase', 'main') = 'main'
             ORDER BY position LIMIT 1
            """,
            (run["id"],),
        ).fetchone()
        before = f" after step {failed['name']} failed: {failed['error']}" if failed else ""
        return _escalate(
            conn, run, step, f"rollback step {step['name']} failed: {reason}{before}", actor
        )
    rollback = _next_pending(conn, run["id"], ROLLBACK)
    if rollback is not None:
        event(
            conn,
            "rollback_started",
            actor,
            f"step {step['name']} failed: {reason}; rolling back",
            run_id=run["id"],
            step_id=step["id"],
        )
        return [_mark_dispatched(conn, run["id"], rollback["position"])]
    return _escalate(conn, run, step, f"step {step['name']} failed: {reason}", actor)


def _escalate(conn: Connection, run: Row, step: Row, reason: str, actor: str) -> list[StepRef]:
    if not run["on_failure"].get("escalate", True):
        _finish_run(conn, run["id"], "failed")
        return []
    position = conn.execute(
        "SELECT max(position) + 1 AS next FROM steps WHERE run_id = %s", (run["id"],)
    ).fetchone()["next"]  # type: ignore[index]
    escalation = StepConfig(name="escalate", kind="escalate", action="escalate", timeout_s=60)
    output = _output_tail(conn, step["id"])
    params = {
        "severity": run["on_failure"].get("severity", "critical"),
        "reason": f"{reason}; output: {output}" if output else reason,
        "failed_step_id": step["id"],
    }
    _insert_step(conn, run["id"], position, escalation, params, ESCALATION)
    event(conn, "escalation_planned", actor, reason, run_id=run["id"], step_id=step["id"])
    return [_mark_dispatched(conn, run["id"], position)]


def _output_tail(conn: Connection, step_id: int, limit: int = 500) -> str:
    """The end of what a failed command said (stderr, else stdout), for the person paged."""
    row = conn.execute("SELECT result FROM steps WHERE id = %s", (step_id,)).fetchone()
    result = (row or {}).get("result") or {}
    text = str(result.get("stderr") or "").strip() or str(result.get("stdout") or "").strip()
    return " ".join(text.split())[-limit:]


def _finish_run(conn: Connection, run_id: int, status: str) -> None:
    conn.execute("UPDATE runs SET status = %s, finished_at = now() WHERE id = %s", (status, run_id))
    event(conn, f"run_{status}", "caretaker", f"run {status}", run_id=run_id)


def event(
    conn: Connection,
    kind: str,
    actor: str,
    message: str,
    *,
    occurrence_id: int | None = None,
    run_id: int | None = None,
    step_id: int | None = None,
    incident_id: int | None = None,
    data: dict[str, Any] | None = None,
) -> None:
    """Append one event to the log that timelines and the audit read."""
    conn.execute(
        """
        INSERT INTO events (kind, actor, occurrence_id, run_id, step_id, incident_id, message, data)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            kind,
            actor,
            occurrence_id,
            run_id,
            step_id,
            incident_id,
            clean_text(message),
            storable_json(data or {}),
        ),
    )


def clean_text(text: str | None) -> str | None:
    """Text PostgreSQL can store: NUL becomes U+FFFD."""
    return None if text is None else text.replace("\x00", "\ufffd")


def storable_json(value: Any) -> str:
    """JSON for a jsonb column: NUL in any string (output of a command, say) becomes U+FFFD."""
    return json.dumps(_clean(value), default=str)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(item) for item in value]
    return value

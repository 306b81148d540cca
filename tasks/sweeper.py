"""Finding lost work again: unrouted occurrences, undelivered steps, expired leases."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from workers import dispatch, runs
from workers.app import QUEUES, STEP_QUEUES, app
from workers.config import get_config
from workers.db import Connection, transaction
from workers.errors import BrokerUnavailable
from workers.runs import Claim, Outcome, StepRef
from workers.settings import get_settings
from workers.windows import CHANGE_WINDOW, open_window

log = logging.getLogger(__name__)

ACTOR = "sweeper"
# Rows handled per pass; a backlog larger than this is worked off over several passes.
BATCH = 1000


@dataclass
class Sweep:
    occurrences: list[int] = field(default_factory=list)
    steps: list[StepRef] = field(default_factory=list)
    notifications: list[int] = field(default_factory=list)
    expired: int = 0


def find_lost_work(conn: Connection, graces_s: dict[str, float]) -> Sweep:
    """Claim for re-dispatch what was recorded but not started within its queue's grace."""
    # SKIP LOCKED keeps two sweepers (or a sweeper and a busy worker) off the same rows.
    sweep = Sweep()
    sweep.occurrences = [
        row["id"]
        for row in conn.execute(
            """
        UPDATE occurrences SET dispatched_at = now()
         WHERE id IN (SELECT id FROM occurrences
                       WHERE routed_at IS NULL AND status = 'firing'
                         AND coalesce(dispatched_at, received_at)
                             < now() - make_interval(secs => %(grace)s)
                       ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        RETURNING id
        """,
            {"grace": graces_s["alerts"], "batch": BATCH},
        )
    ]
    for queue in sorted(set(STEP_QUEUES.values())):
        kinds = [kind for kind, q in STEP_QUEUES.items() if q == queue]
        sweep.steps += _lost_steps(conn, kinds, graces_s[queue])
    sweep.notifications = [
        row["id"]
        for row in conn.execute(
            """
        UPDATE notifications SET dispatched_at = now()
         WHERE id IN (SELECT id FROM notifications
                       WHERE status = 'pending'
                         AND dispatched_at < now() - make_interval(secs => %(grace)s)
                       ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED)
        RETURNING id
        """,
            {"grace": graces_s["incidents"], "batch": BATCH},
        )
    ]
    return sweep


def _lost_steps(conn: Connection, kinds: list[str], grace_s: float) -> list[StepRef]:
    rows = conn.execute(
        """
        UPDATE steps SET dispatched_at = now()
         WHERE id IN (SELECT s.id FROM steps s JOIN runs r ON r.id = s.run_id
                       WHERE s.status = 'pending' AND r.status = 'running'
                         AND s.kind = ANY(%(kinds)s) AND s.dispatched_at IS NOT NULL
                         AND s.dispatched_at < now() - make_interval(secs => %(grace)s)
                       ORDER BY s.id LIMIT %(batch)s FOR UPDATE OF s SKIP LOCKED)
        RETURNING id, kind, spec
        """,
        {"kinds": kinds, "grace": grace_s, "batch": BATCH},
    ).fetchall()
    return [StepRef(row["id"], row["kind"], float(row["spec"]["timeout_s"])) for row in rows]


def graces(grace_s: float, visibility_timeout_s: float) -> dict[str, float]:
    """Per queue, how long work may wait before it counts as lost.

    Work in a queue that still holds messages may just be waiting its turn: it counts as lost
    only after the broker's visibility timeout. An empty queue has lost whatever it should
    hold, so grace_s applies.
    """
    try:
        depths = dispatch.queue_depths(list(QUEUES))
    except BrokerUnavailable:
        depths = {}
    return {queue: visibility_timeout_s if depths.get(queue) else grace_s for queue in QUEUES}


def expire_leases(conn: Connection) -> list[StepRef]:
    """Settle steps whose worker stopped renewing their lease; return the steps to dispatch."""
    expired = conn.execute(
        """
        SELECT s.id, s.run_id FROM steps s
         WHERE s.status = 'running' AND s.lease_expires_at < now()
         ORDER BY s.id LIMIT %s
        """,
        (BATCH,),
    ).fetchall()
    following: list[StepRef] = []
    for row in expired:
        following.extend(_expire_one(conn, row["id"], row["run_id"]))
    return following


def _expire_one(conn: Connection, step_id: int, run_id: int) -> list[StepRef]:
    run = conn.execute("SELECT * FROM runs WHERE id = %s FOR UPDATE", (run_id,)).fetchone()
    step = conn.execute(
        "SELECT * FROM steps WHERE id = %s AND status = 'running' AND lease_expires_at < now()",
        (step_id,),
    ).fetchone()
    if run is None or step is None:
        return []
    if run["status"] not in runs.ACTIVE_RUN:
        # The run ended meanwhile (its alert resolved): nothing is left to decide.
        conn.execute(
            "UPDATE steps SET status = 'skipped', lease_expires_at = NULL, finished_at = now(),"
            " error = 'the worker was lost after the run ended' WHERE id = %s",
            (step_id,),
        )
        return []
    # Running a check again is harmless; running an action again might not be. Without a
    # recorded result its outcome is unknown, so a person decides instead.
    if step["spec"]["idempotent"] and step["tries"] < runs.MAX_TRIES:
        conn.execute(
            "UPDATE steps SET status = 'pending', lease_expires_at = NULL, dispatched_at = now()"
            " WHERE id = %s",
            (step_id,),
        )
        runs.event(
            conn,
            "step_requeued",
            ACTOR,
            f"step {step['name']} lost its worker; running it again",
            run_id=run_id,
            step_id=step_id,
        )
        return [StepRef(step_id, step["kind"], float(step["spec"]["timeout_s"]))]
    reason = (
        "outcome unknown: the worker was lost while the step ran"
        if not step["spec"]["idempotent"]
        else f"the step lost its worker {step['tries']} times"
    )
    claim = Claim(step=step, run=run, occurrence={}, tries=step["tries"])
    return runs.finish_step(conn, claim, Outcome(ok=False, result={}, error=reason), ACTOR)


def heartbeat(conn: Connection, name: str) -> None:
    """Record that a periodic job ran, for self-monitoring."""
    conn.execute(
        "INSERT INTO heartbeats (name, at) VALUES (%s, now())"
        " ON CONFLICT (name) DO UPDATE SET at = excluded.at",
        (name,),
    )


@app.task(name="caretaker.sweeper.sweep_lost_work", acks_late=True, reject_on_worker_lost=True)
def sweep_lost_work() -> dict[str, int]:
    """Re-dispatch lost work. Idempotent: duplicates of a step or routing are no-ops.
    Not retried: the next beat tick sweeps again."""
    settings = get_settings()
    graces_s = graces(settings.dispatch_grace_s, settings.visibility_timeout_s)
    with transaction() as conn:
        sweep = find_lost_work(conn, graces_s)
        sweep.steps.extend(expire_leases(conn))
        heartbeat(conn, "sweeper")

    dispatch.try_send("occurrences", dispatch.route_occurrences, sweep.occurrences)
    dispatch.try_send("steps", dispatch.execute_steps, sweep.steps)
    dispatch.try_send("notifications", dispatch.send_notifications, sweep.notifications)
    counts = {
        "occurrences": len(sweep.occurrences),
        "steps": len(sweep.steps),
        "notifications": len(sweep.notifications),
    }
    if any(counts.values()):
        log.warning(
            "sweeper re-dispatched work not started in time %s",
            " ".join(f"{k}={v}" for k, v in counts.items()),
        )
    return counts


@app.task(name="caretaker.sweeper.open_change_windows", acks_late=True)
def open_change_windows() -> int:
    """While a change window is open, start the runs waiting for one. Idempotent."""
    config = get_config()
    window = open_window(config.change_windows, datetime.now(UTC))
    if window is None:
        return 0
    with transaction() as conn:
        first_steps = runs.resume_waiting(
            conn, CHANGE_WINDOW, f"change window {window.name} is open"
        )
    dispatch.try_send("first steps", dispatch.execute_steps, first_steps)
    if first_steps:
        log.info("change window open window=%s runs=%d", window.name, len(first_steps))
    return len(first_steps)

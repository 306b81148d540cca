"""Escalation to incidents and delivery of their notifications (queue `incidents`)."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from workers import incidents, notifier
from workers.app import app
from workers.config import get_config
from workers.db import Connection, transaction
from workers.errors import NotifyError
from workers.runs import Claim, Outcome, event
from workers.settings import get_settings

log = logging.getLogger(__name__)

SEVERITIES = ("critical", "warning", "info")
# Retries wait 5 s, 10 s, 20 s... up to MAX_BACKOFF_S, kept under the broker's visibility
# timeout so that a waiting retry is never delivered twice.
FIRST_BACKOFF_S = 5
MAX_BACKOFF_S = 120


class EscalateParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    severity: Literal["critical", "warning", "info"] | None = None
    reason: str = "escalated by runbook"
    failed_step_id: int | None = None


def escalate_step(conn: Connection, params: EscalateParams, claim: Claim) -> Outcome:
    """Open or append to the incident of the step's occurrence, in the step's transaction."""
    occurrence = claim.occurrence
    labels: dict[str, str] = occurrence["labels"]
    annotations: dict[str, str] = occurrence["annotations"]
    config = get_config()
    severity = params.severity or labels.get("severity", "")
    if severity not in SEVERITIES:
        severity = config.default_severity
    title = annotations.get("summary") or labels.get("alertname") or occurrence["fingerprint"]

    escalation = incidents.escalate(
        conn,
        source=occurrence["source"],
        dedup_key=occurrence["fingerprint"],
        severity=severity,
        title=title,
        labels=labels,
        reason=params.reason,
        truncated_alerts=occurrence["truncated_alerts"],
        config=config,
        run_id=claim.run["id"],
        occurrence_id=occurrence["id"],
    )
    log.warning(
        "escalated incident_id=%s run_id=%s opened=%s",
        escalation.incident_id,
        claim.run["id"],
        escalation.opened,
    )
    return Outcome(
        ok=True,
        result={
            "incident_id": escalation.incident_id,
            "opened": escalation.opened,
            "notifications": escalation.notification_ids,
        },
    )


@app.task(
    name="caretaker.incidents.send_notification",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def send_notification(self: Any, notification_id: int) -> str:
    """Deliver one queued notification. Idempotent (a sent one is not sent again); retried
    with exponential backoff up to CARETAKER_NOTIFY_MAX_RETRIES, then marked failed."""
    settings = get_settings()
    with transaction() as conn:
        row = conn.execute(
            "SELECT * FROM notifications WHERE id = %s FOR UPDATE", (notification_id,)
        ).fetchone()
        if row is None or row["status"] != "pending":
            return "nothing to do"
        attempts = row["attempts"] + 1
        try:
            notifier.deliver(
                get_config(), row["channel"], row["payload"], settings.notify_timeout_s
            )
        except NotifyError as exc:
            final = attempts > settings.notify_max_retries
            backoff_s = min(FIRST_BACKOFF_S * 2 ** (attempts - 1), MAX_BACKOFF_S)
            _record_failure(conn, row, attempts, str(exc), final, backoff_s)
            if final:
                log.error("notification failed notification_id=%s error=%s", row["id"], exc)
                return "failed"
            error = exc
        else:
            conn.execute(
                "UPDATE notifications SET status = 'sent', attempts = %s, sent_at = now(),"
                " error = NULL WHERE id = %s",
                (attempts, row["id"]),
            )
            event(
                conn,
                "notified",
                "caretaker",
                f"notified {row['channel']} ({row['event']})",
                incident_id=row["incident_id"],
            )
            return "sent"
    raise self.retry(exc=error, countdown=backoff_s)


def _record_failure(
    conn: Connection, row: Any, attempts: int, error: str, final: bool, backoff_s: float
) -> None:
    # dispatched_at is set to when the retry is due, so the sweeper's grace starts from there
    # and it does not send a second copy beside the scheduled retry.
    conn.execute(
        "UPDATE notifications SET attempts = %s, error = %s, status = %s,"
        " dispatched_at = now() + make_interval(secs => %s) WHERE id = %s",
        (attempts, error, "failed" if final else "pending", backoff_s, row["id"]),
    )
    if final:
        event(
            conn,
            "notify_failed",
            "caretaker",
            f"notifying {row['channel']} failed after {attempts} attempts: {error}",
            incident_id=row["incident_id"],
        )

"""Incidents: what a person must look at, one open per dedup key, with a timeline."""

from __future__ import annotations

import json
from dataclasses import dataclass

from workers.config import Config
from workers.db import Connection, Row
from workers.errors import Conflict, NotFound
from workers.runs import event

INCIDENT_STATUSES = ("open", "acknowledged", "resolved")
# Gravest first.
SEVERITY_ORDER = ("critical", "warning", "info")


@dataclass(frozen=True)
class Escalation:
    incident_id: int
    opened: bool
    notification_ids: list[int]


def escalate(
    conn: Connection,
    *,
    source: str,
    dedup_key: str,
    severity: str,
    title: str,
    labels: dict[str, str],
    reason: str,
    truncated_alerts: int,
    config: Config,
    run_id: int | None = None,
    occurrence_id: int | None = None,
    actor: str = "caretaker",
) -> Escalation:
    """Open an incident for dedup_key, or append to the open one; queue its notifications."""
    # The partial unique index admits one unresolved incident per key, so two workers escalating
    # at once end on the same row: one inserts, the other appends.
    row = conn.execute(
        """
        INSERT INTO incidents (source, dedup_key, status, severity, title, labels,
                               truncated_alerts)
        VALUES (%s, %s, 'open', %s, %s, %s, %s)
        ON CONFLICT (source, dedup_key) WHERE status <> 'resolved' DO UPDATE
           SET updated_at = now(),
               truncated_alerts = greatest(incidents.truncated_alerts, excluded.truncated_alerts),
               -- An escalation that is graver than the incident raises it, with its title.
               title = CASE WHEN array_position(%s::text[], excluded.severity)
                                 < array_position(%s::text[], incidents.severity)
                            THEN excluded.title ELSE incidents.title END,
               severity = CASE WHEN array_position(%s::text[], excluded.severity)
                                    < array_position(%s::text[], incidents.severity)
                               THEN excluded.severity ELSE incidents.severity END
        RETURNING id, (xmax = 0) AS opened
        """,
        (
            source,
            dedup_key,
            severity,
            title,
            json.dumps(labels),
            truncated_alerts,
            *[list(SEVERITY_ORDER)] * 4,
        ),
    ).fetchone()
    assert row is not None
    incident_id, opened = row["id"], row["opened"]
    # A run's occurrence is linked through the run. Its row is not touched here: the webhook
    # locks occurrences before runs, and a worker holding the run must not wait for it.
    if run_id is not None:
        conn.execute("UPDATE runs SET incident_id = %s WHERE id = %s", (incident_id, run_id))
    elif occurrence_id is not None:
        conn.execute(
            "UPDATE occurrences SET incident_id = %s WHERE id = %s", (incident_id, occurrence_id)
        )

    kind = "incident_opened" if opened else "incident_escalated"
    event(
        conn,
        kind,
        actor,
        reason,
        incident_id=incident_id,
        run_id=run_id,
        occurrence_id=occurrence_id,
        data={"severity": severity},
    )
    notification_ids = queue_notifications(
        conn, incident_id, "opened" if opened else "escalated", reason, config
    )
    return Escalation(incident_id, opened, notification_ids)


def queue_notifications(
    conn: Connection, incident_id: int, what: str, reason: str, config: Config
) -> list[int]:
    """Write one pending notification per channel in the caller's transaction (an outbox)."""
    incident = get(conn, incident_id)
    payload = {
        "event": what,
        "reason": reason,
        "incident": {
            key: incident[key]
            for key in ("id", "status", "severity", "title", "labels", "truncated_alerts")
        },
        "dedup_key": f"{incident['source']}:{incident['dedup_key']}",
    }
    ids = []
    for channel in config.notify.webhooks:
        row = conn.execute(
            """
            INSERT INTO notifications (incident_id, channel, event, payload, status, dispatched_at)
            VALUES (%s, %s, %s, %s, 'pending', now()) RETURNING id
            """,
            (incident_id, channel.name, what, json.dumps(payload, default=str)),
        ).fetchone()
        assert row is not None
        ids.append(row["id"])
    return ids


def get(conn: Connection, incident_id: int) -> Row:
    """One incident; NotFound when there is none with this id."""
    row = conn.execute("SELECT * FROM incidents WHERE id = %s", (incident_id,)).fetchone()
    if row is None:
        raise NotFound(f"no incident with id {incident_id}")
    return row


def list_incidents(conn: Connection, status: str | None = None, limit: int = 50) -> list[Row]:
    """Incidents, newest first, optionally of one status."""
    return conn.execute(
        """
        SELECT * FROM incidents WHERE %(status)s::text IS NULL OR status = %(status)s
         ORDER BY opened_at DESC, id DESC LIMIT %(limit)s
        """,
        {"status": status, "limit": limit},
    ).fetchall()


def timeline(conn: Connection, incident_id: int) -> list[Row]:
    """The incident's events and those of the runs and occurrences escalated into it."""
    return conn.execute(
        """
        SELECT e.* FROM events e
         WHERE e.incident_id = %(id)s
            OR e.run_id IN (SELECT id FROM runs WHERE incident_id = %(id)s)
            OR e.occurrence_id IN (SELECT id FROM occurrences WHERE incident_id = %(id)s
                                   UNION SELECT occurrence_id FROM runs WHERE incident_id = %(id)s)
         ORDER BY e.at, e.id
        """,
        {"id": incident_id},
    ).fetchall()


def set_status(
    conn: Connection, incident_id: int, status: str, person: str, config: Config
) -> tuple[Row, list[int]]:
    """Acknowledge or resolve an incident on a person's word; return it and its notifications."""
    # The row lock makes two people acting at once take turns; the second sees the first's act.
    current = conn.execute(
        "SELECT status FROM incidents WHERE id = %s FOR UPDATE", (incident_id,)
    ).fetchone()
    if current is None:
        raise NotFound(f"no incident with id {incident_id}")
    if current["status"] == "resolved" or current["status"] == status:
        raise Conflict(f"incident {incident_id} is already {current['status']}")
    column = "acknowledged" if status == "acknowledged" else "resolved"
    row = conn.execute(
        f"UPDATE incidents SET status = %s, {column}_at = now(), {column}_by = %s,"
        " updated_at = now() WHERE id = %s RETURNING *",
        (status, person, incident_id),
    ).fetchone()
    assert row is not None
    event(
        conn,
        f"incident_{status}",
        f"person:{person}",
        f"{status} by {person}",
        incident_id=incident_id,
    )
    what = "acknowledged" if status == "acknowledged" else "resolved"
    return row, queue_notifications(conn, incident_id, what, f"{what} by {person}", config)

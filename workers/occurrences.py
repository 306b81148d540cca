"""Recording alert occurrences: one row per firing episode, however often it is repeated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from workers.config import Config
from workers.db import Connection, Row
from workers.incidents import queue_notifications
from workers.payloads import Alert, Notification
from workers.runs import event

SOURCE_ALERTMANAGER = "alertmanager"
# Work a person (or caretaker on a person's behalf) asked for: a hotfix, a restore, an update.
SOURCE_MANUAL = "manual"


@dataclass
class Recorded:
    """What one notification changed, for the answer and the metrics."""

    new_ids: list[int] = field(default_factory=list)
    deduplicated: int = 0
    resolved: int = 0
    ignored: int = 0
    cancelled_runs: int = 0
    resolved_incidents: int = 0
    notification_ids: list[int] = field(default_factory=list)


def record_notification(conn: Connection, notification: Notification, config: Config) -> Recorded:
    """Record a notification's alerts in the caller's transaction, as one batch."""
    firing: dict[tuple[str, datetime], Alert] = {}
    resolved: dict[tuple[str, datetime], Alert] = {}
    for alert in notification.alerts:
        # Aware datetimes compare by instant: 08:15Z and 09:15+01:00 are one occurrence.
        key = (alert.fingerprint, alert.starts_at.astimezone(UTC))
        (firing if alert.status == "firing" else resolved)[key] = alert

    # Rows in one order in every transaction, so concurrent notifications of the same alerts
    # lock them in the same order and never deadlock.
    recorded = Recorded(deduplicated=len(notification.alerts) - len(firing) - len(resolved))
    if firing:
        _record_firing(conn, notification, [firing[k] for k in sorted(firing)], recorded)
    if resolved:
        _record_resolved(conn, [resolved[k] for k in sorted(resolved)], recorded, config)
    if notification.truncated_alerts:
        _note_truncation(conn, notification)
    return recorded


def _record_firing(
    conn: Connection, notification: Notification, alerts: list[Alert], recorded: Recorded
) -> None:
    rows = [
        {
            "fingerprint": alert.fingerprint,
            "starts_at": alert.starts_at.isoformat(),
            "labels": alert.labels,
            "annotations": alert.annotations,
            "generator_url": alert.generator_url,
        }
        for alert in alerts
    ]
    # One statement for the whole group: thousands of alerts in an outage are one round trip.
    # A repeat only refreshes last_seen_at; xmax = 0 tells a new row from a repeat.
    cursor = conn.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations,
                                 generator_url, group_key, truncated_alerts)
        SELECT %(source)s, x.fingerprint, x.starts_at, 'firing', x.labels, x.annotations,
               x.generator_url, %(group_key)s, %(truncated)s
          FROM jsonb_to_recordset(%(rows)s::jsonb) AS x(fingerprint text, starts_at timestamptz,
               labels jsonb, annotations jsonb, generator_url text)
        ON CONFLICT (source, fingerprint, starts_at) DO UPDATE
           SET last_seen_at = now(),
               truncated_alerts = greatest(occurrences.truncated_alerts, excluded.truncated_alerts)
        RETURNING id, (xmax = 0) AS inserted
        """,
        {
            "source": SOURCE_ALERTMANAGER,
            "group_key": notification.group_key,
            "truncated": notification.truncated_alerts,
            "rows": json.dumps(rows),
        },
    )
    for row in cursor.fetchall():
        if row["inserted"]:
            recorded.new_ids.append(row["id"])
        else:
            recorded.deduplicated += 1
    if recorded.new_ids:
        conn.execute(
            """
            INSERT INTO events (kind, actor, occurrence_id, message)
            SELECT 'occurrence_received', 'alertmanager', id, 'alert firing'
              FROM unnest(%s::bigint[]) AS id
            """,
            (recorded.new_ids,),
        )


def _record_resolved(
    conn: Connection, alerts: list[Alert], recorded: Recorded, config: Config
) -> None:
    rows = [
        {
            "fingerprint": a.fingerprint,
            "starts_at": a.starts_at.isoformat(),
            "ends_at": a.ends_at.isoformat() if a.ends_at else None,
            "labels": a.labels,
        }
        for a in alerts
    ]
    cursor = conn.execute(
        """
        UPDATE occurrences o
           SET status = 'resolved', ends_at = coalesce(x.ends_at, now()), resolved_at = now(),
               last_seen_at = now()
          FROM jsonb_to_recordset(%s::jsonb) AS x(fingerprint text, starts_at timestamptz,
               ends_at timestamptz)
         WHERE o.source = 'alertmanager' AND o.fingerprint = x.fingerprint
           AND o.starts_at = x.starts_at AND o.status = 'firing'
        RETURNING o.id, o.fingerprint
        """,
        (json.dumps(rows),),
    )
    closed = cursor.fetchall()
    recorded.resolved = len(closed)
    # A resolved alert never seen firing, or resolved already, changes nothing...
    recorded.ignored = len(alerts) - len(closed)
    if recorded.ignored:
        _remember_resolved(conn, rows)
    if not closed:
        return

    closing = close_occurrences(conn, SOURCE_ALERTMANAGER, closed, "alert resolved", config)
    recorded.cancelled_runs = closing.cancelled_runs
    recorded.resolved_incidents = closing.resolved_incidents
    recorded.notification_ids += closing.notification_ids


def _remember_resolved(conn: Connection, rows: list[dict[str, Any]]) -> None:
    # ...but it is kept, already resolved and routed: a firing notification of the same
    # episode arriving late (Alertmanager peers do not keep order) is then a repeat, and never
    # starts a run or opens an incident that nothing would resolve.
    conn.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, ends_at, status, labels,
                                 routed_at, resolved_at)
        SELECT 'alertmanager', x.fingerprint, x.starts_at, coalesce(x.ends_at, now()),
               'resolved', x.labels, now(), now()
          FROM jsonb_to_recordset(%s::jsonb) AS x(fingerprint text, starts_at timestamptz,
               ends_at timestamptz, labels jsonb)
        ON CONFLICT (source, fingerprint, starts_at) DO NOTHING
        """,
        (json.dumps(rows),),
    )


@dataclass
class Closed:
    cancelled_runs: int = 0
    resolved_incidents: int = 0
    notification_ids: list[int] = field(default_factory=list)


def close_occurrences(
    conn: Connection, source: str, closed: list[Row], reason: str, config: Config
) -> Closed:
    """After occurrences stopped firing: cancel their runs, resolve their incidents, notify.

    `closed` holds the (id, fingerprint) rows just set to resolved, in the caller's transaction.
    """
    ids = [row["id"] for row in closed]
    conn.execute(
        """
        INSERT INTO events (kind, actor, occurrence_id, message)
        SELECT 'occurrence_resolved', %s, id, %s FROM unnest(%s::bigint[]) AS id
        """,
        (source, reason, ids),
    )
    result = Closed(cancelled_runs=cancel_runs(conn, ids, reason, source))
    fingerprints = sorted({row["fingerprint"] for row in closed})
    resolved_ids = resolve_incidents_for(conn, source, fingerprints, reason)
    result.resolved_incidents = len(resolved_ids)
    for incident_id in resolved_ids:
        result.notification_ids += queue_notifications(
            conn, incident_id, "resolved", reason, config
        )
    return result


def record_manual(
    conn: Connection, fingerprint: str, labels: dict[str, str], summary: str, person: str
) -> int:
    """Record work asked for by `person` as a firing occurrence to route; return its id."""
    row = conn.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations)
        VALUES (%s, %s, now(), 'firing', %s, %s) RETURNING id
        """,
        (SOURCE_MANUAL, fingerprint, json.dumps(labels), json.dumps({"summary": summary})),
    ).fetchone()
    assert row is not None
    event(conn, "occurrence_received", person, summary, occurrence_id=row["id"])
    return int(row["id"])


def cancel_runs(
    conn: Connection,
    occurrence_ids: list[int],
    reason: str,
    actor: str,
    run_id: int | None = None,
) -> int:
    """Cancel the active runs of these occurrences (only `run_id`, when given) and skip their
    steps not yet started; a step already running finishes, its result recorded."""
    # Runs are locked before their steps, in the same order as the step tasks lock them.
    runs = conn.execute(
        """
        UPDATE runs SET status = 'cancelled', finished_at = now(), waiting_for = NULL
         WHERE occurrence_id = ANY(%s) AND status IN ('running', 'waiting')
           AND (%s::bigint IS NULL OR id = %s)
        RETURNING id
        """,
        (occurrence_ids, run_id, run_id),
    ).fetchall()
    run_ids = [row["id"] for row in runs]
    if not run_ids:
        return 0
    conn.execute(
        """
        UPDATE steps SET status = 'skipped', finished_at = now(), error = %s
         WHERE run_id = ANY(%s) AND status IN ('pending', 'waiting')
        """,
        (reason, run_ids),
    )
    conn.execute(
        """
        INSERT INTO events (kind, actor, run_id, message)
        SELECT 'run_cancelled', %s, id, %s FROM unnest(%s::bigint[]) AS id
        """,
        (actor, reason, run_ids),
    )
    return len(run_ids)


def resolve_incidents_for(
    conn: Connection, source: str, fingerprints: list[str], reason: str
) -> list[int]:
    """Resolve open incidents of these fingerprints that have no firing occurrence left."""
    rows = conn.execute(
        """
        UPDATE incidents i
           SET status = 'resolved', resolved_at = now(), resolved_by = %(source)s,
               updated_at = now()
         WHERE i.source = %(source)s AND i.dedup_key = ANY(%(keys)s) AND i.status <> 'resolved'
           AND NOT EXISTS (SELECT 1 FROM occurrences o
                            WHERE o.source = %(source)s AND o.fingerprint = i.dedup_key
                              AND o.status = 'firing')
        RETURNING i.id
        """,
        {"source": source, "keys": fingerprints},
    ).fetchall()
    ids = [row["id"] for row in rows]
    if ids:
        conn.execute(
            """
            INSERT INTO events (kind, actor, incident_id, message)
            SELECT 'incident_resolved', %s, id, %s FROM unnest(%s::bigint[]) AS id
            """,
            (source, reason, ids),
        )
    return ids


def _note_truncation(conn: Connection, notification: Notification) -> None:
    # Alertmanager dropped alerts from this group: show it on any open incident of the group.
    fingerprints = sorted({alert.fingerprint for alert in notification.alerts})
    rows = conn.execute(
        """
        UPDATE incidents SET truncated_alerts = greatest(truncated_alerts, %s), updated_at = now()
         WHERE source = 'alertmanager' AND dedup_key = ANY(%s) AND status <> 'resolved'
        RETURNING id
        """,
        (notification.truncated_alerts, fingerprints),
    ).fetchall()
    for row in rows:
        conn.execute(
            "INSERT INTO events (kind, actor, incident_id, message, data)"
            " VALUES ('alerts_truncated', 'alertmanager', %s, %s, %s)",
            (
                row["id"],
                f"alertmanager dropped {notification.truncated_alerts} alerts from the group",
                json.dumps({"truncated_alerts": notification.truncated_alerts}),
            ),
        )

"""Health-check results: their history, and a target's unhealthy episode as an occurrence."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from workers import incidents
from workers.config import CheckTarget, Config
from workers.db import Connection, Row
from workers.occurrences import close_occurrences
from workers.runs import event

SOURCE_CHECK = "check"
ACTOR = "health"


@dataclass
class Recorded:
    """What one result changed: an occurrence to route, notifications to send."""

    new_occurrence_id: int | None = None
    notification_ids: list[int] = field(default_factory=list)


def record_result(
    conn: Connection, group: str, target: CheckTarget, result: dict[str, Any], config: Config
) -> Recorded:
    """Store a result and move the target's episode on: open, escalate or close it."""
    # One episode per target: rounds that overlap must not open two.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"check:{target.name}",))
    conn.execute(
        """
        INSERT INTO check_results (target, grp, check_name, status, value, summary, details,
                                   duration_s)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        """,
        (
            target.name,
            group,
            target.check,
            result["status"],
            result["value"],
            result["summary"],
            json.dumps(result["details"], default=str),
            result["duration_s"],
        ),
    )
    episode = conn.execute(
        "SELECT * FROM occurrences WHERE source = %s AND fingerprint = %s AND status = 'firing'",
        (SOURCE_CHECK, target.name),
    ).fetchone()

    if result["status"] == "healthy":
        return _close(conn, episode, target, config) if episode else Recorded()
    severity = "critical" if result["status"] == "critical" else "warning"
    if episode is None:
        return _open(conn, group, target, severity, result)
    return _continue(conn, episode, target, severity, result, config)


def labels_of(group: str, target: CheckTarget, severity: str) -> dict[str, str]:
    """The labels runbooks match a check finding on, as they match alerts on theirs."""
    return {
        "alertname": "HealthCheck",
        "component": target.name,
        "group": group,
        "check": target.check,
        "severity": severity,
    }


def _open(
    conn: Connection, group: str, target: CheckTarget, severity: str, result: dict[str, Any]
) -> Recorded:
    row = conn.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations)
        VALUES (%s, %s, now(), 'firing', %s, %s) RETURNING id
        """,
        (
            SOURCE_CHECK,
            target.name,
            json.dumps(labels_of(group, target, severity)),
            json.dumps({"summary": f"{target.name}: {result['summary']}"}),
        ),
    ).fetchone()
    assert row is not None
    event(
        conn,
        "occurrence_received",
        ACTOR,
        f"health check {severity}: {result['summary']}",
        occurrence_id=row["id"],
    )
    return Recorded(new_occurrence_id=row["id"])


def _continue(
    conn: Connection,
    episode: Row,
    target: CheckTarget,
    severity: str,
    result: dict[str, Any],
    config: Config,
) -> Recorded:
    summary = f"{target.name}: {result['summary']}"
    conn.execute(
        "UPDATE occurrences SET last_seen_at = now(), annotations = %s WHERE id = %s",
        (json.dumps({"summary": summary}), episode["id"]),
    )
    if severity != "critical":
        return Recorded()
    if episode["labels"].get("severity") == "critical" and _incident_open(conn, target.name):
        return Recorded()

    # A warning that turned critical is a person's business now, whatever its recovery does;
    # so is a target still critical after a person resolved its incident.
    labels = episode["labels"] | {"severity": "critical"}
    conn.execute(
        "UPDATE occurrences SET labels = %s WHERE id = %s", (json.dumps(labels), episode["id"])
    )
    escalation = incidents.escalate(
        conn,
        source=SOURCE_CHECK,
        dedup_key=target.name,
        severity="critical",
        title=summary,
        labels=labels,
        reason=f"turned critical: {summary}",
        truncated_alerts=0,
        config=config,
        occurrence_id=episode["id"],
        actor=ACTOR,
    )
    return Recorded(notification_ids=escalation.notification_ids)


def _incident_open(conn: Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM incidents WHERE source = %s AND dedup_key = %s AND status <> 'resolved'",
        (SOURCE_CHECK, name),
    ).fetchone()
    return row is not None


def _close(conn: Connection, episode: Row, target: CheckTarget, config: Config) -> Recorded:
    closed = conn.execute(
        """
        UPDATE occurrences SET status = 'resolved', ends_at = now(), resolved_at = now()
         WHERE id = %s RETURNING id, fingerprint
        """,
        (episode["id"],),
    ).fetchall()
    closing = close_occurrences(
        conn, SOURCE_CHECK, closed, f"{target.name} is healthy again", config
    )
    return Recorded(notification_ids=closing.notification_ids)


def close_removed(conn: Connection, names: list[str], config: Config) -> list[int]:
    """End the episodes of targets no longer configured; return notifications to send."""
    closed = conn.execute(
        """
        UPDATE occurrences SET status = 'resolved', ends_at = now(), resolved_at = now()
         WHERE source = %s AND status = 'firing' AND NOT (fingerprint = ANY(%s))
        RETURNING id, fingerprint
        """,
        (SOURCE_CHECK, names),
    ).fetchall()
    if not closed:
        return []
    reason = "target removed from the configuration"
    return close_occurrences(conn, SOURCE_CHECK, closed, reason, config).notification_ids


def latest_results(conn: Connection, names: list[str]) -> list[Row]:
    """The latest stored result of each named target."""
    return conn.execute(
        """
        SELECT DISTINCT ON (target) target, grp, check_name, status, value, summary,
               duration_s, checked_at
          FROM check_results WHERE target = ANY(%s)
         ORDER BY target, checked_at DESC
        """,
        (names,),
    ).fetchall()


def prune_history(conn: Connection, keep_days: float) -> int:
    """Delete results older than keep_days; return how many."""
    cursor = conn.execute(
        "DELETE FROM check_results WHERE checked_at < now() - make_interval(secs => %s * 86400)",
        (keep_days,),
    )
    return cursor.rowcount

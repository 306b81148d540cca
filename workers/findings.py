"""Findings of analysis as occurrences: one firing occurrence per key while the finding lasts.

A finding is routed like an alert: a runbook may match its labels, and without one it is
escalated, so an anomalous series or a log spike holds one incident until it is normal again.
"""

from __future__ import annotations

import json

from workers.config import Config
from workers.db import Connection
from workers.occurrences import close_occurrences
from workers.runs import event

SOURCE_ANALYSIS = "analysis"
ACTOR = "analysis"


def raise_finding(conn: Connection, key: str, labels: dict[str, str], summary: str) -> int | None:
    """Open the finding `key`, or note that it goes on; return the id of a new occurrence,
    which the caller routes after commit, or None when it was already open."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"finding:{key}",))
    annotations = json.dumps({"summary": summary})
    updated = conn.execute(
        """
        UPDATE occurrences SET last_seen_at = now(), annotations = %s
         WHERE source = %s AND fingerprint = %s AND status = 'firing' RETURNING id
        """,
        (annotations, SOURCE_ANALYSIS, key),
    ).fetchone()
    if updated is not None:
        return None
    row = conn.execute(
        """
        INSERT INTO occurrences (source, fingerprint, starts_at, status, labels, annotations)
        VALUES (%s, %s, now(), 'firing', %s, %s) RETURNING id
        """,
        (SOURCE_ANALYSIS, key, json.dumps(labels), annotations),
    ).fetchone()
    assert row is not None
    event(conn, "occurrence_received", ACTOR, f"finding: {summary}", occurrence_id=row["id"])
    return int(row["id"])


def clear_finding(conn: Connection, key: str, reason: str, config: Config) -> list[int]:
    """End the finding `key` if it is open: its runs cancelled, its incident resolved; return
    the notifications to send after commit."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"finding:{key}",))
    closed = conn.execute(
        """
        UPDATE occurrences SET status = 'resolved', ends_at = now(), resolved_at = now()
         WHERE source = %s AND fingerprint = %s AND status = 'firing'
        RETURNING id, fingerprint
        """,
        (SOURCE_ANALYSIS, key),
    ).fetchall()
    if not closed:
        return []
    return close_occurrences(conn, SOURCE_ANALYSIS, closed, reason, config).notification_ids


def open_findings(conn: Connection, prefix: str) -> list[str]:
    """Keys of the open findings whose key starts with prefix."""
    rows = conn.execute(
        """
        SELECT fingerprint FROM occurrences
         WHERE source = %s AND status = 'firing' AND starts_with(fingerprint, %s)
        """,
        (SOURCE_ANALYSIS, prefix),
    ).fetchall()
    return [row["fingerprint"] for row in rows]

"""Read models of incidents and runs, as plain data for the CLI and any other front end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from workers import dispatch, incidents, reports
from workers.config import get_config
from workers.db import Row, transaction
from workers.errors import NotFound


def _plain(row: Row) -> dict[str, Any]:
    return {
        key: (value.isoformat() if isinstance(value, datetime) else value)
        for key, value in row.items()
    }


def incident_rows(status: str | None, limit: int) -> list[dict[str, Any]]:
    with transaction() as conn:
        return [_plain(row) for row in incidents.list_incidents(conn, status, limit)]


def incident_detail(incident_id: int) -> dict[str, Any]:
    with transaction() as conn:
        incident = _plain(incidents.get(conn, incident_id))
        incident["runs"] = [
            _plain(row)
            for row in conn.execute(
                "SELECT id, runbook, status, created_at, finished_at FROM runs"
                " WHERE incident_id = %s ORDER BY id",
                (incident_id,),
            ).fetchall()
        ]
        incident["timeline"] = [_plain(row) for row in incidents.timeline(conn, incident_id)]
    return incident


def change_incident(incident_id: int, status: str, person: str) -> dict[str, Any]:
    """Acknowledge or resolve an incident, then send its notifications."""
    with transaction() as conn:
        row, notification_ids = incidents.set_status(
            conn, incident_id, status, person, get_config()
        )
    dispatch.try_send("notifications", dispatch.send_notifications, notification_ids)
    return _plain(row)


def health_report(hours: float) -> dict[str, Any]:
    with transaction() as conn:
        return reports.health_report(conn, datetime.now(UTC), hours)


def run_rows(status: str | None, limit: int) -> list[dict[str, Any]]:
    with transaction() as conn:
        rows = conn.execute(
            """
            SELECT * FROM runs WHERE %(status)s::text IS NULL OR status = %(status)s
             ORDER BY id DESC LIMIT %(limit)s
            """,
            {"status": status, "limit": limit},
        ).fetchall()
    return [_plain(row) for row in rows]


def run_detail(run_id: int) -> dict[str, Any]:
    with transaction() as conn:
        run = conn.execute("SELECT * FROM runs WHERE id = %s", (run_id,)).fetchone()
        if run is None:
            raise NotFound(f"no run with id {run_id}")
        detail = _plain(run)
        detail["occurrence"] = _plain(
            conn.execute(
                "SELECT id, source, fingerprint, status, starts_at, labels FROM occurrences"
                " WHERE id = %s",
                (run["occurrence_id"],),
            ).fetchone()
            or {}
        )
        detail["steps"] = [
            _plain(row)
            for row in conn.execute(
                "SELECT * FROM steps WHERE run_id = %s ORDER BY position", (run_id,)
            ).fetchall()
        ]
        detail["events"] = [
            _plain(row)
            for row in conn.execute(
                "SELECT * FROM events WHERE run_id = %s ORDER BY at, id", (run_id,)
            ).fetchall()
        ]
    return detail


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as an aligned text table."""
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)
    ]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    text = str(value)
    if isinstance(value, str) and len(text) >= 19 and text[10] == "T":
        text = text[:19].replace("T", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def render_incident(detail: dict[str, Any]) -> str:
    lines = [
        f"incident {detail['id']}: {detail['title']}",
        f"  status {detail['status']}, severity {detail['severity']}, "
        f"opened {_cell(detail['opened_at'])}",
        f"  labels {detail['labels']}",
    ]
    if detail["truncated_alerts"]:
        lines.append(
            f"  alertmanager dropped {detail['truncated_alerts']} alerts from the group:"
            " this is not everything"
        )
    for run in detail["runs"]:
        lines.append(f"  run {run['id']} ({run['runbook']}): {run['status']}")
    lines.append("timeline:")
    lines += [
        f"  {_cell(e['at'])}  {e['kind']:<22} {e['actor']:<16} {e['message']}"
        for e in detail["timeline"]
    ]
    return "\n".join(lines)


def render_run(detail: dict[str, Any]) -> str:
    lines = [
        f"run {detail['id']} ({detail['runbook']}): {detail['status']}",
        f"  occurrence {detail['occurrence'].get('id')} labels "
        f"{detail['occurrence'].get('labels')}",
    ]
    for step in detail["steps"]:
        summary = (step["result"] or {}).get("summary") or step["error"] or ""
        lines.append(
            f"  {step['position']}. {step['name']:<16} {step['kind']:<9} "
            f"{step['status']:<10} {summary}"
        )
    lines.append("events:")
    lines += [f"  {_cell(e['at'])}  {e['kind']:<22} {e['message']}" for e in detail["events"]]
    return "\n".join(lines)

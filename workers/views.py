"""Read models of incidents and runs, as plain data for the CLI and any other front end."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from workers import dispatch, incidents, reports
from workers.config import get_config
from workers.db import Row, transaction
from workers.errors import Conflict, NotFound
from workers.occurrences import cancel_runs
from workers.settings import get_settings

# Every status a run can have, as the runs table allows them.
RUN_STATUSES = ("running", "waiting", "recovered", "escalated", "failed", "cancelled")


def _plain(row: Row) -> dict[str, Any]:
    # Times are stored in UTC and shown in UTC, whatever the session's time zone.
    return {
        key: (value.astimezone(UTC).isoformat() if isinstance(value, datetime) else value)
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


def cancel_run(run_id: int, person: str) -> dict[str, Any]:
    """Cancel a running or waiting run: its steps not yet started are skipped."""
    with transaction() as conn:
        row = conn.execute(
            "SELECT id, status, occurrence_id FROM runs WHERE id = %s FOR UPDATE", (run_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id}")
        if row["status"] not in ("running", "waiting"):
            raise Conflict(
                f"run {run_id} is {row['status']}: only a running or waiting run can be cancelled"
            )
        cancel_runs(conn, [row["occurrence_id"]], f"cancelled by {person}", person, run_id)
    return {"id": run_id, "status": "cancelled"}


def health_report(hours: float) -> dict[str, Any]:
    with transaction() as conn:
        return reports.health_report(
            conn, datetime.now(UTC), hours, reports.configured_targets(get_config())
        )


def latest_report(kind: str) -> dict[str, Any]:
    """The newest stored report of a kind, with its id and when it was made."""
    with transaction() as conn:
        row = reports.latest(conn, kind)
    if row is None:
        raise NotFound(f"no {kind} report stored yet")
    return row


def build_report(kind: str) -> dict[str, Any]:
    """Make a performance or capacity report now, in this process; store and return it."""
    now = datetime.now(UTC)
    if kind == "performance":
        from tasks.review import performance_review

        report = performance_review(get_config(), get_settings(), now)
    else:
        from tasks.capacity import capacity_report

        report = capacity_report(get_config(), get_settings(), now)
    with transaction() as conn:
        report["id"] = reports.store(conn, report)
    return report


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
    """Rows as an aligned text table; columns named *_at are shown as UTC times."""
    if not rows:
        return "(none)"
    cells = [
        [_when(row.get(c)) if c.endswith("_at") else _cell(row.get(c)) for c in columns]
        for row in rows
    ]
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
    return text if len(text) <= 60 else text[:57] + "..."


def _when(value: str | None) -> str:
    """A stored time (ISO 8601) as "YYYY-MM-DD HH:MM:SS UTC"; "-" when unset."""
    if value is None:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _took(started_at: str | None, finished_at: str | None) -> str:
    """Seconds from start to finish, as "12.34s"; "-" unless both are known."""
    if started_at is None or finished_at is None:
        return "-"
    elapsed = datetime.fromisoformat(finished_at) - datetime.fromisoformat(started_at)
    return f"{elapsed.total_seconds():.2f}s"


def render_incident(detail: dict[str, Any]) -> str:
    lines = [
        f"incident {detail['id']}: {detail['title']}",
        f"  status {detail['status']}, severity {detail['severity']}, "
        f"opened {_when(detail['opened_at'])}",
    ]
    for what in ("acknowledged", "resolved"):
        if detail.get(f"{what}_at"):
            lines.append(
                f"  {what} {_when(detail[f'{what}_at'])} by {detail.get(f'{what}_by') or '-'}"
            )
    lines.append(f"  labels {detail['labels']}")
    if detail["truncated_alerts"]:
        lines.append(
            f"  alertmanager dropped {detail['truncated_alerts']} alerts from the group:"
            " this is not everything"
        )
    for run in detail["runs"]:
        lines.append(
            f"  run {run['id']} ({run['runbook']}): {run['status']}, started"
            f" {_when(run['created_at'])}, took {_took(run['created_at'], run['finished_at'])}"
        )
    lines.append("timeline:")
    lines += [
        f"  {_when(e['at'])}  {e['kind']:<22} {e['actor']:<16} {e['message']}"
        for e in detail["timeline"]
    ]
    return "\n".join(lines)


def render_run(detail: dict[str, Any]) -> str:
    lines = [
        f"run {detail['id']} ({detail['runbook']}): {detail['status']}",
        f"  started {_when(detail['created_at'])}, finished {_when(detail['finished_at'])}",
        f"  occurrence {detail['occurrence'].get('id')} labels "
        f"{detail['occurrence'].get('labels')}",
    ]
    lines += [_step_line(step) for step in detail["steps"]]
    lines.append("events:")
    lines += [f"  {_when(e['at'])}  {e['kind']:<22} {e['message']}" for e in detail["events"]]
    return "\n".join(lines)


def _step_line(step: dict[str, Any]) -> str:
    result = step["result"] or {}
    summary = result.get("summary") or step["error"] or ""
    took = _took(step["started_at"], step["finished_at"])
    line = (
        f"  {step['position']}. {step['name']:<22} {step['kind']:<9} {step['status']:<10} {took:>8}"
    )
    if step["kind"] == "recover" and "exit_code" in result:
        line += f"  {_command_outcome(result)}"
    elif step["kind"] == "recover" and result and not summary:
        # A built-in action: what it did, briefly (the names of what it made, for instance).
        summary = _brief(result)
    return f"{line}  {summary}".rstrip()


def _command_outcome(result: dict[str, Any]) -> str:
    if result.get("timed_out"):
        return "timed out"
    exit_code = result.get("exit_code")
    return "did not start" if exit_code is None else f"exit {exit_code}"


def _brief(result: dict[str, Any], limit: int = 100) -> str:
    shown = ", ".join(
        f"{key}={value}" for key, value in result.items() if isinstance(value, str | int | float)
    )
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."

"""Reports built from the stored records: the daily health report."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from workers.config import Config
from workers.db import Connection
from workers.health import SOURCE_CHECK

RANKS = ("healthy", "unknown", "warning", "critical")


def health_report(
    conn: Connection,
    end_at: datetime,
    hours: float = 24.0,
    configured: list[tuple[str, str, str]] | None = None,
) -> dict[str, Any]:
    """Per target: results, share healthy, worst and latest status, episodes; and incidents.

    `configured` lists (group, target, check) of the targets that should have been checked:
    one with no result in the period is reported as not checked, not left out.
    """
    start_at = end_at - timedelta(hours=hours)
    window = {"start": start_at, "end": end_at, "source": SOURCE_CHECK}
    targets = conn.execute(
        """
        SELECT r.target, r.grp AS "group", r.check_name AS "check", count(*) AS results,
               round(100.0 * count(*) FILTER (WHERE r.status = 'healthy') / count(*), 1)
                   AS healthy_pct,
               max(array_position(%(ranks)s::text[], r.status)) AS worst_rank,
               (array_agg(r.status ORDER BY r.checked_at DESC))[1] AS latest,
               (array_agg(r.summary ORDER BY r.checked_at DESC))[1] AS latest_summary,
               (SELECT count(*) FROM occurrences o
                 WHERE o.source = %(source)s AND o.fingerprint = r.target
                   AND o.starts_at < %(end)s
                   AND coalesce(o.ends_at, 'infinity') >= %(start)s) AS episodes
          FROM check_results r
         WHERE r.checked_at >= %(start)s AND r.checked_at < %(end)s
         GROUP BY r.target, r.grp, r.check_name
         ORDER BY r.grp, r.target
        """,
        window | {"ranks": list(RANKS)},
    ).fetchall()
    incidents = conn.execute(
        """
        SELECT count(*) FILTER (WHERE opened_at >= %(start)s AND opened_at < %(end)s) AS opened,
               count(*) FILTER (WHERE resolved_at >= %(start)s AND resolved_at < %(end)s)
                   AS resolved,
               count(*) FILTER (WHERE status <> 'resolved') AS open
          FROM incidents WHERE source = %(source)s
        """,
        window,
    ).fetchone()

    rows = [_target(row) for row in targets]
    checked = {row["target"] for row in rows}
    rows += [
        _not_checked(group, name, check)
        for group, name, check in configured or []
        if name not in checked
    ]
    return {
        "kind": "health",
        "period_start": start_at.isoformat(),
        "period_end": end_at.isoformat(),
        "overall": max((row["latest"] for row in rows), key=RANKS.index, default="unknown"),
        "targets": rows,
        "incidents": dict(incidents or {}),
    }


def _target(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["worst"] = RANKS[row.pop("worst_rank") - 1]
    row["healthy_pct"] = float(row["healthy_pct"])
    return row


def _not_checked(group: str, name: str, check: str) -> dict[str, Any]:
    return {
        "target": name,
        "group": group,
        "check": check,
        "results": 0,
        "healthy_pct": 0.0,
        "worst": "unknown",
        "latest": "unknown",
        "latest_summary": "not checked in this period",
        "episodes": 0,
    }


def configured_targets(config: Config) -> list[tuple[str, str, str]]:
    """(group, target, check) of every configured target, for health_report."""
    return [(group, target.name, target.check) for group, target in config.checks.targets()]


def store(conn: Connection, report: dict[str, Any]) -> int:
    """Keep a report; return its id."""
    row = conn.execute(
        """
        INSERT INTO reports (kind, period_start, period_end, body)
        VALUES (%s, %s, %s, %s) RETURNING id
        """,
        (report["kind"], report["period_start"], report["period_end"], json.dumps(report)),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def latest(conn: Connection, kind: str) -> dict[str, Any] | None:
    """The newest stored report of a kind, with its id, or None."""
    row = conn.execute(
        "SELECT id, body FROM reports WHERE kind = %s ORDER BY created_at DESC, id DESC LIMIT 1",
        (kind,),
    ).fetchone()
    return None if row is None else dict(row["body"]) | {"id": row["id"]}


def render_health(report: dict[str, Any]) -> str:
    """The health report as text for a terminal."""
    lines = [
        f"health report {report['period_start'][:16]} .. {report['period_end'][:16]} UTC:"
        f" overall {report['overall']}",
        f"incidents: {report['incidents'].get('opened', 0)} opened,"
        f" {report['incidents'].get('resolved', 0)} resolved,"
        f" {report['incidents'].get('open', 0)} open",
    ]
    if not report["targets"]:
        lines.append("no check results in this period")
    for t in report["targets"]:
        lines.append(
            f"  {t['group']:<12} {t['target']:<24} {t['latest']:<9} worst {t['worst']:<9}"
            f" {t['healthy_pct']:>5.1f}% healthy of {t['results']}, {t['episodes']} episodes"
            f"  {t['latest_summary']}"
        )
    return "\n".join(lines)


def render_capacity(report: dict[str, Any]) -> str:
    """The capacity report as text for a terminal: worst level first."""
    lines = [
        f"capacity report {report['period_end'][:16]} UTC: overall {report['overall'] or 'n/a'}"
    ]
    if not report["series"]:
        lines.append("no usage series configured (analysis.capacity)")
    for e in report["series"]:
        if "error" in e:
            lines.append(f"  {e['key']:<32} error: {e['error']}")
            continue
        days = "never" if e["days_to_threshold"] is None else f"{e['days_to_threshold']:g} d"
        lines.append(
            f"  {e['key']:<32} {e['level'] or '-':<8} now {e['current']:.4g},"
            f" {e['slope_per_day']:+.3g}/day; in {e['horizon_days']:g} d {e['forecast']:.4g}"
            f" ({e['lower']:.4g} .. {e['upper']:.4g}); {e['threshold']:g} in {days}"
        )
        lines.append(f"  {'':<32} {e['recommendation']}")
    return "\n".join(lines)


def render_performance(report: dict[str, Any]) -> str:
    """The weekly performance review as text for a terminal."""
    lines = [f"performance review {report['period_start'][:16]} .. {report['period_end'][:16]} UTC"]
    if not report["series"] and not report["databases"]:
        lines.append("no series or databases configured (analysis.series, review_databases)")
    for e in report["series"]:
        if "error" in e:
            lines.append(f"  {e['key']:<32} error: {e['error']}")
        elif not e.get("points"):
            lines.append(f"  {e['key']:<32} no data this week")
        else:
            week, change = e["week"], e["change_pct"]
            lines.append(
                f"  {e['key']:<32} median {week['median']:.4g} ({_pct(change['median'])}),"
                f" p95 {week['p95']:.4g} ({_pct(change['p95'])}), max {week['max']:.4g},"
                f" {len(e['anomalies'])} anomalies in {e['points']} points"
            )
    for db in report["databases"]:
        if not db.get("available"):
            lines.append(f"  database {db['target']}: {db.get('reason')}")
            continue
        lines.append(f"  database {db['target']}: slowest statements by total time")
        for q in db["queries"]:
            text = " ".join(str(q["query"]).split())[:70]
            lines.append(
                f"    {q['total_ms']:>10.0f} ms {q['share_pct']:>5.1f}%"
                f" {q['calls']:>8} calls {q['mean_ms']:>9.2f} ms  {text}"
            )
    lines.append("recommendations:")
    lines += [f"  - {item}" for item in report["recommendations"]]
    return "\n".join(lines)


def _pct(change: float | None) -> str:
    return "n/a" if change is None else f"{change:+g}% week on week"


def render_maintenance(report: dict[str, Any]) -> str:
    """The database maintenance report as text for a terminal: each database, each table."""
    lines = [
        f"maintenance {report['period_start'][:16]} .. {report['period_end'][:16]} UTC:"
        f" overall {report['overall']}; tables {report['tables_ok']} ok,"
        f" {report['tables_failed']} failed, {report['tables_skipped']} skipped"
    ]
    if not report["databases"]:
        lines.append("no databases configured (backups.databases)")
    for database in report["databases"]:
        lines += _maintained_database(database)
    return "\n".join(lines)


def _maintained_database(db: dict[str, Any]) -> list[str]:
    where = f" ({db['server']}/{db['dbname']})" if db["server"] else ""
    lines = [
        f"  database {db['name']}{where}: {db['status']},"
        f" {len(db['tables'])} tables in {db['seconds']:.1f} s"
    ]
    if db["error"]:
        lines.append(f"    error: {db['error']}")
    for table in db["tables"]:
        lines.append(f"    {table['table']:<40} {table['status']:<7} {table['seconds']:>7.2f} s")
        before = table["before"]
        if before is not None:
            lines.append(
                f"      dead {_share(before['dead_pct'])} free {_share(before['free_pct'])}"
                f" ({before['source']}), table {_size(before['table_bytes'])},"
                f" indexes {_size(before['index_bytes'])}, last vacuum {_last_vacuum(before)};"
                f" dead tuples {_count(before['dead_tuples'])} ->"
                f" {_count(table['dead_tuples_after'])}"
            )
        if table["error"]:
            lines.append(f"      error: {table['error']}")
    statements = db["statements"]
    if statements is not None:
        lines.append(f"    pg_stat_statements {statements['action']}: {statements['reason']}")
    return lines


def _share(pct: float | None) -> str:
    return "-" if pct is None else f"{pct:.1f}%"


def _size(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "-"
    size = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _last_vacuum(before: dict[str, Any]) -> str:
    # ISO 8601 times in UTC compare as text.
    times = [before["last_vacuum_at"], before["last_autovacuum_at"]]
    latest = max((at for at in times if at), default=None)
    return "never" if latest is None else f"{latest[:16]} UTC"

"""Prometheus metrics of the webhook service."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from workers.db import Connection, Row, transaction
from workers.errors import DatabaseUnavailable
from workers.health import latest_results

ALERTS_RECEIVED = Counter(
    "caretaker_alerts_received",
    "Alerts received from Alertmanager, by their own status.",
    ["status"],
)
ALERTS_NEW = Counter("caretaker_alerts_new", "Alerts recorded as new occurrences.")
ALERTS_DEDUPLICATED = Counter(
    "caretaker_alerts_deduplicated", "Firing alerts already recorded: repeats of a notification."
)
ALERTS_IGNORED = Counter(
    "caretaker_alerts_ignored", "Resolved alerts never seen firing, or already resolved."
)
WEBHOOK_REJECTED = Counter(
    "caretaker_webhook_rejected", "Webhook requests refused, by reason.", ["reason"]
)
TRUNCATED_ALERTS = Counter(
    "caretaker_alerts_truncated", "Alerts Alertmanager reported dropping from its groups."
)
COMMIT_SECONDS = Histogram(
    "caretaker_webhook_commit_seconds", "Time to validate and commit one notification."
)
DISPATCH_SECONDS = Histogram(
    "caretaker_webhook_dispatch_seconds", "Time to hand a notification's new work to the broker."
)


# Values of caretaker_check_status, documented in the README.
STATUS_VALUES = {"healthy": 0, "warning": 1, "critical": 2, "unknown": 3}


class StoredMetrics(Collector):
    """Check, run and heartbeat metrics read from PostgreSQL at scrape time.

    Checks and steps run in many worker processes on many hosts; the database has all of their
    results, so one scrape of the webhook sees the whole system.
    """

    def __init__(self, target_names: Callable[[], list[str]]) -> None:
        self.target_names = target_names

    def collect(self) -> Iterator[Metric]:
        try:
            with transaction() as conn:
                readings = _read(conn, self.target_names())
        except DatabaseUnavailable:
            yield GaugeMetricFamily(
                "caretaker_metrics_database_up",
                "Whether the stored metrics could be read.",
                value=0,
            )
            return
        yield GaugeMetricFamily(
            "caretaker_metrics_database_up", "Whether the stored metrics could be read.", value=1
        )
        yield from _check_families(readings["checks"])
        yield from _run_families(readings["runs"], readings["steps"])
        yield from _heartbeat_families(readings["heartbeats"])
        yield _notification_family(readings["notifications"])


def _read(conn: Connection, names: list[str]) -> dict[str, list[Row]]:
    return {
        "checks": latest_results(conn, names),
        "runs": conn.execute(
            "SELECT runbook, status, count(*) AS n FROM runs GROUP BY runbook, status"
        ).fetchall(),
        "steps": conn.execute(
            """
            SELECT kind, status, count(*) AS n,
                   coalesce(sum(extract(epoch FROM finished_at - started_at)), 0) AS seconds
              FROM steps WHERE status IN ('succeeded', 'failed') GROUP BY kind, status
            """
        ).fetchall(),
        "notifications": conn.execute(
            "SELECT channel, status, count(*) AS n FROM notifications GROUP BY channel, status"
        ).fetchall(),
        "heartbeats": conn.execute(
            "SELECT name, extract(epoch FROM at) AS at FROM heartbeats"
        ).fetchall(),
    }


def _check_families(rows: list[Row]) -> Iterator[Metric]:
    labels = ["component", "group", "check"]
    status = GaugeMetricFamily(
        "caretaker_check_status",
        "Latest status of a check: 0 healthy, 1 warning, 2 critical, 3 unknown.",
        labels=labels,
    )
    value = GaugeMetricFamily(
        "caretaker_check_value", "Latest value a check measured.", labels=labels
    )
    duration = GaugeMetricFamily(
        "caretaker_check_duration_seconds", "How long the latest check took.", labels=labels
    )
    checked = GaugeMetricFamily(
        "caretaker_check_timestamp_seconds",
        "When the latest check ran, as a Unix time.",
        labels=labels,
    )
    for row in rows:
        key = [row["target"], row["grp"], row["check_name"]]
        status.add_metric(key, STATUS_VALUES[row["status"]])
        duration.add_metric(key, row["duration_s"])
        checked.add_metric(key, row["checked_at"].timestamp())
        if row["value"] is not None:
            value.add_metric(key, row["value"])
    yield from (status, value, duration, checked)


def _run_families(runs: list[Row], steps: list[Row]) -> Iterator[Metric]:
    by_status = GaugeMetricFamily(
        "caretaker_runs", "Stored runs by runbook and status.", labels=["runbook", "status"]
    )
    for row in runs:
        by_status.add_metric([row["runbook"], row["status"]], row["n"])
    finished = GaugeMetricFamily(
        "caretaker_steps_finished",
        "Stored finished steps by kind and outcome.",
        labels=["kind", "status"],
    )
    seconds = GaugeMetricFamily(
        "caretaker_steps_seconds",
        "Total running time of the stored finished steps.",
        labels=["kind", "status"],
    )
    for row in steps:
        finished.add_metric([row["kind"], row["status"]], row["n"])
        seconds.add_metric([row["kind"], row["status"]], float(row["seconds"]))
    yield from (by_status, finished, seconds)


def _heartbeat_families(rows: list[Row]) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "caretaker_heartbeat_timestamp_seconds",
        "When a periodic job (beat, sweeper, health_round) last ran, as a Unix time.",
        labels=["name"],
    )
    for row in rows:
        family.add_metric([row["name"]], float(row["at"]))
    yield family


def _notification_family(rows: list[Row]) -> Metric:
    family = GaugeMetricFamily(
        "caretaker_notifications",
        "Stored notifications by channel and status (pending, sent, failed).",
        labels=["channel", "status"],
    )
    for row in rows:
        family.add_metric([row["channel"], row["status"]], row["n"])
    return family

"""Analysis on a schedule (queue `analysis`): anomaly detection, the weekly performance review
and the monthly capacity plan. pandas and scipy are imported when a task runs, not with the
worker, so the other queues' processes never load them."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import redis

from workers import dispatch, findings, reports
from workers.app import app
from workers.config import get_config
from workers.db import transaction
from workers.errors import SourceError
from workers.settings import get_settings

log = logging.getLogger(__name__)

# Seconds a detection run may hold its lock: past this a stuck run no longer blocks the next.
DETECTION_LOCK_S = 900


@app.task(name="caretaker.analysis.detect_anomalies", acks_late=True, reject_on_worker_lost=True)
def detect_anomalies() -> dict[str, Any]:
    """Score each configured series' new points against its stored baseline; raise a finding
    for an anomalous series, clear it when the series is normal again, learn from normal data
    only. Skipped while the previous run still works. Idempotent; not retried."""
    from tasks.detection import detect_series

    settings, config = get_settings(), get_config()
    lock = redis.Redis.from_url(settings.broker_url).lock(
        "caretaker:anomaly-detection", timeout=DETECTION_LOCK_S, blocking=False
    )
    if not lock.acquire():
        log.warning("anomaly detection skipped: the previous run is still working")
        return {"skipped": "the previous run is still working"}
    now = datetime.now(UTC)
    outcome: dict[str, Any] = {}
    new_ids: list[int] = []
    notification_ids: list[int] = []
    try:
        for spec in config.analysis.series:
            try:
                judged = detect_series(spec, now, settings, config)
            except SourceError as exc:
                log.warning("anomaly detection source failed series=%s error=%s", spec.name, exc)
                outcome[spec.name] = {"status": "error", "message": str(exc)}
                continue
            notification_ids += _clear_vanished(spec.name, {item.key for item in judged})
            for item in judged:
                outcome[item.key] = {"status": item.status, "message": item.message}
                new_ids += [item.new_occurrence_id] if item.new_occurrence_id else []
                notification_ids += item.notification_ids
        notification_ids += _clear_removed({spec.name for spec in config.analysis.series})
    finally:
        lock.release()
    dispatch.try_send("routing", dispatch.route_occurrences, new_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, notification_ids)
    anomalous = sum(1 for item in outcome.values() if item["status"] == "anomalous")
    log.info("anomaly detection done series=%d anomalous=%d", len(outcome), anomalous)
    return outcome


def _clear_vanished(name: str, reported: set[str]) -> list[int]:
    """End the findings of a series' label sets the source no longer reports (a pod that
    went away): nothing would ever score them normal again."""
    from tasks.detection import FINDING_PREFIX

    notification_ids: list[int] = []
    with transaction() as conn:
        for key in findings.open_findings(conn, f"{FINDING_PREFIX}{name}"):
            series = key.removeprefix(FINDING_PREFIX)
            mine = series == name or series.startswith(name + "{")
            if mine and series not in reported:
                reason = f"{series} is no longer reported by its source"
                notification_ids += findings.clear_finding(conn, key, reason, get_config())
    return notification_ids


def _clear_removed(configured: set[str]) -> list[int]:
    """End the findings of series no longer configured; return notifications to send."""
    from tasks.detection import FINDING_PREFIX

    notification_ids: list[int] = []
    with transaction() as conn:
        for key in findings.open_findings(conn, FINDING_PREFIX):
            name = key.removeprefix(FINDING_PREFIX).split("{", 1)[0]
            if name not in configured:
                reason = f"{name} removed from the configuration"
                notification_ids += findings.clear_finding(conn, key, reason, get_config())
    return notification_ids


@app.task(name="caretaker.analysis.performance_review", acks_late=True, reject_on_worker_lost=True)
def performance_review() -> int:
    """Review the past week and store the report; return its id. Harmless twice (one more
    report) unless statements are reset after reading; not retried."""
    from tasks.review import performance_review as review

    report = review(get_config(), get_settings(), datetime.now(UTC))
    with transaction() as conn:
        report_id = reports.store(conn, report)
    log.info(
        "performance review stored report_id=%s recommendations=%d",
        report_id,
        len(report["recommendations"]),
    )
    return report_id


@app.task(name="caretaker.analysis.capacity_plan", acks_late=True, reject_on_worker_lost=True)
def capacity_plan() -> int:
    """Forecast every usage series and store the capacity report; return its id. Harmless
    twice; not retried."""
    from tasks.capacity import capacity_report

    report = capacity_report(get_config(), get_settings(), datetime.now(UTC))
    with transaction() as conn:
        report_id = reports.store(conn, report)
    log.info("capacity plan stored report_id=%s overall=%s", report_id, report["overall"])
    return report_id

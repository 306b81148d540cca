"""Health checks on demand and in rounds (queue `checks`): results recorded, findings acted on."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import redis

from tasks.actions import run_check
from tasks.sweeper import heartbeat
from workers import dispatch, health, reports
from workers.app import app
from workers.config import CheckTarget, Config, get_config
from workers.db import transaction
from workers.settings import get_settings

log = logging.getLogger(__name__)


# A round's checks run side by side in threads: they wait on the network, and a target that
# hangs holds one thread until its own deadline, not a worker process or the rest of the round.
ROUND_THREADS = 16
# Seconds a round may hold its lock: past this a stuck round no longer blocks the next one.
ROUND_LOCK_S = 600


@app.task(name="caretaker.health.run_round", acks_late=True, reject_on_worker_lost=True)
def run_round() -> int:
    """Check every configured target, side by side, and record the results; close the
    episodes of targets no longer configured; prune history. Skipped while the previous round
    still runs, so slow targets never pile rounds up. Idempotent; not retried."""
    settings = get_settings()
    config = get_config()
    targets = config.checks.targets()
    lock = redis.Redis.from_url(settings.broker_url).lock(
        "caretaker:health-round", timeout=ROUND_LOCK_S, blocking=False
    )
    if not lock.acquire():
        log.warning("health round skipped: the previous round is still running")
        return 0
    try:
        with ThreadPoolExecutor(ROUND_THREADS, thread_name_prefix="round") as pool:
            list(pool.map(lambda found: _check_and_record(found[0], found[1], config), targets))
        with transaction() as conn:
            closed = health.close_removed(conn, [t.name for _, t in targets], config)
            pruned = health.prune_history(conn, settings.check_history_days)
            heartbeat(conn, "health_round")
    finally:
        lock.release()
    dispatch.try_send("notifications", dispatch.send_notifications, closed)
    log.info("health round done targets=%d pruned=%d", len(targets), pruned)
    return len(targets)


@app.task(name="caretaker.health.check_target", acks_late=True, reject_on_worker_lost=True)
def check_target(name: str) -> dict[str, Any]:
    """Check one configured target and record the result; open, escalate or close its episode.
    Read-only towards the target. A duplicate adds one history row; not retried."""
    config = get_config()
    found = config.checks.find(name)
    if found is None:
        log.warning("check of an unknown target name=%s", name)
        return {"status": "unknown", "summary": f"no target named {name!r} in the configuration"}
    return _check_and_record(*found, config)


def _check_and_record(group: str, target: CheckTarget, config: Config) -> dict[str, Any]:
    result = run_check(target.action, target.params).model_dump()
    with transaction() as conn:
        recorded = health.record_result(conn, group, target, result, config)

    if recorded.new_occurrence_id is not None:
        dispatch.try_send("routing", dispatch.route_occurrences, [recorded.new_occurrence_id])
    dispatch.try_send("notifications", dispatch.send_notifications, recorded.notification_ids)
    return result


@app.task(name="caretaker.health.report_daily", acks_late=True, reject_on_worker_lost=True)
def report_daily() -> int:
    """Build and store the health report of the last 24 hours; return its id. Each run stores
    one more report (harmless twice); not retried."""
    with transaction() as conn:
        configured = reports.configured_targets(get_config())
        report = reports.health_report(conn, datetime.now(UTC), configured=configured)
        report_id = reports.store(conn, report)
    log.info("health report stored report_id=%s overall=%s", report_id, report["overall"])
    return report_id


@app.task(name="caretaker.health.record_beat_tick", acks_late=True)
def record_beat_tick() -> None:
    """Record that beat is alive. Idempotent."""
    with transaction() as conn:
        heartbeat(conn, "beat")


def _on_demand(action: str, params: dict[str, Any]) -> dict[str, Any]:
    result = run_check(action, params)
    log.info("check %s status=%s %s", action, result.status, result.summary)
    return result.model_dump()


@app.task(name="caretaker.health.check_http", acks_late=True, reject_on_worker_lost=True)
def check_http(**params: Any) -> dict[str, Any]:
    """Check an HTTP endpoint. Read-only and idempotent; not retried; records nothing."""
    return _on_demand("check_http", params)


@app.task(name="caretaker.health.check_system", acks_late=True, reject_on_worker_lost=True)
def check_system(**params: Any) -> dict[str, Any]:
    """Check the worker's host: CPU, memory, disks. Read-only; not retried; records nothing."""
    return _on_demand("check_system", params)


@app.task(name="caretaker.health.check_tls", acks_late=True, reject_on_worker_lost=True)
def check_tls(**params: Any) -> dict[str, Any]:
    """Check a TLS endpoint's certificate: days to expiry, trust, hostname. Read-only."""
    return _on_demand("check_tls", params)


@app.task(name="caretaker.health.check_dns", acks_late=True, reject_on_worker_lost=True)
def check_dns(**params: Any) -> dict[str, Any]:
    """Check that a name resolves, optionally to expected answers. Read-only."""
    return _on_demand("check_dns", params)


@app.task(name="caretaker.health.check_queues", acks_late=True, reject_on_worker_lost=True)
def check_queues(**params: Any) -> dict[str, Any]:
    """Check caretaker itself: queue depths, workers, beat and sweeper. Read-only."""
    return _on_demand("check_queues", params)


@app.task(name="caretaker.health.check_postgres", acks_late=True, reject_on_worker_lost=True)
def check_postgres(**params: Any) -> dict[str, Any]:
    """Check a PostgreSQL server: connections, long queries, idle transactions, replica lag.
    Read-only."""
    return _on_demand("check_postgres", params)


@app.task(name="caretaker.health.check_redis", acks_late=True, reject_on_worker_lost=True)
def check_redis(**params: Any) -> dict[str, Any]:
    """Check a Redis server: ping, memory, hit rate, evictions, clients. Read-only."""
    return _on_demand("check_redis", params)

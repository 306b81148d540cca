"""caretaker watching itself: queue depths, live workers, beat ticks and sweeper passes."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from tasks.checks import CheckResult, Params, Status, grade, run_within, timed, worst
from workers.app import QUEUES, app
from workers.db import transaction
from workers.dispatch import queue_depths
from workers.errors import BrokerUnavailable, DatabaseUnavailable


class QueuesParams(Params):
    queues: list[str] = list(QUEUES)
    depth_warning: int = Field(default=100, ge=1)
    depth_critical: int = Field(default=1000, ge=1)
    min_workers: int = Field(default=1, ge=0)
    worker_timeout_s: float = Field(default=2.0, gt=0, le=30)
    beat_max_age_s: float = Field(default=120.0, gt=0)
    sweeper_max_age_s: float = Field(default=180.0, gt=0)
    timeout_s: float = Field(default=3.0, gt=0, le=30)


def check_queues(params: QueuesParams) -> CheckResult:
    """Depth of each queue, workers answering a ping, and the age of beat's and the sweeper's
    last sign of life. A deep queue, no worker or a silent beat is a finding."""
    started = time.monotonic()
    statuses: list[Status] = []
    problems: list[str] = []
    details: dict[str, Any] = {}
    for part in (_depths, _workers, _heartbeats):
        part(params, details, statuses, problems)

    summary = "; ".join(problems) if problems else "queues flowing, workers and beat alive"
    deepest = max(details.get("depths", {}).values(), default=0)
    return timed(started, worst(statuses), summary, details, value=float(deepest))


def _depths(
    params: QueuesParams, details: dict[str, Any], statuses: list[Status], problems: list[str]
) -> None:
    try:
        depths = queue_depths(params.queues, params.timeout_s)
    except BrokerUnavailable as exc:
        statuses.append("critical")
        problems.append(str(exc))
        return
    details["depths"] = depths
    for queue, depth in depths.items():
        status = grade(depth, params.depth_warning, params.depth_critical)
        statuses.append(status)
        if status != "healthy":
            problems.append(f"queue {queue} holds {depth} messages")


def _workers(
    params: QueuesParams, details: dict[str, Any], statuses: list[Status], problems: list[str]
) -> None:
    try:
        replies = run_within(
            lambda: app.control.ping(timeout=params.worker_timeout_s),
            params.worker_timeout_s + params.timeout_s,
            "check-queues",
        )
    except Exception as exc:
        statuses.append("critical")
        problems.append(f"cannot ask workers for a ping: {type(exc).__name__}: {exc}")
        return
    names = sorted(name for reply in replies for name in reply)
    details["workers"] = names
    if len(names) < params.min_workers:
        statuses.append("critical")
        problems.append(f"{len(names)} workers answer, {params.min_workers} expected")


def _heartbeats(
    params: QueuesParams, details: dict[str, Any], statuses: list[Status], problems: list[str]
) -> None:
    try:
        with transaction() as conn:
            rows = conn.execute(
                "SELECT name, extract(epoch FROM now() - at) AS age_s FROM heartbeats"
            ).fetchall()
    except DatabaseUnavailable as exc:
        statuses.append("critical")
        problems.append(str(exc))
        return
    ages = {row["name"]: round(float(row["age_s"]), 1) for row in rows}
    details["heartbeat_ages_s"] = ages
    for name, limit_s in (("beat", params.beat_max_age_s), ("sweeper", params.sweeper_max_age_s)):
        age_s = ages.get(name)
        if age_s is None:
            statuses.append("warning")
            problems.append(f"{name} has never run")
        elif age_s > limit_s:
            statuses.append("critical")
            problems.append(f"{name} silent for {age_s:.0f}s")

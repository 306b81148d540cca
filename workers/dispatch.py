"""Handing work to the broker by task name, so callers need not import the task modules."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from kombu.exceptions import OperationalError

from workers.app import STEP_QUEUES, app
from workers.errors import BrokerUnavailable
from workers.runs import StepRef
from workers.settings import get_settings

log = logging.getLogger(__name__)

ROUTE_OCCURRENCES = "caretaker.alerts.route_occurrences"
EXECUTE_STEP = "caretaker.runs.execute_step"
SEND_NOTIFICATION = "caretaker.incidents.send_notification"
# Room the task needs around a step's own timeout to record its result.
STEP_MARGIN_S = 30
# A batch of occurrences is routed by one task; more than this is split.
ROUTE_BATCH = 500
# Seconds during which a process sends nothing more after the broker refused a message.
BROKER_BACKOFF_S = 10.0

_broker_down_until = 0.0


def send(name: str, args: list[Any], queue: str | None = None, **options: Any) -> None:
    """Publish one task; BrokerUnavailable when the broker cannot take it now."""
    # Publishing never retries here: PostgreSQL holds the work and the sweeper sends it again.
    # After a failure the broker is left alone for a while, so that a Redis outage costs
    # callers one connect timeout, not one per message.
    global _broker_down_until
    if time.monotonic() < _broker_down_until:
        raise BrokerUnavailable(f"broker marked unavailable; {name} left to the sweeper")
    try:
        app.send_task(name, args=args, queue=queue, retry=False, ignore_result=True, **options)
    except (OperationalError, OSError) as exc:
        _broker_down_until = time.monotonic() + BROKER_BACKOFF_S
        raise BrokerUnavailable(f"broker unavailable for {name}: {exc}") from exc


def route_occurrences(ids: list[int]) -> None:
    """Ask the alerts queue to route these occurrences to their runbooks."""
    for start in range(0, len(ids), ROUTE_BATCH):
        send(ROUTE_OCCURRENCES, [ids[start : start + ROUTE_BATCH]])


def execute_steps(steps: list[StepRef]) -> None:
    """Send each step to the queue of its kind, with time limits around its own timeout."""
    for step in steps:
        send(
            EXECUTE_STEP,
            [step.id],
            queue=STEP_QUEUES[step.kind],
            soft_time_limit=step.timeout_s + STEP_MARGIN_S,
            time_limit=step.timeout_s + 2 * STEP_MARGIN_S,
        )


def send_notifications(ids: list[int]) -> None:
    """Send queued notifications through the incidents queue."""
    for notification_id in ids:
        send(SEND_NOTIFICATION, [notification_id])


def try_send(what: str, func: Any, *args: Any) -> bool:
    """Send after a commit; on failure log it and leave the work to the sweeper."""
    try:
        func(*args)
    except BrokerUnavailable as exc:
        log.warning("dispatch deferred to the sweeper what=%s error=%s", what, exc)
        return False
    return True


def ping_broker() -> str:
    """ "ok" when the broker answers within seconds, else what went wrong."""
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
    # Any failure at all means the broker is unreachable; it is reported, not raised.
    except Exception as exc:
        return f"broker unreachable: {exc}"
    return "ok"


def redact_url(url: str) -> str:
    """A broker URL without its password, fit for logs and messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at:
        return url
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{location}" if user else f"{scheme}{sep}***@{location}"


# Celery's Redis transport keeps a queue's prioritised messages in these extra lists.
PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def queue_depths(queues: list[str], timeout_s: float = 3.0) -> dict[str, int]:
    """Messages waiting in each queue on the Redis broker; BrokerUnavailable if unreadable."""
    client = redis.Redis.from_url(
        get_settings().broker_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        with client.pipeline() as pipe:
            for queue in queues:
                for suffix in PRIORITY_SUFFIXES:
                    pipe.llen(queue + suffix)
            lengths = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerUnavailable(f"cannot read queue depths: {exc}") from exc
    finally:
        client.close()
    step = len(PRIORITY_SUFFIXES)
    return {queue: sum(lengths[i * step : (i + 1) * step]) for i, queue in enumerate(queues)}

"""The Celery app: queues, routes, serialisation and limits; `celery -A workers.app` uses it."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from workers.settings import get_settings

# Operators run separate pools per queue; `analysis` is CPU heavy, `maintenance` is long.
QUEUES = ("alerts", "checks", "analysis", "remediation", "maintenance", "incidents")

# Step kinds run on the queue of their concern.
STEP_QUEUES = {
    "check": "checks",
    "verify": "checks",
    "recover": "remediation",
    "escalate": "incidents",
}

# Seconds to connect to the broker: a down Redis must fail fast, the sweeper re-sends later.
BROKER_TIMEOUT_S = 2.0

TASK_MODULES = [
    "tasks.alerts",
    "tasks.runs",
    "tasks.commands",
    "tasks.incidents",
    "tasks.sweeper",
    "tasks.health",
    "tasks.analysis",
    "tasks.logscan",
    "tasks.backups",
    "tasks.dbmaint",
    "tasks.security",
    "tasks.restore",
]


def make_app() -> Celery:
    """Build the app from the process's settings."""
    settings = get_settings()
    celery = Celery(
        "caretaker", broker=settings.broker_url, backend=settings.broker_url, include=TASK_MODULES
    )
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=3600,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="alerts",
        task_routes=_routes(),
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        # Results are kept only for `caretaker dispatch --wait`, which asks for them.
        task_ignore_result=True,
        broker_connection_timeout=BROKER_TIMEOUT_S,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": BROKER_TIMEOUT_S,
            "socket_timeout": BROKER_TIMEOUT_S * 2,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
        beat_schedule=_beat_schedule(),
    )
    return celery


def _routes() -> dict[str, Any]:
    return {
        "caretaker.alerts.*": {"queue": "alerts"},
        "caretaker.sweeper.*": {"queue": "alerts"},
        "caretaker.health.*": {"queue": "checks"},
        "caretaker.analysis.*": {"queue": "analysis"},
        "caretaker.commands.*": {"queue": "remediation"},
        "caretaker.remediation.*": {"queue": "remediation"},
        "caretaker.maintenance.*": {"queue": "maintenance"},
        "caretaker.incidents.*": {"queue": "incidents"},
    }


def _beat_schedule() -> dict[str, Any]:
    from beat_schedule import build_schedule

    return build_schedule(get_settings())


app = make_app()

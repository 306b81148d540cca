"""The periodic calendar: the one place every scheduled task of caretaker is listed."""

from __future__ import annotations

from typing import Any

from workers.settings import Settings


def build_schedule(settings: Settings) -> dict[str, Any]:
    """Celery beat entries, keyed by a stable name."""
    return {
        "sweep-lost-work": {
            "task": "caretaker.sweeper.sweep_lost_work",
            "schedule": settings.sweep_interval_s,
            "options": {"expires": settings.sweep_interval_s},
        },
        "check-system": {
            "task": "caretaker.checks.check_system",
            "schedule": settings.system_check_interval_s,
            "options": {"expires": settings.system_check_interval_s},
        },
    }

"""The periodic calendar: the one place every scheduled task of caretaker is listed."""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from workers.settings import Settings

# Seconds between the ticks by which caretaker sees that beat is alive.
BEAT_TICK_S = 30.0
# Seconds between looks at whether a change window is open for the runs waiting for one.
CHANGE_WINDOW_CHECK_S = 60.0


def build_schedule(settings: Settings) -> dict[str, Any]:
    """Celery beat entries, keyed by a stable name."""
    return {
        "sweep-lost-work": {
            "task": "caretaker.sweeper.sweep_lost_work",
            "schedule": settings.sweep_interval_s,
            "options": {"expires": settings.sweep_interval_s},
        },
        "health-round": {
            "task": "caretaker.health.run_round",
            "schedule": settings.health_interval_s,
            "options": {"expires": settings.health_interval_s},
        },
        "health-report-daily": {
            "task": "caretaker.health.report_daily",
            "schedule": crontab(minute=0, hour=settings.daily_report_hour_utc),
        },
        "anomaly-detection": {
            "task": "caretaker.analysis.detect_anomalies",
            "schedule": settings.anomaly_interval_s,
            "options": {"expires": settings.anomaly_interval_s},
        },
        "log-analysis-daily": {
            "task": "caretaker.analysis.scan_logs",
            "schedule": crontab(minute=5, hour=settings.daily_report_hour_utc),
        },
        "performance-review-weekly": {
            "task": "caretaker.analysis.performance_review",
            "schedule": crontab(minute=15, hour=settings.daily_report_hour_utc, day_of_week=1),
        },
        "capacity-plan-monthly": {
            "task": "caretaker.analysis.capacity_plan",
            "schedule": crontab(minute=30, hour=settings.daily_report_hour_utc, day_of_month=1),
        },
        "backups-daily": {
            "task": "caretaker.maintenance.create_backups",
            "schedule": crontab(minute=0, hour=settings.backup_hour_utc),
        },
        "backup-verification-daily": {
            "task": "caretaker.maintenance.verify_backups",
            "schedule": crontab(minute=0, hour=(settings.backup_hour_utc + 2) % 24),
        },
        # After the night's backups are verified, so the drill restores one of them.
        "dr-drill-monthly": {
            "task": "caretaker.maintenance.dr_drill",
            "schedule": crontab(minute=0, hour=(settings.backup_hour_utc + 3) % 24, day_of_month=1),
        },
        # After the weekly review has read pg_stat_statements, which maintenance then resets.
        "database-maintenance-weekly": {
            "task": "caretaker.maintenance.maintain_databases",
            "schedule": crontab(
                minute=0, hour=(settings.daily_report_hour_utc + 1) % 24, day_of_week=1
            ),
        },
        "security-scan-weekly": {
            "task": "caretaker.remediation.security_scan",
            "schedule": crontab(minute=45, hour=settings.daily_report_hour_utc, day_of_week=1),
        },
        "change-windows": {
            "task": "caretaker.sweeper.open_change_windows",
            "schedule": CHANGE_WINDOW_CHECK_S,
            "options": {"expires": CHANGE_WINDOW_CHECK_S},
        },
        "beat-tick": {
            "task": "caretaker.health.record_beat_tick",
            "schedule": BEAT_TICK_S,
            "options": {"expires": BEAT_TICK_S},
        },
    }

"""The Celery app's wiring: queues, routes, serialisation, limits, the calendar."""

from __future__ import annotations

from beat_schedule import build_schedule
from workers.app import QUEUES, app
from workers.settings import Settings


def test_json_only_never_pickle() -> None:
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


def test_every_queue_is_declared_and_prefetch_is_one() -> None:
    assert [queue.name for queue in app.conf.task_queues] == list(QUEUES)
    assert app.conf.worker_prefetch_multiplier == 1


def test_task_names_are_stable_and_routed_to_their_queue() -> None:
    app.loader.import_default_modules()
    names = sorted(name for name in app.tasks if name.startswith("caretaker."))
    router = app.amqp.router

    queues = {name: router.route({}, name)["queue"].name for name in names}

    assert queues == {
        "caretaker.alerts.route_occurrences": "alerts",
        "caretaker.analysis.capacity_plan": "analysis",
        "caretaker.analysis.detect_anomalies": "analysis",
        "caretaker.analysis.performance_review": "analysis",
        "caretaker.analysis.scan_logs": "analysis",
        "caretaker.health.check_dns": "checks",
        "caretaker.health.check_http": "checks",
        "caretaker.health.check_postgres": "checks",
        "caretaker.health.check_queues": "checks",
        "caretaker.health.check_redis": "checks",
        "caretaker.health.check_system": "checks",
        "caretaker.health.check_target": "checks",
        "caretaker.health.check_tls": "checks",
        "caretaker.health.record_beat_tick": "checks",
        "caretaker.health.report_daily": "checks",
        "caretaker.health.run_round": "checks",
        "caretaker.commands.run_command": "remediation",
        "caretaker.remediation.security_scan": "remediation",
        "caretaker.maintenance.create_backups": "maintenance",
        "caretaker.maintenance.dr_drill": "maintenance",
        "caretaker.maintenance.maintain_databases": "maintenance",
        "caretaker.maintenance.verify_backups": "maintenance",
        "caretaker.incidents.send_notification": "incidents",
        "caretaker.runs.execute_step": "alerts",
        "caretaker.sweeper.sweep_lost_work": "alerts",
        "caretaker.sweeper.open_change_windows": "alerts",
    }


def test_idempotent_tasks_are_acknowledged_late_and_commands_are_not() -> None:
    app.loader.import_default_modules()
    late = {
        name
        for name, task in app.tasks.items()
        if name.startswith("caretaker.") and task.acks_late and task.reject_on_worker_lost
    }

    assert "caretaker.commands.run_command" not in late
    assert {
        "caretaker.runs.execute_step",
        "caretaker.alerts.route_occurrences",
        "caretaker.sweeper.sweep_lost_work",
    } <= late


def test_every_task_has_soft_and_hard_time_limits() -> None:
    assert 0 < app.conf.task_soft_time_limit < app.conf.task_time_limit


def test_broker_redelivers_within_minutes() -> None:
    assert app.conf.broker_transport_options["visibility_timeout"] == 300


def test_the_calendar_holds_the_sweeper_the_health_round_and_beat_ticks() -> None:
    schedule = build_schedule(Settings(sweep_interval_s=15, health_interval_s=120))

    assert schedule["sweep-lost-work"]["task"] == "caretaker.sweeper.sweep_lost_work"
    assert schedule["sweep-lost-work"]["schedule"] == 15
    assert schedule["health-round"]["task"] == "caretaker.health.run_round"
    assert schedule["health-round"]["schedule"] == 120
    assert schedule["beat-tick"]["task"] == "caretaker.health.record_beat_tick"


def test_the_calendar_holds_the_analysis_and_every_entry_names_a_known_task() -> None:
    app.loader.import_default_modules()
    schedule = build_schedule(Settings(anomaly_interval_s=600, daily_report_hour_utc=5))

    assert schedule["anomaly-detection"]["schedule"] == 600
    daily = schedule["log-analysis-daily"]["schedule"]
    assert (daily.hour, daily.minute) == ({5}, {5})
    weekly = schedule["performance-review-weekly"]["schedule"]
    assert (weekly.day_of_week, weekly.hour, weekly.minute) == ({1}, {5}, {15})
    monthly = schedule["capacity-plan-monthly"]["schedule"]
    assert (monthly.day_of_month, monthly.hour, monthly.minute) == ({1}, {5}, {30})
    maintenance = schedule["database-maintenance-weekly"]["schedule"]
    assert (maintenance.day_of_week, maintenance.hour, maintenance.minute) == ({1}, {6}, {0})
    assert {entry["task"] for entry in schedule.values()} <= set(app.tasks)


def test_backups_are_made_daily_and_verified_two_hours_later() -> None:
    schedule = build_schedule(Settings(backup_hour_utc=23))

    made = schedule["backups-daily"]["schedule"]
    verified = schedule["backup-verification-daily"]["schedule"]
    assert (made.hour, made.minute) == ({23}, {0})
    assert (verified.hour, verified.minute) == ({1}, {0})

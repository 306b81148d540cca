"""The `caretaker` command line: processes, set-up, ad hoc dispatch, incidents and runs."""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import psycopg
from psycopg.conninfo import conninfo_to_dict

from workers import supervisor, views
from workers.config import load_config
from workers.db import migrate as apply_migrations
from workers.db import redact
from workers.dispatch import ping_broker, redact_url
from workers.errors import CaretakerError, ConfigError, DatabaseUnavailable
from workers.incidents import INCIDENT_STATUSES
from workers.reports import render_capacity, render_health, render_performance
from workers.settings import get_settings

log = logging.getLogger("caretaker")

POSTGRES_UNREACHABLE = (
    "PostgreSQL is not reachable at {url} ({error}).\n"
    "  Start a local one:   sudo pg_ctlcluster $(ls /etc/postgresql) main start\n"
    "  or with Docker:      docker compose up -d postgres\n"
    "  or point caretaker at yours: export CARETAKER_DATABASE_URL=postgresql://user@host/db"
)
POSTGRES_REFUSED = (
    "PostgreSQL at {url} refused the connection: {error}\n"
    "  Create the role (as the postgres user): sudo -u postgres createuser --createdb {role}\n"
    "  or let an existing role create databases: "
    'sudo -u postgres psql -c "ALTER ROLE {role} CREATEDB"\n'
    "  or point caretaker at another role: export CARETAKER_DATABASE_URL=postgresql://user@host/db"
)
# Only a server that answered says these: about the role, its password or its rights.
SERVER_ANSWERED_MARKS = (
    "does not exist",
    "authentication failed",
    "password",
    "permission denied",
    "pg_hba.conf",
)
REDIS_HELP = (
    "Redis is not reachable at {url} ({error}).\n"
    "  Start a local one:   redis-server --daemonize yes --port 6379\n"
    "  or with Docker:      docker compose up -d redis\n"
    "  or point caretaker at yours: export CARETAKER_BROKER_URL=redis://host:6379/0"
)


def main() -> None:
    """Entry point of the console script."""
    logging.basicConfig(
        level=get_settings().log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # httpx logs every request at INFO, URL and all: caretaker logs what matters itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cli()


class _Commands(click.Group):
    """The top-level group: caretaker's own errors become one clear line and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CaretakerError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=_Commands)
def cli() -> None:
    """caretaker: alerts and schedules become runbooks on Celery workers."""


@cli.command()
@click.option("--host", default=None, help="Listen address (CARETAKER_HOST).")
@click.option("--port", type=int, default=None, help="Listen port (CARETAKER_PORT).")
def run(host: str | None, port: int | None) -> None:
    """Webhook, a worker on all queues and beat together: the main job on one host."""
    _prepare()
    settings = get_settings()
    host, port = host or settings.host, port or settings.port

    # Handlers first: a signal between starting a child and catching it would orphan the child.
    received: list[int] = []
    supervisor.catch_stop_signals(received)
    me = [sys.executable, "-m", "workers.cli"]
    children = {
        "webhook": supervisor.start([*me, "webhook", "--host", host, "--port", str(port)]),
        "worker": supervisor.start([*me, "worker"]),
        "beat": supervisor.start([*me, "beat"]),
    }
    sys.exit(supervisor.supervise(children, host, port, received))


def _prepare() -> None:
    """Check the configuration, migrate (creating the database if needed) and check the
    broker, or say how to fix each."""
    settings = get_settings()
    problems = []
    try:
        load_config(settings.config)
    except ConfigError as exc:
        problems += [f"{settings.config}: {problem}" for problem in exc.problems]
    try:
        apply_migrations(settings.database_url)
    except (DatabaseUnavailable, psycopg.Error) as exc:
        problems.append(postgres_help(settings.database_url, _first_line(exc.__cause__ or exc)))
    broker = ping_broker()
    if broker != "ok":
        problems.append(REDIS_HELP.format(url=redact_url(settings.broker_url), error=broker))
    if problems:
        raise click.ClickException("\n".join(problems))


def postgres_help(url: str, error: str) -> str:
    """What to do about a database that cannot be used: refused by the server, or unreachable."""
    if not any(mark in error.lower() for mark in SERVER_ANSWERED_MARKS):
        return POSTGRES_UNREACHABLE.format(url=_shown_url(url), error=error)
    return POSTGRES_REFUSED.format(url=_shown_url(url), error=error, role=_role(url))


def _shown_url(url: str) -> str:
    # The URL as the user wrote it, unless it carries a password: then without it.
    parts = urlsplit(url)
    if parts.scheme and parts.password is None and "password" not in parts.query:
        return url
    return redact(url)


def _role(url: str) -> str:
    # libpq connects as the operating system user when the URL names none.
    try:
        return str(conninfo_to_dict(url).get("user") or getpass.getuser())
    except psycopg.Error:
        return getpass.getuser()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return " ".join(lines[0].split()) if lines else type(exc).__name__


@cli.command()
@click.option("--host", default=None, help="Listen address (CARETAKER_HOST).")
@click.option("--port", type=int, default=None, help="Listen port (CARETAKER_PORT).")
def webhook(host: str | None, port: int | None) -> None:
    """The webhook service alone."""
    import uvicorn

    from workers.webhook import create_app

    settings = get_settings()
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


@cli.command()
@click.option("--queues", "-Q", default=None, help="Comma-separated queues (default: all).")
@click.option("--concurrency", "-c", type=int, default=None, help="Worker processes.")
def worker(queues: str | None, concurrency: int | None) -> None:
    """A Celery worker on the given queues."""
    from workers.app import QUEUES, app

    argv = ["worker", "--loglevel", get_settings().log_level, "-Q", queues or ",".join(QUEUES)]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    app.worker_main(argv)


@cli.command()
def beat() -> None:
    """Celery beat, firing the calendar in beat_schedule.py."""
    from workers.app import app

    settings = get_settings()
    app.start(["beat", "--loglevel", settings.log_level, "-s", str(settings.beat_schedule_file)])


@cli.command()
def flower() -> None:
    """Flower on the same broker, with basic auth from settings."""
    from workers.app import app

    settings = get_settings()
    if settings.flower_password is None:
        raise click.ClickException("set CARETAKER_FLOWER_PASSWORD: flower never runs without auth")
    auth = f"{settings.flower_user}:{settings.flower_password.get_secret_value()}"
    app.start(
        [
            "flower",
            f"--port={settings.flower_port}",
            f"--basic-auth={auth}",
            f"--max-tasks={settings.flower_max_tasks}",
            "--persistent=True",
            f"--db={settings.flower_db}",
        ]
    )


@cli.command()
def migrate() -> None:
    """Create the database if missing and apply pending migrations."""
    settings = get_settings()
    try:
        applied = apply_migrations(settings.database_url)
    except (DatabaseUnavailable, psycopg.Error) as exc:
        error = _first_line(exc.__cause__ or exc)
        raise click.ClickException(postgres_help(settings.database_url, error)) from exc
    click.echo(
        f"applied {len(applied)} migrations"
        + (f": {', '.join(applied)}" if applied else " (database up to date)")
    )


@cli.group()
def config() -> None:
    """The configuration file."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(path_type=Path))
def config_check(file: Path | None) -> None:
    """Validate FILE (default CARETAKER_CONFIG) and report every error with its path."""
    path = file or get_settings().config
    if path is None:
        raise click.ClickException("no file given and CARETAKER_CONFIG is not set")
    try:
        loaded = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            located = problem if problem.startswith(f"{path}: ") else f"{path}: {problem}"
            click.echo(located, err=True)
        count = len(exc.problems)
        raise click.ClickException(f"{count} problem{'s' if count > 1 else ''} in {path}") from exc
    click.echo(f"{path}: ok ({len(loaded.runbooks)} runbooks)")


@cli.command()
@click.argument("task")
@click.option(
    "--arg",
    "args",
    multiple=True,
    metavar="KEY=VALUE",
    help="A keyword argument; the value is read as JSON when it parses.",
)
@click.option("--wait", is_flag=True, help="Wait for the result and print it.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds --wait waits for the result.",
)
def dispatch(task: str, args: tuple[str, ...], wait: bool, timeout_s: float) -> None:
    """Send TASK (a name like caretaker.health.check_system) to its queue."""
    from kombu.exceptions import OperationalError

    from workers.app import app

    app.loader.import_default_modules()
    if task not in app.tasks:
        known = "\n  ".join(sorted(t for t in app.tasks if t.startswith("caretaker.")))
        raise click.ClickException(f"unknown task {task!r}; known tasks:\n  {known}")
    kwargs = _parse_args(args)
    # Asked first: with the broker down, Celery's result backend retries for seconds and then
    # fails with a traceback of its own.
    url = redact_url(get_settings().broker_url)
    broker = ping_broker()
    if broker != "ok":
        raise click.ClickException(f"cannot send {task}: {broker} (broker {url})")
    # The app stores no results unless asked; --wait reads this one from the result backend.
    options = {"ignore_result": False} if wait else {}
    try:
        result = app.tasks[task].apply_async(kwargs=kwargs, **options)
    except TypeError as exc:
        # Celery checks the arguments against the task's signature before sending.
        raise click.ClickException(f"{task} does not take these arguments: {exc}") from exc
    except OperationalError as exc:
        message = f"cannot send {task}: broker unreachable: {exc} (broker {url})"
        raise click.ClickException(message) from exc
    click.echo(f"dispatched {task} id={result.id}")
    if wait:
        click.echo(json.dumps(_result_of(result, timeout_s), indent=2, default=str))


def _result_of(result: Any, timeout_s: float) -> Any:
    """The task's return value; no result in time, or the task's failure, is one line."""
    from celery.exceptions import TimeoutError as ResultTimeout

    try:
        value = result.get(timeout=timeout_s, propagate=False)
    except ResultTimeout as exc:
        raise click.ClickException(
            f"no result within {timeout_s:g}s; the task is still queued or running (id={result.id})"
        ) from exc
    if result.failed() or isinstance(value, BaseException):
        message = "; ".join(line.strip() for line in str(value).splitlines() if line.strip())
        raise click.ClickException(
            f"task failed (id={result.id}): {type(value).__name__}: {message}"
        )
    return value


def _parse_args(args: tuple[str, ...]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in args:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--arg")
        try:
            parsed[key] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[key] = raw
    return parsed


@cli.group()
def incidents() -> None:
    """Incidents: what a person must look at."""


@incidents.command("list")
@click.option("--status", type=click.Choice(INCIDENT_STATUSES))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def incidents_list(status: str | None, limit: int, as_json: bool) -> None:
    """Incidents, newest first."""
    rows = views.incident_rows(status, limit)
    _print(rows, as_json, ["id", "status", "severity", "opened_at", "title"])


@incidents.command("show")
@click.argument("incident_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def incidents_show(incident_id: int, as_json: bool) -> None:
    """One incident with its timeline."""
    detail = views.incident_detail(incident_id)
    _show(detail, as_json, views.render_incident)


@incidents.command("ack")
@click.argument("incident_id", type=int)
@click.option("--by", default=None, help="Who acknowledges (default: the current user).")
def incidents_ack(incident_id: int, by: str | None) -> None:
    """Acknowledge an incident."""
    row = views.change_incident(incident_id, "acknowledged", by or getpass.getuser())
    click.echo(f"incident {row['id']} acknowledged")


@incidents.command("resolve")
@click.argument("incident_id", type=int)
@click.option("--by", default=None, help="Who resolves (default: the current user).")
def incidents_resolve(incident_id: int, by: str | None) -> None:
    """Resolve an incident."""
    row = views.change_incident(incident_id, "resolved", by or getpass.getuser())
    click.echo(f"incident {row['id']} resolved")


@cli.group()
def reports() -> None:
    """Reports built from caretaker's records."""


@reports.command("health")
@click.option(
    "--hours",
    type=click.FloatRange(min=0, min_open=True, max=24 * 366),
    default=24.0,
    show_default=True,
    help="Period to cover.",
)
@click.option("--json", "as_json", is_flag=True)
def reports_health(hours: float, as_json: bool) -> None:
    """Each target's health over the period: results, share healthy, worst, latest, episodes."""
    report = views.health_report(hours)
    _show(report, as_json, render_health)


@reports.command("performance")
@click.option("--now", "build", is_flag=True, help="Review the past week now and store it.")
@click.option("--json", "as_json", is_flag=True)
def reports_performance(build: bool, as_json: bool) -> None:
    """The latest weekly performance review: series against their baseline, anomalies,
    slowest statements, recommendations."""
    report = views.build_report("performance") if build else views.latest_report("performance")
    _show(report, as_json, render_performance)


@reports.command("capacity")
@click.option("--now", "build", is_flag=True, help="Forecast every usage series now and store it.")
@click.option("--json", "as_json", is_flag=True)
def reports_capacity(build: bool, as_json: bool) -> None:
    """The latest capacity plan: trend, forecast with its band, days to threshold, level."""
    report = views.build_report("capacity") if build else views.latest_report("capacity")
    _show(report, as_json, render_capacity)


@cli.group()
def analyze() -> None:
    """Ad hoc analysis of a series from a CSV file or Prometheus: anomalies and capacity."""


# Without --range, a Prometheus query looks this far back.
DEFAULT_RANGE_S = 30 * 86400.0
MAX_DURATION_S = 100 * 366 * 86400.0


class _Duration(click.ParamType[float]):
    """A duration such as 90s, 5m, 36h, 30d or 2w, converted to seconds."""

    name = "duration"
    UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        try:
            seconds = float(text[:-1]) * self.UNIT_S[text[-1:]]
        except (KeyError, ValueError):
            self.fail(f"{value!r} is not a duration: a number and a unit, s m h d or w", param, ctx)
        if not 0 < seconds <= MAX_DURATION_S:
            self.fail(f"{value!r} must be more than 0 and at most 100 years", param, ctx)
        return seconds


class _Finite(click.ParamType[float]):
    """A finite number over 0 (NaN and infinity would quietly switch the analysis off)."""

    name = "number"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} must be a finite number over 0", param, ctx)
        return number


POSITIVE = _Finite()


def _source_options(command: Any) -> Any:
    """The options that say where the series comes from: a CSV file or a Prometheus query."""
    options = [
        click.option(
            "--series",
            "path",
            type=click.Path(exists=True, dir_okay=False),
            help="CSV file with timestamp,value columns.",
        ),
        click.option(
            "--prometheus",
            "query",
            metavar="QUERY",
            help="PromQL query, sent to CARETAKER_PROMETHEUS_URL.",
        ),
        click.option(
            "--range", "range_s", type=_Duration(), help="How far back to query (default 30d)."
        ),
        click.option(
            "--step",
            "step_s",
            type=_Duration(),
            help="Query step (default: the smallest round step Prometheus allows).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@analyze.command("anomalies")
@_source_options
@click.option("--method", type=click.Choice(["mad", "zscore"]), default="mad", show_default=True)
@click.option("--threshold", type=POSITIVE, default=3.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def analyze_anomalies(
    path: str | None,
    query: str | None,
    range_s: float | None,
    step_s: float | None,
    method: str,
    threshold: float,
    as_json: bool,
) -> None:
    """Score every point against the series' own statistics; list those over the threshold.

    A query may give several series: each is scored on its own, a `*_total` counter as a rate.
    """
    from tasks.anomaly import detect, read_csv_series

    _one_source(path, query, range_s, step_s)
    if path is not None:
        found = detect(_series(read_csv_series, path), method, threshold)  # type: ignore[arg-type]
        _echo_anomalies(_anomaly_summary(found), as_json)
        return

    summaries = []
    for fetched in _prometheus_series(query or "", range_s, step_s):
        found = detect(fetched.values, method, threshold)  # type: ignore[arg-type]
        summaries.append({"labels": fetched.labels, **_anomaly_summary(found)})
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    for summary in summaries:
        click.echo(_shown_labels(summary["labels"]))
        _echo_anomalies(summary, False, indent="  ")


def _anomaly_summary(found: Any) -> dict[str, Any]:
    listed = [
        {"timestamp": a.timestamp.isoformat(), "value": a.value, "score": a.score}
        for a in found.anomalies
    ]
    return {
        "method": found.method,
        "threshold": found.threshold,
        "points": found.points,
        "center": found.center,
        "scale": found.scale,
        "skipped": found.skipped,
        "anomalies": listed,
    }


def _echo_anomalies(summary: dict[str, Any], as_json: bool, indent: str = "") -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    listed = summary["anomalies"]
    click.echo(
        indent
        + (
            summary["skipped"]
            or f"{len(listed)} anomalies in {summary['points']} points"
            f" ({summary['method']}, |score| > {summary['threshold']:g})"
        )
    )
    for item in listed:
        click.echo(f"{indent}  {item['timestamp']}  {item['value']:g}  score {item['score']:+.2f}")


@analyze.command("capacity")
@_source_options
@click.option("--threshold", type=float, required=True, help="Value the series must stay under.")
@click.option("--horizon-days", type=POSITIVE, default=90.0, show_default=True)
@click.option(
    "--capacity",
    type=POSITIVE,
    default=None,
    help="What 100% is (100 for percentages); gives the level.",
)
@click.option("--json", "as_json", is_flag=True)
def analyze_capacity(
    path: str | None,
    query: str | None,
    range_s: float | None,
    step_s: float | None,
    threshold: float,
    horizon_days: float,
    capacity: float | None,
    as_json: bool,
) -> None:
    """Linear trend, forecast with a 95% band, days until the threshold, level.

    A query may give several series: each gets its own forecast, a `*_total` counter as a rate.
    """
    from dataclasses import asdict

    from tasks.anomaly import read_csv_series
    from tasks.forecast import forecast

    _one_source(path, query, range_s, step_s)
    if path is not None:
        try:
            result = forecast(_series(read_csv_series, path), horizon_days, threshold, capacity)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(
            json.dumps(asdict(result), indent=2)
            if as_json
            else _capacity_line(result, horizon_days, threshold)
        )
        return

    results: list[dict[str, Any]] = []
    for fetched in _prometheus_series(query or "", range_s, step_s):
        try:
            planned = forecast(fetched.values, horizon_days, threshold, capacity)
        except ValueError as exc:
            # One series too short to forecast leaves the others worth showing.
            results.append({"labels": fetched.labels, "skipped": str(exc)})
            line = str(exc)
        else:
            results.append({"labels": fetched.labels, **asdict(planned)})
            line = _capacity_line(planned, horizon_days, threshold)
        if not as_json:
            click.echo(f"{_shown_labels(fetched.labels)}\n  {line}")
    if as_json:
        click.echo(json.dumps(results, indent=2))


def _capacity_line(result: Any, horizon_days: float, threshold: float) -> str:
    days = "never" if result.days_to_threshold is None else f"{result.days_to_threshold:g} days"
    return (
        f"slope {result.slope_per_day:+.4g}/day; in {horizon_days:g} days {result.forecast:.4g}"
        f" ({result.lower:.4g} .. {result.upper:.4g}); {threshold:g} reached in {days}"
        + (f"; {result.level}: {result.advice}" if result.level else "")
    )


def _one_source(
    path: str | None, query: str | None, range_s: float | None, step_s: float | None
) -> None:
    if (path is None) == (query is None):
        raise click.UsageError("give exactly one of --series FILE and --prometheus QUERY")
    if path is not None and (range_s is not None or step_s is not None):
        raise click.UsageError("--range and --step go with --prometheus, not --series")


def _prometheus_series(query: str, range_s: float | None, step_s: float | None) -> list[Any]:
    """Each series the query gives over the last range_s seconds; a counter as its rate."""
    from datetime import UTC, datetime, timedelta

    from tasks.anomaly import to_rate
    from tasks.prometheus import query_range
    from tasks.sources import Fetched, is_counter
    from workers.errors import SourceError

    settings = get_settings()
    if settings.prometheus_url is None:
        raise click.ClickException(
            "--prometheus needs CARETAKER_PROMETHEUS_URL, the address of Prometheus's HTTP API"
            " (http://prometheus:9090)"
        )
    end_at = datetime.now(UTC)
    start_at = end_at - timedelta(seconds=range_s or DEFAULT_RANGE_S)
    try:
        found = query_range(
            settings.prometheus_url, query, start_at, end_at, step_s, settings.prometheus_timeout_s
        )
    except SourceError as exc:
        raise click.ClickException(str(exc)) from exc

    if not found:
        since = start_at.isoformat(timespec="seconds")
        raise click.ClickException(f"prometheus has no series for {query!r} since {since}")
    if is_counter(query, None):
        return [Fetched(to_rate(fetched.values), fetched.labels) for fetched in found]
    return found


def _shown_labels(labels: dict[str, str]) -> str:
    """A series as Prometheus writes it: name{label="value", ...}."""
    pairs = ", ".join(
        f"{name}={json.dumps(value)}" for name, value in labels.items() if name != "__name__"
    )
    return f"{labels.get('__name__', '')}{{{pairs}}}"


def _series(read: Any, path: str) -> Any:
    try:
        return read(path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.group()
def backups() -> None:
    """Backups of databases and directories, verified by a full restore."""


@backups.command("create")
@click.option("--target", "target_name", metavar="NAME", help="A target of the backups section.")
@click.option("--db", "dsn", metavar="URL", help="Any database, ad hoc; a URL without a password.")
def backups_create(target_name: str | None, dsn: str | None) -> None:
    """Back up one target now, in this process; the backup is recorded unverified."""
    from workers.config import check_dsn

    if (target_name is None) == (dsn is None):
        raise click.UsageError("give exactly one of --target NAME and --db URL")
    if dsn is not None:
        try:
            check_dsn(dsn)
        except ValueError as exc:
            # The message names no part of the URL, which may hold the password.
            raise click.ClickException(f"--db: {exc}") from None

    from tasks.backups import create_now

    row = create_now(target_name, dsn)
    click.echo(
        f"backup {row['id']} of {row['target']}: {row['key']}"
        f" ({row['size_bytes']} bytes, sha256 {row['sha256']}), unverified"
    )


@backups.command("list")
@click.option("--target", "target_name", metavar="NAME")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def backups_list(target_name: str | None, limit: int, as_json: bool) -> None:
    """Backups, newest first, with their verification status."""
    from tasks.backups import backup_rows

    rows = backup_rows(target_name, limit)
    _print(rows, as_json, ["id", "target", "status", "created_at", "size_bytes", "key", "reason"])


@backups.command("verify")
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True, max=366),
    default=None,
    help="Backups of this many last days (default: backups.verify_days).",
)
@click.option("--target", "target_name", metavar="NAME")
@click.option("--json", "as_json", is_flag=True)
def backups_verify(days: float | None, target_name: str | None, as_json: bool) -> None:
    """Restore every backup of the last days not yet verified, in this process, and check
    it; exit 1 when any is invalid or could not be checked."""
    from dataclasses import asdict

    from tasks.backups import verify_now

    verdicts = verify_now(days, target_name)
    if as_json:
        click.echo(json.dumps([asdict(v) for v in verdicts], indent=2, default=str))
    for verdict in [] if as_json else verdicts:
        reason = f": {verdict.reason}" if verdict.reason else ""
        click.echo(f"backup {verdict.backup_id} {verdict.target}: {verdict.status}{reason}")
    if not verdicts and not as_json:
        click.echo("no backups to verify")
    failed = [v for v in verdicts if v.status in ("invalid", "verification_failed")]
    if failed:
        raise click.ClickException(
            f"{len(failed)} of {len(verdicts)} backups invalid or not verified"
        )


@backups.command("restore")
@click.option("--target", "target_name", metavar="NAME", required=True)
@click.option("--backup", "backup_id", type=int, metavar="ID", help="Default: latest verified.")
@click.option("--by", default=None, help="Who asks (default: the current user).")
def backups_restore(target_name: str, backup_id: int | None, by: str | None) -> None:
    """Restore a target from a backup as a run: stop its dependants, restore a copy, check
    it, swap it in, start them, check their health; the original is put back and the run
    escalated on any failure. Follow it with `caretaker runs list`."""
    from tasks.restore import ask_for_restore

    occurrence_id = ask_for_restore(target_name, backup_id, by or getpass.getuser())
    backup = f"backup {backup_id}" if backup_id else "its latest verified backup"
    click.echo(f"restore of {target_name} from {backup} recorded as occurrence {occurrence_id};")
    click.echo("follow it with `caretaker runs list`")


@backups.command("drill")
@click.option("--target", "target_name", metavar="NAME", help="One of backups.databases.")
@click.option("--json", "as_json", is_flag=True)
def backups_drill(target_name: str | None, as_json: bool) -> None:
    """Restore the latest verified backup of each database target into a scratch database
    now, in this process, and record the time against its rto_s and the backup's age against
    its rpo_s; exit 1 when a drill missed or failed."""
    from tasks.restore import drill_now, render_drill

    outcome = drill_now(target_name)
    if as_json:
        click.echo(json.dumps(outcome, indent=2, default=str))
    for name, drill in [] if as_json else outcome.items():
        click.echo(render_drill(name, drill))
    if not outcome and not as_json:
        click.echo("no database targets to drill")
    bad = [name for name, drill in outcome.items() if drill["status"] in ("missed", "failed")]
    if bad:
        raise click.ClickException(f"{len(bad)} of {len(outcome)} drills missed or failed")


@cli.group("db")
def databases() -> None:
    """The databases of the backups section: maintenance."""


@databases.command("maintain")
@click.option("--target", "target_name", metavar="NAME", help="One of backups.databases.")
@click.option("--json", "as_json", is_flag=True)
def databases_maintain(target_name: str | None, as_json: bool) -> None:
    """ANALYZE and VACUUM every user table now, in this process, and report bloat; reset
    pg_stat_statements once the weekly review has read it. The report is stored; exit 1 when
    a table or database failed."""
    from tasks.dbmaint import maintain_now
    from workers.reports import render_maintenance

    report = maintain_now(target_name)
    _show(report, as_json, render_maintenance)
    failed = [db["name"] for db in report["databases"] if db["status"] == "failed"]
    if failed:
        raise click.ClickException(
            f"maintenance failed in {', '.join(failed)}: {report['tables_failed']} tables failed"
        )


@cli.group()
def security() -> None:
    """Security advisories against the installed packages of the service targets."""


@security.command("scan")
@click.option("--target", "target_name", metavar="NAME", help="One of the targets section.")
@click.option("--json", "as_json", is_flag=True)
def security_scan(target_name: str | None, as_json: bool) -> None:
    """Scan now, in this process, and record the findings; exit 1 when a critical advisory
    affects a target or a target could not be scanned."""
    from dataclasses import asdict

    from tasks.security import render_scan, scan_now

    report = scan_now(target_name)
    click.echo(json.dumps(asdict(report), indent=2) if as_json else render_scan(report))
    problem = report.problem()
    if problem:
        raise click.ClickException(problem)


@security.command("hotfix")
@click.argument("package")
@click.option("--target", "target_name", metavar="NAME", required=True)
@click.option("--version", help="The fixed version; default: the open finding's fix.")
@click.option("--advisory", help="The advisory id; default: the open finding's.")
@click.option("--by", default=None, help="Who asks (default: the current user).")
def security_hotfix(
    package: str, target_name: str, version: str | None, advisory: str | None, by: str | None
) -> None:
    """Hotfix PACKAGE on a target as a run: record, install, test, restart, verify, pin;
    rolled back and escalated on any failure. Follow it with `caretaker runs list`."""
    from tasks.hotfix import ask_for_hotfix

    try:
        occurrence_id = ask_for_hotfix(
            target_name, package, version, advisory, by or getpass.getuser()
        )
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"hotfix of {package} on {target_name} recorded as occurrence {occurrence_id};")
    click.echo("follow it with `caretaker runs list`")


@security.command("findings")
@click.option("--target", "target_name", metavar="NAME")
@click.option("--all", "include_resolved", is_flag=True, help="Resolved findings too.")
@click.option("--json", "as_json", is_flag=True)
def security_findings(target_name: str | None, include_resolved: bool, as_json: bool) -> None:
    """Stored findings, most severe first; open ones unless --all."""
    from tasks.security import finding_rows

    rows = finding_rows(target_name, include_resolved)
    columns = ["target", "package", "installed_version", "advisory_id", "severity"]
    columns += ["fixed_version", "first_seen_at", "last_seen_at"]
    _print(rows, as_json, columns + (["resolved_at"] if include_resolved else []))


@cli.command()
@click.argument("version")
@click.option("--target", "target_name", metavar="NAME", help="One target (default: all).")
@click.option("--in-window", is_flag=True, help="Wait for a change window (change_windows) to run.")
@click.option("--by", default=None, help="Who asks (default: the current user).")
def update(version: str, target_name: str | None, in_window: bool, by: str | None) -> None:
    """Update to the release tag VERSION as runs: archive, dump, check out, install, migrate,
    restart, verify; rolled back and escalated on any failure. Without --target every target
    is updated stage by stage, a stage once the one before verified it."""
    from tasks.update import ask_for_update

    try:
        ids = ask_for_update(version, target_name, by or getpass.getuser(), in_window)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    listed = ", ".join(str(occurrence_id) for occurrence_id in ids)
    click.echo(f"update to {version} recorded as occurrence{'s' * (len(ids) > 1)} {listed};")
    click.echo("follow it with `caretaker runs list`")


@cli.group()
def runs() -> None:
    """Runbook runs and their steps."""


@runs.command("list")
@click.option("--status", type=click.Choice(views.RUN_STATUSES))
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs_list(status: str | None, limit: int, as_json: bool) -> None:
    """Runs, newest first."""
    rows = views.run_rows(status, limit)
    _print(rows, as_json, ["id", "status", "runbook", "occurrence_id", "incident_id", "created_at"])


@runs.command("show")
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def runs_show(run_id: int, as_json: bool) -> None:
    """One run with its steps and events."""
    detail = views.run_detail(run_id)
    _show(detail, as_json, views.render_run)


@runs.command("cancel")
@click.argument("run_id", type=int)
@click.option("--by", default=None, help="Who cancels (default: the current user).")
def runs_cancel(run_id: int, by: str | None) -> None:
    """Cancel a running or waiting run: steps not yet started are skipped, one already running
    finishes. Nothing is rolled back or escalated."""
    views.cancel_run(run_id, by or getpass.getuser())
    click.echo(f"run {run_id} cancelled")


def _show(data: dict[str, Any], as_json: bool, render: Any) -> None:
    """One record as JSON, or as the text `render` makes of it."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else render(data))


def _print(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(views.table(rows, columns))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

"""End to end through real processes: Alertmanager -> webhook -> PostgreSQL -> Celery worker.

Alertmanager repeats its notifications every couple of seconds here, so each scenario also
shows that repeats change nothing: one occurrence, one run, at most one incident.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import (
    DATA,
    ROOT,
    STATE_DIR,
    TEST_ENV,
    NotifySink,
    alert,
    free_port,
    notification,
    wait_for,
)
from workers.incidents import timeline

Conn = psycopg.Connection[dict[str, Any]]
Row = dict[str, Any]

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
TOKEN = secrets.token_urlsafe(24)
# Alertmanager's timers, in seconds: short, so that repeats really happen within a test.
GROUP_WAIT_S = 1
GROUP_INTERVAL_S = 1
REPEAT_INTERVAL_S = 2
# Every process gets this long to come up.
START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 30.0

RUN_DONE = ("recovered", "escalated", "failed", "cancelled")
DEDUPLICATED = "caretaker_alerts_deduplicated_total"
UNAUTHORIZED = 'caretaker_webhook_rejected_total{reason="unauthorized"}'


@dataclass(frozen=True)
class Webhook:
    """The caretaker webhook process under test."""

    url: str
    log_path: Path

    def metric(self, sample: str) -> float:
        """One sample of /metrics, named with its labels; 0 before it is first counted."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == sample:
                return float(value)
        return 0.0


@dataclass(frozen=True)
class Alertmanager:
    """A real Alertmanager whose one receiver is the caretaker webhook."""

    url: str
    log_path: Path

    def fire(self, labels: dict[str, str], annotations: dict[str, str], starts_at: str) -> None:
        self._post({"labels": labels, "annotations": annotations, "startsAt": starts_at})

    def resolve(self, labels: dict[str, str], annotations: dict[str, str], starts_at: str) -> None:
        ends_at = _rfc3339(datetime.now(UTC))
        self._post(
            {"labels": labels, "annotations": annotations, "startsAt": starts_at, "endsAt": ends_at}
        )

    def fingerprint(self, alertname: str) -> str:
        """Alertmanager's own fingerprint of the one active alert with this name."""
        response = httpx.get(
            f"{self.url}/api/v2/alerts", params={"filter": f'alertname="{alertname}"'}, timeout=5
        )
        response.raise_for_status()
        alerts = response.json()
        assert len(alerts) == 1, alerts
        return str(alerts[0]["fingerprint"])

    def _post(self, one_alert: dict[str, Any]) -> None:
        response = httpx.post(f"{self.url}/api/v2/alerts", json=[one_alert], timeout=5)
        assert response.status_code == 200, response.text


@dataclass(frozen=True)
class Service:
    """The tiny HTTP service of tests/data/service.py, on its own port and pidfile."""

    port: int
    pidfile: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def answers(self) -> bool:
        try:
            return httpx.get(self.health_url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None

    def stop(self) -> None:
        """Stop whatever process the pidfile names: the restarted, detached service."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="module")
def webhook(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    """`caretaker webhook` as its own process, with bearer-token auth on."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("webhook") / "webhook.log"
    process = _start(
        [
            sys.executable,
            "-m",
            "workers.cli",
            "webhook",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log_path,
        env={**os.environ, **TEST_ENV, "CARETAKER_WEBHOOK_TOKEN": TOKEN},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(f"{url}/healthz", process, log_path, "the caretaker webhook")
        yield Webhook(url, log_path)
    finally:
        _stop(process)


@pytest.fixture
def alertmanager(webhook: Webhook, tmp_path: Path) -> Iterator[Alertmanager]:
    """A fresh Alertmanager per test, so no alert of one scenario is repeated into the next."""
    if not Path(ALERTMANAGER).exists():
        pytest.fail(f"alertmanager is required at {ALERTMANAGER}", pytrace=False)
    config_path = tmp_path / "alertmanager.yml"
    # JSON is YAML, and needs no quoting rules for the token.
    config_path.write_text(json.dumps(_alertmanager_config(webhook), indent=2))
    port = free_port()
    log_path = tmp_path / "alertmanager.log"
    process = _start(
        [
            ALERTMANAGER,
            f"--config.file={config_path}",
            f"--storage.path={tmp_path / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(f"{url}/-/ready", process, log_path, "alertmanager")
        yield Alertmanager(url, log_path)
    finally:
        _stop(process)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    """A port and pidfile for the service; whatever runs under the pidfile is stopped after."""
    running = Service(port=free_port(), pidfile=tmp_path / "service.pid")
    yield running
    running.stop()


def _alertmanager_config(webhook: Webhook) -> dict[str, Any]:
    receiver = {
        "url": f"{webhook.url}/api/v1/alerts",
        "send_resolved": True,
        "http_config": {"authorization": {"credentials": TOKEN}},
    }
    return {
        "route": {
            "receiver": "caretaker",
            "group_by": ["alertname"],
            "group_wait": f"{GROUP_WAIT_S}s",
            "group_interval": f"{GROUP_INTERVAL_S}s",
            "repeat_interval": f"{REPEAT_INTERVAL_S}s",
        },
        "receivers": [{"name": "caretaker", "webhook_configs": [receiver]}],
    }


def _start(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)


def _wait_up(url: str, process: subprocess.Popen[bytes], log_path: Path, what: str) -> None:
    def up() -> bool:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout_s=START_TIMEOUT_S, what=f"{what} at {url}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _crash(service: Service) -> int:
    """Start the service, see it answer, kill it; return the pid it had."""
    process = subprocess.Popen(
        [sys.executable, str(DATA / "service.py"), str(service.port), str(service.pidfile)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(service.answers, timeout_s=10, what="the service to answer before the crash")
    finally:
        process.kill()
        process.wait(timeout=10)
    assert not service.answers()
    return process.pid


def _occurrences(db: Conn, fingerprint: str) -> list[Row]:
    return db.execute(
        "SELECT * FROM occurrences WHERE fingerprint = %s ORDER BY id", (fingerprint,)
    ).fetchall()


def _runs(db: Conn, fingerprint: str) -> list[Row]:
    return db.execute(
        """
        SELECT r.* FROM runs r JOIN occurrences o ON o.id = r.occurrence_id
         WHERE o.fingerprint = %s ORDER BY r.id
        """,
        (fingerprint,),
    ).fetchall()


def _steps(db: Conn, run_id: int) -> dict[str, Row]:
    rows = db.execute(
        "SELECT * FROM steps WHERE run_id = %s ORDER BY position", (run_id,)
    ).fetchall()
    return {row["name"]: row for row in rows}


def _incidents(db: Conn) -> list[Row]:
    return db.execute("SELECT * FROM incidents ORDER BY id").fetchall()


def _finished_run(db: Conn, fingerprint: str, webhook: Webhook, am: Alertmanager) -> Row:
    def finished() -> Row | None:
        rows = _runs(db, fingerprint)
        return rows[0] if rows and rows[0]["status"] in RUN_DONE else None

    try:
        return wait_for(finished, timeout_s=RUN_TIMEOUT_S, what="the run to finish")
    except AssertionError as exc:
        logs = {
            "webhook": webhook.log_path,
            "worker": STATE_DIR / "worker.log",
            "alertmanager": am.log_path,
        }
        tails = "\n".join(f"--- {name}:\n{_tail(path)}" for name, path in logs.items())
        raise AssertionError(f"{exc}; runs: {_runs(db, fingerprint)}\n{tails}") from exc


def _wait_for_repeat(webhook: Webhook, repeats_before: float) -> None:
    wait_for(
        lambda: webhook.metric(DEDUPLICATED) > repeats_before,
        timeout_s=5 * REPEAT_INTERVAL_S,
        what="alertmanager to repeat its notification",
    )


def _service_down(
    name: str, port: int, restart_script: Path, pidfile: Path
) -> tuple[dict[str, str], dict[str, str]]:
    labels = {"alertname": name, "port": str(port), "instance": f"127.0.0.1:{port}"}
    annotations = {
        "summary": f"service on port {port} is down",
        "health_url": f"http://127.0.0.1:{port}/",
        "restart_script": str(restart_script),
        "pidfile": str(pidfile),
    }
    return labels, annotations


@pytest.mark.e2e
def test_alertmanager_alert_restarts_a_dead_service(
    db: Conn,
    worker: subprocess.Popen[bytes],
    webhook: Webhook,
    alertmanager: Alertmanager,
    service: Service,
) -> None:
    crashed_pid = _crash(service)
    restart_script = DATA / "restart_service.py"
    labels, annotations = _service_down(
        "ServiceDown", service.port, restart_script, service.pidfile
    )
    refused_before = webhook.metric(UNAUTHORIZED)

    alertmanager.fire(labels, annotations, _rfc3339(datetime.now(UTC) - timedelta(seconds=5)))
    fingerprint = alertmanager.fingerprint("ServiceDown")
    run = _finished_run(db, fingerprint, webhook, alertmanager)

    assert run["status"] == "recovered", run
    assert run["runbook"] == "service-down"
    assert run["incident_id"] is None
    steps = _steps(db, run["id"])
    assert list(steps) == ["diagnose", "restart", "confirm"]
    assert steps["diagnose"]["status"] == "succeeded"
    assert steps["diagnose"]["result"]["status"] == "critical"
    assert steps["restart"]["status"] == "succeeded", steps["restart"]
    assert steps["restart"]["result"]["exit_code"] == 0
    assert steps["restart"]["result"]["argv"] == [
        sys.executable,
        str(restart_script),
        str(service.port),
        str(service.pidfile),
    ]
    assert steps["confirm"]["status"] == "succeeded"
    assert steps["confirm"]["result"]["status"] == "healthy"
    assert _incidents(db) == []
    assert service.answers()
    # The pidfile now names the process the restart command started, not the crashed one.
    wait_for(lambda: service.pid() not in (None, crashed_pid), 5, "the restarted pid")

    _wait_for_repeat(webhook, webhook.metric(DEDUPLICATED))
    occurrences = _occurrences(db, fingerprint)
    assert len(occurrences) == 1
    assert occurrences[0]["status"] == "firing"
    assert occurrences[0]["last_seen_at"] > occurrences[0]["received_at"]
    assert len(_runs(db, fingerprint)) == 1
    assert _incidents(db) == []
    # Every delivery from Alertmanager carried the token; a request without it is refused.
    assert webhook.metric(UNAUTHORIZED) == refused_before
    anonymous = httpx.post(f"{webhook.url}/api/v1/alerts", json=notification(alert()), timeout=5)
    assert anonymous.status_code == 401

    service.stop()
    wait_for(lambda: not service.answers(), 10, "the restarted service to stop")


@pytest.mark.e2e
def test_failed_restart_escalates_once_and_resolves_with_the_alert(
    db: Conn,
    worker: subprocess.Popen[bytes],
    webhook: Webhook,
    alertmanager: Alertmanager,
    sink: NotifySink,
    tmp_path: Path,
) -> None:
    port = free_port()
    labels, annotations = _service_down(
        "ServiceDownBroken", port, DATA / "failing_restart.py", tmp_path / "service.pid"
    )
    starts_at = _rfc3339(datetime.now(UTC) - timedelta(seconds=5))

    alertmanager.fire(labels, annotations, starts_at)
    fingerprint = alertmanager.fingerprint("ServiceDownBroken")
    run = _finished_run(db, fingerprint, webhook, alertmanager)

    assert run["status"] == "escalated", run
    steps = _steps(db, run["id"])
    assert list(steps) == ["diagnose", "restart", "confirm", "escalate"]
    assert steps["diagnose"]["status"] == "succeeded"
    assert steps["diagnose"]["result"]["status"] == "critical"
    restart = steps["restart"]
    assert restart["status"] == "failed"
    assert restart["result"]["exit_code"] == 3
    assert restart["error"] == "command exited with 3"
    assert steps["confirm"]["status"] == "skipped"
    assert steps["escalate"]["status"] == "succeeded", steps["escalate"]

    incidents = _incidents(db)
    assert len(incidents) == 1
    incident = incidents[0]
    assert incident["status"] == "open"
    assert incident["severity"] == "critical"
    assert (incident["source"], incident["dedup_key"]) == ("alertmanager", fingerprint)
    assert run["incident_id"] == incident["id"]
    assert steps["escalate"]["result"]["incident_id"] == incident["id"]
    events = timeline(db, incident["id"])
    kinds = [event["kind"] for event in events]
    assert "incident_opened" in kinds
    assert any(
        event["kind"] == "step_failed" and event["step_id"] == restart["id"] for event in events
    ), kinds

    received = wait_for(lambda: sink.received, 15, "the incident notification")
    assert len(received) == 1
    assert received[0]["event"] == "opened"
    assert received[0]["incident"]["id"] == incident["id"]
    assert received[0]["incident"]["severity"] == "critical"
    assert received[0]["dedup_key"] == f"alertmanager:{fingerprint}"

    _wait_for_repeat(webhook, webhook.metric(DEDUPLICATED))
    assert len(_occurrences(db, fingerprint)) == 1
    assert len(_runs(db, fingerprint)) == 1
    assert [row["id"] for row in _incidents(db)] == [incident["id"]]
    assert len(sink.received) == 1

    alertmanager.resolve(labels, annotations, starts_at)
    resolved = wait_for(
        lambda: [row for row in _incidents(db) if row["status"] == "resolved"],
        timeout_s=10,
        what="the incident to be resolved by alertmanager",
    )
    assert [row["id"] for row in resolved] == [incident["id"]]
    assert resolved[0]["resolved_by"] == "alertmanager"
    occurrences = _occurrences(db, fingerprint)
    assert len(occurrences) == 1
    assert occurrences[0]["status"] == "resolved"
    assert occurrences[0]["ends_at"] is not None
    assert "incident_resolved" in [event["kind"] for event in timeline(db, incident["id"])]

"""Fixtures on the real services: a private PostgreSQL database, a Redis db, a Celery worker.

The environment is set before any caretaker module reads its settings. A missing service makes
the tests fail with a message saying which; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import psutil
import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
PG_HOST = os.environ.get("CARETAKER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("CARETAKER_TEST_REDIS", "redis://127.0.0.1:6379/11")
DB_NAME = f"caretaker_test_{uuid.uuid4().hex[:8]}"
DATABASE_URL = f"{PG_HOST}/{DB_NAME}"
STATE_DIR = Path(tempfile.mkdtemp(prefix="caretaker-test-"))
CONFIG_PATH = STATE_DIR / "config.yml"
WEBHOOK_TOKEN = "test-token"
# A service's environment, repository and package index for hotfix tests, made by their fixtures.
DEMO_VENV = STATE_DIR / "demo-venv"
DEMO_REPO = STATE_DIR / "demo-repo"
WHEELS = STATE_DIR / "wheels"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


NOTIFY_PORT = free_port()
HEALTH_PORT = free_port()

TEST_ENV = {
    "CARETAKER_DATABASE_URL": DATABASE_URL,
    "CARETAKER_BROKER_URL": REDIS_URL,
    "CARETAKER_CONFIG": str(CONFIG_PATH),
    "CARETAKER_LEASE_S": "6",
    "CARETAKER_DISPATCH_GRACE_S": "1",
    "CARETAKER_NOTIFY_MAX_RETRIES": "1",
    "CARETAKER_LOG_LEVEL": "INFO",
    "CARETAKER_PACKAGE_INDEX_URL": f"file://{WHEELS}",
}
os.environ.update(TEST_ENV)


def write_config() -> None:
    python = sys.executable
    config = {
        "actions": {"allowlist": [python, "/bin/false"]},
        "notify": {"webhooks": [{"name": "sink", "url": f"http://127.0.0.1:{NOTIFY_PORT}/"}]},
        "checks": {
            "application": [
                {
                    "name": "web",
                    "check": "http",
                    "params": {
                        "url": f"http://127.0.0.1:{HEALTH_PORT}/",
                        "max_latency_ms": 300,
                        "timeout_s": 3,
                    },
                }
            ]
        },
        "targets": [
            {
                "name": "demo",
                "python": str(DEMO_VENV / "bin" / "python"),
                "test_command": [python, str(DATA / "demo_suite.py"), str(DEMO_VENV)],
                "restart_command": [python, "-c", "pass"],
                "health": {
                    "name": "health",
                    "kind": "verify",
                    "action": "check_http",
                    "params": {"url": f"http://127.0.0.1:{HEALTH_PORT}/", "timeout_s": 2},
                },
                "repository": str(DEMO_REPO),
                "requirements": str(DEMO_REPO / "requirements.txt"),
            }
        ],
        "analysis": {
            "series": [{"name": "web-latency", "target": "web", "baseline_days": 1}],
            "capacity": [
                {"name": "web-latency", "target": "web", "threshold": 300, "capacity": 400}
            ],
        },
        "runbooks": [
            {
                "name": "web-slow",
                "matchers": ['check="http"', 'component="web"'],
                "steps": [
                    {
                        "name": "flush-cache",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {"argv": [python, "-c", "pass"]},
                    },
                    {
                        "name": "confirm",
                        "kind": "verify",
                        "action": "check_http",
                        "params": {
                            "url": f"http://127.0.0.1:{HEALTH_PORT}/",
                            "max_latency_ms": 300,
                            "timeout_s": 3,
                        },
                        "attempts": 2,
                        "delay_s": 0.2,
                    },
                ],
            },
            {
                "name": "service-down",
                "matchers": ['alertname=~"ServiceDown|ServiceDownBroken"'],
                "steps": [
                    {
                        "name": "diagnose",
                        "kind": "check",
                        "action": "check_http",
                        "params": {"url": "{{ annotations.health_url }}", "timeout_s": 2},
                    },
                    {
                        "name": "restart",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {
                            "argv": [
                                python,
                                "{{ annotations.restart_script }}",
                                "{{ labels.port }}",
                                "{{ annotations.pidfile }}",
                            ],
                            "timeout_s": 20,
                        },
                    },
                    {
                        "name": "confirm",
                        "kind": "verify",
                        "action": "check_http",
                        "params": {"url": "{{ annotations.health_url }}", "timeout_s": 2},
                        "attempts": 5,
                        "delay_s": 0.5,
                    },
                ],
                "on_failure": {"escalate": True, "severity": "critical"},
            },
            {
                "name": "change-with-rollback",
                "matchers": ['alertname="Change"'],
                "steps": [
                    {
                        "name": "apply",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {
                            "argv": [
                                python,
                                str(DATA / "write_state.py"),
                                "{{ annotations.state_file }}",
                                "new",
                            ]
                        },
                    },
                    {
                        "name": "confirm",
                        "kind": "verify",
                        "action": "check_http",
                        "params": {"url": "{{ annotations.health_url }}", "timeout_s": 1},
                    },
                ],
                "rollback": [
                    {
                        "name": "restore",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {
                            "argv": [
                                python,
                                str(DATA / "write_state.py"),
                                "{{ annotations.state_file }}",
                                "{{ annotations.restore_to }}",
                            ]
                        },
                    },
                ],
            },
            {
                "name": "long-step",
                "matchers": ['alertname="LongStep"'],
                "steps": [
                    {
                        "name": "work",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {
                            "argv": [python, "-c", "import time; time.sleep(9)"],
                            "timeout_s": 30,
                        },
                    },
                ],
            },
            {
                "name": "slow-check",
                "matchers": ['alertname="SlowCheck"'],
                "steps": [
                    {
                        "name": "wait",
                        "kind": "recover",
                        "action": "run_command",
                        "params": {
                            "argv": [python, "-c", "import time; time.sleep(30)"],
                            "timeout_s": 60,
                        },
                    },
                ],
            },
        ],
    }
    CONFIG_PATH.write_text(json.dumps(config, indent=2))


write_config()

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout_s: float = 30.0, what: str = "") -> T:
    """Poll probe until it returns something truthy; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or probe}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def database() -> Iterator[str]:
    """A private database, migrated, dropped at the end of the session."""
    from workers.db import close_pool, migrate

    try:
        migrate(DATABASE_URL)
    except Exception as exc:
        pytest.fail(f"PostgreSQL is required at {PG_HOST}: {exc}", pytrace=False)
    yield DATABASE_URL
    close_pool()
    with psycopg.connect(f"{PG_HOST}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")


@pytest.fixture(scope="session")
def broker() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc}", pytrace=False)
    return client


TABLES = (
    "events, notifications, steps, runs, occurrences, incidents, heartbeats, check_results,"
    " reports, series_baselines, anomalies, log_offsets, log_counts, backups, backup_checks,"
    " drills, target_leases, security_findings"
)


@pytest.fixture
def db(database: str, broker: redis.Redis) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    """An empty caretaker database and broker, and a connection to look at the rows."""
    from psycopg.rows import dict_row

    broker.flushdb()
    with psycopg.connect(database, autocommit=True, row_factory=dict_row) as conn:
        # A worker of an earlier module may still be finishing a task on these tables.
        for attempt in range(5):
            try:
                conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
                break
            except psycopg.errors.DeadlockDetected:
                if attempt == 4:
                    raise
                time.sleep(0.5)
        yield conn


def celery_worker(queues: str, concurrency: int) -> list[str]:
    """The argv of a real Celery worker on these queues, with a unique node name."""
    return [
        *[sys.executable, "-m", "celery", "-A", "workers.app", "worker"],
        *["-Q", queues, "-c", str(concurrency), "--loglevel", "INFO"],
        *["-n", f"test-{uuid.uuid4().hex[:6]}@%h"],
    ]


@contextmanager
def running_worker(log_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker on every queue with this environment, until the block ends; then it
    is stopped with its pool's processes."""
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            celery_worker("alerts,checks,analysis,remediation,maintenance,incidents", 3),
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    wait_for(
        lambda: b"ready." in log_path.read_bytes() or process.poll() is not None,
        timeout_s=60,
        what="the celery worker to start",
    )
    if process.poll() is not None:
        pytest.fail(f"celery worker exited:\n{log_path.read_text()[-3000:]}", pytrace=False)
    try:
        yield process
    finally:
        children = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        # The pool's processes must be gone too before the next module empties the tables.
        for child in psutil.wait_procs(children, timeout=10)[1]:
            child.kill()


# Module scope: tests that inspect queued messages must not share the broker with a worker.
@pytest.fixture(scope="module")
def worker(database: str, broker: redis.Redis) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process on every queue, sharing the tests' database and broker."""
    with running_worker(STATE_DIR / "worker.log", {**os.environ, **TEST_ENV}) as process:
        yield process


class NotifySink:
    """A JSON webhook endpoint that records what caretaker's notifier posts."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.status = 200
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                sink.received.append(json.loads(self.rfile.read(length)))
                self.send_response(sink.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", NOTIFY_PORT), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def notify_sink() -> Iterator[NotifySink]:
    sink = NotifySink()
    yield sink
    sink.server.shutdown()


@pytest.fixture
def sink(notify_sink: NotifySink) -> NotifySink:
    notify_sink.received.clear()
    notify_sink.status = 200
    return notify_sink


def alert(
    name: str = "TestAlert",
    status: str = "firing",
    fingerprint: str = "f1",
    starts_at: str = "2026-12-01T10:00:00Z",
    **labels: str,
) -> dict[str, Any]:
    """One alert in Alertmanager's webhook format."""
    return {
        "status": status,
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": f"{name} is happening"},
        "startsAt": starts_at,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-12-01T11:00:00Z",
        "generatorURL": "http://prometheus.example/graph",
        "fingerprint": fingerprint,
    }


def service_alert(fingerprint: str, port: str, status: str = "firing") -> dict[str, Any]:
    """A ServiceDown alert carrying everything the service-down runbook refers to."""
    found = alert("ServiceDown", status=status, fingerprint=fingerprint, port=port)
    found["annotations"] |= {
        "health_url": f"http://127.0.0.1:{port}/",
        "restart_script": str(DATA / "restart_service.py"),
        "pidfile": str(STATE_DIR / f"service-{port}.pid"),
    }
    return found


def notification(*alerts: dict[str, Any], truncated: int = 0) -> dict[str, Any]:
    """A webhook notification in Alertmanager's version 4 format."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="TestAlert"}',
        "truncatedAlerts": truncated,
        "status": "firing",
        "receiver": "caretaker",
        "groupLabels": {"alertname": "TestAlert"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": list(alerts),
    }


class Processes:
    """Starts caretaker's real processes for a test and stops them afterwards."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self, args: list[str], env: dict[str, str] | None = None, name: str = "process"
    ) -> subprocess.Popen[bytes]:
        log_path = STATE_DIR / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                args,
                cwd=ROOT,
                env={**os.environ, **TEST_ENV, **(env or {})},
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        process.log_path = log_path  # type: ignore[attr-defined]
        self.started.append(process)
        return process

    def webhook(self, env: dict[str, str] | None = None) -> str:
        """Start `caretaker webhook` on a free port; return its base URL once healthy."""
        import httpx

        port = free_port()
        process = self.start(
            [sys.executable, "-m", "workers.cli", "webhook", "--port", str(port)],
            env,
            name="webhook",
        )
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"webhook exited: {process.log_path.read_text()}")  # type: ignore[attr-defined]
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        wait_for(up, timeout_s=30, what="the webhook to listen")
        return url

    def stop_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    yield started
    started.stop_all()


def queued_tasks(client: redis.Redis, queue: str) -> list[tuple[str, Any]]:
    """The (task name, args) of every message waiting in a Celery queue on Redis."""
    import base64

    found = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        found.append((message["headers"]["task"], body[0]))
    return found

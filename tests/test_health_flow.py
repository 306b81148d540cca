"""warning -> recover -> verify -> escalate, then healthy -> resolved, on a real worker."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from tests.conftest import HEALTH_PORT, wait_for
from workers.app import app

Conn = psycopg.Connection[dict[str, Any]]


class ControlledServer:
    """An HTTP service whose answers the test slows down and speeds up."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(server.delay_s)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", HEALTH_PORT), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


@pytest.fixture
def web() -> Iterator[ControlledServer]:
    server = ControlledServer()
    yield server
    server.http.shutdown()
    server.http.server_close()


def check_web() -> None:
    app.send_task("caretaker.health.check_target", args=["web"])


def test_a_slow_service_is_recovered_verified_escalated_then_resolved(
    db: Conn, worker: subprocess.Popen[bytes], web: ControlledServer
) -> None:
    web.delay_s = 0.5  # over the target's max_latency_ms of 300: a warning

    check_web()
    run = wait_for(
        lambda: db.execute("SELECT * FROM runs WHERE status NOT IN ('running')").fetchone(),
        timeout_s=30,
        what="the recovery run to finish",
    )

    assert (run["runbook"], run["status"]) == ("web-slow", "escalated")
    steps = db.execute("SELECT name, status FROM steps ORDER BY position").fetchall()
    assert [(s["name"], s["status"]) for s in steps] == [
        ("flush-cache", "succeeded"),
        ("confirm", "failed"),
        ("escalate", "succeeded"),
    ]
    incident = db.execute("SELECT * FROM incidents").fetchone()
    assert incident is not None
    assert (incident["source"], incident["dedup_key"], incident["status"]) == (
        "check",
        "web",
        "open",
    )

    web.delay_s = 0.0
    check_web()
    wait_for(
        lambda: db.execute("SELECT 1 FROM incidents WHERE status = 'resolved'").fetchone(),
        timeout_s=30,
        what="the incident to resolve",
    )

    history = [r["status"] for r in db.execute("SELECT status FROM check_results ORDER BY id")]
    assert history == ["warning", "healthy"]
    episode = db.execute("SELECT status FROM occurrences").fetchall()
    assert episode == [{"status": "resolved"}]

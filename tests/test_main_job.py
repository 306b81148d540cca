"""`caretaker run`: webhook, worker and beat together, the way a new user starts caretaker."""

from __future__ import annotations

import signal
import sys
from typing import Any

import httpx
import psutil
import psycopg

from tests.conftest import STATE_DIR, Processes, alert, free_port, notification, wait_for

Conn = psycopg.Connection[dict[str, Any]]


def test_run_takes_an_alert_to_an_incident_and_stops_cleanly(
    db: Conn, processes: Processes
) -> None:
    port = free_port()
    env = {
        "CARETAKER_SWEEP_INTERVAL_S": "1",
        "CARETAKER_BEAT_SCHEDULE_FILE": str(STATE_DIR / "beat-schedule"),
    }
    main = processes.start(
        [sys.executable, "-m", "workers.cli", "run", "--port", str(port)], env, name="run"
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, timeout_s=60, what="caretaker run to serve /healthz")
    answer = httpx.post(
        f"{url}/api/v1/alerts", json=notification(alert("Unmatched", fingerprint="m1")), timeout=10
    )

    assert answer.status_code == 200
    incident = wait_for(
        lambda: db.execute("SELECT * FROM incidents WHERE source = 'alertmanager'").fetchone(),
        timeout_s=60,
        what="an incident",
    )
    assert incident["title"] == "Unmatched is happening"
    # Beat runs too: the sweeper records its passes.
    wait_for(
        lambda: db.execute("SELECT 1 FROM heartbeats WHERE name = 'sweeper'").fetchone(),
        timeout_s=30,
        what="a sweeper pass fired by beat",
    )

    children = psutil.Process(main.pid).children(recursive=True)
    main.send_signal(signal.SIGTERM)
    main.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == []

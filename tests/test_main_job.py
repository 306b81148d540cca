"""`caretaker run`: webhook, worker and beat together, the way a new user starts caretaker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from tests.conftest import (
    STATE_DIR,
    TEST_ENV,
    Processes,
    alert,
    free_port,
    notification,
    wait_for,
)
from workers import supervisor

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
    assert main.returncode == 0
    log = main.log_path.read_text()  # type: ignore[attr-defined]
    assert f"caretaker ready: webhook on {url}/api/v1/alerts\n" in log
    assert log.count("caretaker ready:") == 1
    assert "Traceback" not in log
    for name in ("webhook", "worker", "beat"):
        assert f"INFO caretaker {name} stopped " in log


STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "time.sleep(120)\n"
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_dies_is_named_and_a_stubborn_one_killed_with_its_group(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervisor, "SHUTDOWN_GRACE_S", 1.0)
    caplog.set_level(logging.INFO, logger="caretaker")
    children = {
        "webhook": supervisor.start(python("import time; time.sleep(120)")),
        "worker": supervisor.start(python(STUBBORN)),
        "beat": supervisor.start(python("import time; time.sleep(1); raise SystemExit(3)")),
    }
    wait_for(lambda: psutil.Process(children["worker"].pid).children(), what="SIGTERM ignored")
    grandchild = psutil.Process(children["worker"].pid).children()[0]

    code = supervisor.supervise(children, "127.0.0.1", free_port(), [])

    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert (
        errors[0]
        == f"beat exited on its own code=3 pid={children['beat'].pid}; stopping the others"
    )
    assert errors[1] == (
        f"killing worker pid={children['worker'].pid}: still running 1s after SIGTERM"
    )
    assert len(errors) == 2
    assert [child.returncode for child in children.values()] == [
        -signal.SIGTERM,
        -signal.SIGKILL,
        3,
    ]
    psutil.wait_procs([grandchild], timeout=5)
    assert not grandchild.is_running()


def test_a_signal_stops_the_children_and_a_second_one_kills_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="caretaker")
    children = {
        "webhook": supervisor.start(python("import time; time.sleep(120)")),
        "worker": supervisor.start(python(STUBBORN)),
    }
    wait_for(lambda: psutil.Process(children["worker"].pid).children(), what="SIGTERM ignored")
    received: list[int] = [signal.SIGINT]
    threading.Timer(1.0, received.append, [signal.SIGINT]).start()
    started = time.monotonic()

    code = supervisor.supervise(children, "127.0.0.1", free_port(), received)

    assert code == 1
    assert time.monotonic() - started < 10  # far less than the grace
    assert caplog.records[0].getMessage().startswith("stopping on signal=SIGINT; ")
    killed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert killed == [f"killing worker pid={children['worker'].pid}: told again to stop"]


def test_ready_is_said_once_when_healthz_answers(capsys: pytest.CaptureFixture[str]) -> None:
    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    children = {"webhook": supervisor.start(python("import time; time.sleep(120)"))}
    received: list[int] = []
    threading.Timer(2.0, received.append, [signal.SIGTERM]).start()

    code = supervisor.supervise(children, "0.0.0.0", port, received)
    server.shutdown()

    assert code == 0
    assert capsys.readouterr().out == (
        f"caretaker ready: webhook on http://127.0.0.1:{port}/api/v1/alerts\n"
    )


def test_run_refuses_to_start_with_a_broken_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("runbooks:\n  - name: x\n    matchers: ['alertname']\n    steps: []\n")

    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "run", "--port", str(free_port())],
        env={**os.environ, **TEST_ENV, "CARETAKER_CONFIG": str(broken)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert f"{broken}: runbooks[0].matchers[0]: not a label matcher" in result.stderr

"""Metrics served from the stored results, and scraped by a real Prometheus."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fastapi.testclient import TestClient

from tests.conftest import Processes, free_port, wait_for
from workers import health
from workers.config import CheckTarget, get_config
from workers.db import transaction
from workers.settings import Settings
from workers.webhook import create_app

Conn = psycopg.Connection[dict[str, Any]]
WEB = CheckTarget(name="web", check="http", params={"url": "http://127.0.0.1:1/"})


def record(status: str, value: float) -> None:
    result = {"status": status, "value": value, "summary": "s", "details": {}, "duration_s": 0.25}
    with transaction() as conn:
        health.record_result(conn, "application", WEB, result, get_config())


def test_latest_check_results_are_served_as_metrics(db: Conn) -> None:
    record("healthy", 12.0)
    record("warning", 480.0)

    text = TestClient(create_app(Settings())).get("/metrics").text

    labels = '{check="http",component="web",group="application"}'
    assert f"caretaker_check_status{labels} 1.0" in text
    assert f"caretaker_check_value{labels} 480.0" in text
    assert f"caretaker_check_duration_seconds{labels} 0.25" in text
    assert "caretaker_metrics_database_up 1.0" in text


def test_runs_and_steps_are_counted(db: Conn) -> None:
    record("critical", 1.0)
    from tasks.alerts import route_one
    from tasks.runs import execute_step

    with transaction() as conn:
        first = route_one(conn, 1, get_config())
    assert first is not None
    execute_step.run(first.id)

    text = TestClient(create_app(Settings())).get("/metrics").text

    assert 'caretaker_runs{runbook="default-escalate",status="escalated"} 1.0' in text
    assert 'caretaker_steps_finished{kind="escalate",status="succeeded"} 1.0' in text


def test_a_real_prometheus_scrapes_the_check_status(db: Conn, processes: Processes) -> None:
    record("critical", 3.0)
    webhook = processes.webhook()
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="caretaker-prom-"))
    (workdir / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: caretaker\n"
        f"    static_configs: [{{targets: ['{webhook.removeprefix('http://')}']}}]\n"
    )
    processes.start(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        name="prometheus",
    )

    def queried() -> list[Any] | None:
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": 'caretaker_check_status{component="web"}'},
                timeout=2,
            ).json()
        except (httpx.HTTPError, ValueError):
            return None
        found: list[Any] = answer.get("data", {}).get("result", [])
        return found or None

    [series] = wait_for(queried, timeout_s=60, what="prometheus to scrape caretaker")

    assert series["metric"]["group"] == "application"
    assert series["metric"]["check"] == "http"
    assert series["value"][1] == "2"

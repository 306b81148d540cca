"""`caretaker flower` serves Flower on the same broker, behind basic auth."""

from __future__ import annotations

import sys

import httpx
import redis
from click.testing import CliRunner

from tests.conftest import STATE_DIR, Processes, free_port, wait_for
from workers.cli import cli


def test_flower_requires_auth_and_sees_the_broker(
    processes: Processes, broker: redis.Redis
) -> None:
    port = free_port()
    env = {
        "CARETAKER_FLOWER_PORT": str(port),
        "CARETAKER_FLOWER_PASSWORD": "flower-pw",
        "CARETAKER_FLOWER_DB": str(STATE_DIR / "flower.db"),
    }
    processes.start([sys.executable, "-m", "workers.cli", "flower"], env, name="flower")
    url = f"http://127.0.0.1:{port}"

    def listening() -> httpx.Response | None:
        try:
            return httpx.get(url, timeout=2)
        except httpx.HTTPError:
            return None

    anonymous = wait_for(listening, timeout_s=30, what="flower to listen")
    signed_in = httpx.get(f"{url}/api/workers", auth=("admin", "flower-pw"), timeout=10)
    wrong = httpx.get(url, auth=("admin", "nope"), timeout=10)

    assert anonymous.status_code == 401
    assert wrong.status_code == 401
    assert signed_in.status_code == 200


def test_flower_never_runs_without_a_password() -> None:
    result = CliRunner().invoke(cli, ["flower"])

    assert result.exit_code == 1
    assert "CARETAKER_FLOWER_PASSWORD" in result.output

"""Tests of tasks.checks against a real local HTTP server and this host's own readings."""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks.checks import HttpParams, SystemParams, check_http, check_system, worst
from tests.conftest import free_port

SLOW_S = 0.3


class Handler(BaseHTTPRequestHandler):
    """Answers by path: /ok, /unavailable, /slow, /redirect."""

    def do_GET(self) -> None:
        if self.path == "/ok":
            self.answer(200, b"all systems nominal")
        elif self.path == "/unavailable":
            self.answer(503, b"down for maintenance")
        elif self.path == "/slow":
            time.sleep(SLOW_S)
            self.answer(200, b"slow but fine")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.answer(404, b"no such page")

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """The base URL of a local HTTP server that runs for this module's tests."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (via the backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


@pytest.fixture
def trickle_port() -> Iterator[int]:
    """A port that answers 200 but sends its body one byte every 0.4 s for about 4 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            for _ in range(10):
                time.sleep(0.4)
                try:
                    conn.sendall(b"x")
                except OSError:
                    return  # the check gave up and closed the connection

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


def test_healthy_endpoint(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/ok", body_contains="nominal"))

    assert result.status == "healthy"
    assert result.value is not None and 0 < result.value < 5000
    assert result.details["status_code"] == 200
    assert result.details["latency_ms"] == pytest.approx(result.value, abs=0.1)
    assert f"{server}/ok answered 200" in result.summary
    assert result.duration_s > 0


def test_unexpected_status_is_critical(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/unavailable"))

    assert result.status == "critical"
    assert result.details["status_code"] == 503
    assert "expected [200]" in result.summary


def test_an_expected_error_status_is_healthy(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/unavailable", expected_status=[503]))

    assert result.status == "healthy"


def test_body_without_the_expected_text_is_critical(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/ok", body_contains="database ok"))

    assert result.status == "critical"
    assert "body lacks 'database ok'" in result.summary


def test_over_max_latency_is_a_warning(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/slow", max_latency_ms=SLOW_S * 1000 / 3))

    assert result.status == "warning"
    assert result.value is not None and result.value >= SLOW_S * 1000
    assert "over 100 ms" in result.summary


def test_under_max_latency_is_healthy(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/slow", max_latency_ms=10_000))

    assert result.status == "healthy"


def test_connection_refused_is_critical() -> None:
    url = f"http://127.0.0.1:{free_port()}/"

    result = check_http(HttpParams(url=url, timeout_s=2))

    assert result.status == "critical"
    assert result.summary.startswith(f"cannot reach {url}: ")
    assert result.details["url"] == url
    assert result.details["error"]
    assert result.value is None


def test_no_answer_is_critical_within_the_timeout(silent_port: int) -> None:
    url = f"http://127.0.0.1:{silent_port}/"
    timeout_s = 0.5
    started = time.monotonic()

    result = check_http(HttpParams(url=url, timeout_s=timeout_s))

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"
    assert result.details == {"url": url, "error": "timeout"}
    assert result.summary == f"no answer from {url} within {timeout_s}s"


def test_a_slowly_trickling_answer_is_bounded_by_the_timeout(trickle_port: int) -> None:
    # Each read arrives well within timeout_s, but the whole answer takes about 4 s.
    timeout_s = 1.0
    started = time.monotonic()

    result = check_http(HttpParams(url=f"http://127.0.0.1:{trickle_port}/", timeout_s=timeout_s))

    assert time.monotonic() - started < timeout_s + 1
    assert result.status == "critical"


def test_redirect_is_not_followed_by_default(server: str) -> None:
    result = check_http(HttpParams(url=f"{server}/redirect"))

    assert result.status == "critical"
    assert result.details["status_code"] == 302


def test_redirect_followed_when_asked(server: str) -> None:
    result = check_http(
        HttpParams(url=f"{server}/redirect", follow_redirects=True, body_contains="nominal")
    )

    assert result.status == "healthy"
    assert result.details["status_code"] == 200


def generous() -> SystemParams:
    return SystemParams(
        cpu_warning_pct=100,
        cpu_critical_pct=100,
        memory_warning_pct=100,
        memory_critical_pct=100,
        disk_warning_pct=100,
        disk_critical_pct=100,
        cpu_sample_s=0.2,
    )


def test_system_healthy_with_generous_thresholds() -> None:
    result = check_system(generous())

    cpu, memory = result.details["cpu_pct"], result.details["memory_pct"]
    assert 0 <= cpu <= 100
    assert 0 < memory <= 100
    # A threshold of 100 never fires, however busy the CPU.
    assert result.status == "healthy"
    assert result.summary == f"cpu {cpu:.0f}%, memory {memory:.0f}%"
    assert result.value == max(cpu, memory)
    assert 0 <= result.details["disks"]["/"]["used_pct"] < 100
    assert result.details["load_1m_per_cpu"] >= 0
    assert result.duration_s >= 0.2


def test_system_missing_disk_path_is_critical() -> None:
    missing = "/nonexistent/caretaker-test-disk"
    params = generous().model_copy(update={"disk_paths": ["/", missing]})

    result = check_system(params)

    assert result.status == "critical"
    assert result.details["disks"][missing] == {"error": "No such file or directory"}
    assert "used_pct" in result.details["disks"]["/"]
    assert f"disk {missing}: No such file or directory" in result.summary


def test_system_zero_thresholds_are_critical() -> None:
    params = SystemParams(
        cpu_warning_pct=0,
        cpu_critical_pct=0,
        memory_warning_pct=0,
        memory_critical_pct=0,
        disk_warning_pct=0,
        disk_critical_pct=0,
        cpu_sample_s=0.1,
    )

    assert check_system(params).status == "critical"


def test_system_warning_between_thresholds() -> None:
    params = generous().model_copy(update={"memory_warning_pct": 0})

    result = check_system(params)

    assert result.status in ("warning", "critical")
    if result.details["cpu_pct"] < 100:
        assert result.status == "warning"


def test_worst_orders_statuses_by_severity() -> None:
    assert worst([]) == "healthy"
    assert worst(["healthy", "healthy"]) == "healthy"
    assert worst(["healthy", "unknown"]) == "unknown"
    assert worst(["unknown", "warning", "healthy"]) == "warning"
    assert worst(["warning", "critical", "unknown"]) == "critical"
    assert worst(["critical", "healthy"]) == "critical"


def test_system_a_directory_that_should_be_a_mount_point_is_critical(tmp_path: Path) -> None:
    params = generous().model_copy(update={"mount_points": ["/proc", str(tmp_path)]})

    result = check_system(params)

    assert result.status == "critical"
    assert result.details["unmounted"] == [str(tmp_path)]
    assert f"{tmp_path} is not mounted" in result.summary


def test_system_a_missing_process_is_critical() -> None:
    params = generous().model_copy(
        update={"processes": [Path(sys.executable).name, "caretaker-no-such-daemon"]}
    )

    result = check_system(params)

    assert result.status == "critical"
    assert result.details["missing_processes"] == ["caretaker-no-such-daemon"]


def test_system_load_over_the_threshold_is_graded() -> None:
    params = generous().model_copy(update={"load_warning_per_cpu": 1e-9})

    result = check_system(params)

    assert result.status in ("warning", "critical")
    assert "per cpu" in result.summary


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"cpu_warning_pct": 99, "cpu_critical_pct": 50},
            "cpu_warning_pct (99) must be at most cpu_critical_pct (50)",
        ),
        (
            {"disk_warning_pct": 90, "disk_critical_pct": 80},
            "disk_warning_pct (90) must be at most disk_critical_pct (80)",
        ),
    ],
)
def test_system_thresholds_out_of_order_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SystemParams.model_validate(params)


def test_config_check_reports_thresholds_out_of_order() -> None:
    from workers.config import parse_config
    from workers.errors import ConfigError

    data = {
        "checks": {
            "host": [{"name": "system", "check": "system", "params": {"memory_warning_pct": 97}}]
        }
    }

    with pytest.raises(ConfigError) as raised:
        parse_config(data)

    assert raised.value.problems == [
        "checks.host[0].params: memory_warning_pct (97) must be at most memory_critical_pct (95)"
    ]


def test_system_a_reading_that_hangs_is_critical_within_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dead network mount cannot be made here; a disk reading that never returns stands in.
    import psutil

    monkeypatch.setattr(psutil, "disk_usage", lambda path: time.sleep(5))
    params = generous().model_copy(update={"timeout_s": 0.5, "cpu_sample_s": 0.1})
    started = time.monotonic()

    result = check_system(params)

    assert time.monotonic() - started < 2
    assert result.status == "critical"
    assert result.summary == "no reading within 0.6s (a hung mount?)"

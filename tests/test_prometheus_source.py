"""Series from a real Prometheus over a backfilled history, and `caretaker analyze` on it.

The history is written as OpenMetrics, turned into TSDB blocks by promtool and served by the
prometheus binary, so every point a test expects is one the test wrote.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tasks.anomaly import to_rate
from tasks.forecast import forecast
from tasks.prometheus import auto_step_s, query_range
from tests.conftest import DATA, free_port, wait_for
from workers.cli import cli
from workers.errors import SourceError
from workers.settings import get_settings

DAY_S = 86400
SAMPLE_S = 300
HISTORY_DAYS = 60
DISK_POINTS = HISTORY_DAYS * DAY_S // SAMPLE_S + 1
DISK_START_BYTES = 100e9
DISK_SLOPES = {"/data": 2.5e9, "/logs": 0.5e9}
# The latency and request series cover the last two days of the history.
RECENT_POINTS = 2 * DAY_S // SAMPLE_S + 1
LATENCY_CYCLE = (0.20, 0.21, 0.22, 0.23, 0.24)
NON_FINITE = {100: "NaN", 101: "+Inf", 102: "-Inf"}
SPIKE_AT, SPIKE = 400, 3.0
# Requests arrive at 0.5, 1 and 1.5 a second in turn, with one burst and one restart.
REQUESTS_CYCLE = (150, 300, 450)
BURST_AT, BURST = 300, 3000
RESTART_AT = 450


@dataclass(frozen=True)
class History:
    url: str
    end_s: int

    @property
    def start_s(self) -> int:
        return self.end_s - HISTORY_DAYS * DAY_S

    @property
    def recent_s(self) -> int:
        return self.end_s - (RECENT_POINTS - 1) * SAMPLE_S


def disk_bytes(mount: str, i: int) -> float:
    return DISK_START_BYTES + DISK_SLOPES[mount] * i * SAMPLE_S / DAY_S


def latency(i: int) -> float:
    if i in NON_FINITE:
        return float(NON_FINITE[i])
    return SPIKE if i == SPIKE_AT else LATENCY_CYCLE[i % len(LATENCY_CYCLE)]


def requests_total() -> list[float]:
    counted = [1000.0]
    for i in range(1, RECENT_POINTS):
        added = BURST if i == BURST_AT else REQUESTS_CYCLE[i % len(REQUESTS_CYCLE)]
        counted.append(float(added) if i == RESTART_AT else counted[-1] + added)
    return counted


def openmetrics(history: History) -> str:
    lines = ["# TYPE disk_used_bytes gauge"]
    for mount in DISK_SLOPES:
        for i in range(DISK_POINTS):
            stamp_s = history.start_s + i * SAMPLE_S
            lines.append(f'disk_used_bytes{{mount="{mount}"}} {disk_bytes(mount, i)!r} {stamp_s}')
    lines.append("# TYPE latency_seconds gauge")
    for i in range(RECENT_POINTS):
        value = NON_FINITE.get(i) or repr(latency(i))
        lines.append(f'latency_seconds{{service="api"}} {value} {history.recent_s + i * SAMPLE_S}')
    lines.append("# TYPE http_requests counter")
    for i, counted in enumerate(requests_total()):
        stamp_s = history.recent_s + i * SAMPLE_S
        lines.append(f'http_requests_total{{job="web"}} {counted!r} {stamp_s}')
    return "\n".join([*lines, "# EOF", ""])


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(
            f"the {binary} binary is required (Debian: apt install prometheus)", pytrace=False
        )


@pytest.fixture(scope="module")
def history() -> Iterator[History]:
    """A real Prometheus serving 60 days that end on the hour, one to two hours ago."""
    require("promtool")
    require("prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="caretaker-promsource-"))
    port = free_port()
    # Whole hours keep the history's first and last samples on every step used here, and an
    # end before now lets the command line's "the last 2d" reach all of it.
    served = History(f"http://127.0.0.1:{port}", end_s=int(time.time()) // 3600 * 3600 - 3600)
    process: subprocess.Popen[bytes] | None = None
    try:
        backfill(served, workdir)
        with (workdir / "prometheus.log").open("wb") as log_file:
            process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    "--storage.tsdb.retention.time=10y",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started = process
        wait_for(lambda: _ready(started, port, workdir), timeout_s=30, what="prometheus")
        yield served
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def backfill(history: History, workdir: Path) -> None:
    """The history as TSDB blocks in workdir/data, and a configuration that scrapes nothing."""
    (workdir / "history.om").write_text(openmetrics(history))
    (workdir / "prometheus.yml").write_text("global: {}\n")
    # One long block instead of 720 two-hour ones: promtool and the start take a fraction of
    # a second instead of half a minute.
    done = subprocess.run(
        [
            *["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet"],
            *["--max-block-duration=2000h", str(workdir / "history.om"), str(workdir / "data")],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"promtool could not backfill: {done.stderr}"


def _ready(process: subprocess.Popen[bytes], port: int, workdir: Path) -> bool:
    if process.poll() is not None:
        log_text = (workdir / "prometheus.log").read_text()[-3000:]
        raise AssertionError(f"prometheus exited:\n{log_text}")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def at(stamp_s: int) -> datetime:
    return datetime.fromtimestamp(stamp_s, UTC)


def grid(start_s: int, end_s: int, step_s: int) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(
        pd.to_datetime(np.arange(start_s, end_s + 1, step_s), unit="s", utc=True)
    )


def test_without_a_step_the_smallest_round_step_within_11000_points_is_chosen() -> None:
    assert auto_step_s(3 * 3600) == 1.0
    assert auto_step_s(4 * 3600) == 5.0
    assert auto_step_s(30 * DAY_S) == 300.0
    assert auto_step_s(60 * DAY_S) == 900.0
    assert auto_step_s(400 * DAY_S) == 3600.0
    assert auto_step_s(20 * 365 * DAY_S) == 86400.0
    assert auto_step_s(50 * 365 * DAY_S) == 2 * 86400.0


def test_the_history_comes_back_point_for_point(history: History) -> None:
    found = query_range(
        history.url, "disk_used_bytes", at(history.start_s), at(history.end_s), timeout_s=10
    )

    # 60 days at the 15-minute step the range calls for: every third sample.
    assert [series.labels for series in found] == [
        {"__name__": "disk_used_bytes", "mount": "/data"},
        {"__name__": "disk_used_bytes", "mount": "/logs"},
    ]
    for series, mount in zip(found, DISK_SLOPES, strict=True):
        assert len(series.values) == 5761
        assert series.values.name == "disk_used_bytes"
        assert series.values.index.equals(grid(history.start_s, history.end_s, 900))
        expected = [disk_bytes(mount, i) for i in range(0, DISK_POINTS, 3)]
        assert series.values.tolist() == expected


def test_the_forecast_from_prometheus_has_the_written_slope(history: History) -> None:
    [data, logs] = query_range(
        history.url, "disk_used_bytes", at(history.start_s), at(history.end_s)
    )

    planned = forecast(data.values, 90, threshold=300e9, capacity=500e9)

    assert planned.points == 5761
    assert planned.slope_per_day == pytest.approx(2.5e9, rel=1e-9)
    assert planned.current == pytest.approx(250e9, rel=1e-12)
    assert planned.forecast == pytest.approx(475e9, rel=1e-9)
    assert planned.days_to_threshold == 20.0
    assert (planned.level, planned.advice) == ("critical", "increase now")
    assert forecast(logs.values).slope_per_day == pytest.approx(0.5e9, rel=1e-9)


def range_queries_answered(url: str) -> float:
    """How many range queries Prometheus has answered, from its own metrics."""
    pattern = r'prometheus_http_requests_total\{code="200",handler="/api/v1/query_range"\} (\S+)'
    found = re.search(pattern, httpx.get(f"{url}/metrics", timeout=5).text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(("step_s", "requests"), [(300, 2), (60, 8)])
def test_a_step_past_the_limit_is_fetched_in_pieces_and_joined(
    history: History, step_s: int, requests: int
) -> None:
    points = HISTORY_DAYS * DAY_S // step_s + 1
    answered_before = range_queries_answered(history.url)

    found = query_range(
        history.url,
        '{__name__=~"disk_used_bytes|latency_seconds"}',
        at(history.start_s),
        at(history.end_s),
        step_s=step_s,
    )

    # 17,281 or 86,401 points a series: at most 11,000 in each request.
    assert range_queries_answered(history.url) - answered_before == requests
    # Latency only starts two days before the end: it is in the last piece alone.
    assert [series.labels.get("mount") or series.labels["service"] for series in found] == [
        "/data",
        "/logs",
        "api",
    ]
    for series, mount in zip(found, DISK_SLOPES, strict=False):
        assert series.values.index.equals(grid(history.start_s, history.end_s, step_s))
        # Between samples, Prometheus gives the latest one of the last five minutes.
        expected = [disk_bytes(mount, i * step_s // SAMPLE_S) for i in range(points)]
        assert series.values.tolist() == expected
    recent = found[2].values
    assert recent.index.equals(grid(history.recent_s, history.end_s, step_s))
    expected_recent = [latency(i * step_s // SAMPLE_S) for i in range(len(recent))]
    np.testing.assert_array_equal(recent.to_numpy(), expected_recent)


def test_nan_and_infinities_arrive_as_floats_at_their_timestamps(history: History) -> None:
    [found] = query_range(
        history.url, "latency_seconds", at(history.recent_s), at(history.end_s), step_s=300
    )

    values = found.values
    assert len(values) == RECENT_POINTS
    assert found.labels == {"__name__": "latency_seconds", "service": "api"}
    assert np.isnan(values[at(history.recent_s + 100 * SAMPLE_S)])
    assert values[at(history.recent_s + 101 * SAMPLE_S)] == float("inf")
    assert values[at(history.recent_s + 102 * SAMPLE_S)] == float("-inf")
    assert values[at(history.recent_s + 400 * SAMPLE_S)] == 3.0
    assert values[at(history.recent_s + 103 * SAMPLE_S)] == 0.23
    np.testing.assert_array_equal(values.to_numpy(), [latency(i) for i in range(RECENT_POINTS)])


def test_a_counter_keeps_its_restart_and_becomes_a_rate(history: History) -> None:
    [found] = query_range(
        history.url, "http_requests_total", at(history.recent_s), at(history.end_s), step_s=300
    )

    assert found.values.tolist() == requests_total()
    rate = to_rate(found.values)
    assert rate[at(history.recent_s + RESTART_AT * SAMPLE_S)] == 0.5
    assert rate[at(history.recent_s + BURST_AT * SAMPLE_S)] == 10.0
    assert sorted(set(rate.tolist())) == [0.5, 1.0, 1.5, 10.0]


def test_a_malformed_query_is_an_error_with_prometheus_message(history: History) -> None:
    with pytest.raises(SourceError) as raised:
        query_range(history.url, "rate(disk_used_bytes[5m]", at(history.start_s), at(history.end_s))

    assert str(raised.value) == (
        "prometheus refused the query (400 bad_data): 1:25: parse error: unclosed left parenthesis"
    )


def test_a_closed_port_is_an_error_not_an_empty_answer() -> None:
    port = free_port()

    with pytest.raises(SourceError) as raised:
        query_range(f"http://127.0.0.1:{port}", "up", at(0), at(3600))

    assert str(raised.value) == (
        f"cannot reach prometheus at http://127.0.0.1:{port}: [Errno 111] Connection refused"
    )


class StandIn:
    """A tiny HTTP server that answers as an overloaded or misconfigured Prometheus would."""

    ANSWERS = {
        "overloaded": (503, "text/plain", "upstream overloaded\n"),
        "busy": (
            503,
            "application/json",
            '{"status":"error","errorType":"unavailable","error":"too many\\nqueries"}',
        ),
        "login": (200, "text/html", "<html><body>sign in</body></html>"),
        "instant": (
            200,
            "application/json",
            '{"status":"success","data":{"resultType":"vector","result":[]}}',
        ),
    }

    def __init__(self) -> None:
        self.authorizations: list[str | None] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.authorizations.append(self.headers.get("Authorization"))
                mode = self.path.split("/")[1]
                if mode == "slow":
                    time.sleep(0.5)
                status, kind, body = stand_in.ANSWERS.get(mode, (404, "text/plain", ""))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", kind)
                    self.end_headers()
                    self.wfile.write(body.encode())
                except OSError:
                    # The slow answer comes after the client gave up and closed the connection.
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("overloaded", "prometheus at {where} answered 503 Service Unavailable"),
        ("busy", "prometheus could not run the query (503 unavailable): too many queries"),
        ("login", "prometheus at {where} answered with something other than JSON (text/html)"),
        ("instant", "prometheus at {where} answered a 'vector', not a matrix"),
        ("slow", "prometheus at {where} did not answer within 0.2 s"),
    ],
    ids=["overloaded", "busy", "login", "instant", "slow"],
)
def test_a_failing_server_is_an_error_without_its_credentials(
    stand_in: StandIn, mode: str, message: str
) -> None:
    url = f"http://reader:s3cret@127.0.0.1:{stand_in.port}/{mode}"

    with pytest.raises(SourceError) as raised:
        query_range(url, "up", at(0), at(3600), timeout_s=0.2)

    where = f"http://127.0.0.1:{stand_in.port}/{mode}"
    assert str(raised.value) == message.format(where=where)
    assert "s3cret" not in str(raised.value)
    # The credentials go where they belong: basic auth, "reader:s3cret" in base64.
    assert stand_in.authorizations[-1] == "Basic cmVhZGVyOnMzY3JldA=="


@pytest.fixture
def prometheus_url(history: History, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("CARETAKER_PROMETHEUS_URL", history.url)
    get_settings.cache_clear()
    yield history.url
    get_settings.cache_clear()


def analyze(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["analyze", *args])
    return result.exit_code, result.output


def test_cli_forecasts_every_series_of_a_query(prometheus_url: str) -> None:
    code, output = analyze(
        *["capacity", "--prometheus", "disk_used_bytes", "--range", "70d"],
        *["--threshold", "300e9", "--json"],
    )

    assert code == 0, output
    data, logs = json.loads(output)
    assert data["labels"] == {"__name__": "disk_used_bytes", "mount": "/data"}
    assert logs["labels"] == {"__name__": "disk_used_bytes", "mount": "/logs"}
    assert (data["points"], logs["points"]) == (5761, 5761)
    assert data["slope_per_day"] == pytest.approx(2.5e9, rel=1e-9)
    assert logs["slope_per_day"] == pytest.approx(0.5e9, rel=1e-9)
    assert (data["days_to_threshold"], logs["days_to_threshold"]) == (20.0, 340.0)


def test_cli_capacity_text_names_each_series(prometheus_url: str) -> None:
    code, output = analyze(
        *["capacity", "--prometheus", 'disk_used_bytes{mount="/data"}', "--range", "70d"],
        *["--threshold", "300e9", "--horizon-days", "30"],
    )

    assert code == 0, output
    assert output.splitlines() == [
        'disk_used_bytes{mount="/data"}',
        "  slope +2.5e+09/day; in 30 days 3.25e+11 (3.25e+11 .. 3.25e+11);"
        " 3e+11 reached in 20 days",
    ]


def test_cli_finds_the_planted_spike_at_its_timestamp(
    prometheus_url: str, history: History
) -> None:
    code, output = analyze(
        "anomalies", "--prometheus", "latency_seconds", "--range", "2d", "--step", "5m", "--json"
    )

    assert code == 0, output
    [found] = json.loads(output)
    assert found["labels"] == {"__name__": "latency_seconds", "service": "api"}
    spike_at = at(history.recent_s + SPIKE_AT * SAMPLE_S).isoformat()
    assert [(a["timestamp"], a["value"]) for a in found["anomalies"]] == [(spike_at, 3.0)]
    assert found["anomalies"][0]["score"] > 100
    assert found["center"] == 0.22


def test_cli_turns_a_counter_into_a_rate_before_scoring(
    prometheus_url: str, history: History
) -> None:
    code, output = analyze(
        "anomalies",
        "--prometheus",
        "http_requests_total",
        "--range",
        "2d",
        "--step",
        "5m",
        "--json",
    )

    assert code == 0, output
    [found] = json.loads(output)
    burst_at = at(history.recent_s + BURST_AT * SAMPLE_S).isoformat()
    # The restart counts as 0.5 a second, like its neighbours, and is no anomaly.
    assert [(a["timestamp"], a["value"]) for a in found["anomalies"]] == [(burst_at, 10.0)]
    assert found["center"] == 1.0


def test_cli_says_a_malformed_query_in_one_line(prometheus_url: str) -> None:
    code, output = analyze("anomalies", "--prometheus", "rate(x[5m]", "--range", "1h")

    assert code == 1
    assert output == (
        "Error: prometheus refused the query (400 bad_data): "
        "1:11: parse error: unclosed left parenthesis\n"
    )


def test_cli_says_when_a_query_matches_no_series(prometheus_url: str) -> None:
    code, output = analyze("anomalies", "--prometheus", "nothing_here", "--range", "1h")

    assert code == 1
    assert re.fullmatch(
        r"Error: prometheus has no series for 'nothing_here' since \S+\+00:00\n", output
    )


def test_cli_without_prometheus_url_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARETAKER_PROMETHEUS_URL", raising=False)
    get_settings.cache_clear()

    code, output = analyze("anomalies", "--prometheus", "up")

    get_settings.cache_clear()
    assert code == 1
    assert output == (
        "Error: --prometheus needs CARETAKER_PROMETHEUS_URL, the address of Prometheus's"
        " HTTP API (http://prometheus:9090)\n"
    )


@pytest.mark.parametrize(
    "source",
    [
        ["--series", str(DATA / "series" / "disk.csv"), "--prometheus", "up"],
        [],
    ],
)
def test_cli_wants_exactly_one_source(source: list[str]) -> None:
    code, output = analyze("capacity", *source, "--threshold", "90")

    assert code == 2
    assert output.splitlines()[-1] == (
        "Error: give exactly one of --series FILE and --prometheus QUERY"
    )


def test_cli_range_goes_with_prometheus_only() -> None:
    disk = str(DATA / "series" / "disk.csv")

    code, output = analyze("capacity", "--series", disk, "--range", "7d", "--threshold", "90")

    assert code == 2
    assert output.splitlines()[-1] == "Error: --range and --step go with --prometheus, not --series"


def test_cli_range_must_be_a_duration(prometheus_url: str) -> None:
    code, output = analyze("anomalies", "--prometheus", "up", "--range", "30x")

    assert code == 2
    assert output.splitlines()[-1] == (
        "Error: Invalid value for '--range': '30x' is not a duration: a number and a unit,"
        " s m h d or w"
    )

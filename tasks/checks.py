"""Health checks; every check returns a CheckResult and never raises for what it finds."""

from __future__ import annotations

import functools
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import httpx
import psutil
from pydantic import BaseModel, ConfigDict, Field, model_validator

Status = Literal["healthy", "warning", "critical", "unknown"]
T = TypeVar("T")
_RANK: dict[str, int] = {"healthy": 0, "unknown": 1, "warning": 2, "critical": 3}
# Body kept for `body_contains`; a larger answer is read to the end but not stored.
BODY_LIMIT_BYTES = 1024 * 1024


class CheckResult(BaseModel):
    """The one result type of every check."""

    status: Status
    value: float | None = None
    summary: str
    details: dict[str, Any] = {}
    duration_s: float = 0.0


def worst(statuses: list[Status]) -> Status:
    """The most severe of several statuses; healthy when there are none."""
    return max(statuses, key=_RANK.__getitem__, default="healthy")


class Params(BaseModel):
    """Parameters of a check. Every pair of fields named X_warning... and X_critical... (or
    warning_X / critical_X) must be ordered: the warning comes before the critical level."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _thresholds_in_order(self) -> Params:
        values = self.model_dump()
        for name, warning in values.items():
            if "warning" not in name or not isinstance(warning, int | float):
                continue
            pair = name.replace("warning", "critical")
            critical = values.get(pair)
            if not isinstance(critical, int | float):
                continue
            # Days left fall towards danger; every other reading rises towards it.
            falling = name.endswith("_days")
            if (warning < critical) if falling else (warning > critical):
                order = "at least" if falling else "at most"
                raise ValueError(f"{name} ({warning:g}) must be {order} {pair} ({critical:g})")
        return self


class HttpParams(Params):
    url: str = Field(pattern=r"^https?://")
    method: Literal["GET", "HEAD", "POST"] = "GET"
    expected_status: list[int] = [200]
    timeout_s: float = Field(default=5.0, gt=0, le=300)
    max_latency_ms: float | None = Field(default=None, gt=0)
    body_contains: str | None = None
    follow_redirects: bool = False
    verify_tls: bool = True


def check_http(params: HttpParams) -> CheckResult:
    """Request a URL; critical when unreachable, slow past timeout_s, or answering wrongly."""
    started = time.monotonic()
    try:
        status_code, body = _fetch_within(params)
    except TimeoutError:
        return timed(
            started,
            "critical",
            f"no answer from {params.url} within {params.timeout_s}s",
            {"url": params.url, "error": "timeout"},
        )
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as exc:
        return timed(
            started,
            "critical",
            f"cannot reach {params.url}: {exc}",
            {"url": params.url, "error": str(exc)},
        )

    latency_ms = (time.monotonic() - started) * 1000
    details: dict[str, Any] = {
        "url": params.url,
        "status_code": status_code,
        "latency_ms": round(latency_ms, 1),
    }
    status: Status = "healthy"
    summary = f"{params.url} answered {status_code} in {latency_ms:.0f} ms"
    if status_code not in params.expected_status:
        status, summary = "critical", f"{summary}, expected {params.expected_status}"
    elif params.body_contains is not None and params.body_contains not in body:
        status, summary = "critical", f"{summary}, body lacks {params.body_contains!r}"
    elif params.max_latency_ms is not None and latency_ms > params.max_latency_ms:
        status, summary = "warning", f"{summary}, over {params.max_latency_ms:.0f} ms"
    return timed(started, status, summary, details, value=latency_ms)


def _fetch_within(params: HttpParams) -> tuple[int, str]:
    """Status and body of one request, all of it within timeout_s; TimeoutError otherwise."""
    # httpx bounds each read, not the whole exchange: a server that trickles its answer would
    # hold the check for ever. The reading loop stops at the deadline as well.
    deadline = time.monotonic() + params.timeout_s

    def fetch() -> tuple[int, str]:
        with (
            httpx.Client(
                timeout=params.timeout_s,
                follow_redirects=params.follow_redirects,
                verify=_tls_context() if params.verify_tls else False,
            ) as client,
            client.stream(params.method, params.url) as response,
        ):
            body = bytearray()
            for chunk in response.iter_bytes():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no complete answer within {params.timeout_s}s")
                body += chunk[: BODY_LIMIT_BYTES - len(body)]
            return response.status_code, body.decode(errors="replace")

    try:
        return run_within(fetch, params.timeout_s, "check-http")
    except httpx.TimeoutException as exc:
        raise TimeoutError(str(exc)) from exc


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Loading the trust store takes tens of milliseconds: once per process, not per check.
    return ssl.create_default_context()


def run_within(func: Callable[[], T], timeout_s: float, name: str) -> T:
    """func's result if it finishes within timeout_s; TimeoutError if not; its error if it fails.

    Client libraries bound each read or connect, not a whole exchange, and not name lookups.
    func runs in a daemon thread that is abandoned at the deadline; func should set its own
    socket timeouts so that the thread ends soon after.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = func()
        except BaseException as exc:  # handed to the caller's thread as it is
            outcome["error"] = exc

    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" in outcome:
        raise outcome["error"]
    if "value" not in outcome:
        raise TimeoutError(f"no answer within {timeout_s}s")
    value: T = outcome["value"]
    return value


class SystemParams(Params):
    cpu_warning_pct: float = Field(default=85.0, ge=0, le=100)
    cpu_critical_pct: float = Field(default=95.0, ge=0, le=100)
    memory_warning_pct: float = Field(default=85.0, ge=0, le=100)
    memory_critical_pct: float = Field(default=95.0, ge=0, le=100)
    disk_paths: list[str] = ["/"]
    disk_warning_pct: float = Field(default=85.0, ge=0, le=100)
    disk_critical_pct: float = Field(default=95.0, ge=0, le=100)
    # Paths that must be mount points: an unmounted volume leaves an ordinary directory behind.
    mount_points: list[str] = []
    # 1-minute load average per CPU; unset means load is reported but not graded.
    load_warning_per_cpu: float | None = Field(default=None, gt=0)
    load_critical_per_cpu: float | None = Field(default=None, gt=0)
    # Names that must be running: a process's name, or the base name of its executable or argv[0].
    processes: list[str] = []
    # psutil's first reading in a fresh process is 0.0; sampling over an interval is real.
    cpu_sample_s: float = Field(default=0.5, gt=0, le=10)
    # Seconds the other readings may take beyond the CPU sample.
    timeout_s: float = Field(default=10.0, gt=0, le=300)


def check_system(params: SystemParams) -> CheckResult:
    """CPU, memory, load, disks, mounts and processes; a missing path is a finding, not an error.
    A reading that hangs (a disk on a dead network mount) is critical after timeout_s."""
    started = time.monotonic()
    try:
        return run_within(
            lambda: _measure(params, started),
            params.cpu_sample_s + params.timeout_s,
            "check-system",
        )
    except TimeoutError:
        summary = f"no reading within {params.cpu_sample_s + params.timeout_s:g}s (a hung mount?)"
        return timed(started, "critical", summary, {"host": socket.gethostname()})


def _measure(params: SystemParams, started: float) -> CheckResult:
    cpu = psutil.cpu_percent(interval=params.cpu_sample_s)
    memory = psutil.virtual_memory().percent
    statuses = [
        grade(cpu, params.cpu_warning_pct, params.cpu_critical_pct),
        grade(memory, params.memory_warning_pct, params.memory_critical_pct),
    ]
    # Whichever worker takes the check measures its own host: the name says which one.
    readings: dict[str, Any] = {"host": socket.gethostname(), "cpu_pct": cpu, "memory_pct": memory}
    problems: list[str] = []
    for part in (_load, _disks, _mounts, _processes):
        part(params, readings, statuses, problems)

    summary = f"cpu {cpu:.0f}%, memory {memory:.0f}%"
    if problems:
        summary += "; " + "; ".join(problems)
    return timed(started, worst(statuses), summary, readings, value=max(cpu, memory))


Findings = list[Status]


def _load(
    params: SystemParams, readings: dict[str, Any], statuses: Findings, problems: list[str]
) -> None:
    per_cpu = os.getloadavg()[0] / (psutil.cpu_count() or 1)
    readings["load_1m_per_cpu"] = round(per_cpu, 3)
    warning = params.load_warning_per_cpu or float("inf")
    critical = params.load_critical_per_cpu or float("inf")
    status = grade(per_cpu, warning, critical)
    statuses.append(status)
    if status != "healthy":
        problems.append(f"load {per_cpu:.2f} per cpu")


def _disks(
    params: SystemParams, readings: dict[str, Any], statuses: Findings, problems: list[str]
) -> None:
    disks: dict[str, Any] = {}
    for path in params.disk_paths:
        try:
            used = psutil.disk_usage(path).percent
        except OSError as exc:
            disks[path] = {"error": exc.strerror or str(exc)}
            statuses.append("critical")
            problems.append(f"disk {path}: {exc.strerror or exc}")
            continue
        disks[path] = {"used_pct": used}
        status = grade(used, params.disk_warning_pct, params.disk_critical_pct)
        statuses.append(status)
        if status != "healthy":
            problems.append(f"disk {path} {used:.0f}% used")
    readings["disks"] = disks


def _mounts(
    params: SystemParams, readings: dict[str, Any], statuses: Findings, problems: list[str]
) -> None:
    unmounted = [path for path in params.mount_points if not os.path.ismount(path)]
    readings["unmounted"] = unmounted
    for path in unmounted:
        statuses.append("critical")
        problems.append(f"{path} is not mounted")


def _processes(
    params: SystemParams, readings: dict[str, Any], statuses: Findings, problems: list[str]
) -> None:
    if not params.processes:
        return
    running = set()
    for process in psutil.process_iter(["name", "exe", "cmdline"]):
        running.add(process.info["name"])
        argv0 = (process.info["cmdline"] or [""])[0]
        running.update(os.path.basename(path) for path in (process.info["exe"], argv0) if path)
    missing = [name for name in params.processes if name not in running]
    readings["missing_processes"] = missing
    for name in missing:
        statuses.append("critical")
        problems.append(f"process {name} is not running")


def grade(value: float, warning: float, critical: float) -> Status:
    """critical over `critical`, warning over `warning`, else healthy: a threshold of 100
    (percent) never fires."""
    if value > critical:
        return "critical"
    return "warning" if value > warning else "healthy"


def timed(
    started: float,
    status: Status,
    summary: str,
    details: dict[str, Any],
    value: float | None = None,
) -> CheckResult:
    duration_s = round(time.monotonic() - started, 4)
    return CheckResult(
        status=status, value=value, summary=summary, details=details, duration_s=duration_s
    )

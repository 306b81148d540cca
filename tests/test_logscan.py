"""Log analysis on real files and the real PostgreSQL: counts across rotations, spikes, findings."""

from __future__ import annotations

import gzip
import json
import lzma
import math
import shutil
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
import redis

from tasks import logscan
from tests.conftest import CONFIG_PATH, NotifySink, Processes, celery_worker, queued_tasks, wait_for
from workers.app import app
from workers.config import AnalysisConfig, Config, LogConfig, get_config
from workers.db import transaction

Conn = psycopg.Connection[dict[str, Any]]
TODAY = date(2026, 12, 10)
ERROR_KEY = "logs:app:error"


@pytest.fixture
def logs(db: Conn) -> Conn:
    """The emptied caretaker database, log tables included."""
    db.execute("TRUNCATE log_offsets, log_counts")
    return db


def entry(path: Path, name: str = "app", **fields: Any) -> LogConfig:
    patterns = fields.pop("patterns", {"error": r"\b(ERROR|CRITICAL|FATAL)\b"})
    return LogConfig(name=name, path=path, patterns=patterns, **fields)


def config_with(*entries: LogConfig) -> Config:
    return get_config().model_copy(update={"analysis": AnalysisConfig(logs=list(entries))})


def scan(log: LogConfig, day: date = TODAY) -> dict[str, Any]:
    return logscan.scan_log(log, config_with(log), day, time.monotonic() + 60)


def use_config(monkeypatch: pytest.MonkeyPatch, *entries: LogConfig) -> None:
    config = config_with(*entries)
    monkeypatch.setattr(logscan, "get_config", lambda: config)


def append(path: Path, text: str | bytes) -> None:
    with path.open("ab") as out:
        out.write(text.encode() if isinstance(text, str) else text)


def lines(*texts: str) -> str:
    return "".join(f"{text}\n" for text in texts)


def counts(db: Conn, name: str = "app", day: date = TODAY) -> dict[str, tuple[int, int]]:
    rows = db.execute(
        "SELECT pattern, lines, matches FROM log_counts WHERE log_name = %s AND day = %s",
        (name, day),
    )
    return {row["pattern"]: (row["lines"], row["matches"]) for row in rows}


def offsets(db: Conn, name: str = "app") -> dict[str, tuple[int, bool]]:
    rows = db.execute(
        "SELECT path, offset_bytes, finished FROM log_offsets WHERE log_name = %s", (name,)
    )
    return {Path(row["path"]).name: (row["offset_bytes"], row["finished"]) for row in rows}


def history(db: Conn, name: str, days: list[int], before: date = TODAY) -> None:
    """Earlier days' error counts, the oldest first, ending the day before `before`."""
    for back, matches in enumerate(reversed(days), start=1):
        db.execute(
            "INSERT INTO log_counts (log_name, day, pattern, lines, matches)"
            " VALUES (%s, %s, 'error', 1000, %s)",
            (name, before - timedelta(days=back), matches),
        )


def findings(db: Conn) -> list[tuple[str, str, dict[str, str]]]:
    rows = db.execute("SELECT fingerprint, status, labels FROM occurrences ORDER BY id")
    return [(row["fingerprint"], row["status"], row["labels"]) for row in rows]


def test_counts_lines_per_pattern_exactly(logs: Conn, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(
        b"2026-12-10 10:00:00 INFO started\n"
        b"2026-12-10 10:00:01 ERROR db timeout\n"
        b"Traceback (most recent call last):\n"
        b'  File "app.py", line 3, in <module>\n'
        b"ValueError: ERRORS is not the word\n"
        b"2026-12-10 10:00:02 CRITICAL disk full\n"
        b"  Traceback (most recent call last): indented, so not a traceback\n"
        b"caf\xe9 FATAL in latin-1\n"
    )
    log = entry(path, patterns={"error": r"\b(ERROR|CRITICAL|FATAL)\b", "traceback": r"^Trace"})

    summary = scan(log)

    assert (summary["status"], summary["lines"]) == ("ok", 8)
    assert summary["matches"] == {"error": 3, "traceback": 1}
    assert counts(logs) == {"error": (8, 3), "traceback": (8, 1)}
    assert offsets(logs) == {"app.log": (path.stat().st_size, False)}


def test_a_second_scan_counts_only_new_lines(logs: Conn, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text(lines("ERROR one", "INFO two", "INFO three"))
    log = entry(path)
    scan(log)
    append(path, lines("ERROR four", "INFO five"))

    second = scan(log)
    again = scan(log)

    assert (second["lines"], second["matches"]) == (2, {"error": 1})
    assert (again["lines"], again["matches"]) == (0, {"error": 0})
    assert counts(logs) == {"error": (5, 2)}


def test_a_partial_last_line_is_counted_once_it_is_complete(logs: Conn, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("ERROR one\nERROR tw")
    log = entry(path)

    first = scan(log)
    assert (first["lines"], first["matches"]) == (1, {"error": 1})
    assert offsets(logs) == {"app.log": (len("ERROR one\n"), False)}
    append(path, "o\n")
    second = scan(log)

    assert (second["lines"], second["matches"]) == (1, {"error": 1})
    assert counts(logs) == {"error": (2, 2)}


def test_a_file_rotated_by_rename_is_finished_under_its_new_name(
    logs: Conn, tmp_path: Path
) -> None:
    path = tmp_path / "app.log"
    path.write_text(lines("ERROR a", "INFO b", "INFO c"))
    log = entry(path)
    scan(log)
    append(path, lines("ERROR d", "INFO e"))
    path.rename(tmp_path / "app.log.1")
    path.write_text(lines("ERROR f"))

    second = scan(log)
    third = scan(log)

    assert (second["lines"], second["matches"]) == (3, {"error": 2})
    assert third["lines"] == 0
    assert counts(logs) == {"error": (6, 3)}
    assert offsets(logs) == {
        "app.log.1": ((tmp_path / "app.log.1").stat().st_size, False),
        "app.log": (len("ERROR f\n"), False),
    }


@pytest.mark.parametrize(
    ("rotated", "compress"),
    [("app.log.1.gz", gzip.open), ("app.log-20261209.gz", gzip.open), ("app.log.1.xz", lzma.open)],
)
def test_a_file_rotated_and_compressed_is_not_counted_again(
    logs: Conn, tmp_path: Path, rotated: str, compress: Callable[[Path, str], IO[bytes]]
) -> None:
    path = tmp_path / "app.log"
    path.write_text(lines("ERROR a", "INFO b", "INFO c") + "ERROR unfinished")
    log = entry(path)
    assert scan(log)["lines"] == 3
    append(path, " but ended by the rotation")
    with compress(tmp_path / rotated, "wb") as out:
        out.write(path.read_bytes())
    path.unlink()
    path.write_text(lines("INFO new", "ERROR new"))

    second = scan(log)
    third = scan(log)

    # The compressed file never grows: its last line counts without a newline.
    assert (second["lines"], second["matches"]) == (3, {"error": 2})
    assert (third["lines"], third["matches"]) == (0, {"error": 0})
    assert counts(logs) == {"error": (6, 3)}
    assert offsets(logs)[rotated][1] is True


def test_a_renamed_file_compressed_at_the_next_rotation_is_finished(
    logs: Conn, tmp_path: Path
) -> None:
    path, first, second = tmp_path / "app.log", tmp_path / "app.log.1", tmp_path / "app.log.2.gz"
    path.write_text(lines("ERROR a", "INFO b"))
    log = entry(path)
    scan(log)
    path.rename(first)
    path.write_text(lines("INFO c"))
    assert scan(log)["lines"] == 1
    # logrotate with delaycompress: the writer adds a last line to the old file, then the
    # next rotation compresses it and renames the live file.
    append(first, lines("ERROR late"))
    with gzip.open(second, "wb") as out:
        out.write(first.read_bytes())
    first.unlink()
    path.rename(first)
    path.write_text(lines("ERROR d"))

    summary = scan(log)

    assert (summary["lines"], summary["matches"]) == (2, {"error": 2})
    assert counts(logs) == {"error": (5, 3)}
    assert offsets(logs)["app.log.2.gz"] == (len("ERROR a\nINFO b\nERROR late\n"), True)


def test_a_file_being_compressed_right_now_is_read_once(logs: Conn, tmp_path: Path) -> None:
    path, rotated = tmp_path / "app.log", tmp_path / "app.log.1"
    path.write_text(lines("ERROR a", "ERROR b", "INFO c"))
    log = entry(path)
    scan(log)
    append(path, lines("ERROR late"))
    path.rename(rotated)
    path.write_text(lines("INFO new"))
    with gzip.open(tmp_path / "app.log.1.gz", "wb") as out:
        out.write(rotated.read_bytes())

    during = scan(log)
    rotated.unlink()
    after = scan(log)

    assert (during["lines"], during["matches"]) == (2, {"error": 1})
    assert (after["lines"], after["matches"]) == (0, {"error": 0})
    assert counts(logs) == {"error": (5, 3)}
    assert offsets(logs)["app.log.1.gz"] == (
        len(lines("ERROR a", "ERROR b", "INFO c", "ERROR late")),
        True,
    )


def test_copytruncate_counts_the_copy_on_and_the_live_file_from_its_start(
    logs: Conn, tmp_path: Path
) -> None:
    path = tmp_path / "app.log"
    path.write_text(lines("INFO a", "ERROR b", "INFO c", "INFO d"))
    log = entry(path)
    scan(log)
    append(path, lines("ERROR e"))
    shutil.copy(path, tmp_path / "app.log.1")
    with path.open("r+b") as live:
        live.truncate(0)
    append(path, lines("INFO f", "ERROR g"))

    summary = scan(log)

    assert (summary["lines"], summary["matches"]) == (3, {"error": 2})
    assert counts(logs) == {"error": (7, 3)}


def test_a_file_that_shrank_below_its_offset_is_read_from_its_start(
    logs: Conn, tmp_path: Path
) -> None:
    # A banner longer than the fingerprint: the truncated file still looks like the old one.
    banner = lines(*[f"INFO banner line {n:04d} " + "." * 60 for n in range(80)])
    path = tmp_path / "app.log"
    path.write_text(banner + lines("ERROR a", "ERROR b", "INFO c", "INFO d"))
    log = entry(path)
    scan(log)
    inode = path.stat().st_ino
    path.write_text(banner + lines("ERROR after truncation"))
    assert path.stat().st_ino == inode

    summary = scan(log)

    assert (summary["lines"], summary["matches"]) == (81, {"error": 1})
    assert offsets(logs) == {"app.log": (path.stat().st_size, False)}


def test_the_first_scan_takes_rotated_history_as_read(logs: Conn, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    with gzip.open(tmp_path / "app.log.2.gz", "wb") as out:
        out.write(lines(*["ERROR old"] * 5).encode())
    (tmp_path / "app.log.1").write_text(lines(*["ERROR yesterday"] * 3))
    path.write_text(lines("INFO today", "ERROR today"))
    log = entry(path)

    first = scan(log)
    append(tmp_path / "app.log.1", lines("ERROR written after the rotation"))
    second = scan(log)

    assert (first["lines"], first["matches"]) == (2, {"error": 1})
    assert (second["lines"], second["matches"]) == (1, {"error": 1})
    assert offsets(logs)["app.log.2.gz"][1] is True


def test_a_missing_or_unreadable_log_does_not_stop_the_others(
    logs: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, locked = tmp_path / "good.log", tmp_path / "locked.log"
    good.write_text(lines("ERROR x", "INFO y"))
    locked.write_text(lines("ERROR z"))
    opener = logscan.open_content

    # Tests run as root, which file modes do not stop; the error is what a reader gets.
    def open_content(path: Path, compression: str) -> Any:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return opener(path, compression)

    monkeypatch.setattr(logscan, "open_content", open_content)
    use_config(
        monkeypatch,
        entry(tmp_path / "gone" / "missing.log", name="missing"),
        entry(tmp_path / "absent.log", name="absent"),
        entry(locked, name="locked"),
        entry(good, name="good"),
    )

    summary = logscan.scan_logs()

    assert summary["missing"]["status"] == "error"
    assert (
        summary["missing"]["error"] == f"cannot list {tmp_path / 'gone'}: no such file or directory"
    )
    assert summary["absent"]["error"] == f"{tmp_path / 'absent.log'}: no such file"
    assert summary["locked"]["error"] == f"cannot read {locked}: permission denied"
    assert (summary["good"]["status"], summary["good"]["matches"]) == ("ok", {"error": 1})
    names = [row["log_name"] for row in logs.execute("SELECT DISTINCT log_name FROM log_counts")]
    assert names == ["good"]


def test_a_spike_opens_one_finding_and_a_normal_day_clears_it(
    logs: Conn, broker: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = logscan.utc_today()
    history(logs, "app", [2, 3, 2, 4, 3, 2, 3], before=today)
    path = tmp_path / "app.log"
    path.write_text(lines(*["ERROR payment failed"] * 40, *["INFO ok"] * 10))
    use_config(monkeypatch, entry(path))

    first = logscan.scan_logs()["app"]["patterns"]["error"]
    append(path, lines(*["ERROR payment failed"] * 5))
    again = logscan.scan_logs()["app"]["patterns"]["error"]

    # MAD is 1 line, under the counting noise of a median of 3: the spread is sqrt(3).
    assert (first["status"], first["today"], first["days"], first["median"]) == (
        "spike",
        40,
        7,
        3.0,
    )
    assert first["score"] == round((40 - 3) / math.sqrt(3), 3)
    assert again["today"] == 45
    labels = {"alertname": "LogSpike", "log": "app", "pattern": "error", "severity": "warning"}
    assert findings(logs) == [(ERROR_KEY, "firing", labels)]
    [occurrence_id] = [row["id"] for row in logs.execute("SELECT id FROM occurrences")]
    assert queued_tasks(broker, "alerts") == [
        ("caretaker.alerts.route_occurrences", [[occurrence_id]])
    ]

    monkeypatch.setattr(logscan, "utc_today", lambda: today + timedelta(days=1))
    append(path, lines("ERROR a usual day", "ERROR and another"))
    normal = logscan.scan_logs()["app"]["patterns"]["error"]

    assert (normal["status"], normal["today"], normal["median"]) == ("normal", 2, 3.0)
    assert findings(logs) == [(ERROR_KEY, "resolved", labels)]


def test_fewer_than_three_days_of_history_is_learning(logs: Conn, tmp_path: Path) -> None:
    history(logs, "app", [0, 1])
    path = tmp_path / "app.log"
    path.write_text(lines(*["ERROR burst"] * 50))

    verdict = scan(entry(path))["patterns"]["error"]

    assert (verdict["status"], verdict["today"], verdict["days"]) == ("learning", 50, 2)
    assert verdict["score"] is None
    assert findings(logs) == []


def test_an_all_zero_history_reports_a_burst_but_not_one_line(
    logs: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    today = logscan.utc_today()
    burst, single = tmp_path / "burst.log", tmp_path / "single.log"
    burst.write_text(lines(*["ERROR x"] * 10))
    single.write_text(lines("ERROR x", "INFO y"))
    for name in ("burst", "single"):
        history(logs, name, [0] * 14, before=today)
    use_config(monkeypatch, entry(burst, name="burst"), entry(single, name="single"))

    summary = logscan.scan_logs()

    assert summary["burst"]["patterns"]["error"]["status"] == "spike"
    assert summary["burst"]["patterns"]["error"]["score"] == 10.0
    assert summary["single"]["patterns"]["error"]["status"] == "normal"
    assert summary["single"]["patterns"]["error"]["score"] == 1.0
    assert [(key, status) for key, status, _ in findings(logs)] == [("logs:burst:error", "firing")]


def test_the_spread_has_a_floor_of_counting_noise() -> None:
    assert logscan.judge(3, [0] * 7, 3.0).status == "normal"
    assert logscan.judge(4, [0] * 7, 3.0).status == "spike"
    steady = [100] * 14
    assert (logscan.judge(130, steady, 3.0).status, logscan.judge(130, steady, 3.0).score) == (
        "normal",
        3.0,
    )
    assert logscan.judge(131, steady, 3.0).status == "spike"
    # A noisy history spreads by its own deviation (MAD 3), above the floor (sqrt(12)).
    noisy = [10, 50, 12, 45, 11, 60, 9]
    assert logscan.judge(25, noisy, 3.0).scale == pytest.approx(3 * 1.4826)
    assert logscan.judge(25, noisy, 3.0).status == "normal"
    assert logscan.judge(26, noisy, 3.0).status == "spike"


def test_a_scan_recorded_twice_counts_once(logs: Conn, tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text(lines("ERROR a", "INFO b"))
    log = entry(path)
    with transaction() as conn:
        state = logscan.load_state(conn, "app")
    budget = logscan.Budget(logscan.SCAN_MAX_BYTES, time.monotonic() + 60)
    first, duplicate = logscan.read_log(log, state, budget), logscan.read_log(log, state, budget)

    with transaction() as conn:
        recorded = logscan.record_scan(conn, log, first, TODAY, config_with(log))
    with transaction() as conn:
        discarded = logscan.record_scan(conn, log, duplicate, TODAY, config_with(log))

    assert (recorded.conflict, discarded.conflict) == (False, True)
    assert counts(logs) == {"error": (2, 1)}


def test_a_scan_stops_at_its_budget_and_the_next_goes_on(
    logs: Conn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logscan, "CHUNK_BYTES", 16)
    monkeypatch.setattr(logscan, "SCAN_MAX_BYTES", 64)
    monkeypatch.setattr(logscan, "MAX_LINE_BYTES", 24)
    path = tmp_path / "app.log"
    path.write_text(lines(*[f"ERROR {n:03d}" for n in range(20)], "INFO " + "x" * 100, "ERROR z"))
    log = entry(path)

    scans = [scan(log)]
    while not scans[-1]["complete"] and len(scans) < 20:
        scans.append(scan(log))

    # 64 bytes a scan, but a line longer than that is finished rather than never passed.
    assert len(scans) == 6
    assert sum(s["lines"] for s in scans) == 22
    assert counts(logs) == {"error": (22, 21)}
    assert offsets(logs) == {"app.log": (path.stat().st_size, False)}


def test_a_finding_of_a_log_no_longer_configured_is_cleared(
    logs: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.findings import raise_finding

    with transaction() as conn:
        raise_finding(conn, "logs:retired:error", {"alertname": "LogSpike"}, "a spike")
    use_config(monkeypatch)

    assert logscan.scan_logs() == {}
    assert [status for _, status, _ in findings(logs)] == ["resolved"]


def test_a_log_spike_on_a_real_worker_opens_an_incident(
    logs: Conn, processes: Processes, sink: NotifySink, tmp_path: Path
) -> None:
    path = tmp_path / "web.log"
    path.write_text(lines(*["ERROR upstream timed out"] * 30))
    history(logs, "web", [0, 1, 0, 0, 2, 0, 1], before=logscan.utc_today())
    config = json.loads(CONFIG_PATH.read_text())
    config["analysis"] = {"logs": [{"name": "web", "path": str(path)}]}
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    # The worker imports the log-scan tasks explicitly and reads this configuration.
    argv = [*celery_worker("alerts,analysis,incidents", 1), "-P", "solo", "-I", "tasks.logscan"]
    worker = processes.start(argv, env={"CARETAKER_CONFIG": str(config_path)}, name="logscan")
    log_path: Path = worker.log_path  # type: ignore[attr-defined]
    wait_for(lambda: b"ready." in log_path.read_bytes() or worker.poll() is not None, 60)
    assert worker.poll() is None, log_path.read_text()[-3000:]

    app.send_task("caretaker.analysis.scan_logs")
    incident = wait_for(
        lambda: logs.execute("SELECT * FROM incidents").fetchone(), 60, "the incident"
    )
    wait_for(lambda: sink.received, 30, "the notification")
    run = wait_for(
        lambda: logs.execute(
            "SELECT runbook, status FROM runs WHERE status <> 'running'"
        ).fetchone(),
        30,
        "the run to end",
    )

    assert (incident["source"], incident["dedup_key"]) == ("analysis", "logs:web:error")
    assert (incident["status"], incident["severity"]) == ("open", "warning")
    assert run == {"runbook": "default-escalate", "status": "escalated"}
    assert [(m["event"], m["dedup_key"]) for m in sink.received] == [
        ("opened", "analysis:logs:web:error")
    ]
    assert counts(logs, "web", logscan.utc_today()) == {
        "error": (30, 30),
        "traceback": (30, 0),
    }

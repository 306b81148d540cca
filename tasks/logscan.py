"""Daily log analysis (queue `analysis`): pattern lines counted across rotations, spikes raised."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
import math
import os
import re
import statistics
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, astuple, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

from workers import dispatch
from workers.app import app
from workers.config import Config, LogConfig, get_config
from workers.db import Connection, transaction
from workers.findings import clear_finding, open_findings, raise_finding
from workers.settings import get_settings

log = logging.getLogger(__name__)

# Bytes at the start of a file's decompressed content that identify it, whatever its name,
# inode or compression; a shorter file is known by all of its bytes until it grows.
FINGERPRINT_BYTES = 4096
# Bytes read at a time; the complete lines among them are decoded and matched together.
CHUNK_BYTES = 1024 * 1024
# A longer line is matched on about its first this many bytes, so that a file without
# newlines cannot fill the worker's memory.
MAX_LINE_BYTES = 64 * 1024
# Bytes of one log read per scan: a log that wrote more since the previous scan is caught up
# by the following ones, and cannot starve the other logs.
SCAN_MAX_BYTES = 1024**3
# Share of the task's soft time limit spent reading; the rest is left for recording.
READ_SHARE_OF_LIMIT = 0.6
# Days of counts a baseline needs; with fewer, a pattern is still learning.
MIN_HISTORY_DAYS = 3
# 1.4826 * MAD estimates the standard deviation of normally distributed data.
MAD_TO_SIGMA = 1.4826
# The spread of a baseline in lines is never taken below this, nor below the square root of
# its median (the noise of counting independent events): a quiet log with an all-zero history
# still reports a real burst, and one stray line after quiet days does not page.
MIN_SCALE_LINES = 1.0

# What logrotate names the files it rotates: app.log.1, app.log.2.gz, app.log-20261201(.gz).
_ROTATED = re.compile(r"(?:\.(?P<number>\d+)|-(?P<date>\d{8}[0-9-]*))(?P<ext>\.gz|\.bz2|\.xz)?")
# What reading a missing, unreadable, damaged or half-written file raises.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)

Status = Literal["learning", "normal", "spike"]


@dataclass(frozen=True)
class Offset:
    """Where the scans of one file stopped: a row of log_offsets."""

    fingerprint: str
    fingerprint_bytes: int
    path: str
    device: int
    inode: int
    offset_bytes: int
    finished: bool


@dataclass(frozen=True)
class LogFile:
    """A file of a log as found now, the live one or a rotated one, with its first bytes."""

    path: Path
    compression: str
    device: int
    inode: int
    size: int
    head: bytes

    @property
    def compressed(self) -> bool:
        return bool(self.compression)

    def at(self, offset_bytes: int, finished: bool = False) -> Offset:
        return Offset(
            fingerprint(self.head),
            len(self.head),
            str(self.path),
            self.device,
            self.inode,
            offset_bytes,
            finished,
        )


@dataclass(frozen=True)
class State:
    """What earlier scans of a log left: its files' offsets, and whether it was ever scanned."""

    offsets: tuple[Offset, ...]
    scanned_before: bool


@dataclass
class Budget:
    """What one scan may still read: bytes of the current log, and time (monotonic)."""

    bytes_left: int
    deadline: float

    def spent(self, progressed: bool = True) -> bool:
        """Whether to stop; the bytes count only once a line was read, so that a line
        longer than the budget is still passed, by one scan."""
        return time.monotonic() >= self.deadline or (progressed and self.bytes_left <= 0)


@dataclass
class Scan:
    """What reading a log found, before it is recorded."""

    state: State
    offsets: list[Offset] = field(default_factory=list)
    files: int = 0
    lines: int = 0
    matches: Counter[str] = field(default_factory=Counter)
    complete: bool = True
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """A day's count of one pattern against the baseline of the days before."""

    status: Status
    today: int
    days: int
    median: float | None = None
    scale: float | None = None
    score: float | None = None


@dataclass
class Recorded:
    conflict: bool = False
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    new_occurrence_ids: list[int] = field(default_factory=list)
    notification_ids: list[int] = field(default_factory=list)


def utc_today() -> date:
    return datetime.now(UTC).date()


@app.task(name="caretaker.analysis.scan_logs", acks_late=True, reject_on_worker_lost=True)
def scan_logs() -> dict[str, Any]:
    """Scan every configured log from where the previous scan stopped, add the lines to
    today's counts, and raise or clear a finding per pattern; return a summary per log.
    Offsets and counts move in one transaction from the state the scan began with, so a
    repeated or concurrent delivery counts nothing twice. Not retried: the next scan reads
    what this one could not."""
    config = get_config()
    today = utc_today()
    deadline = time.monotonic() + get_settings().task_soft_time_limit_s * READ_SHARE_OF_LIMIT
    summary: dict[str, Any] = {}
    for entry in config.analysis.logs:
        if time.monotonic() >= deadline:
            log.warning("log scan deferred to the next scan name=%s", entry.name)
            summary[entry.name] = {"status": "deferred"}
            continue
        summary[entry.name] = scan_log(entry, config, today, deadline)

    _clear_unconfigured(config)
    log.info("log scan done logs=%d", len(summary))
    return summary


def scan_log(entry: LogConfig, config: Config, today: date, deadline: float) -> dict[str, Any]:
    """Read one log, record its counts and findings, dispatch after commit; return its summary."""
    started = time.monotonic()
    with transaction() as conn:
        state = load_state(conn, entry.name)
    scan = read_log(entry, state, Budget(SCAN_MAX_BYTES, deadline))
    with transaction() as conn:
        recorded = record_scan(conn, entry, scan, today, config)

    if recorded.new_occurrence_ids:
        dispatch.try_send("routing", dispatch.route_occurrences, recorded.new_occurrence_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, recorded.notification_ids)
    _log_outcome(entry, scan, recorded, time.monotonic() - started)
    return _summary(scan, recorded)


def read_log(entry: LogConfig, state: State, budget: Budget) -> Scan:
    """Count the lines of a log's files after their stored offsets."""
    scan = Scan(state, matches=Counter(dict.fromkeys(entry.patterns, 0)))
    patterns = {name: re.compile(text) for name, text in entry.patterns.items()}
    files = _probe_all(entry.path, scan)
    assigned, copies = match_files(files, state.offsets)

    for found in files:
        if found.path in copies:
            continue
        stored = assigned.get(found.path)
        if stored is None and not state.scanned_before and found.path != entry.path:
            # History found by the first scan belongs to earlier days: taken as read.
            scan.offsets.append(found.at(0 if found.compressed else found.size, found.compressed))
            continue
        scan.offsets.append(_read_file(found, stored, patterns, scan, budget))

    # Files that vanished are forgotten, unless something failed: a file that could not be
    # read this time keeps its offset, not to be read again from the start.
    if scan.errors:
        kept = set(assigned.values())
        scan.offsets += [offset for offset in state.offsets if offset not in kept]
    return scan


def find_files(path: Path) -> list[tuple[Path, str]]:
    """The live file and its rotated siblings, oldest first, each with its compression."""
    found: list[tuple[tuple[int, str, int], Path, str]] = []
    with os.scandir(path.parent) as entries:
        for entry in entries:
            rest = entry.name.removeprefix(path.name)
            if rest == entry.name or not entry.is_file():
                continue
            if rest == "":
                found.append(((2, "", 0), Path(entry.path), ""))
                continue
            rotated = _ROTATED.fullmatch(rest)
            if rotated is None:
                continue
            # Dated files sort by date; a higher number is an older file.
            key = (0, rotated["date"], 0) if rotated["date"] else (1, "", -int(rotated["number"]))
            found.append((key, Path(entry.path), rotated["ext"] or ""))
    return [(file_path, compression) for _, file_path, compression in sorted(found)]


def _probe_all(path: Path, scan: Scan) -> list[LogFile]:
    try:
        names = find_files(path)
    except OSError as exc:
        scan.errors.append(f"cannot list {path.parent}: {_reason(exc)}")
        return []
    if path not in [name for name, _ in names]:
        scan.errors.append(f"{path}: no such file")
    files = []
    for file_path, compression in names:
        try:
            found = probe(file_path, compression)
        except READ_ERRORS as exc:
            scan.errors.append(f"cannot read {file_path}: {_reason(exc)}")
            continue
        if found is not None:
            files.append(found)
    return files


def probe(path: Path, compression: str) -> LogFile | None:
    """The file with its first bytes; None when it is empty (nothing to know it by yet)."""
    with open_content(path, compression) as stream:
        head = stream.read(FINGERPRINT_BYTES)
        info = os.fstat(stream.fileno())
    if not head:
        return None
    return LogFile(path, compression, _int64(info.st_dev), _int64(info.st_ino), info.st_size, head)


def _int64(value: int) -> int:
    # Some file systems hand out inode numbers past 2**63, which a bigint cannot hold.
    return value - 2**64 if value >= 2**63 else value


def open_content(path: Path, compression: str) -> io.BufferedIOBase:
    """A file's content as a binary stream, decompressed as its name says."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".bz2":
        return bz2.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    return path.open("rb")


def fingerprint(head: bytes) -> str:
    """A file's identity: a hash of its first bytes, with their length."""
    return hashlib.sha256(len(head).to_bytes(8, "big") + head).hexdigest()


def match_files(
    files: list[LogFile], offsets: tuple[Offset, ...]
) -> tuple[dict[Path, Offset], set[Path]]:
    """Each file's stored offset, found by content; and the files that are copies of another
    (a rotation copying or compressing it right now), left for a later scan."""
    pairs = [(offset, found) for found in files for offset in offsets if _holds(found, offset)]
    # The longest fingerprint is the surest; then the same inode; then the uncompressed copy.
    pairs.sort(key=lambda p: (-p[0].fingerprint_bytes, not _same_inode(*p), p[1].compressed))
    assigned: dict[Path, Offset] = {}
    for offset, found in pairs:
        if found.path not in assigned and offset not in assigned.values():
            assigned[found.path] = offset

    # Files that start alike are one content a rotation is copying or compressing right now:
    # one is read, the others wait for a later scan, when they differ or are gone. (A copy
    # shorter than FINGERPRINT_BYTES is not told from a new file; that window is short.)
    def rank(found: LogFile) -> tuple[bool, bool, int, str]:
        return (found.path in assigned, not found.compressed, found.size, str(found.path))

    copies = {
        found.path
        for found in files
        if found.path not in assigned
        and any(o.head == found.head and rank(o) > rank(found) for o in files)
    }
    return assigned, copies


def _holds(found: LogFile, offset: Offset) -> bool:
    # A finished offset came from a compressed file; a plain file starting alike is another.
    if offset.finished and not found.compressed:
        return False
    length = offset.fingerprint_bytes
    return len(found.head) >= length and fingerprint(found.head[:length]) == offset.fingerprint


def _same_inode(offset: Offset, found: LogFile) -> bool:
    return (offset.device, offset.inode) == (found.device, found.inode)


def _read_file(
    found: LogFile,
    stored: Offset | None,
    patterns: dict[str, re.Pattern[str]],
    scan: Scan,
    budget: Budget,
) -> Offset:
    start = stored.offset_bytes if stored is not None else 0
    if stored is not None and stored.finished:
        return found.at(start, finished=True)
    if not found.compressed and found.size < start:
        log.warning(
            "log file shrank, read from its start path=%s offset_bytes=%d size_bytes=%d",
            found.path,
            start,
            found.size,
        )
        start = 0
    if budget.spent():
        scan.complete = False
        return found.at(start)

    position, at_end = start, False
    try:
        with open_content(found.path, found.compression) as stream:
            # In a compressed file this decompresses up to the offset without keeping it.
            stream.seek(start)
            scan.files += 1
            for batch in _batches(stream, found.compressed, budget):
                position += batch.used_bytes
                _tally(batch.lines, patterns, scan)
                at_end = batch.at_end
    except READ_ERRORS as exc:
        # What was counted up to here stays counted, and the next scan goes on from here.
        scan.errors.append(f"cannot read {found.path}: {_reason(exc)}")
        return found.at(position)
    if not at_end:
        scan.complete = False
    return found.at(position, finished=at_end and found.compressed)


class Batch(NamedTuple):
    """Complete lines read together, the bytes they took, and whether the stream ended."""

    used_bytes: int
    lines: list[str]
    at_end: bool = False


def _batches(stream: io.BufferedIOBase, final: bool, budget: Budget) -> Iterator[Batch]:
    """The complete lines from where the stream is, in batches, until its end or the budget.
    A last line without a newline is left unread, unless the file is `final` (compressed, so
    it will never grow)."""
    pending, skipped, progressed = b"", 0, False
    while not budget.spent(progressed):
        chunk = stream.read(CHUNK_BYTES)
        budget.bytes_left -= len(chunk)
        if not chunk:
            if final and (pending or skipped):
                yield Batch(len(pending) + skipped, [_decode(pending)], True)
            else:
                yield Batch(0, [], True)
            return
        data = pending + chunk
        end = data.rfind(b"\n") + 1
        if end == 0:
            # Still inside one line: past MAX_LINE_BYTES only its start is kept to match.
            excess = max(0, len(data) - MAX_LINE_BYTES)
            pending, skipped = data[: len(data) - excess], skipped + excess
            continue
        yield Batch(end + skipped, _decode(data[:end]).split("\n")[:-1])
        pending, skipped, progressed = data[end:], 0, True


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _tally(lines: list[str], patterns: dict[str, re.Pattern[str]], scan: Scan) -> None:
    scan.lines += len(lines)
    for name, pattern in patterns.items():
        search = pattern.search
        scan.matches[name] += sum(1 for line in lines if search(line))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return (str(exc) or type(exc).__name__).lower()


def load_state(conn: Connection, name: str) -> State:
    """The offsets earlier scans of a log stored, and whether it was scanned before."""
    rows = conn.execute(
        """
        SELECT fingerprint, fingerprint_bytes, path, device, inode, offset_bytes, finished
          FROM log_offsets WHERE log_name = %s ORDER BY fingerprint
        """,
        (name,),
    ).fetchall()
    counted = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM log_counts WHERE log_name = %s) AS counted", (name,)
    ).fetchone()
    assert counted is not None
    return State(tuple(Offset(**row) for row in rows), bool(rows or counted["counted"]))


def record_scan(
    conn: Connection, entry: LogConfig, scan: Scan, today: date, config: Config
) -> Recorded:
    """Store a scan's offsets and counts, and judge today's counts; in the caller's
    transaction. Nothing is stored when another scan recorded since this one began."""
    # Offsets and counts move together, and only from the state the scan started from: the
    # lock orders scans of a log, the comparison discards the one that read the same lines.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"logscan:{entry.name}",))
    if load_state(conn, entry.name) != scan.state:
        return Recorded(conflict=True)
    _save_offsets(conn, entry.name, scan.offsets)
    # A log that could not be read at all has no count that day, rather than a false zero,
    # and keeps its findings as they were.
    if scan.lines or not scan.errors:
        _add_counts(conn, entry.name, today, scan)
    if scan.errors:
        return Recorded()
    return _judge_log(conn, entry, today, config)


def _save_offsets(conn: Connection, name: str, offsets: list[Offset]) -> None:
    unique = {offset.fingerprint: offset for offset in offsets}
    conn.execute("DELETE FROM log_offsets WHERE log_name = %s", (name,))
    with conn.cursor() as cursor:
        cursor.executemany(
            """
            INSERT INTO log_offsets (log_name, fingerprint, fingerprint_bytes, path, device,
                                     inode, offset_bytes, finished)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
            """,
            [(name, *astuple(offset)) for offset in unique.values()],
        )


def _add_counts(conn: Connection, name: str, today: date, scan: Scan) -> None:
    conn.execute(
        """
        INSERT INTO log_counts (log_name, day, pattern, lines, matches)
        SELECT %s, %s, x.pattern, %s, x.matches
          FROM unnest(%s::text[], %s::bigint[]) AS x(pattern, matches)
        ON CONFLICT (log_name, day, pattern) DO UPDATE
           SET lines = log_counts.lines + excluded.lines,
               matches = log_counts.matches + excluded.matches,
               updated_at = now()
        """,
        (name, today, scan.lines, list(scan.matches), list(scan.matches.values())),
    )


def _judge_log(conn: Connection, entry: LogConfig, today: date, config: Config) -> Recorded:
    rows = conn.execute(
        """
        SELECT pattern, day, matches FROM log_counts
         WHERE log_name = %s AND day >= %s AND day <= %s
        """,
        (entry.name, today - timedelta(days=entry.baseline_days), today),
    ).fetchall()
    recorded = Recorded()
    for pattern in entry.patterns:
        days = {row["day"]: row["matches"] for row in rows if row["pattern"] == pattern}
        history = [count for day, count in days.items() if day < today]
        verdict = judge(days.get(today, 0), history, entry.threshold)
        recorded.verdicts[pattern] = verdict
        _act(conn, entry, pattern, verdict, config, recorded)
    return recorded


def judge(count: int, history: list[int], threshold: float) -> Verdict:
    """Score a day's count against the earlier days': (count - median) / robust spread."""
    if len(history) < MIN_HISTORY_DAYS:
        return Verdict("learning", count, len(history))
    median = statistics.median(history)
    mad = statistics.median(abs(value - median) for value in history)
    scale = max(MAD_TO_SIGMA * mad, math.sqrt(median), MIN_SCALE_LINES)
    score = (count - median) / scale
    status: Status = "spike" if score > threshold and count > median else "normal"
    return Verdict(status, count, len(history), float(median), scale, round(score, 3))


def _act(
    conn: Connection,
    entry: LogConfig,
    pattern: str,
    verdict: Verdict,
    config: Config,
    recorded: Recorded,
) -> None:
    key = f"logs:{entry.name}:{pattern}"
    if verdict.status == "spike":
        labels = {"alertname": "LogSpike", "log": entry.name, "pattern": pattern}
        labels["severity"] = "warning"
        summary = (
            f"log {entry.name}: {verdict.today} lines matching {pattern} today against a "
            f"median of {verdict.median:g} over {verdict.days} days "
            f"(score {verdict.score:g}, threshold {entry.threshold:g})"
        )
        new_id = raise_finding(conn, key, labels, summary)
        if new_id is not None:
            recorded.new_occurrence_ids.append(new_id)
    elif verdict.status == "normal":
        reason = f"log {entry.name}: {verdict.today} lines matching {pattern}, within baseline"
        recorded.notification_ids += clear_finding(conn, key, reason, config)


def _clear_unconfigured(config: Config) -> None:
    configured = {f"logs:{e.name}:{p}" for e in config.analysis.logs for p in e.patterns}
    notification_ids: list[int] = []
    with transaction() as conn:
        for key in open_findings(conn, "logs:"):
            if key not in configured:
                reason = "the log or pattern is no longer configured"
                notification_ids += clear_finding(conn, key, reason, config)
    dispatch.try_send("notifications", dispatch.send_notifications, notification_ids)


def _summary(scan: Scan, recorded: Recorded) -> dict[str, Any]:
    status = "conflict" if recorded.conflict else ("error" if scan.errors else "ok")
    return {
        "status": status,
        "error": "; ".join(scan.errors) or None,
        "files": scan.files,
        "lines": scan.lines,
        "matches": dict(scan.matches),
        "complete": scan.complete,
        "patterns": {pattern: asdict(verdict) for pattern, verdict in recorded.verdicts.items()},
    }


def _log_outcome(entry: LogConfig, scan: Scan, recorded: Recorded, duration_s: float) -> None:
    message = "log scanned name=%s files=%d lines=%d complete=%s duration_s=%.2f"
    log.info(message, entry.name, scan.files, scan.lines, scan.complete, duration_s)
    if scan.errors:
        log.warning("log scan error name=%s error=%s", entry.name, "; ".join(scan.errors))
    if recorded.conflict:
        log.warning("log scan discarded, another scan recorded first name=%s", entry.name)
    spikes = [pattern for pattern, v in recorded.verdicts.items() if v.status == "spike"]
    if spikes:
        log.info("log spike name=%s patterns=%s", entry.name, ",".join(spikes))

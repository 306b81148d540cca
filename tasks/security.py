"""The security scan (queue `remediation`): each service target's installed distributions
judged against OSV advisories; findings stored, critical ones raised as findings."""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from cvss import CVSS3  # type: ignore[import-untyped]
from cvss.exceptions import CVSSError  # type: ignore[import-untyped]
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers import dispatch, findings, views
from workers.app import app
from workers.config import Config, ServiceTarget, get_config
from workers.db import Connection, transaction
from workers.errors import CaretakerError, NotFound
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)

# Seconds a target's interpreter may take to list its distributions.
LIST_TIMEOUT_S = 60.0
# Seconds of one request to the OSV API, and of connecting to it.
OSV_TIMEOUT_S = 30.0
OSV_CONNECT_TIMEOUT_S = 5.0
# Queries in one POST /v1/querybatch; the API takes at most 1000.
OSV_BATCH = 1000
# Pages followed for one package before the API's answer is taken as broken.
OSV_MAX_PAGES = 100
ECOSYSTEM = "PyPI"
SEVERITIES = ("critical", "high", "medium", "low", "none", "unknown")
DATABASE_SEVERITY = {
    "CRITICAL": "critical",
    "HIGH": "high",
    "MODERATE": "medium",
    "MEDIUM": "medium",
    "LOW": "low",
}
FINDING_PREFIX = "security:"
# The smallest PEP 440 version: OSV's `introduced: "0"` means every version, pre-releases too.
ZERO = Version("0.dev0")
# Run by the target's own interpreter; -I keeps caretaker's PYTHONPATH and the working
# directory out of its sys.path, so only the target's environment is listed.
LIST_SCRIPT = """
import importlib.metadata as metadata, json
found = []
for dist in metadata.distributions():
    meta = dist.metadata
    found.append([meta.get("Name"), meta.get("Version")] if meta else [None, None])
print(json.dumps(found))
"""


class AdvisorySourceError(CaretakerError):
    """The advisories could not be read; never to be taken as "no vulnerabilities"."""


class TargetScanError(CaretakerError):
    """A target's interpreter could not list its installed distributions."""


@dataclass(frozen=True)
class Distribution:
    """An installed distribution: its canonical name, its version as installed, and that
    version parsed (None when it is not PEP 440, so no range can be judged)."""

    name: str
    version: str
    parsed: Version | None


@dataclass(frozen=True)
class Finding:
    """An advisory affecting a package installed in a target's environment."""

    target: str
    package: str
    installed_version: str
    advisory_id: str
    aliases: tuple[str, ...]
    severity: str
    summary: str
    # The smallest version fixing the advisory above the installed one, if any says so.
    fixed_version: str | None

    @property
    def key(self) -> str:
        return f"{FINDING_PREFIX}{self.target}:{self.package}:{self.advisory_id}"


@dataclass
class TargetScan:
    """What one scan found in one target; `error` says why it could not be scanned."""

    target: str
    error: str | None = None
    distributions: int = 0
    findings: list[Finding] = field(default_factory=list)
    # "name version" of distributions whose version is not PEP 440: not judged.
    unparsable: list[str] = field(default_factory=list)
    new: int = 0
    resolved: int = 0

    def counts(self) -> dict[str, Any]:
        by_severity = {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}
        return {
            "status": "error" if self.error else "ok",
            "error": self.error,
            "distributions": self.distributions,
            "findings": len(self.findings),
            **by_severity,
            "new": self.new,
            "resolved": self.resolved,
            "unparsable": len(self.unparsable),
        }


@dataclass
class ScanReport:
    targets: list[TargetScan]
    # Advisory files skipped, by name with the reason.
    invalid_advisories: list[str]

    def summary(self) -> dict[str, Any]:
        targets = {scan.target: scan.counts() for scan in self.targets}
        return {"targets": targets, "invalid_advisories": self.invalid_advisories}

    def problem(self) -> str | None:
        """What a person must act on: a critical finding or a target not scanned."""
        critical = sum(f.severity == "critical" for s in self.targets for f in s.findings)
        failed = [scan.target for scan in self.targets if scan.error]
        parts = [f"{critical} critical findings"] if critical else []
        parts += [f"not scanned: {', '.join(failed)}"] if failed else []
        return "; ".join(parts) or None


# The target's distributions


def list_distributions(python: Path, timeout_s: float = LIST_TIMEOUT_S) -> list[Distribution]:
    """The distributions installed in the environment of this interpreter, by canonical name;
    TargetScanError when it cannot be run or gives no list."""
    try:
        done = subprocess.run(
            [str(python), "-I", "-c", LIST_SCRIPT],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TargetScanError(f"{python} did not list its packages within {timeout_s:g} s") from exc
    except OSError as exc:
        raise TargetScanError(f"cannot run {python}: {exc.strerror or exc}") from exc
    if done.returncode != 0:
        error = _last_line(done.stderr) or "no error output"
        raise TargetScanError(f"{python} exited with {done.returncode}: {error}")
    return parse_distributions(_last_line(done.stdout), python)


def parse_distributions(text: str, python: Path) -> list[Distribution]:
    """The listing script's output as distributions; the first of a name wins, as on
    sys.path."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TargetScanError(f"{python} printed no package list: {text[:100]!r}") from exc
    found: dict[str, Distribution] = {}
    for name, version in rows if isinstance(rows, list) else []:
        if not isinstance(name, str) or not name or not isinstance(version, str):
            continue
        canonical = canonicalize_name(name)
        found.setdefault(canonical, Distribution(canonical, version, _parsed(version)))
    return sorted(found.values(), key=lambda dist: dist.name)


def _parsed(version: str) -> Version | None:
    try:
        return Version(version)
    except InvalidVersion:
        return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# Advisories


class _Osv(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class OsvPackage(_Osv):
    ecosystem: str = ""
    name: str = ""


class OsvRange(_Osv):
    type: str
    events: list[dict[str, str]] = []


class OsvAffected(_Osv):
    package: OsvPackage = OsvPackage()
    ranges: list[OsvRange] = []
    versions: list[str] = []


class OsvScore(_Osv):
    type: str
    score: str


class Advisory(_Osv):
    """An OSV advisory, with the fields the scan reads."""

    id: str = Field(min_length=1)
    aliases: list[str] = []
    summary: str = ""
    details: str = ""
    withdrawn: str | None = None
    affected: list[OsvAffected] = []
    severity: list[OsvScore] = []
    database_specific: dict[str, Any] = {}

    def entries(self, package: str | None = None) -> list[OsvAffected]:
        """Its PyPI entries: of one package (by canonical name), or all."""
        return [
            entry
            for entry in self.affected
            if entry.package.ecosystem == ECOSYSTEM
            and (package is None or canonicalize_name(entry.package.name) == package)
        ]


def affects(advisory: Advisory, package: str, installed: Version) -> bool | None:
    """Whether the advisory affects this version of the package (canonical name) on PyPI, by
    its `versions` lists and its ECOSYSTEM or SEMVER ranges; None when it gives nothing to
    judge by for this package."""
    judged = False
    for entry in advisory.entries(package):
        if installed in {_parsed(text) for text in entry.versions}:
            return True
        ranges = _ranges(entry)
        judged = judged or bool(entry.versions) or bool(ranges)
        if any(_in_range(installed, events) for events in ranges):
            return True
    return False if judged else None


def fixed_after(advisory: Advisory, package: str, installed: Version) -> Version | None:
    """The smallest `fixed` version of the package's ranges above the installed one."""
    fixed = [
        version
        for entry in advisory.entries(package)
        for events in _ranges(entry)
        for version, _, kind in events
        if kind == "fixed" and version > installed
    ]
    return min(fixed, default=None)


# Events at one version apply in this order; OSV sorts a range's events by version.
_EVENT_ORDER = {"introduced": 0, "last_affected": 1, "fixed": 2}


def _ranges(entry: OsvAffected) -> list[list[tuple[Version, int, str]]]:
    """Each ECOSYSTEM or SEMVER range's events as (version, order, kind), sorted; an event
    whose version is not PEP 440 is left out."""
    ranges = []
    for item in entry.ranges:
        if item.type not in ("ECOSYSTEM", "SEMVER"):
            continue
        events = []
        for event in item.events:
            for kind, order in _EVENT_ORDER.items():
                text = event.get(kind)
                version = ZERO if kind == "introduced" and text == "0" else _parsed(text or "")
                if text and version is not None:
                    events.append((version, order, kind))
        ranges.append(sorted(events))
    return ranges


def _in_range(installed: Version, events: list[tuple[Version, int, str]]) -> bool:
    affected = False
    for version, _, kind in events:
        if kind == "introduced":
            affected = affected or installed >= version
        else:
            # A fix ends the range at its own version, a last affected version just after it.
            ended = installed >= version if kind == "fixed" else installed > version
            affected = affected and not ended
    return affected


def severity_of(advisory: Advisory) -> str:
    """The database's own rating, else the band of a CVSS v3 base score, else unknown."""
    rated = advisory.database_specific.get("severity")
    if isinstance(rated, str) and rated.upper() in DATABASE_SEVERITY:
        return DATABASE_SEVERITY[rated.upper()]
    for item in advisory.severity:
        score = cvss3_score(item.score) if item.type == "CVSS_V3" else None
        if score is not None:
            return severity_band(score)
    return "unknown"


def cvss3_score(vector: str) -> float | None:
    """The base score of a CVSS v3 vector; None when it is not one."""
    try:
        return float(CVSS3(vector).base_score)
    except (CVSSError, ValueError, KeyError) as exc:
        log.debug("not a cvss v3 vector vector=%s error=%s", vector, exc)
        return None


def severity_band(score: float) -> str:
    """CVSS v3's qualitative rating of a base score."""
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "medium"
    return "low" if score > 0 else "none"


def judge(target: str, dist: Distribution, advisory: Advisory, matched: bool) -> Finding | None:
    """The finding this advisory makes for an installed distribution, if any. `matched`: the
    source already matched the version, so an advisory without ranges to judge by stands."""
    if dist.parsed is None or advisory.withdrawn:
        return None
    verdict = affects(advisory, dist.name, dist.parsed)
    if verdict is False or (verdict is None and not matched):
        return None
    fixed = fixed_after(advisory, dist.name, dist.parsed)
    return Finding(
        target=target,
        package=dist.name,
        installed_version=dist.version,
        advisory_id=advisory.id,
        aliases=tuple(advisory.aliases),
        severity=severity_of(advisory),
        summary=(advisory.summary or _last_line(advisory.details[:300]))[:300],
        fixed_version=str(fixed) if fixed is not None else None,
    )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


# Advisory sources


class AdvisorySource(Protocol):
    # True when the source matched versions itself (the API); False when it matched names.
    matches_versions: bool
    # Advisories skipped, by file name or id with the reason.
    invalid: list[str]

    def advisories_for(self, dists: Sequence[Distribution]) -> dict[str, list[Advisory]]:
        """Advisories that may affect each distribution, by canonical name."""
        ...


class LocalAdvisories:
    """A directory of OSV JSON files, one advisory each (PyPI's all.zip from the OSV bucket,
    unpacked); files that are not advisories are named in `invalid` and skipped."""

    matches_versions = False

    def __init__(self, directory: Path) -> None:
        if not directory.is_dir():
            raise AdvisorySourceError(f"osv directory {directory} is not a directory")
        self.invalid: list[str] = []
        self._by_package: dict[str, list[Advisory]] = {}
        loaded = [self._read(path, directory) for path in sorted(directory.rglob("*.json"))]
        advisories = [advisory for advisory in loaded if advisory is not None]
        # An empty directory would read as "nothing is vulnerable".
        if not advisories:
            raise AdvisorySourceError(f"osv directory {directory} holds no valid advisory")
        for advisory in advisories:
            for name in {canonicalize_name(e.package.name) for e in advisory.entries()}:
                self._by_package.setdefault(name, []).append(advisory)
        log.info("advisories loaded dir=%s count=%d", directory, len(advisories))

    def _read(self, path: Path, directory: Path) -> Advisory | None:
        name = str(path.relative_to(directory))
        try:
            return Advisory.model_validate_json(path.read_bytes())
        except OSError as exc:
            reason = f"{name}: cannot read: {exc.strerror}"
        except ValidationError as exc:
            reason = f"{name}: {_first_error(exc)}"
        log.warning("advisory skipped reason=%s", reason)
        self.invalid.append(reason)
        return None

    def advisories_for(self, dists: Sequence[Distribution]) -> dict[str, list[Advisory]]:
        return {dist.name: self._by_package.get(dist.name, []) for dist in dists}


class OsvApi:
    """The OSV API: POST /v1/querybatch for the ids affecting each version (following
    next_page_token), GET /v1/vulns/{id} for each advisory, kept for the whole scan."""

    matches_versions = True

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.invalid: list[str] = []
        self._details: dict[str, Advisory | None] = {}
        timeout = httpx.Timeout(OSV_TIMEOUT_S, connect=OSV_CONNECT_TIMEOUT_S)
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def advisories_for(self, dists: Sequence[Distribution]) -> dict[str, list[Advisory]]:
        advisories = {
            name: [self.advisory(i) for i in dict.fromkeys(ids)]
            for name, ids in self.query(dists).items()
        }
        return {name: [a for a in found if a is not None] for name, found in advisories.items()}

    def query(self, dists: Sequence[Distribution]) -> dict[str, list[str]]:
        """Ids of the advisories affecting each distribution's version, by canonical name."""
        found: dict[str, list[str]] = {dist.name: [] for dist in dists}
        pending: list[tuple[Distribution, str | None, int]] = [(d, None, 1) for d in dists]
        while pending:
            batch, pending = pending[:OSV_BATCH], pending[OSV_BATCH:]
            for (dist, _, page), result in zip(batch, self._post_batch(batch), strict=True):
                found[dist.name] += self._ids(result)
                token = result.get("next_page_token")
                if token and page >= OSV_MAX_PAGES:
                    raise AdvisorySourceError(
                        f"osv api {self.url}: more than {OSV_MAX_PAGES} pages for {dist.name}"
                    )
                if token:
                    pending.append((dist, str(token), page + 1))
        return found

    def _post_batch(self, batch: list[tuple[Distribution, str | None, int]]) -> list[Any]:
        queries = [
            {"package": {"name": dist.name, "ecosystem": ECOSYSTEM}, "version": dist.version}
            | ({"page_token": token} if token else {})
            for dist, token, _ in batch
        ]
        body = self._request("POST", "/v1/querybatch", {"queries": queries})
        results = body.get("results") if isinstance(body, dict) else None
        if not isinstance(results, list) or len(results) != len(batch):
            count = len(results) if isinstance(results, list) else "no"
            raise AdvisorySourceError(
                f"osv api {self.url}: {count} results for {len(batch)} queries"
            )
        return [result if isinstance(result, dict) else {} for result in results]

    def _ids(self, result: dict[str, Any]) -> list[str]:
        vulns = result.get("vulns") or []
        listed = vulns if isinstance(vulns, list) else [vulns]
        ids = [v.get("id") if isinstance(v, dict) else None for v in listed]
        if not all(isinstance(i, str) and i for i in ids):
            raise AdvisorySourceError(f"osv api {self.url}: a result without advisory ids")
        return [str(i) for i in ids]

    def advisory(self, advisory_id: str) -> Advisory | None:
        """One advisory in full, asked once per scan; None when the answer is not a valid
        advisory, which is named in `invalid`."""
        if advisory_id not in self._details:
            self._details[advisory_id] = self._fetch(advisory_id)
        return self._details[advisory_id]

    def _fetch(self, advisory_id: str) -> Advisory | None:
        body = self._request("GET", f"/v1/vulns/{quote(advisory_id, safe='')}", None)
        try:
            advisory = Advisory.model_validate(body)
        except ValidationError as exc:
            reason = f"{advisory_id}: {_first_error(exc)}"
            log.warning("advisory skipped reason=%s", reason)
            self.invalid.append(reason)
            return None
        if advisory.id != advisory_id:
            raise AdvisorySourceError(
                f"osv api {self.url}: asked for {advisory_id!r}, answered {advisory.id!r}"
            )
        return advisory

    def _request(self, method: str, path: str, payload: Any) -> Any:
        try:
            response = self._client.request(method, path, json=payload)
        except httpx.HTTPError as exc:
            raise AdvisorySourceError(f"osv api {self.url}{path}: {exc!r}") from exc
        if response.status_code != 200:
            text = " ".join(response.text.split())[:200]
            raise AdvisorySourceError(
                f"osv api {self.url}{path} answered {response.status_code}: {text}"
            )
        try:
            return response.json()
        except ValueError as exc:
            raise AdvisorySourceError(f"osv api {self.url}{path}: not JSON") from exc


@contextmanager
def open_source(settings: Settings) -> Iterator[AdvisorySource]:
    """The configured advisories: the OSV API when osv_url is set, else the osv_dir files."""
    if settings.osv_url:
        api = OsvApi(settings.osv_url)
        try:
            yield api
        finally:
            api.close()
    elif settings.osv_dir is not None:
        yield LocalAdvisories(settings.osv_dir)
    else:
        raise AdvisorySourceError(
            "no advisory source: set CARETAKER_OSV_URL (the OSV API, https://api.osv.dev)"
            " or CARETAKER_OSV_DIR (a directory of OSV JSON files)"
        )


# Scanning and recording


def scan_target(target: ServiceTarget, source: AdvisorySource) -> TargetScan:
    """List the target's distributions and judge them against the advisories; records
    nothing. TargetScanError when its interpreter cannot list them, AdvisorySourceError
    when the advisories cannot be read."""
    dists = list_distributions(target.python, LIST_TIMEOUT_S)
    judged = [dist for dist in dists if dist.parsed is not None]

    candidates = source.advisories_for(judged)

    found: dict[tuple[str, str], Finding] = {}
    for dist in judged:
        for advisory in candidates.get(dist.name, []):
            finding = judge(target.name, dist, advisory, source.matches_versions)
            if finding is not None:
                found.setdefault((finding.package, finding.advisory_id), finding)
    return TargetScan(
        target.name,
        distributions=len(dists),
        findings=sorted(found.values(), key=_finding_order),
        unparsable=[f"{dist.name} {dist.version}" for dist in dists if dist.parsed is None],
    )


def _finding_order(finding: Finding) -> tuple[int, str, str]:
    return SEVERITIES.index(finding.severity), finding.package, finding.advisory_id


def record_scan(conn: Connection, scan: TargetScan, config: Config) -> tuple[list[int], list[int]]:
    """Store a target's findings: new ones added, those found again seen again, those no
    longer found resolved; critical ones, and others with a known fix, raised as findings
    (routed to a hotfix: at once, or in a change window), the rest cleared. Returns the
    occurrences to route and the notifications to send after commit."""
    # Two scans of one target at once (the task and the command line) would both add the
    # same open finding; the second waits and then sees the first's rows.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"security-scan:{scan.target}",))
    for finding in scan.findings:
        scan.new += _upsert(conn, finding)
    scan.resolved = conn.execute(
        """
        UPDATE security_findings SET resolved_at = now()
         WHERE target = %s AND resolved_at IS NULL
           AND (package, advisory_id) NOT IN (SELECT * FROM unnest(%s::text[], %s::text[]))
        """,
        (
            scan.target,
            [f.package for f in scan.findings],
            [f.advisory_id for f in scan.findings],
        ),
    ).rowcount

    # Critical findings are hotfixed at once; others with a known fix wait for a change window.
    raised = {
        f.key: f for f in scan.findings if f.severity == "critical" or f.fixed_version is not None
    }
    new_ids = [_raise(conn, finding) for finding in raised.values()]
    notification_ids: list[int] = []
    for key in findings.open_findings(conn, f"{FINDING_PREFIX}{scan.target}:"):
        if key not in raised:
            reason = "no longer found by the security scan"
            notification_ids += findings.clear_finding(conn, key, reason, config)
    return [i for i in new_ids if i is not None], notification_ids


def _upsert(conn: Connection, finding: Finding) -> int:
    """Add the finding or see it again; 1 when it is new."""
    row = conn.execute(
        """
        INSERT INTO security_findings (target, package, installed_version, advisory_id,
                                       aliases, severity, summary, fixed_version)
        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
        ON CONFLICT (target, package, advisory_id) WHERE resolved_at IS NULL DO UPDATE
           SET last_seen_at = now(), installed_version = EXCLUDED.installed_version,
               aliases = EXCLUDED.aliases, severity = EXCLUDED.severity,
               summary = EXCLUDED.summary, fixed_version = EXCLUDED.fixed_version
        RETURNING (xmax = 0) AS inserted
        """,
        (
            *(finding.target, finding.package, finding.installed_version, finding.advisory_id),
            *(list(finding.aliases), finding.severity, finding.summary, finding.fixed_version),
        ),
    ).fetchone()
    assert row is not None
    return int(row["inserted"])


def _raise(conn: Connection, finding: Finding) -> int | None:
    labels = {
        "alertname": "SecurityAdvisory",
        "target": finding.target,
        "package": finding.package,
        "advisory": finding.advisory_id,
        "advisory_severity": finding.severity,
        "severity": "critical" if finding.severity == "critical" else "warning",
    } | ({"fixed_version": finding.fixed_version} if finding.fixed_version else {})
    fix = f"; fixed in {finding.fixed_version}" if finding.fixed_version else "; no fix known"
    summary = (
        f"{finding.package} {finding.installed_version} on {finding.target}:"
        f" {finding.advisory_id} ({finding.severity}) {finding.summary}".rstrip()
        + fix
    )
    if _hotfixed_before(conn, finding.key):
        # Its hotfix succeeded, yet the scan finds it again: the fix did not hold (the old
        # version came back). A new occurrence gets a new run. A failed hotfix is a person's.
        reason = "found again after its hotfix"
        findings.clear_finding(conn, finding.key, reason, get_config())
    return findings.raise_finding(conn, finding.key, labels, summary)


def _hotfixed_before(conn: Connection, key: str) -> bool:
    row = conn.execute(
        """
        SELECT 1 FROM occurrences o JOIN runs r ON r.occurrence_id = o.id
         WHERE o.source = 'analysis' AND o.fingerprint = %s AND o.status = 'firing'
           AND r.status = 'recovered'
        """,
        (key,),
    ).fetchone()
    return row is not None


def resolve_removed(conn: Connection, configured: set[str], config: Config) -> list[int]:
    """Resolve the findings of targets no longer configured; return notifications to send."""
    conn.execute(
        "UPDATE security_findings SET resolved_at = now()"
        " WHERE resolved_at IS NULL AND NOT (target = ANY(%s))",
        (sorted(configured),),
    )
    notification_ids: list[int] = []
    for key in findings.open_findings(conn, FINDING_PREFIX):
        target = key.removeprefix(FINDING_PREFIX).split(":", 1)[0]
        if target not in configured:
            reason = f"target {target} removed from the configuration"
            notification_ids += findings.clear_finding(conn, key, reason, config)
    return notification_ids


def scan_now(
    target_name: str | None = None, config: Config | None = None, settings: Settings | None = None
) -> ScanReport:
    """Scan every configured target (or the one named) in this process, record what was
    found and dispatch after commit. A target that cannot be scanned is reported and its
    findings left as they were; advisories that cannot be read fail the whole scan."""
    config = config or get_config()
    settings = settings or get_settings()
    targets = _selected(config, target_name)

    scans: list[TargetScan] = []
    invalid: list[str] = []
    if targets:
        with open_source(settings) as source:
            scans = [_scan_or_error(target, source) for target in targets]
            invalid = source.invalid

    new_ids: list[int] = []
    notification_ids: list[int] = []
    for scan in scans:
        if scan.error is None:
            with transaction() as conn:
                routed, notified = record_scan(conn, scan, config)
            new_ids += routed
            notification_ids += notified
    if target_name is None:
        with transaction() as conn:
            notification_ids += resolve_removed(conn, {t.name for t in targets}, config)
    dispatch.try_send("routing", dispatch.route_occurrences, new_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, notification_ids)
    _log_done(scans)
    return ScanReport(scans, invalid)


def _selected(config: Config, target_name: str | None) -> list[ServiceTarget]:
    if target_name is None:
        return list(config.targets)
    chosen = [target for target in config.targets if target.name == target_name]
    if not chosen:
        known = ", ".join(t.name for t in config.targets) or "none"
        raise NotFound(f"no target named {target_name!r} (configured: {known})")
    return chosen


def _scan_or_error(target: ServiceTarget, source: AdvisorySource) -> TargetScan:
    try:
        return scan_target(target, source)
    except TargetScanError as exc:
        log.error("security scan failed target=%s error=%s", target.name, exc)
        return TargetScan(target.name, error=str(exc))


def _log_done(scans: list[TargetScan]) -> None:
    for scan in scans:
        if scan.error is None:
            counts = scan.counts()
            log.info(
                "security scan done target=%s distributions=%d findings=%d critical=%d"
                " new=%d resolved=%d",
                *(scan.target, scan.distributions, counts["findings"], counts["critical"]),
                *(scan.new, scan.resolved),
            )


# The default time limits apply: a longer task would outlive the broker's visibility timeout
# and be delivered again while it runs.
@app.task(name="caretaker.remediation.security_scan", acks_late=True, reject_on_worker_lost=True)
def security_scan() -> dict[str, Any]:
    """Scan every configured target's installed packages against the OSV advisories and
    record the findings: new ones stored, those gone resolved, critical ones raised as
    findings (an incident each while they last). Idempotent; not retried. Returns the
    counts per target and the advisories skipped as invalid."""
    return scan_now().summary()


# Reading the findings


def finding_rows(target: str | None = None, include_resolved: bool = False) -> list[dict[str, Any]]:
    """Stored findings, most severe first; open ones unless include_resolved. Times in UTC
    ISO 8601."""
    with transaction() as conn:
        rows = conn.execute(
            """
            SELECT id, target, package, installed_version, advisory_id, aliases, severity,
                   summary, fixed_version, first_seen_at, last_seen_at, resolved_at
              FROM security_findings
             WHERE (%(target)s::text IS NULL OR target = %(target)s)
               AND (%(all)s OR resolved_at IS NULL)
             ORDER BY resolved_at IS NOT NULL, array_position(%(order)s, severity),
                      target, package, advisory_id, id
            """,
            {"target": target, "all": include_resolved, "order": list(SEVERITIES)},
        ).fetchall()
    return [
        {k: v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v for k, v in r.items()}
        for r in rows
    ]


def render_scan(report: ScanReport) -> str:
    """The report as text: per target its findings, or why it was not scanned."""
    lines: list[str] = []
    for scan in report.targets:
        if scan.error:
            lines.append(f"{scan.target}: not scanned: {scan.error}")
            continue
        critical = scan.counts()["critical"]
        lines.append(
            f"{scan.target}: {len(scan.findings)} findings in {scan.distributions} packages"
            f" ({critical} critical, {scan.new} new, {scan.resolved} resolved)"
        )
        rows = [asdict(finding) for finding in scan.findings]
        columns = ["package", "installed_version", "advisory_id", "severity", "fixed_version"]
        if rows:
            lines += ["  " + line for line in views.table(rows, columns).splitlines()]
        if scan.unparsable:
            lines.append(f"  not judged (version not PEP 440): {', '.join(scan.unparsable)}")
    if not report.targets:
        lines.append("no targets configured: nothing to scan")
    lines += [f"skipped advisory {reason}" for reason in report.invalid_advisories]
    return "\n".join(lines)

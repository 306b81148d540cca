"""The security scan on a real scratch environment, with OSV advisories from files and from a
local stand-in for the OSV API; findings in PostgreSQL, critical ones as occurrences."""

from __future__ import annotations

import json
import site
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg
import pytest
import redis
from click.testing import CliRunner
from packaging.utils import canonicalize_name
from packaging.version import Version

from tasks import security
from tasks.security import (
    Advisory,
    AdvisorySourceError,
    OsvRange,
    affects,
    fixed_after,
    severity_of,
)
from tests.conftest import DATA, queued_tasks
from tests.wheels import ScratchEnv, build_wheel
from workers.cli import cli
from workers.config import Config, ServiceTarget
from workers.settings import Settings

Conn = psycopg.Connection[dict[str, Any]]

OSV_DIR = DATA / "osv"
DEMO = "caretaker-demo-vuln"
CRITICAL_KEY = f"security:app:{DEMO}:CARETAKER-DEMO-0001"
# What the scan must find in version 1.0: (advisory, severity, fixed version).
EXPECTED_AT_1_0 = [
    ("CARETAKER-DEMO-0001", "critical", "1.1"),
    ("CARETAKER-DEMO-0002", "high", "1.1"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> ScratchEnv:
    """A virtual environment holding only the demo package; shared, it takes a while."""
    root = tmp_path_factory.mktemp("security")
    for version in ("1.0", "1.1"):
        build_wheel(DEMO, version, root / "wheels")
    env = ScratchEnv(root / "venv", root / "wheels")
    env.install(f"{DEMO}==1.0")
    return env


@pytest.fixture
def clean(db: Conn) -> Conn:
    db.execute("TRUNCATE security_findings RESTART IDENTITY")
    return db


def app_config(python: Path) -> Config:
    return Config(targets=[ServiceTarget(name="app", python=python)])


def dir_settings() -> Settings:
    return Settings(osv_dir=OSV_DIR, osv_url=None)


def found(report: security.ScanReport, target: str = "app") -> list[tuple[str, str, str | None]]:
    scan = next(scan for scan in report.targets if scan.target == target)
    return [(f.advisory_id, f.severity, f.fixed_version) for f in scan.findings]


def open_rows(db: Conn) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT * FROM security_findings WHERE resolved_at IS NULL ORDER BY advisory_id"
    ).fetchall()


def finding_occurrences(db: Conn) -> list[dict[str, Any]]:
    return db.execute(
        "SELECT id, fingerprint, status, labels FROM occurrences"
        " WHERE source = 'analysis' AND fingerprint LIKE 'security:%' ORDER BY id"
    ).fetchall()


# Judging advisories, without services


def advisory(
    *events: dict[str, str], versions: list[str] | None = None, kind: str = "ECOSYSTEM"
) -> Advisory:
    entry: dict[str, Any] = {
        "package": {"ecosystem": "PyPI", "name": "Some_Package"},
        "ranges": [{"type": kind, "events": list(events)}],
        "versions": versions or [],
    }
    return Advisory.model_validate({"id": "X-1", "affected": [entry]})


def test_ranges_are_judged_in_version_order() -> None:
    name = canonicalize_name("some.package")
    unsorted = advisory({"fixed": "2.0"}, {"introduced": "1.5"}, {"introduced": "0"})
    last = advisory({"introduced": "1.0"}, {"last_affected": "1.2"})

    assert affects(unsorted, name, Version("0a1")) is True
    assert affects(unsorted, name, Version("1.9.9")) is True
    assert affects(unsorted, name, Version("2.0")) is False
    assert affects(last, name, Version("1.2")) is True
    assert affects(last, name, Version("1.2.1")) is False
    assert affects(last, name, Version("0.9")) is False
    assert affects(advisory(versions=["3.0"]), name, Version("3.0.0")) is True
    assert affects(advisory({"introduced": "0"}), "other-package", Version("1.0")) is None


def test_other_ecosystems_and_git_ranges_give_nothing_to_judge() -> None:
    npm = Advisory.model_validate(
        {"id": "X", "affected": [{"package": {"ecosystem": "npm", "name": "some-package"}}]}
    )
    git = advisory({"introduced": "0"}, kind="GIT")

    assert affects(npm, "some-package", Version("1.0")) is None
    assert affects(git, "some-package", Version("1.0")) is None


def test_the_fix_proposed_is_the_smallest_fixed_above_the_installed() -> None:
    two = advisory({"introduced": "0"}, {"fixed": "1.1"}, {"introduced": "2.0"}, {"fixed": "2.3"})
    semver = OsvRange(type="SEMVER", events=[{"introduced": "2.0"}, {"fixed": "2.1"}])
    entry = two.affected[0]
    found = two.model_copy(
        update={"affected": [entry.model_copy(update={"ranges": [*entry.ranges, semver]})]}
    )

    assert fixed_after(found, "some-package", Version("1.0")) == Version("1.1")
    assert fixed_after(found, "some-package", Version("2.0")) == Version("2.1")
    assert fixed_after(found, "some-package", Version("3.0")) is None


@pytest.mark.parametrize(
    ("rated", "vector", "severity"),
    [
        ("MODERATE", None, "medium"),
        ("Medium", None, "medium"),
        ("LOW", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "low"),
        (None, "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", "critical"),
        (None, "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N", "high"),
        (None, "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:L/I:N/A:N", "medium"),
        (None, "CVSS:3.1/AV:L/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N", "low"),
        (None, "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N", "none"),
        (None, "CVSS:3.1/AV:N/nonsense", "unknown"),
        (None, None, "unknown"),
    ],
)
def test_severity_from_the_database_else_the_cvss_base_score(
    rated: str | None, vector: str | None, severity: str
) -> None:
    found: dict[str, Any] = {"id": "X-1"}
    if rated is not None:
        found["database_specific"] = {"severity": rated}
    if vector is not None:
        found["severity"] = [{"type": "CVSS_V3", "score": vector}]

    assert severity_of(Advisory.model_validate(found)) == severity


def test_listing_keeps_the_first_of_a_name_and_unparsable_versions() -> None:
    text = json.dumps(
        [["Foo_Bar", "1.0"], ["foo-bar", "9.9"], ["odd", "not a version"], [None, "1"]]
    )

    listed = security.parse_distributions(text, Path("/srv/app/bin/python"))

    assert [(d.name, d.version, d.parsed) for d in listed] == [
        ("foo-bar", "1.0", Version("1.0")),
        ("odd", "not a version", None),
    ]


# The target's environment


def test_only_the_targets_environment_is_listed(
    scratch: ScratchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # caretaker's own packages on PYTHONPATH must not leak into the target's listing.
    monkeypatch.setenv("PYTHONPATH", ":".join(site.getsitepackages()))
    scratch.install(f"{DEMO}==1.0")

    listed = security.list_distributions(scratch.python)

    assert [(d.name, d.version) for d in listed] == [(DEMO, "1.0")]


def test_no_targets_means_nothing_is_scanned(clean: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an environment was listed")

    monkeypatch.setattr(security, "list_distributions", never)

    # No advisory source either: with nothing to scan none is needed.
    report = security.scan_now(config=Config(), settings=Settings(osv_dir=None, osv_url=None))

    assert report.targets == []
    assert open_rows(clean) == []
    assert security.render_scan(report) == "no targets configured: nothing to scan"


# Scans from a directory of advisories


def test_a_scan_finds_exactly_the_advisories_affecting_the_installed_version(
    clean: Conn, broker: redis.Redis, scratch: ScratchEnv
) -> None:
    scratch.install(f"{DEMO}==1.0")

    report = security.scan_now(config=app_config(scratch.python), settings=dir_settings())

    assert found(report) == EXPECTED_AT_1_0
    assert report.invalid_advisories == [
        "broken.json: Invalid JSON: EOF while parsing a list at line 2 column 0",
        "not-an-advisory.json: id: Field required",
    ]
    assert report.targets[0].distributions == 1
    rows = open_rows(clean)
    assert [(r["package"], r["installed_version"], r["advisory_id"]) for r in rows] == [
        (DEMO, "1.0", "CARETAKER-DEMO-0001"),
        (DEMO, "1.0", "CARETAKER-DEMO-0002"),
    ]
    assert rows[0]["aliases"] == ["CVE-2099-0001"]
    assert rows[1]["summary"] == "Information disclosure in caretaker-demo-vuln"
    # The critical one is hotfixed at once; the high one, with a fix, in a change window.
    occurrence, planned = finding_occurrences(clean)
    assert occurrence["fingerprint"] == CRITICAL_KEY
    assert occurrence["status"] == "firing"
    assert occurrence["labels"] == {
        "alertname": "SecurityAdvisory",
        "target": "app",
        "package": DEMO,
        "advisory": "CARETAKER-DEMO-0001",
        "advisory_severity": "critical",
        "severity": "critical",
        "fixed_version": "1.1",
    }
    assert planned["fingerprint"] == f"security:app:{DEMO}:CARETAKER-DEMO-0002"
    assert (planned["labels"]["severity"], planned["labels"]["advisory_severity"]) == (
        "warning",
        "high",
    )
    routed = ("caretaker.alerts.route_occurrences", [[occurrence["id"], planned["id"]]])
    assert routed in queued_tasks(broker, "alerts")


def test_a_rescan_sees_findings_again_without_adding_any(clean: Conn, scratch: ScratchEnv) -> None:
    scratch.install(f"{DEMO}==1.0")
    config = app_config(scratch.python)
    security.scan_now(config=config, settings=dir_settings())
    before = open_rows(clean)

    again = security.scan_now(config=config, settings=dir_settings())

    after = open_rows(clean)
    assert (again.targets[0].new, again.targets[0].resolved) == (0, 0)
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert [r["first_seen_at"] for r in after] == [r["first_seen_at"] for r in before]
    assert all(a["last_seen_at"] > b["last_seen_at"] for a, b in zip(after, before, strict=True))
    assert len(finding_occurrences(clean)) == 2


def test_upgrading_resolves_the_findings_and_clears_the_occurrence(
    clean: Conn, scratch: ScratchEnv
) -> None:
    config = app_config(scratch.python)
    scratch.install(f"{DEMO}==1.0")
    security.scan_now(config=config, settings=dir_settings())

    scratch.install(f"{DEMO}==1.1")
    report = security.scan_now(config=config, settings=dir_settings())

    assert found(report) == []
    assert report.targets[0].resolved == 2
    assert open_rows(clean) == []
    resolved = clean.execute("SELECT resolved_at FROM security_findings").fetchall()
    assert len(resolved) == 2 and all(row["resolved_at"] is not None for row in resolved)
    assert [o["status"] for o in finding_occurrences(clean)] == ["resolved", "resolved"]

    # Back to the vulnerable version: new findings, the old ones stay history.
    scratch.install(f"{DEMO}==1.0")
    report = security.scan_now(config=config, settings=dir_settings())
    assert report.targets[0].new == 2
    assert clean.execute("SELECT count(*) AS n FROM security_findings").fetchone() == {"n": 4}
    statuses = [o["status"] for o in finding_occurrences(clean)]
    assert statuses == ["resolved", "resolved", "firing", "firing"]


def test_a_target_that_cannot_be_listed_is_reported_and_the_others_scanned(
    clean: Conn, scratch: ScratchEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch.install(f"{DEMO}==1.0")
    hanging = tmp_path / "python"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    hanging.chmod(hanging.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(security, "LIST_TIMEOUT_S", 0.5)
    config = Config(
        targets=[
            ServiceTarget(name="gone", python=tmp_path / "missing" / "python"),
            ServiceTarget(name="hung", python=hanging),
            ServiceTarget(name="app", python=scratch.python),
        ]
    )

    report = security.scan_now(config=config, settings=dir_settings())

    errors = {scan.target: scan.error for scan in report.targets}
    assert errors == {
        "gone": f"cannot run {tmp_path}/missing/python: No such file or directory",
        "hung": f"{hanging} did not list its packages within 0.5 s",
        "app": None,
    }
    assert found(report) == EXPECTED_AT_1_0
    assert report.problem() == "1 critical findings; not scanned: gone, hung"


def test_findings_of_a_target_that_fails_stay_open(
    clean: Conn, scratch: ScratchEnv, tmp_path: Path
) -> None:
    scratch.install(f"{DEMO}==1.0")
    security.scan_now(config=app_config(scratch.python), settings=dir_settings())

    report = security.scan_now(config=app_config(tmp_path / "nope"), settings=dir_settings())

    assert report.targets[0].error is not None
    assert len(open_rows(clean)) == 2
    assert [o["status"] for o in finding_occurrences(clean)] == ["firing", "firing"]


def test_findings_of_a_removed_target_are_resolved(clean: Conn, scratch: ScratchEnv) -> None:
    scratch.install(f"{DEMO}==1.0")
    security.scan_now(config=app_config(scratch.python), settings=dir_settings())

    security.scan_now(config=Config(), settings=dir_settings())

    assert open_rows(clean) == []
    assert [o["status"] for o in finding_occurrences(clean)] == ["resolved", "resolved"]


def test_an_empty_advisory_directory_is_an_error(scratch: ScratchEnv, tmp_path: Path) -> None:
    with pytest.raises(AdvisorySourceError, match="holds no valid advisory"):
        security.scan_now(config=app_config(scratch.python), settings=Settings(osv_dir=tmp_path))


def test_the_task_returns_counts_per_target(
    clean: Conn, scratch: ScratchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch.install(f"{DEMO}==1.0")
    monkeypatch.setattr(security, "get_config", lambda: app_config(scratch.python))
    monkeypatch.setattr(security, "get_settings", dir_settings)

    outcome = security.security_scan()

    assert security.security_scan.name == "caretaker.remediation.security_scan"
    counts = outcome["targets"]["app"]
    assert counts["status"] == "ok"
    assert (counts["findings"], counts["critical"], counts["high"], counts["new"]) == (2, 1, 1, 2)
    assert len(outcome["invalid_advisories"]) == 2


# The OSV API, served by a local stand-in


class OsvStandIn:
    """POST /v1/querybatch and GET /v1/vulns/{id} over the advisory files. It matches names
    only and pages one advisory at a time, so the scan must judge versions and follow
    next_page_token itself."""

    def __init__(self) -> None:
        self.advisories: dict[str, dict[str, Any]] = {}
        for path in sorted(OSV_DIR.glob("*.json")):
            try:
                loaded = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if "id" in loaded:
                self.advisories[loaded["id"]] = loaded
        self.fail_status: int | None = None
        self.page_tokens: list[str] = []
        self.fetched: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def matching(self, name: str) -> list[str]:
        return [
            advisory_id
            for advisory_id, found in self.advisories.items()
            if any(
                entry["package"]["ecosystem"] == "PyPI"
                and canonicalize_name(entry["package"]["name"]) == canonicalize_name(name)
                for entry in found["affected"]
            )
        ]

    def answer(self, query: dict[str, Any]) -> dict[str, Any]:
        ids = self.matching(query["package"]["name"])
        token = query.get("page_token")
        if token is not None:
            self.page_tokens.append(token)
        start = int(token or 0)
        if start >= len(ids):
            return {}
        page: dict[str, Any] = {"vulns": [{"id": ids[start], "modified": "2026-01-01T00:00:00Z"}]}
        if start + 1 < len(ids):
            page["next_page_token"] = str(start + 1)
        return page

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                queries = json.loads(self.rfile.read(length))["queries"]
                self._send({"results": [stand_in.answer(query) for query in queries]})

            def do_GET(self) -> None:
                advisory_id = unquote(self.path.removeprefix("/v1/vulns/"))
                stand_in.fetched.append(advisory_id)
                found = stand_in.advisories.get(advisory_id)
                self._send(found or {"code": 5, "message": "Bug not found."}, 200 if found else 404)

            def _send(self, body: dict[str, Any], status: int = 200) -> None:
                if stand_in.fail_status is not None:
                    status, body = stand_in.fail_status, {"code": 13, "message": "internal"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def osv_api() -> Iterator[OsvStandIn]:
    stand_in = OsvStandIn()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


def test_a_scan_through_the_osv_api_follows_pages(
    clean: Conn, scratch: ScratchEnv, osv_api: OsvStandIn
) -> None:
    scratch.install(f"{DEMO}==1.0")
    settings = Settings(osv_url=osv_api.url, osv_dir=None)

    report = security.scan_now(config=app_config(scratch.python), settings=settings)

    # The stand-in answered every advisory of the name: the scan judges the versions itself,
    # and keeps the one it has nothing to judge by (a git range only) as the API matched it.
    expected = [*EXPECTED_AT_1_0, ("CARETAKER-DEMO-0006", "low", None)]
    assert found(report) == expected
    assert report.invalid_advisories == []
    assert osv_api.page_tokens == ["1", "2", "3", "4"]
    # Each advisory is read once, the withdrawn and the unaffecting ones too.
    assert sorted(osv_api.fetched) == [f"CARETAKER-DEMO-000{i}" for i in (1, 2, 3, 4, 6)]
    assert [r["advisory_id"] for r in open_rows(clean)] == [a for a, _, _ in expected]


def test_an_osv_api_error_fails_the_scan_and_resolves_nothing(
    clean: Conn, scratch: ScratchEnv, osv_api: OsvStandIn
) -> None:
    scratch.install(f"{DEMO}==1.0")
    config = app_config(scratch.python)
    settings = Settings(osv_url=osv_api.url, osv_dir=None)
    security.scan_now(config=config, settings=settings)
    osv_api.fail_status = 500

    with pytest.raises(AdvisorySourceError) as raised:
        security.scan_now(config=config, settings=settings)

    assert str(raised.value) == f"osv api {osv_api.url}/v1/querybatch answered 500: " + json.dumps(
        {"code": 13, "message": "internal"}
    )
    assert len(open_rows(clean)) == 3
    assert {o["status"] for o in finding_occurrences(clean)} == {"firing"}


def test_an_unreachable_osv_api_is_an_error(scratch: ScratchEnv, osv_api: OsvStandIn) -> None:
    url = osv_api.url
    osv_api.server.shutdown()
    osv_api.server.server_close()

    with pytest.raises(AdvisorySourceError, match="ConnectError"):
        security.scan_now(config=app_config(scratch.python), settings=Settings(osv_url=url))


# The command line


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["security", *args])


def test_cli_scan_prints_findings_and_exits_1_on_a_critical_one(
    clean: Conn, scratch: ScratchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch.install(f"{DEMO}==1.0")
    monkeypatch.setattr(security, "get_config", lambda: app_config(scratch.python))
    monkeypatch.setattr(security, "get_settings", dir_settings)

    done = invoke("scan")

    assert done.exit_code == 1, done.output
    lines = done.stdout.splitlines()
    assert lines[0] == "app: 2 findings in 1 packages (1 critical, 2 new, 0 resolved)"
    assert [line.split() for line in lines[2:4]] == [
        [DEMO, "1.0", "CARETAKER-DEMO-0001", "critical", "1.1"],
        [DEMO, "1.0", "CARETAKER-DEMO-0002", "high", "1.1"],
    ]
    assert lines[4:] == [
        "skipped advisory broken.json: Invalid JSON: EOF while parsing a list at line 2 column 0",
        "skipped advisory not-an-advisory.json: id: Field required",
    ]
    assert done.stderr == "Error: 1 critical findings\n"

    as_json = invoke("scan", "--json", "--target", "app")
    assert as_json.exit_code == 1
    scanned = json.loads(as_json.stdout)["targets"][0]
    assert [(f["advisory_id"], f["fixed_version"]) for f in scanned["findings"]] == [
        ("CARETAKER-DEMO-0001", "1.1"),
        ("CARETAKER-DEMO-0002", "1.1"),
    ]

    listed = invoke("findings", "--json")
    assert [(r["advisory_id"], r["severity"]) for r in json.loads(listed.stdout)] == [
        ("CARETAKER-DEMO-0001", "critical"),
        ("CARETAKER-DEMO-0002", "high"),
    ]


def test_cli_scan_exits_0_when_nothing_critical_remains(
    clean: Conn, scratch: ScratchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(security, "get_config", lambda: app_config(scratch.python))
    monkeypatch.setattr(security, "get_settings", dir_settings)
    scratch.install(f"{DEMO}==1.0")
    invoke("scan")
    scratch.install(f"{DEMO}==1.1")

    done = invoke("scan")

    assert done.exit_code == 0, done.output
    assert done.stdout.startswith("app: 0 findings in 1 packages (0 critical, 0 new, 2 resolved)")
    assert invoke("findings").stdout == "(none)\n"
    everything = invoke("findings", "--all", "--target", "app").stdout.splitlines()
    assert everything[0].split()[-1] == "RESOLVED_AT"
    assert len(everything) == 3


def test_cli_names_an_unknown_target_in_one_line(
    clean: Conn, scratch: ScratchEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(security, "get_config", lambda: app_config(scratch.python))
    monkeypatch.setattr(security, "get_settings", dir_settings)

    done = invoke("scan", "--target", "nope")

    assert done.exit_code == 1
    assert done.stderr == "Error: no target named 'nope' (configured: app)\n"


def test_a_finding_back_after_a_successful_hotfix_gets_a_new_occurrence(
    clean: Conn, scratch: ScratchEnv
) -> None:
    scratch.install(f"{DEMO}==1.0")
    config = app_config(scratch.python)
    security.scan_now(config=config, settings=dir_settings())
    first = finding_occurrences(clean)[0]
    clean.execute(
        "INSERT INTO runs (occurrence_id, runbook, status, trigger, on_failure)"
        " VALUES (%s, 'hotfix:app', 'recovered', 'alert', '{}')",
        (first["id"],),
    )

    # The old version came back before the next scan: the fix did not hold.
    security.scan_now(config=config, settings=dir_settings())

    rows = [(o["fingerprint"], o["status"]) for o in finding_occurrences(clean)]
    assert rows.count((CRITICAL_KEY, "resolved")) == 1
    assert rows.count((CRITICAL_KEY, "firing")) == 1

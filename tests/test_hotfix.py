"""Security hotfixes: hostile input refused before anything runs, the pin committed on its own
branch in a real git repository, and the whole run on a real worker with a real venv."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tasks.hotfix import (
    PinParams,
    hotfix_runbook,
    pin_in_repository,
    pinned,
    raise_pin,
    request_hotfix,
)
from tests.conftest import DEMO_REPO, DEMO_VENV, HEALTH_PORT, ROOT, WHEELS, wait_for
from tests.wheels import ScratchEnv, build_wheel
from workers import dispatch
from workers.config import get_config
from workers.db import transaction
from workers.errors import ActionError
from workers.runs import StepContext

Conn = psycopg.Connection[dict[str, Any]]
CONTEXT = StepContext(run_id=7, step_name="pin", labels={}, earlier={})


def git(*args: str, cwd: Path = DEMO_REPO) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


@pytest.fixture
def repo() -> Iterator[Path]:
    """The demo service's repository: one commit holding its requirements."""
    shutil.rmtree(DEMO_REPO, ignore_errors=True)
    DEMO_REPO.mkdir(parents=True)
    git("init", "--quiet", "--initial-branch=main")
    (DEMO_REPO / "requirements.txt").write_text("flask==3.0.0\ncaretaker-demo==1.0  # pinned\n")
    git("add", "requirements.txt")
    git("-c", "user.name=dev", "-c", "user.email=dev@example.com", "commit", "-qm", "start")
    yield DEMO_REPO
    shutil.rmtree(DEMO_REPO, ignore_errors=True)


@pytest.mark.parametrize(
    "spec",
    [
        "requests; rm -rf /",
        "--index-url=http://evil.example",
        "-e git+https://evil.example/x",
        "requests>=2",
        "requests==2.*",
        "requests[socks]==2.31.0",
        "requests @ https://evil.example/r.whl",
        "requests==2.31.0 ",
        "requests==not-a-version",
        "",
    ],
)
def test_anything_but_an_exact_pin_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="is not a package pin"):
        pinned(spec)


def test_a_pin_is_canonical() -> None:
    assert pinned("Caretaker_Demo==1.1") == "caretaker-demo==1.1"


def test_a_hostile_hotfix_request_records_nothing(db: Conn) -> None:
    with transaction() as conn, pytest.raises(ValueError, match="is not a package pin"):
        request_hotfix(conn, "demo", "requests; rm -rf /", "1.0", "GHSA-1", "ops")
    with transaction() as conn, pytest.raises(ValueError, match="is not an advisory id"):
        request_hotfix(conn, "demo", "requests", "2.31.0", "../../etc", "ops")
    with transaction() as conn, pytest.raises(ValueError, match="is not an advisory id"):
        request_hotfix(conn, "demo", "requests", "2.31.0", "PYSEC..2026", "ops")
    with transaction() as conn, pytest.raises(ActionError, match="no target named 'nope'"):
        request_hotfix(conn, "nope", "requests", "2.31.0", "GHSA-1", "ops")

    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 0}


def test_the_pin_replaces_the_package_line_or_is_appended() -> None:
    text = "# deps\nflask==3.0.0\nCaretaker_Demo>=1.0  # old\n-r base.txt\n"

    assert raise_pin(text, "caretaker-demo==1.1") == (
        "# deps\nflask==3.0.0\ncaretaker-demo==1.1\n-r base.txt\n"
    )
    assert raise_pin("flask==3.0.0\n", "caretaker-demo==1.1") == (
        "flask==3.0.0\ncaretaker-demo==1.1\n"
    )


def test_the_pin_is_committed_on_its_own_branch_and_the_checkout_is_untouched(
    repo: Path,
) -> None:
    head = git("rev-parse", "HEAD")
    params = PinParams(
        target="demo", package="caretaker-demo", version="1.1", advisory="GHSA-demo-1"
    )

    outcome = pin_in_repository(params, CONTEXT)

    assert outcome.ok, outcome.error
    assert outcome.result["branch"] == "hotfix/security-GHSA-demo-1"
    assert git("rev-list", "--count", f"main..{outcome.result['branch']}") == "1"
    assert git("rev-parse", f"{outcome.result['branch']}~1") == head
    pinned_text = git("show", f"{outcome.result['branch']}:requirements.txt")
    assert pinned_text == "flask==3.0.0\ncaretaker-demo==1.1"
    assert git("log", "-1", "--format=%s", outcome.result["branch"]) == (
        "Raise caretaker-demo==1.1 for GHSA-demo-1"
    )
    # The checked-out tree and branch are as they were; no worktree is left registered.
    assert git("rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert "caretaker-demo==1.0" in (repo / "requirements.txt").read_text()
    assert len(git("worktree", "list").splitlines()) == 1


def test_the_runbook_follows_the_target_configuration() -> None:
    [target] = get_config().targets
    runbook = hotfix_runbook(target, "caretaker-demo", "1.1", "GHSA-demo-1")

    assert [s.name for s in runbook.steps] == [
        "record",
        "install",
        "test",
        "restart",
        "verify",
        "pin",
    ]
    assert [s.name for s in runbook.rollback] == [
        "reinstall",
        "restart-after-rollback",
        "verify-after-rollback",
    ]
    assert runbook.steps[1].params["requirements"] == ["caretaker-demo==1.1"]


@pytest.fixture(scope="module")
def wheels() -> Path:
    """The package index: two versions of the demo package."""
    for version in ("1.0", "1.1"):
        build_wheel("caretaker-demo", version, WHEELS)
    return WHEELS


@pytest.fixture
def demo_env(wheels: Path) -> Iterator[ScratchEnv]:
    """The demo service's environment, holding the vulnerable 1.0."""
    shutil.rmtree(DEMO_VENV, ignore_errors=True)
    (DEMO_VENV.parent / "tests-fail").unlink(missing_ok=True)
    env = ScratchEnv(DEMO_VENV, wheels)
    env.install("caretaker-demo==1.0")
    yield env
    shutil.rmtree(DEMO_VENV, ignore_errors=True)
    (DEMO_VENV.parent / "tests-fail").unlink(missing_ok=True)


@pytest.fixture
def healthy() -> Iterator[None]:
    """The demo service's health endpoint, answering 200."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", HEALTH_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield
    server.shutdown()
    server.server_close()


def installed(env: ScratchEnv) -> str:
    done = subprocess.run(
        [str(env.python), "-c", "import caretaker_demo; print(caretaker_demo.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def hotfix(advisory: str) -> int:
    with transaction() as conn:
        occurrence_id = request_hotfix(conn, "demo", "caretaker-demo", "1.1", advisory, "ops")
    dispatch.route_occurrences([occurrence_id])
    return occurrence_id


def finished_run(db: Conn) -> dict[str, Any]:
    return wait_for(
        lambda: db.execute(
            "SELECT id, status FROM runs WHERE status NOT IN ('running', 'waiting')"
        ).fetchone(),
        timeout_s=90,
        what="the hotfix run to end",
    )


def test_a_hotfix_upgrades_tests_restarts_verifies_and_pins(
    db: Conn, worker: subprocess.Popen[bytes], demo_env: ScratchEnv, repo: Path, healthy: None
) -> None:
    assert installed(demo_env) == "1.0"

    hotfix("GHSA-demo-1")

    assert finished_run(db)["status"] == "recovered"
    assert installed(demo_env) == "1.1"
    steps = db.execute("SELECT name, status FROM steps ORDER BY position").fetchall()
    assert [(s["name"], s["status"]) for s in steps] == [
        ("record", "succeeded"),
        ("install", "succeeded"),
        ("test", "succeeded"),
        ("restart", "succeeded"),
        ("verify", "succeeded"),
        ("pin", "succeeded"),
        ("reinstall", "skipped"),
        ("restart-after-rollback", "skipped"),
        ("verify-after-rollback", "skipped"),
    ]
    record = db.execute("SELECT result FROM steps WHERE name = 'record'").fetchone()
    assert record is not None and record["result"]["versions"]["caretaker-demo"] == "1.0"
    assert git("show", "hotfix/security-GHSA-demo-1:requirements.txt") == (
        "flask==3.0.0\ncaretaker-demo==1.1"
    )
    assert git("rev-list", "--count", "main..hotfix/security-GHSA-demo-1") == "1"
    assert db.execute("SELECT count(*) AS n FROM incidents").fetchone() == {"n": 0}


def test_a_failing_test_rolls_back_and_escalates_with_the_output(
    db: Conn, worker: subprocess.Popen[bytes], demo_env: ScratchEnv, repo: Path, healthy: None
) -> None:
    (DEMO_VENV.parent / "tests-fail").write_text("1")

    hotfix("GHSA-demo-2")

    assert finished_run(db)["status"] == "escalated"
    assert installed(demo_env) == "1.0"  # put back by the rollback
    steps = db.execute("SELECT name, status FROM steps ORDER BY position").fetchall()
    assert [(s["name"], s["status"]) for s in steps] == [
        ("record", "succeeded"),
        ("install", "succeeded"),
        ("test", "failed"),
        ("restart", "skipped"),
        ("verify", "skipped"),
        ("pin", "skipped"),
        ("reinstall", "succeeded"),
        ("restart-after-rollback", "succeeded"),
        ("verify-after-rollback", "succeeded"),
        ("escalate", "succeeded"),
    ]
    incident = wait_for(lambda: db.execute("SELECT id, status FROM incidents").fetchone())
    reason = db.execute(
        "SELECT message FROM events WHERE incident_id = %s AND kind = 'incident_opened'",
        (incident["id"],),
    ).fetchone()
    assert reason is not None
    assert "step test failed: command exited with 1; rolled back" in reason["message"]
    assert "FAILED test_checkout: the new version breaks checkout" in reason["message"]
    assert git("branch", "--list", "hotfix/*") == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["requests; rm -rf /", "--version", "1.0", "--advisory", "A-1"], "is not a package pin"),
        (
            ["requests", "--version", "--index-url=http://evil.example", "--advisory", "A-1"],
            "is not a package pin",
        ),
        (["requests", "--version", "2.0", "--advisory", "../../x"], "is not an advisory id"),
        (["requests"], "no open finding with a fix for requests on demo"),
    ],
)
def test_the_hotfix_command_refuses_hostile_input_and_records_nothing(
    db: Conn, args: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "security", "hotfix", *args, "--target", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert db.execute("SELECT count(*) AS n FROM occurrences").fetchone() == {"n": 0}


def test_a_pin_done_before_or_already_in_the_repository_is_not_a_failure(repo: Path) -> None:
    params = PinParams(target="demo", package="caretaker-demo", version="1.1", advisory="GHSA-a")
    assert pin_in_repository(params, CONTEXT).result["branch"] == "hotfix/security-GHSA-a"

    again = pin_in_repository(params, CONTEXT)
    current = PinParams(target="demo", package="flask", version="3.0.0", advisory="GHSA-b")
    in_head = pin_in_repository(current, CONTEXT)

    assert again.ok and again.result["already_pinned_in"] == "hotfix/security-GHSA-a"
    assert in_head.ok and in_head.result["already_pinned_in"] == "HEAD"
    assert git("branch", "--list", "hotfix/security-GHSA-b") == ""

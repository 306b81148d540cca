"""Security hotfixes: hostile input refused before anything runs, the pin committed on its own
branch in a real git repository, and the whole run on a real worker with a real venv."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
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
from tests.conftest import DEMO_REPO
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

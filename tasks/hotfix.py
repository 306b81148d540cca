"""Security hotfixes as runs: record the installed versions, install the fixed one, test,
restart, verify, pin it in the repository; on any failure reinstall what was recorded, restart,
verify, and escalate.

Package names and versions are checked with `packaging` before they reach pip, and pip gets them
after `--`, so nothing from an advisory or a command line can become a pip option.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.commands import CommandParams, CommandResult, execute
from workers.config import (
    OnFailure,
    RunbookConfig,
    ServiceTarget,
    StepConfig,
    get_config,
)
from workers.db import Connection, transaction
from workers.errors import ActionError
from workers.occurrences import record_manual
from workers.runs import Outcome, StepContext
from workers.settings import get_settings

log = logging.getLogger(__name__)

RUNBOOK_PREFIX = "hotfix:"
# The alertname of an advisory finding; its labels name target, package, advisory, fixed_version.
ADVISORY_ALERT = "SecurityAdvisory"
PIP_TIMEOUT_S = 900.0
GIT_TIMEOUT_S = 60.0
# A branch name part from an advisory id: GHSA-xxxx, PYSEC-2024-1, CVE-2024-1234.
_ADVISORY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def pinned(spec: str) -> str:
    """`name==version`, canonical, or ValueError: no options, markers, URLs, extras, ranges."""
    if not spec or spec.startswith("-") or spec != spec.strip():
        raise ValueError(f"{spec!r} is not a package pin: expected name==version")
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        # packaging's message draws a caret under the spot on further lines: the first says it.
        reason = str(exc).splitlines()[0]
        raise ValueError(f"{spec!r} is not a package pin: {reason}") from None
    if requirement.url or requirement.marker or requirement.extras:
        raise ValueError(f"{spec!r} is not a package pin: only name==version is accepted")
    specifiers = list(requirement.specifier)
    if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
        raise ValueError(f"{spec!r} is not a package pin: expected exactly ==version")
    try:
        version = Version(specifiers[0].version)
    except InvalidVersion:
        raise ValueError(f"{spec!r} is not a package pin: bad version") from None
    return f"{canonicalize_name(requirement.name)}=={version}"


def advisory_ref(text: str) -> str:
    """An advisory id that can name a git branch: letters, digits, `.`, `_`, `-`, without
    `..` or a trailing `.` or `.lock`."""
    if not _ADVISORY.match(text) or ".." in text or text.endswith((".", ".lock")):
        raise ValueError(f"{text!r} is not an advisory id")
    return text


class TargetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str


class InstallParams(TargetParams):
    requirements: list[str] = Field(min_length=1)

    @field_validator("requirements")
    @classmethod
    def _pins(cls, value: list[str]) -> list[str]:
        return [pinned(spec) for spec in value]


class RestoreParams(TargetParams):
    # The step whose recorded versions are put back.
    from_step: str = "record"


class PinParams(TargetParams):
    package: str
    version: str
    advisory: str

    @field_validator("advisory")
    @classmethod
    def _advisory(cls, value: str) -> str:
        return advisory_ref(value)


def service_target(name: str) -> ServiceTarget:
    found = next((t for t in get_config().targets if t.name == name), None)
    if found is None:
        raise ActionError(f"no target named {name!r} in the configuration")
    return found


def installed_versions(python: Path) -> dict[str, str]:
    """Every distribution installed in the environment of `python`, by canonical name."""
    from tasks.security import TargetScanError, list_distributions

    try:
        return {d.name: d.version for d in list_distributions(python)}
    except TargetScanError as exc:
        raise ActionError(str(exc)) from exc


def pip_install_argv(python: Path, pins: list[str], exact: bool = False) -> list[str]:
    """pip's argv for the pins into the environment of `python`, from the configured package
    index; `exact` installs only them (no dependency changes), as a rollback must."""
    argv = [*_pip(python), "install", "--no-input", "--disable-pip-version-check"]
    argv += index_options()
    if exact:
        argv.append("--no-deps")
    return [*argv, "--", *pins]


def index_options() -> list[str]:
    """pip's options for the configured package index: a local directory of wheels (a path
    or file:// URL) or an index URL; none means pip's default."""
    index = get_settings().package_index_url
    if index is None:
        return []
    local = index.removeprefix("file://")
    if local != index or index.startswith("/"):
        return ["--no-index", "--find-links", local]
    return ["--index-url", index]


def _pip(python: Path) -> list[str]:
    # caretaker's own pip acts on the target's environment, which needs no pip of its own.
    # --isolated: no pip.conf or PIP_* variable adds a package source beside the configured one.
    return [sys.executable, "-m", "pip", "--isolated", "--python", str(python)]


def record_versions(params: TargetParams, context: StepContext) -> Outcome:
    """What rollback restores: every installed version. Read-only."""
    target = service_target(params.target)
    return Outcome(ok=True, result={"versions": installed_versions(target.python)})


def pip_install(params: InstallParams, context: StepContext) -> Outcome:
    target = service_target(params.target)
    done = execute(
        CommandParams(
            argv=pip_install_argv(target.python, params.requirements), timeout_s=PIP_TIMEOUT_S
        )
    )
    result = done.model_dump()
    if not done.ok:
        return Outcome(ok=False, result=result, error=f"pip install failed: {_tail(done)}")
    after = installed_versions(target.python)
    result["versions"] = {
        pin.split("==")[0]: after.get(pin.split("==")[0]) for pin in params.requirements
    }
    missing = [pin for pin in params.requirements if pin not in _pins_of(after)]
    if missing:
        return Outcome(
            ok=False, result=result, error=f"not installed after pip: {', '.join(missing)}"
        )
    return Outcome(ok=True, result=result)


def restore_versions(params: RestoreParams, context: StepContext) -> Outcome:
    """Put the environment back to the versions an earlier step recorded: changed ones
    reinstalled exactly, ones that were not there removed."""
    recorded = context.earlier.get(params.from_step, {}).get("versions")
    if recorded is None:
        return Outcome(ok=False, result={}, error=f"step {params.from_step} recorded no versions")
    target = service_target(params.target)
    current = installed_versions(target.python)
    reinstall = [
        f"{name}=={version}" for name, version in recorded.items() if current.get(name) != version
    ]
    remove = [name for name in current if name not in recorded]
    outputs = []
    if remove:
        argv = [*_pip(python=target.python), "uninstall", "--yes", "--", *remove]
        outputs.append(execute(CommandParams(argv=argv, timeout_s=PIP_TIMEOUT_S)))
    if reinstall:
        argv = pip_install_argv(target.python, reinstall, exact=True)
        outputs.append(execute(CommandParams(argv=argv, timeout_s=PIP_TIMEOUT_S)))
    after = installed_versions(target.python)
    result = {"reinstalled": reinstall, "removed": remove, "versions": after}
    if after != recorded:
        differ = sorted(n for n in set(after) | set(recorded) if after.get(n) != recorded.get(n))
        tails = "; ".join(_tail(done) for done in outputs if not done.ok)
        return Outcome(
            ok=False,
            result=result,
            error=f"still differs from the record: {', '.join(differ)} {tails}".strip(),
        )
    return Outcome(ok=True, result=result)


def pin_in_repository(params: PinParams, context: StepContext) -> Outcome:
    """Commit the raised pin on `hotfix/security-<advisory>` in the target's repository, from
    its HEAD, in a worktree of its own: the checked-out tree is never touched."""
    target = service_target(params.target)
    if target.repository is None or target.requirements is None:
        return Outcome(
            ok=True, result={"skipped": "the target names no repository and requirements file"}
        )
    repo = target.repository
    requirements = target.requirements
    relative = requirements.relative_to(repo) if requirements.is_absolute() else requirements
    branch = f"hotfix/security-{params.advisory}"
    pin = pinned(f"{params.package}=={params.version}")
    git = shutil.which("git") or "git"
    # Done before (a second hotfix of the advisory), or nothing to raise (the repository
    # pins the version already): the fix that was installed and verified stands.
    for ref in (branch, "HEAD"):
        shown = execute(CommandParams(argv=[git, "-C", str(repo), "show", f"{ref}:{relative}"]))
        if shown.ok and raise_pin(shown.stdout, pin) == _normalised(shown.stdout):
            return Outcome(ok=True, result={"branch": None, "pin": pin, "already_pinned_in": ref})
    with tempfile.TemporaryDirectory(prefix="caretaker-hotfix-") as tmp:
        tree = Path(tmp) / "tree"
        _git(git, repo, "worktree", "add", "--quiet", "-b", branch, str(tree), "HEAD")
        try:
            path = tree / relative
            text = path.read_text() if path.exists() else ""
            path.write_text(raise_pin(text, pin))
            _git(git, tree, "add", "--", str(relative))
            message = (
                f"Raise {pin} for {params.advisory}\n\n"
                f"Installed and verified by caretaker, run {context.run_id}."
            )
            _git(
                git,
                tree,
                "-c",
                "user.name=caretaker",
                "-c",
                "user.email=caretaker@localhost",
                "commit",
                "--quiet",
                "-m",
                message,
            )
            commit = _git(git, tree, "rev-parse", "HEAD").stdout.strip()
        finally:
            _git(git, repo, "worktree", "remove", "--force", str(tree))
    return Outcome(ok=True, result={"branch": branch, "commit": commit, "pin": pin})


def _normalised(requirements: str) -> str:
    return "\n".join(requirements.splitlines()) + "\n"


def raise_pin(requirements: str, pin: str) -> str:
    """The requirements text with the package's line replaced by the pin (appended if absent)."""
    name = pin.split("==")[0]
    lines = requirements.splitlines()
    for i, line in enumerate(lines):
        spec = line.split("#", 1)[0].strip()
        if not spec or spec.startswith("-"):
            continue
        try:
            found = canonicalize_name(Requirement(spec).name)
        except InvalidRequirement:
            continue
        if found == name:
            lines[i] = pin
            break
    else:
        lines.append(pin)
    return "\n".join(lines) + "\n"


def hotfix_runbook(
    target: ServiceTarget, package: str, version: str, advisory: str
) -> RunbookConfig:
    """The run a critical advisory gets on a target: the steps the target's configuration
    allows, and the rollback that undoes them."""
    pin = pinned(f"{package}=={version}")
    advisory_ref(advisory)
    name = {"target": target.name}
    # The service's own tests run where its code is.
    where = target.app_dir or target.repository
    steps = [
        StepConfig(
            name="record", kind="recover", action="record_versions", params=name, idempotent=True
        ),
        StepConfig(
            name="install",
            kind="recover",
            action="pip_install",
            params=name | {"requirements": [pin]},
            timeout_s=PIP_TIMEOUT_S + 60,
        ),
    ]
    if target.test_command:
        steps.append(_command("test", target.test_command, where))
    if target.restart_command:
        steps.append(_command("restart", target.restart_command))
    if target.health is not None:
        steps.append(target.health.model_copy(update={"name": "verify", "kind": "verify"}))
    if target.repository is not None:
        steps.append(
            StepConfig(
                name="pin",
                kind="recover",
                action="pin_in_repository",
                params=name | {"package": package, "version": version, "advisory": advisory},
            )
        )
    rollback = [
        StepConfig(
            name="reinstall",
            kind="recover",
            action="restore_versions",
            params=name,
            timeout_s=2 * PIP_TIMEOUT_S,
        ),
    ]
    if target.restart_command:
        rollback.append(_command("restart-after-rollback", target.restart_command))
    if target.health is not None:
        rollback.append(
            target.health.model_copy(update={"name": "verify-after-rollback", "kind": "verify"})
        )
    return RunbookConfig(
        name=f"{RUNBOOK_PREFIX}{target.name}",
        matchers=['alertname="SecurityAdvisory"'],
        steps=steps,
        rollback=rollback,
        on_failure=OnFailure(escalate=True, severity="critical"),
    )


def _command(name: str, argv: list[str], cwd: Path | None = None) -> StepConfig:
    params: dict[str, object] = {"argv": argv, "timeout_s": 1800}
    if cwd is not None:
        params["cwd"] = str(cwd)
    return StepConfig(
        name=name, kind="recover", action="run_command", params=params, timeout_s=1860
    )


def _pins_of(versions: dict[str, str]) -> set[str]:
    return {f"{name}=={Version(version)}" for name, version in versions.items() if _parses(version)}


def _parses(version: str) -> bool:
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def _git(git: str, where: Path, *args: str) -> CommandResult:
    done = execute(CommandParams(argv=[git, "-C", str(where), *args], timeout_s=GIT_TIMEOUT_S))
    if not done.ok:
        raise ActionError(f"git {args[0]} failed: {_tail(done)}")
    return done


def _tail(done: CommandResult, limit: int = 400) -> str:
    text = (done.stderr.strip() or done.stdout.strip()).splitlines()
    return " ".join(text[-5:])[-limit:] if text else f"exit code {done.exit_code}"


def request_hotfix(
    conn: Connection, target: str, package: str, version: str, advisory: str, person: str
) -> int:
    """Record a hotfix asked for by a person as an occurrence to route; return its id.
    Everything is checked before anything is recorded."""
    pin = pinned(f"{package}=={version}")
    advisory_ref(advisory)
    if not any(t.name == target for t in get_config().targets):
        raise ActionError(f"no target named {target!r} in the configuration")
    name = pin.split("==")[0]
    labels = {
        "alertname": ADVISORY_ALERT,
        "target": target,
        "package": name,
        "advisory": advisory,
        "fixed_version": version,
        "severity": "critical",
    }
    fingerprint = f"hotfix:{target}:{name}:{advisory}:{uuid.uuid4().hex[:8]}"
    summary = f"hotfix {pin} on {target}, asked by {person}"
    return record_manual(conn, fingerprint, labels, summary, person)


def ask_for_hotfix(
    target: str, package: str, version: str | None, advisory: str | None, person: str
) -> int:
    """A person's hotfix request: version and advisory default to the target's open finding
    for the package; recorded, then routed. Returns the occurrence id."""
    from tasks.security import finding_rows
    from workers import dispatch

    if version is None or advisory is None:
        name = canonicalize_name(package)
        found = [r for r in finding_rows(target) if r["package"] == name and r["fixed_version"]]
        if not found:
            raise ActionError(
                f"no open finding with a fix for {package} on {target}: give --version and"
                " --advisory"
            )
        version = version or found[0]["fixed_version"]
        advisory = advisory or found[0]["advisory_id"]
    assert version is not None and advisory is not None
    with transaction() as conn:
        occurrence_id = request_hotfix(conn, target, package, version, advisory, person)
    dispatch.try_send("routing", dispatch.route_occurrences, [occurrence_id])
    return occurrence_id

"""The YAML configuration file: one section per concern, validated with every error's path."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from workers.errors import ConfigError
from workers.matchers import Matcher, parse_matcher
from workers.settings import get_settings, read_env_secret

StepKind = Literal["check", "recover", "verify", "escalate"]
Severity = Literal["critical", "warning", "info"]

# A parameter may take an alert's label or annotation, but only as a whole argument, so a value
# can never be spliced into a URL, a flag or a shell string.
_REFERENCE = re.compile(r"^\{\{\s*(labels|annotations)\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(Strict):
    """A secret named by the environment variable that holds it; never a literal value."""

    env: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="before")
    @classmethod
    def _not_literal(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("a secret must name its environment variable, as {env: NAME}")
        return value

    def reveal(self) -> str:
        return read_env_secret(self.env)


class NotifyWebhook(Strict):
    name: str
    url: str = Field(pattern=r"^https?://")
    token: SecretRef | None = None


class NotifyConfig(Strict):
    webhooks: list[NotifyWebhook] = []


class ActionsConfig(Strict):
    # Executables a runbook may run, as they appear in argv[0]; nothing else is ever executed.
    allowlist: list[str] = []


class StepConfig(Strict):
    name: str = Field(min_length=1)
    kind: StepKind
    action: str
    params: dict[str, Any] = {}
    attempts: int = Field(default=1, ge=1, le=100)
    delay_s: float = Field(default=0.0, ge=0, le=3600)
    accept: list[Literal["healthy", "warning", "critical", "unknown"]] = ["healthy"]
    # Whether running the step twice is harmless; decides what happens when its worker dies.
    idempotent: bool | None = None
    timeout_s: float = Field(default=300.0, gt=0, le=86400)


def _valid_matcher(text: str) -> str:
    parse_matcher(text)
    return text


class OnFailure(Strict):
    escalate: bool = True
    severity: Severity = "critical"


class RunbookConfig(Strict):
    name: str = Field(min_length=1)
    matchers: list[Annotated[str, AfterValidator(_valid_matcher)]] = Field(min_length=1)
    steps: list[StepConfig] = Field(min_length=1)
    on_failure: OnFailure = OnFailure()

    def parsed_matchers(self) -> list[Matcher]:
        return [parse_matcher(text) for text in self.matchers]


class CheckTarget(Strict):
    """One thing caretaker checks on every health round."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    check: str
    params: dict[str, Any] = {}

    @property
    def action(self) -> str:
        return f"check_{self.check}"


class ChecksConfig(Strict):
    """Health-check targets, grouped as the system is."""

    application: list[CheckTarget] = []
    database: list[CheckTarget] = []
    cache: list[CheckTarget] = []
    network: list[CheckTarget] = []
    # Without a configuration, the host a worker runs on is still checked.
    host: list[CheckTarget] = [CheckTarget(name="system", check="system")]
    caretaker: list[CheckTarget] = []

    def targets(self) -> list[tuple[str, CheckTarget]]:
        """Every target with its group, in file order."""
        return [(group, target) for group in CHECK_GROUPS for target in getattr(self, group)]

    def find(self, name: str) -> tuple[str, CheckTarget] | None:
        return next(((g, t) for g, t in self.targets() if t.name == name), None)


CHECK_GROUPS = ("application", "database", "cache", "network", "host", "caretaker")


class Config(Strict):
    runbooks: list[RunbookConfig] = []
    checks: ChecksConfig = ChecksConfig()
    actions: ActionsConfig = ActionsConfig()
    notify: NotifyConfig = NotifyConfig()
    default_severity: Severity = "critical"


def parse_config(data: Any) -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem with its path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["(top): expected a mapping of sections"])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems = [_format_error(err) for err in exc.errors()]
        # Steps of the runbooks that are themselves well formed are still checked, so one
        # run of `config check` reports every problem in the file.
        problems += _check_steps(_valid_runbooks(data), _valid_actions(data))
        raise ConfigError(problems) from exc

    problems = _check_steps(list(enumerate(config.runbooks)), config.actions)
    problems += _check_targets(config.checks, config.actions)
    if problems:
        raise ConfigError(problems)
    return config


def _valid_runbooks(data: dict[str, Any]) -> list[tuple[int, RunbookConfig]]:
    raw = data.get("runbooks")
    if not isinstance(raw, list):
        return []
    valid = []
    for i, item in enumerate(raw):
        try:
            valid.append((i, RunbookConfig.model_validate(item)))
        except ValidationError:
            continue
    return valid


def _valid_actions(data: dict[str, Any]) -> ActionsConfig:
    try:
        return ActionsConfig.model_validate(data.get("actions") or {})
    except ValidationError:
        return ActionsConfig()


def load_config(path: Path | None) -> Config:
    """Read and validate a configuration file; no path means the built-in defaults."""
    if path is None:
        return Config()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_config(data)


@lru_cache(maxsize=1)
def get_config() -> Config:
    """Configuration of this process, read once from CARETAKER_CONFIG."""
    return load_config(get_settings().config)


def _check_steps(runbooks: list[tuple[int, RunbookConfig]], actions: ActionsConfig) -> list[str]:
    from tasks.actions import ACTIONS

    problems: list[str] = []
    names = set()
    for i, runbook in runbooks:
        if runbook.name in names:
            problems.append(f"runbooks[{i}].name: duplicate runbook name {runbook.name!r}")
        names.add(runbook.name)
        for j, step in enumerate(runbook.steps):
            where = f"runbooks[{i}].steps[{j}]"
            action = ACTIONS.get(step.action)
            if action is None:
                known = ", ".join(sorted(ACTIONS))
                problems.append(f"{where}.action: unknown action {step.action!r} (known: {known})")
                continue
            if step.kind not in action.kinds:
                allowed = ", ".join(action.kinds)
                problems.append(
                    f"{where}.kind: action {step.action!r} cannot be a {step.kind!r} step "
                    f"(allowed: {allowed})"
                )
            problems.extend(_check_references(step.params, f"{where}.params"))
            command_timeout_s = step.params.get("timeout_s")
            if isinstance(command_timeout_s, int | float) and command_timeout_s > step.timeout_s:
                problems.append(
                    f"{where}.params.timeout_s: {command_timeout_s} is longer than the step's "
                    f"timeout_s ({step.timeout_s}); the step would be stopped first"
                )
            problems.extend(action.check_params(step.params, actions, f"{where}.params"))
    return problems


def _check_targets(checks: ChecksConfig, actions: ActionsConfig) -> list[str]:
    from tasks.actions import ACTIONS

    problems: list[str] = []
    seen: set[str] = set()
    positions: dict[str, int] = {}
    for group, target in checks.targets():
        index = positions[group] = positions.get(group, -1) + 1
        where = f"checks.{group}[{index}]"
        if target.name in seen:
            problems.append(f"{where}.name: duplicate target name {target.name!r}")
        seen.add(target.name)
        action = ACTIONS.get(target.action)
        if action is None or action.check is None:
            known = ", ".join(
                sorted(a.removeprefix("check_") for a, v in ACTIONS.items() if v.check is not None)
            )
            problems.append(f"{where}.check: unknown check {target.check!r} (known: {known})")
            continue
        if "{{" in repr(target.params):
            problems.append(f"{where}.params: a health check has no alert to take labels from")
            continue
        problems.extend(action.check_params(target.params, actions, f"{where}.params"))
    return problems


def _check_references(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        if "{{" in value and not _REFERENCE.match(value):
            return [
                f"{where}: {value!r}: a label reference must be the whole argument, "
                "as '{{ labels.NAME }}' or '{{ annotations.NAME }}'"
            ]
        return []
    if isinstance(value, list):
        return [p for k, item in enumerate(value) for p in _check_references(item, f"{where}[{k}]")]
    if isinstance(value, dict):
        return [p for k, item in value.items() for p in _check_references(item, f"{where}.{k}")]
    return []


def resolve_references(
    value: Any, labels: dict[str, str], annotations: dict[str, str]
) -> tuple[Any, list[str]]:
    """Replace whole-argument references with the alert's values; also return the problems.

    A reference to a label the alert lacks, or to a value that starts with "-" (a command
    would read it as an option), is a problem: the runbook must not run with it.
    """
    problems: list[str] = []

    def resolve(item: Any) -> Any:
        if isinstance(item, list):
            return [resolve(part) for part in item]
        if isinstance(item, dict):
            return {key: resolve(part) for key, part in item.items()}
        found = _REFERENCE.match(item) if isinstance(item, str) else None
        if found is None:
            return item
        source = labels if found.group(1) == "labels" else annotations
        name = f"{found.group(1)}.{found.group(2)}"
        resolved = source.get(found.group(2))
        if resolved is None:
            problems.append(f"the alert has no {name}")
            return ""
        if resolved.startswith("-"):
            problems.append(f"{name} is {resolved!r}, which would be read as an option")
        return resolved

    return resolve(value), problems


def _format_error(err: Any) -> str:
    path = ""
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    if err["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{path or '(top)'}: {message}"

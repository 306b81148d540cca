"""The YAML configuration file: one section per concern, validated with every error's path."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
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
    # Run in order when a step fails, to put back what the steps changed; escalation follows.
    rollback: list[StepConfig] = []
    on_failure: OnFailure = OnFailure()
    # A planned change: its run waits until a change window is open.
    change_window: bool = False

    @model_validator(mode="after")
    def _rollback_kinds(self) -> RunbookConfig:
        for step in self.rollback:
            if step.kind not in ("recover", "verify"):
                raise ValueError(f"rollback step {step.name!r}: kind must be recover or verify")
        return self

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

_NAME = r"^[a-z0-9][a-z0-9._-]*$"


class SeriesSource(Strict):
    """Where a series comes from: a PromQL query (needs CARETAKER_PROMETHEUS_URL) or the
    recorded values of a health-check target."""

    query: str | None = Field(default=None, min_length=1)
    target: str | None = Field(default=None, pattern=_NAME)

    @model_validator(mode="after")
    def _one_source(self) -> SeriesSource:
        if (self.query is None) == (self.target is None):
            raise ValueError("give exactly one of query (PromQL) or target (a check target)")
        return self


class SeriesConfig(SeriesSource):
    """A metric watched for anomalies, scheduled and in the weekly performance review."""

    name: str = Field(pattern=_NAME)
    # Counters (`*_total`) are analysed as per-second rates; None means: by the query's name.
    counter: bool | None = None
    method: Literal["mad", "zscore"] = "mad"
    threshold: float = Field(default=3.0, gt=0)
    baseline_days: float = Field(default=7.0, gt=0, le=366)


class CapacityConfig(SeriesSource):
    """A usage series forecast for capacity planning."""

    name: str = Field(pattern=_NAME)
    # The value the series must stay under, e.g. 90 (percent) or a size in bytes.
    threshold: float
    # What 100% is (100 for percentages, or a configured limit); gives the level.
    capacity: float | None = Field(default=None, gt=0)
    horizon_days: float = Field(default=90.0, gt=0, le=3660)
    history_days: float = Field(default=30.0, gt=0, le=3660)


DEFAULT_LOG_PATTERNS = {
    "error": r"\b(ERROR|CRITICAL|FATAL)\b",
    "traceback": r"^Traceback \(most recent call last\):",
}


def _valid_pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    return text


class LogConfig(Strict):
    """A log file scanned daily; its rotated siblings (name.1, name.2.gz, ...) are read too."""

    name: str = Field(pattern=_NAME)
    path: Path
    patterns: dict[
        Annotated[str, Field(pattern=_NAME)], Annotated[str, AfterValidator(_valid_pattern)]
    ] = Field(default_factory=lambda: dict(DEFAULT_LOG_PATTERNS), min_length=1)
    # A day's count this many robust deviations over the baseline's is a spike.
    threshold: float = Field(default=3.0, gt=0)
    baseline_days: int = Field(default=14, ge=3, le=366)


class AnalysisConfig(Strict):
    series: list[SeriesConfig] = []
    capacity: list[CapacityConfig] = []
    logs: list[LogConfig] = []
    # PostgreSQL targets whose pg_stat_statements the weekly review reads; by check target name.
    review_databases: list[Annotated[str, Field(pattern=_NAME)]] = []
    # Reset pg_stat_statements after each weekly read, so every review covers its own week.
    review_reset_statements: bool = False


class DatabaseRef(Strict):
    """A PostgreSQL database: its DSN in an environment variable (which may hold a password),
    or a DSN without a password (libpq then reads ~/.pgpass or PGPASSWORD)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    dsn_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    dsn: str | None = None

    @field_validator("dsn")
    @classmethod
    def _no_password(cls, value: str | None) -> str | None:
        if value is not None:
            check_dsn(value)
        return value

    @model_validator(mode="after")
    def _one_dsn(self) -> DatabaseRef:
        if (self.dsn is None) == (self.dsn_env is None):
            raise ValueError("give exactly one of dsn and dsn_env")
        return self

    def reveal(self) -> str:
        """The DSN itself; KeyError when its environment variable is not set."""
        return read_env_secret(self.dsn_env) if self.dsn_env else str(self.dsn)


def check_dsn(value: str) -> None:
    """Refuse a DSN that is not one, or that holds a password (it would end up in argv,
    logs and the configuration file)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(value)
    except ProgrammingError:
        # libpq's reason may quote part of the string, password included.
        raise ValueError("not a valid PostgreSQL connection string") from None
    if "password" in parts:
        raise ValueError(
            "the connection string holds a password: put it in ~/.pgpass or PGPASSWORD,"
            " or the whole DSN in an environment variable named by dsn_env"
        )


class Dependants(Strict):
    """What depends on a backed-up resource: stopped before a restore swaps it in, started
    after, and its health verified. Commands are argv lists run from the actions allowlist."""

    stop: list[list[str]] = []
    start: list[list[str]] = []
    health: StepConfig | None = None


class BackupDatabase(DatabaseRef):
    name: str = Field(pattern=_NAME)
    # SQL that must return one row whose first column is true on a restored copy.
    probes: list[str] = []
    dependants: Dependants = Dependants()
    # Disaster-recovery targets the monthly drill measures against.
    rto_s: float | None = Field(default=None, gt=0)
    rpo_s: float | None = Field(default=None, gt=0)


class BackupDirectory(Strict):
    name: str = Field(pattern=_NAME)
    path: Path
    dependants: Dependants = Dependants()
    rto_s: float | None = Field(default=None, gt=0)
    rpo_s: float | None = Field(default=None, gt=0)


class BackupStoreConfig(Strict):
    """Where backups are kept: a local directory (the default) or an S3 bucket; S3
    credentials come from boto3's usual chain (environment, ~/.aws), never from this file."""

    kind: Literal["local", "s3"] = "local"
    path: Path = Path("backups")
    bucket: str | None = None
    prefix: str = "caretaker/"
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://")
    region: str | None = None

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> BackupStoreConfig:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an s3 store needs a bucket")
        return self


class RetentionConfig(Strict):
    """Backups kept per target: the newest of each of the last N days, weeks and months."""

    daily: int = Field(default=7, ge=1)
    weekly: int = Field(default=4, ge=0)
    monthly: int = Field(default=6, ge=0)


class BackupsConfig(Strict):
    store: BackupStoreConfig = BackupStoreConfig()
    retention: RetentionConfig = RetentionConfig()
    databases: list[BackupDatabase] = []
    directories: list[BackupDirectory] = []
    # The daily verification restores every backup of this many last days.
    verify_days: float = Field(default=2.0, gt=0, le=366)


def _valid_cron(text: str) -> str:
    from croniter import croniter

    if not croniter.is_valid(text):
        raise ValueError(f"{text!r} is not a cron expression (minute hour day month weekday)")
    return text


class ChangeWindow(Strict):
    """A recurring slot, in UTC, in which caretaker may make planned changes: it opens at each
    time the cron expression gives and stays open `duration_h` hours."""

    name: str = Field(pattern=_NAME)
    cron: Annotated[str, AfterValidator(_valid_cron)]
    duration_h: float = Field(gt=0, le=24 * 31)


class ServiceTarget(Strict):
    """A service caretaker may change: its Python environment, how to test, restart and
    check it, where its code and requirements live. caretaker's own environment is never one
    unless named here."""

    name: str = Field(pattern=_NAME)
    # The interpreter of the service's environment (a venv's bin/python).
    python: Path
    test_command: list[str] = []
    restart_command: list[str] = []
    health: StepConfig | None = None
    repository: Path | None = None
    requirements: Path | None = None
    app_dir: Path | None = None
    migrate_command: list[str] = []
    database: DatabaseRef | None = None
    # Targets updated in order of stage (staging 0 before production 1); equal stages together.
    stage: int = Field(default=0, ge=0)


class Config(Strict):
    runbooks: list[RunbookConfig] = []
    checks: ChecksConfig = ChecksConfig()
    actions: ActionsConfig = ActionsConfig()
    notify: NotifyConfig = NotifyConfig()
    analysis: AnalysisConfig = AnalysisConfig()
    backups: BackupsConfig = BackupsConfig()
    targets: list[ServiceTarget] = []
    # Planned changes (updates asked for in a window, non-critical hotfixes) wait for one.
    change_windows: list[ChangeWindow] = []
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
        # Every step and target that is well formed on its own is still checked in depth,
        # so one run of `config check` reports every problem in the file.
        actions = _validated(ActionsConfig, data.get("actions") or {}) or ActionsConfig()
        problems += _check_runbooks(_raw_runbooks(data), actions)
        problems += _check_targets(_raw_targets(data), actions)
        raise ConfigError(list(dict.fromkeys(problems))) from exc

    problems = _check_runbooks(_runbooks_of(config), config.actions)
    problems += _check_targets(_targets_of(config.checks), config.actions)
    problems += _check_sections(config)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return config


class _Runbook(NamedTuple):
    """A runbook at its path, as the deeper checks see it: its name as written, valid steps."""

    where: str
    name: Any
    # Each valid step with its path inside the runbook: steps[j] or rollback[j].
    steps: list[tuple[str, StepConfig]]


class _Target(NamedTuple):
    """A health-check target at its path: its name as written, and the target if valid."""

    where: str
    name: Any
    target: CheckTarget | None


def _runbooks_of(config: Config) -> list[_Runbook]:
    return [
        _Runbook(
            f"runbooks[{i}]",
            runbook.name,
            [(f"steps[{j}]", step) for j, step in enumerate(runbook.steps)]
            + [(f"rollback[{j}]", step) for j, step in enumerate(runbook.rollback)],
        )
        for i, runbook in enumerate(config.runbooks)
    ]


def _raw_runbooks(data: dict[str, Any]) -> list[_Runbook]:
    raw = data.get("runbooks")
    if not isinstance(raw, list):
        return []
    return [
        _Runbook(
            f"runbooks[{i}]",
            item.get("name"),
            _valid_steps("steps", item.get("steps"))
            + _valid_steps("rollback", item.get("rollback")),
        )
        for i, item in enumerate(raw)
        if isinstance(item, dict)
    ]


def _valid_steps(field: str, raw: Any) -> list[tuple[str, StepConfig]]:
    if not isinstance(raw, list):
        return []
    steps = [(f"{field}[{j}]", _validated(StepConfig, item)) for j, item in enumerate(raw)]
    return [(path, step) for path, step in steps if step is not None]


def _targets_of(checks: ChecksConfig) -> list[_Target]:
    return [
        _Target(f"checks.{group}[{k}]", target.name, target)
        for group in CHECK_GROUPS
        for k, target in enumerate(getattr(checks, group))
    ]


def _raw_targets(data: dict[str, Any]) -> list[_Target]:
    raw = data.get("checks") or {}
    if not isinstance(raw, dict):
        return []
    # A group the file leaves out keeps its default, as it does when the file is valid.
    raw = ChecksConfig().model_dump() | raw
    return [
        _Target(f"checks.{group}[{k}]", _raw_name(item), _validated(CheckTarget, item))
        for group in CHECK_GROUPS
        if isinstance(raw.get(group), list)
        for k, item in enumerate(raw[group])
    ]


def _raw_name(item: Any) -> Any:
    return item.get("name") if isinstance(item, dict) else None


_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], value: Any) -> _Model | None:
    try:
        return model.model_validate(value)
    except ValidationError:
        return None


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


def _check_runbooks(runbooks: list[_Runbook], actions: ActionsConfig) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for where, name, steps in runbooks:
        if _seen_before(name, seen):
            problems.append(f"{where}.name: duplicate runbook name {name!r}")
        for path, step in steps:
            problems += _check_step(step, f"{where}.{path}", actions)
    return problems


def _seen_before(name: Any, seen: set[str]) -> bool:
    """Whether a name as written was already used; names that are not text are ignored."""
    if not isinstance(name, str) or not name:
        return False
    found = name in seen
    seen.add(name)
    return found


def _check_step(step: StepConfig, where: str, actions: ActionsConfig) -> list[str]:
    from tasks.actions import ACTIONS

    problems: list[str] = []
    action = ACTIONS.get(step.action)
    if action is None:
        known = ", ".join(sorted(ACTIONS))
        problems.append(f"{where}.action: unknown action {step.action!r} (known: {known})")
    elif step.kind not in action.kinds:
        allowed = ", ".join(action.kinds)
        problems.append(
            f"{where}.kind: action {step.action!r} cannot be a {step.kind!r} step "
            f"(allowed: {allowed})"
        )
    problems += _check_references(step.params, f"{where}.params")
    problems += _check_budget(step, where)
    if action is not None:
        problems += action.check_params(step.params, actions, f"{where}.params")
    return problems


def _check_budget(step: StepConfig, where: str) -> list[str]:
    """Whether the step's work fits in its timeout_s, beyond which Celery stops it."""
    problems: list[str] = []
    command_timeout_s = step.params.get("timeout_s")
    if isinstance(command_timeout_s, int | float) and command_timeout_s > step.timeout_s:
        problems.append(
            f"{where}.params.timeout_s: {command_timeout_s} is longer than the step's "
            f"timeout_s ({step.timeout_s}); the step would be stopped first"
        )
    waits_s = step.attempts * step.delay_s
    if step.kind == "verify" and waits_s > step.timeout_s:
        problems.append(
            f"{where}.attempts: {step.attempts} attempts * delay_s {step.delay_s:g} = "
            f"{waits_s:g} s, longer than the step's timeout_s ({step.timeout_s:g}); "
            "lower attempts or delay_s, or raise timeout_s"
        )
    return problems


def _check_targets(targets: list[_Target], actions: ActionsConfig) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for where, name, target in targets:
        if _seen_before(name, seen):
            problems.append(f"{where}.name: duplicate target name {name!r}")
        if target is not None:
            problems += _check_target(target, where, actions)
    return problems


def _check_target(target: CheckTarget, where: str, actions: ActionsConfig) -> list[str]:
    from tasks.actions import ACTIONS

    action = ACTIONS.get(target.action)
    if action is None or action.check is None:
        known = ", ".join(
            sorted(a.removeprefix("check_") for a, v in ACTIONS.items() if v.check is not None)
        )
        return [f"{where}.check: unknown check {target.check!r} (known: {known})"]
    if "{{" in repr(target.params):
        return [f"{where}.params: a health check has no alert to take labels from"]
    return action.check_params(target.params, actions, f"{where}.params")


def _check_sections(config: Config) -> list[str]:
    """Names unique per section; series and reviewed databases must be configured check
    targets; backup dependants run only allowlisted commands."""
    problems: list[str] = []
    for section in ("series", "capacity"):
        seen: set[str] = set()
        for i, item in enumerate(getattr(config.analysis, section)):
            where = f"analysis.{section}[{i}]"
            if _seen_before(item.name, seen):
                problems.append(f"{where}.name: {item.name!r} is used twice")
            if item.target is not None and config.checks.find(item.target) is None:
                problems.append(f"{where}.target: no check target named {item.target!r}")
    seen = set()
    for i, log in enumerate(config.analysis.logs):
        if _seen_before(log.name, seen):
            problems.append(f"analysis.logs[{i}].name: {log.name!r} is used twice")
    seen = set()
    for section in ("databases", "directories"):
        for i, item in enumerate(getattr(config.backups, section)):
            if _seen_before(item.name, seen):
                problems.append(f"backups.{section}[{i}].name: {item.name!r} is used twice")
            problems += _check_dependants(item.dependants, f"backups.{section}[{i}]", config)
    seen = set()
    for i, target in enumerate(config.targets):
        where = f"targets[{i}]"
        if _seen_before(target.name, seen):
            problems.append(f"{where}.name: {target.name!r} is used twice")
        for field in ("test_command", "restart_command", "migrate_command"):
            argv = getattr(target, field)
            if argv and argv[0] not in config.actions.allowlist:
                problems.append(f"{where}.{field}: {argv[0]!r} is not in actions.allowlist")
        if target.health is not None:
            problems += _check_step(target.health, f"{where}.health", config.actions)
        if not target.python.is_absolute():
            problems.append(f"{where}.python: must be an absolute path")
        requirements, repository = target.requirements, target.repository
        outside = (
            requirements is not None
            and repository is not None
            and requirements.is_absolute()
            and not requirements.is_relative_to(repository)
        )
        if outside:
            problems.append(f"{where}.requirements: must be inside the repository {repository}")
    for i, name in enumerate(config.analysis.review_databases):
        found = config.checks.find(name)
        if found is None or found[1].check != "postgres":
            problems.append(f"analysis.review_databases[{i}]: no postgres check target {name!r}")
    return problems


def _check_dependants(dependants: Dependants, where: str, config: Config) -> list[str]:
    problems = []
    for kind in ("stop", "start"):
        for k, argv in enumerate(getattr(dependants, kind)):
            if not argv:
                problems.append(f"{where}.dependants.{kind}[{k}]: an empty command")
            elif argv[0] not in config.actions.allowlist:
                problems.append(
                    f"{where}.dependants.{kind}[{k}]: {argv[0]!r} is not in actions.allowlist"
                )
    if dependants.health is not None:
        problems += _check_step(dependants.health, f"{where}.dependants.health", config.actions)
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

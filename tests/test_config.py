"""Tests of workers.config and `caretaker config check`: every problem is reported with its path."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tasks.actions import ACTIONS
from tests.conftest import DATA
from workers.cli import cli
from workers.config import load_config, parse_config, resolve_references
from workers.errors import ConfigError

CONFIGS = DATA / "config"
KNOWN_ACTIONS = ", ".join(sorted(ACTIONS))


def valid_data() -> dict[str, Any]:
    """A fresh copy of the valid sample, for a test to break in one place."""
    data = yaml.safe_load((CONFIGS / "valid.yml").read_text())
    assert isinstance(data, dict)
    return copy.deepcopy(data)


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    return raised.value.problems


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.problems


def test_the_valid_sample_loads() -> None:
    config = load_config(CONFIGS / "valid.yml")

    assert [runbook.name for runbook in config.runbooks] == ["service-down", "disk-full"]
    assert config.default_severity == "warning"
    assert config.actions.allowlist == ["/usr/bin/systemctl"]
    token = config.notify.webhooks[0].token
    assert token is not None and token.env == "CARETAKER_NOTIFY_TOKEN"
    steps = config.runbooks[0].steps
    assert [step.kind for step in steps] == ["check", "recover", "verify", "escalate"]
    assert steps[2].attempts == 3 and steps[2].accept == ["healthy", "warning"]
    assert [m.value for m in config.runbooks[0].parsed_matchers()] == ["ServiceDown", "[a-z0-9-]+"]


def test_no_file_and_an_empty_document_mean_the_defaults() -> None:
    assert load_config(None).runbooks == []
    assert parse_config(None).default_severity == "critical"


def test_a_document_that_is_not_a_mapping() -> None:
    assert problems_of(["runbooks"]) == ["(top): expected a mapping of sections"]


def test_unknown_action() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][1]["action"] = "nope"

    assert problems_of(data) == [
        f"runbooks[0].steps[1].action: unknown action 'nope' (known: {KNOWN_ACTIONS})"
    ]


def test_unknown_keys_at_every_level() -> None:
    data = valid_data()
    data["colour"] = "blue"
    data["runbooks"][1]["retries"] = 2
    data["runbooks"][0]["steps"][0]["tiemout_s"] = 5
    data["notify"]["webhooks"][0]["secret"] = {"env": "X"}

    assert sorted(problems_of(data)) == [
        "colour: unknown key",
        "notify.webhooks[0].secret: unknown key",
        "runbooks[0].steps[0].tiemout_s: unknown key",
        "runbooks[1].retries: unknown key",
    ]


def test_unknown_action_parameter() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0]["params"]["retries"] = 3

    assert problems_of(data) == ["runbooks[0].steps[0].params.retries: unknown parameter"]


def test_a_bad_matcher_is_reported_with_its_text() -> None:
    data = valid_data()
    data["runbooks"][1]["matchers"] = ['alertname="DiskFull"', 'mountpoint=~"("']

    [problem] = problems_of(data)

    assert problem.startswith("runbooks[1].matchers")
    assert "bad regular expression" in problem
    assert """'mountpoint=~"("'""" in problem


def test_every_bad_matcher_is_reported_at_its_index() -> None:
    data = valid_data()
    data["runbooks"][0]["matchers"] = ["alertname", 'alertname="X"', 'job=~"("']

    problems = problems_of(data)

    assert len(problems) == 2
    assert problems[0].startswith("runbooks[0].matchers[0]: not a label matcher: 'alertname'")
    assert problems[1].startswith("runbooks[0].matchers[2]: bad regular expression")


def test_a_step_kind_the_action_does_not_allow() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0]["kind"] = "recover"
    data["runbooks"][0]["steps"][1]["kind"] = "verify"

    assert problems_of(data) == [
        "runbooks[0].steps[0].kind: action 'check_http' cannot be a 'recover' step "
        "(allowed: check, verify)",
        "runbooks[0].steps[1].kind: action 'run_command' cannot be a 'verify' step "
        "(allowed: recover)",
    ]


def test_a_step_kind_that_does_not_exist() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0]["kind"] = "fix"

    [problem] = problems_of(data)

    assert problem.startswith("runbooks[0].steps[0].kind: ")
    assert "'check'" in problem


def test_run_command_outside_the_allowlist() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][1]["params"]["argv"] = ["/usr/bin/systemd-run", "reboot"]

    assert problems_of(data) == [
        "runbooks[0].steps[1].params.argv[0]: "
        "executable '/usr/bin/systemd-run' is not in actions.allowlist"
    ]


def test_run_command_cannot_take_its_executable_from_a_label() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][1]["params"]["argv"] = ["{{ labels.command }}"]

    assert problems_of(data) == [
        "runbooks[0].steps[1].params.argv[0]: "
        "executable '{{ labels.command }}' is not in actions.allowlist"
    ]


@pytest.mark.parametrize(
    "spliced",
    [
        "http://{{ labels.host }}/",
        "{{ labels.host }}/healthz",
        " {{ labels.host }}",
        "{{ labels.host }}{{ labels.port }}",
        "{{ labels.host | upper }}",
        "{{ secrets.token }}",
    ],
)
def test_a_label_reference_spliced_into_a_string_is_rejected(spliced: str) -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0]["params"]["url"] = spliced

    assert problems_of(data) == [
        f"runbooks[0].steps[0].params.url: {spliced!r}: a label reference must be the whole "
        "argument, as '{{ labels.NAME }}' or '{{ annotations.NAME }}'"
    ]


def test_a_spliced_reference_inside_argv_is_rejected_at_its_index() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][1]["params"]["argv"] = [
        "/usr/bin/systemctl",
        "restart",
        "{{ labels.service }}.service",
    ]

    [problem] = problems_of(data)

    assert problem.startswith("runbooks[0].steps[1].params.argv[2]: '{{ labels.service }}.service'")


@pytest.mark.parametrize(
    "reference", ["{{ labels.host }}", "{{labels.host}}", "{{ annotations.health_url }}"]
)
def test_a_whole_argument_reference_is_accepted(reference: str) -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0]["params"]["url"] = reference

    step = parse_config(data).runbooks[0].steps[0]

    assert step.params["url"] == reference


def test_a_literal_secret_is_rejected_without_echoing_it() -> None:
    data = valid_data()
    data["notify"]["webhooks"][0]["token"] = "hunter2-literal-secret"

    [problem] = problems_of(data)

    assert problem.startswith("notify.webhooks[0].token: ")
    assert "hunter2" not in problem


def test_a_secret_reference_must_name_a_variable() -> None:
    data = valid_data()
    data["notify"]["webhooks"][0]["token"] = {"env": "not a name"}

    [problem] = problems_of(data)

    assert problem.startswith("notify.webhooks[0].token.env: ")


def test_duplicate_runbook_names() -> None:
    data = valid_data()
    data["runbooks"][1]["name"] = "service-down"

    assert problems_of(data) == ["runbooks[1].name: duplicate runbook name 'service-down'"]


def test_every_step_problem_in_a_file_is_reported() -> None:
    problems = load_problems(CONFIGS / "step_errors.yml")

    assert problems == [
        f"runbooks[0].steps[0].action: unknown action 'nope' (known: {KNOWN_ACTIONS})",
        "runbooks[0].steps[1].kind: action 'check_http' cannot be a 'recover' step "
        "(allowed: check, verify)",
        "runbooks[0].steps[1].params.url: 'http://{{ labels.host }}/': a label reference must "
        "be the whole argument, as '{{ labels.NAME }}' or '{{ annotations.NAME }}'",
        "runbooks[0].steps[2].params.argv[0]: executable '/bin/rm' is not in actions.allowlist",
        "runbooks[1].name: duplicate runbook name 'web'",
        "runbooks[1].steps[0].params.retries: unknown parameter",
    ]


def test_schema_and_action_problems_are_reported_together() -> None:
    problems = load_problems(CONFIGS / "mixed_errors.yml")

    assert len(problems) == 2
    assert problems[0].startswith("notify.webhooks[0].token: ")
    assert problems[1] == (
        f"runbooks[0].steps[0].action: unknown action 'nope' (known: {KNOWN_ACTIONS})"
    )


def test_invalid_yaml_names_the_file_and_line() -> None:
    path = CONFIGS / "not_yaml.yml"

    [problem] = load_problems(path)

    assert problem.startswith(f"{path}: not valid YAML: ")
    assert "line 3" in problem


def test_a_missing_file() -> None:
    path = CONFIGS / "missing.yml"

    assert load_problems(path) == [f"{path}: cannot read: No such file or directory"]


def test_a_directory_instead_of_a_file() -> None:
    assert load_problems(CONFIGS) == [f"{CONFIGS}: cannot read: Is a directory"]


def test_cli_config_check_accepts_the_valid_sample() -> None:
    path = CONFIGS / "valid.yml"

    result = CliRunner().invoke(cli, ["config", "check", str(path)])

    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: ok (2 runbooks)\n"


def test_cli_config_check_prints_every_problem_with_its_path() -> None:
    path = CONFIGS / "step_errors.yml"
    expected = load_problems(path)

    result = CliRunner().invoke(cli, ["config", "check", str(path)])

    assert result.exit_code != 0
    lines = result.stderr.splitlines()
    assert lines[: len(expected)] == [f"{path}: {problem}" for problem in expected]
    assert "runbooks[0].steps[0].action: unknown action 'nope'" in lines[0]
    assert f"6 problems in {path}" in lines[-1]


def test_cli_config_check_names_an_unreadable_file_once() -> None:
    path = CONFIGS / "missing.yml"

    result = CliRunner().invoke(cli, ["config", "check", str(path)])

    assert result.exit_code != 0
    assert result.stderr.splitlines()[0] == f"{path}: cannot read: No such file or directory"


def test_resolve_replaces_whole_argument_references() -> None:
    labels = {"host": "web1", "port": "8080"}
    annotations = {"health_url": "http://web1:8080/healthz"}
    params = {
        "url": "{{ annotations.health_url }}",
        "argv": ["/usr/bin/systemctl", "restart", "{{labels.host}}"],
        "nested": {"port": "{{ labels.port }}"},
        "timeout_s": 5,
        "literal": "labels.host",
    }

    resolved, problems = resolve_references(params, labels, annotations)

    assert problems == []

    assert resolved == {
        "url": "http://web1:8080/healthz",
        "argv": ["/usr/bin/systemctl", "restart", "web1"],
        "nested": {"port": "8080"},
        "timeout_s": 5,
        "literal": "labels.host",
    }


def test_resolve_reports_a_missing_label_as_a_problem() -> None:
    resolved, problems = resolve_references(
        ["{{ labels.absent }}", "{{ annotations.absent }}"], {}, {}
    )

    assert resolved == ["", ""]
    assert problems == ["the alert has no labels.absent", "the alert has no annotations.absent"]


def test_resolve_refuses_a_value_that_reads_as_an_option() -> None:
    _, problems = resolve_references(["/bin/systemctl", "{{ labels.unit }}"], {"unit": "--all"}, {})

    assert problems == ["labels.unit is '--all', which would be read as an option"]


def test_resolve_never_splices_into_a_longer_string() -> None:
    spliced = "http://{{ labels.host }}/"

    assert resolve_references(spliced, {"host": "evil; rm -rf /"}, {}) == (spliced, [])


def test_resolve_does_not_mistake_label_values_for_annotations() -> None:
    resolved, problems = resolve_references("{{ annotations.host }}", {"host": "web1"}, {})

    assert resolved == ""
    assert problems == ["the alert has no annotations.host"]


def test_a_command_timeout_longer_than_its_step() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][1]["params"]["timeout_s"] = 600

    assert problems_of(data) == [
        "runbooks[0].steps[1].params.timeout_s: 600 is longer than the step's timeout_s "
        "(120.0); the step would be stopped first"
    ]

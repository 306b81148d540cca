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


def test_steps_of_a_runbook_that_fails_validation_are_still_checked_in_depth() -> None:
    problems = load_problems(CONFIGS / "runbook_errors.yml")

    assert problems == [
        "runbooks[0].matchers[0]: unbalanced quotes in 'alertname==\"WebDown\"'",
        "runbooks[0].steps[2].attempts: Input should be greater than or equal to 1",
        "runbooks[0].steps[5].accept[0]: "
        "Input should be 'healthy', 'warning', 'critical' or 'unknown'",
        "runbooks[1].matchers: List should have at least 1 item after validation, not 0",
        "runbooks[0].steps[0].params.url: 'http://{{ labels.instance }}/healthz': a label "
        "reference must be the whole argument, as '{{ labels.NAME }}' or '{{ annotations.NAME }}'",
        f"runbooks[0].steps[1].action: unknown action 'restart_service' (known: {KNOWN_ACTIONS})",
        "runbooks[0].steps[3].params.argv[0]: executable '/bin/rm' is not in actions.allowlist",
        "runbooks[0].steps[4].params.timeout_s: 600 is longer than the step's timeout_s "
        "(120.0); the step would be stopped first",
        "runbooks[0].steps[6].kind: action 'check_http' cannot be a 'recover' step "
        "(allowed: check, verify)",
        "runbooks[0].steps[7].params.url: Field required",
        "runbooks[0].steps[8].attempts: 100 attempts * delay_s 3600 = 360000 s, longer than "
        "the step's timeout_s (60); lower attempts or delay_s, or raise timeout_s",
        "runbooks[1].name: duplicate runbook name 'web'",
    ]


def test_a_bad_matcher_a_spliced_reference_and_an_unknown_action_together() -> None:
    data = valid_data()
    runbook = data["runbooks"][0]
    runbook["matchers"] = ['alertname=="ServiceDown"']
    runbook["steps"][0]["params"]["url"] = "http://{{ labels.instance }}/healthz"
    runbook["steps"][1]["action"] = "restart_service"

    problems = problems_of(data)

    assert len(problems) == 3
    assert problems[0].startswith("runbooks[0].matchers[0]: unbalanced quotes")
    assert problems[1].startswith("runbooks[0].steps[0].params.url: 'http://{{ labels.instance")
    assert problems[2].startswith("runbooks[0].steps[1].action: unknown action 'restart_service'")


def test_a_verify_step_whose_waits_exceed_its_timeout() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][2].update(attempts=100, delay_s=3600, timeout_s=60)

    assert problems_of(data) == [
        "runbooks[0].steps[2].attempts: 100 attempts * delay_s 3600 = 360000 s, longer than "
        "the step's timeout_s (60); lower attempts or delay_s, or raise timeout_s"
    ]


def test_a_verify_step_whose_waits_fill_its_timeout_exactly_is_accepted() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][2].update(attempts=4, delay_s=15, timeout_s=60)

    assert parse_config(data).runbooks[0].steps[2].attempts == 4


def test_only_verify_steps_repeat_so_only_they_have_a_waiting_budget() -> None:
    data = valid_data()
    data["runbooks"][0]["steps"][0].update(attempts=100, delay_s=3600, timeout_s=60)

    assert parse_config(data).runbooks[0].steps[0].timeout_s == 60


def test_duplicate_names_among_runbooks_that_fail_validation() -> None:
    data = valid_data()
    data["runbooks"][0]["matchers"] = []
    data["runbooks"][1]["matchers"] = []
    data["runbooks"][1]["name"] = "service-down"

    assert problems_of(data) == [
        "runbooks[0].matchers: List should have at least 1 item after validation, not 0",
        "runbooks[1].matchers: List should have at least 1 item after validation, not 0",
        "runbooks[1].name: duplicate runbook name 'service-down'",
    ]


def test_runbooks_that_are_not_mappings_or_have_odd_names_keep_their_indexes() -> None:
    data = valid_data()
    data["runbooks"][0]["name"] = ["not", "text"]
    data["runbooks"].insert(0, "service-down")
    data["runbooks"].append({"name": ["not", "text"], "steps": "none"})
    data["runbooks"][2]["steps"][0]["action"] = "nope"

    problems = problems_of(data)

    assert f"runbooks[2].steps[0].action: unknown action 'nope' (known: {KNOWN_ACTIONS})" in (
        problems
    )
    assert not [problem for problem in problems if "duplicate" in problem]


KNOWN_CHECKS = ", ".join(
    sorted(name.removeprefix("check_") for name, a in ACTIONS.items() if a.check is not None)
)


def test_every_target_that_is_well_formed_is_checked_when_the_section_fails() -> None:
    data = valid_data()
    data["checks"] = {
        "application": [
            {"name": "Web Site", "check": "http", "params": {"url": "https://example.com"}},
            {"name": "api", "check": "htp"},
            {"name": "api", "check": "http", "params": {"url": "{{ labels.url }}"}},
        ]
    }

    problems = problems_of(data)

    assert len(problems) == 4
    assert problems[0].startswith("checks.application[0].name: String should match pattern")
    assert problems[1:] == [
        f"checks.application[1].check: unknown check 'htp' (known: {KNOWN_CHECKS})",
        "checks.application[2].name: duplicate target name 'api'",
        "checks.application[2].params: a health check has no alert to take labels from",
    ]


@pytest.mark.parametrize("other_section_broken", [False, True])
def test_targets_are_checked_whether_or_not_another_section_fails(
    other_section_broken: bool,
) -> None:
    data = valid_data()
    data["checks"] = {
        "application": [{"name": "system", "check": "http", "params": {"url": "https://a.b"}}],
        "network": [{"name": "site", "check": "http"}],
    }
    if other_section_broken:
        data["default_severity"] = "urgent"

    problems = problems_of(data)

    assert problems[-2:] == [
        "checks.network[0].params.url: Field required",
        "checks.host[0].name: duplicate target name 'system'",
    ]
    assert len(problems) == 2 + other_section_broken


def test_a_target_needs_an_absolute_interpreter_and_requirements_inside_its_repository() -> None:
    target = {
        "name": "shop",
        "python": "venv/bin/python",
        "repository": "/srv/shop",
        "requirements": "/etc/requirements.txt",
    }
    with pytest.raises(ConfigError) as raised:
        parse_config({"targets": [target]})

    assert raised.value.problems == [
        "targets[0].python: must be an absolute path",
        "targets[0].requirements: must be inside the repository /srv/shop",
    ]

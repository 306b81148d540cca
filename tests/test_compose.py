"""docker-compose.yml and the Dockerfile agree with the CLI, each other and the deploy files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from workers.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "Dockerfile"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict), f"{COMPOSE_PATH} is not a mapping"
    return data


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = load_compose()["services"]
    assert found, "docker-compose.yml defines no services"
    return found


def caretaker_services() -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile, whose command is caretaker's argv."""
    return {name: spec for name, spec in services().items() if "build" in spec}


def one_shot_services() -> set[str]:
    """Services others wait for to finish: they exit, so they have nothing to check."""
    return {
        target
        for spec in services().values()
        for target, condition in depends_on(spec).items()
        if condition == "service_completed_successfully"
    }


def depends_on(spec: dict[str, Any]) -> dict[str, str]:
    """A service's dependencies with their conditions, in either of compose's two forms."""
    raw = spec.get("depends_on", {})
    if isinstance(raw, list):
        return {name: "service_started" for name in raw}
    return {name: options.get("condition", "service_started") for name, options in raw.items()}


def resolve_command(argv: list[str]) -> click.Command:
    """The CLI command argv names, with its arguments parsed as click would parse them."""
    command: click.Command = cli
    context = click.Context(cli, info_name="caretaker")
    words = list(argv)
    # caretaker's groups take no options of their own: every word up to the command is a name.
    while isinstance(command, click.Group):
        assert words, f"`caretaker {' '.join(argv)}` names a group, not a command"
        name, *words = words
        found = command.get_command(context, name)
        assert found is not None, f"`caretaker {' '.join(argv)}`: no command {name!r}"
        command = found
        context = click.Context(command, info_name=name, parent=context)
    command.make_context(command.name, words, parent=context.parent)
    return command


def test_caretaker_services_are_built_from_the_dockerfile() -> None:
    built = caretaker_services()
    assert {"migrate", "webhook", "worker", "beat", "flower"} <= set(built)
    for name, spec in built.items():
        assert spec["build"] in (".", {"context": "."}), f"{name} builds from {spec['build']!r}"


def test_dockerfile_entrypoint_is_the_cli() -> None:
    # Compose commands are CLI arguments only because the image's entrypoint is `caretaker`.
    text = DOCKERFILE_PATH.read_text()
    assert re.search(r'^ENTRYPOINT \["caretaker"\]$', text, re.MULTILINE), text
    assert re.search(r"^USER (?!root\b)\S+$", text, re.MULTILINE), "the image must not run as root"


@pytest.mark.parametrize("name", sorted(caretaker_services()))
def test_command_is_a_real_cli_command(name: str) -> None:
    command = caretaker_services()[name].get("command")
    assert isinstance(command, list) and command, f"{name}: command must be a non-empty list"
    assert all(isinstance(word, str) for word in command), f"{name}: {command!r}"

    assert command[0] in cli.commands, f"{name}: {command[0]!r} is not a caretaker command"
    resolve_command(command)


def test_resolve_command_rejects_unknown_commands_and_options() -> None:
    assert resolve_command(["config", "check", "deploy/config.example.yml"]).name == "check"
    with pytest.raises(click.UsageError):
        resolve_command(["webhook", "--no-such-option"])
    with pytest.raises(AssertionError):
        resolve_command(["no-such-command"])
    with pytest.raises(AssertionError):
        resolve_command(["config"])


def test_every_long_running_service_has_a_healthcheck() -> None:
    one_shot = one_shot_services()
    assert "migrate" in one_shot
    for name, spec in services().items():
        if name in one_shot:
            assert spec.get("restart") == "no", f"one-shot service {name} must not restart"
            continue
        check = spec.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"


def test_depends_on_targets_exist_with_valid_conditions() -> None:
    known = set(services())
    one_shot = one_shot_services()
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, spec in services().items():
        for target, condition in depends_on(spec).items():
            assert target in known, f"{name} depends on unknown service {target!r}"
            assert target != name, f"{name} depends on itself"
            assert condition in valid, f"{name} -> {target}: unknown condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services()[target], f"{target} cannot become healthy"
            if target in one_shot:
                assert condition == "service_completed_successfully", f"{name} -> {target}"


def test_caretaker_services_share_the_settings_and_the_config_file() -> None:
    for name, spec in caretaker_services().items():
        env = spec["environment"]
        assert env["CARETAKER_DATABASE_URL"] == "postgresql://postgres@postgres/caretaker"
        assert env["CARETAKER_BROKER_URL"] == "redis://redis:6379/0"
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in spec["volumes"]}
        assert mounts.get(env["CARETAKER_CONFIG"]) == "./deploy/config.example.yml", name


def test_bind_mounted_files_exist() -> None:
    for name, spec in services().items():
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).is_file(), f"{name} mounts missing file {source}"


def test_alertmanager_reads_the_webhook_token_compose_provides() -> None:
    compose = load_compose()
    alertmanager = yaml.safe_load((ROOT / "deploy/alertmanager.yml").read_text())
    webhook_config = alertmanager["receivers"][0]["webhook_configs"][0]
    token_path = webhook_config["http_config"]["authorization"]["credentials_file"]

    mounted = {item["target"]: item["source"] for item in services()["alertmanager"]["configs"]}

    assert token_path in mounted
    assert (
        compose["configs"][mounted[token_path]]["content"]
        == (services()["webhook"]["environment"]["CARETAKER_WEBHOOK_TOKEN"])
    )
    assert webhook_config["url"] == "http://webhook:9095/api/v1/alerts"

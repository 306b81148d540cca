"""The files under deploy/ are valid for caretaker, Alertmanager and Prometheus; the README's
settings table matches the settings object."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from workers.config import load_config
from workers.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# Debian ships both in its prometheus-alertmanager and prometheus packages.
INSTALL_HINT = "apt-get install prometheus-alertmanager prometheus"
TOOL_TIMEOUT_S = 60


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Prometheus project binary; fail, never skip, when it is not installed."""
    binary = shutil.which(name)
    if binary is None:
        pytest.fail(f"{name} is required to check deploy files: {INSTALL_HINT}", pytrace=False)
    return subprocess.run(
        [binary, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
    )


def test_example_config_is_valid() -> None:
    config = load_config(DEPLOY / "config.example.yml")

    names = [runbook.name for runbook in config.runbooks]
    assert {"http-service-down", "disk-full"} <= set(names)
    assert config.actions.allowlist
    assert all(channel.token is not None for channel in config.notify.webhooks)


def test_alertmanager_config_passes_amtool() -> None:
    result = run_tool("amtool", "check-config", "deploy/alertmanager.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_and_rules_pass_promtool() -> None:
    result = run_tool("promtool", "check", "config", "deploy/prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


def readme_settings() -> dict[str, str]:
    """The README's settings table: environment variable to its default cell."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `CARETAKER_"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def test_readme_lists_every_setting_with_its_default() -> None:
    documented = readme_settings()

    for name, field in Settings.model_fields.items():
        variable = f"CARETAKER_{name.upper()}"
        assert variable in documented, f"{variable} is missing from the README's settings table"
        default = field.default
        cell = documented.pop(variable)
        if default is None:
            assert cell == "unset", f"{variable}: README says {cell!r}, default is unset"
        elif isinstance(default, int | float):
            assert float(cell) == default, f"{variable}: README says {cell}, default is {default}"
        else:
            assert cell == str(default), f"{variable}: README says {cell!r}, default {default!r}"
    assert not documented, f"README documents settings that do not exist: {sorted(documented)}"

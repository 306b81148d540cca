"""Settings from CARETAKER_* variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.config import ActionsConfig, Config, NotifyConfig, NotifyWebhook, SecretRef
from workers.errors import NotifyError
from workers.notifier import deliver
from workers.settings import Settings


def test_an_empty_webhook_token_is_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARETAKER_WEBHOOK_TOKEN", "")
    monkeypatch.setenv("CARETAKER_WEBHOOK_PASSWORD", "")

    settings = Settings()

    assert settings.webhook_token is None
    assert settings.webhook_password is None


def test_settings_read_their_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARETAKER_PORT", "9999")
    monkeypatch.setenv("CARETAKER_CONFIG", "/etc/caretaker/config.yml")

    settings = Settings()

    assert (settings.port, settings.config) == (9999, Path("/etc/caretaker/config.yml"))


def test_a_bad_port_names_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARETAKER_PORT", "70000")

    with pytest.raises(ValueError, match="port"):
        Settings()


def test_a_notify_secret_whose_variable_is_unset_is_a_notify_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CARETAKER_TEST_UNSET_TOKEN", raising=False)
    channel = NotifyWebhook(
        name="ops", url="http://127.0.0.1:9/", token=SecretRef(env="CARETAKER_TEST_UNSET_TOKEN")
    )
    config = Config(actions=ActionsConfig(), notify=NotifyConfig(webhooks=[channel]))

    with pytest.raises(NotifyError, match="CARETAKER_TEST_UNSET_TOKEN"):
        deliver(config, "ops", {}, timeout_s=1)


def test_an_empty_url_setting_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARETAKER_PROMETHEUS_URL", "")

    assert Settings().prometheus_url is None

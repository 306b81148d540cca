"""The one notifier: delivers an incident notification to its channel (a JSON webhook)."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from workers.config import Config
from workers.errors import NotifyError

log = logging.getLogger(__name__)


def deliver(config: Config, channel_name: str, payload: dict[str, Any], timeout_s: float) -> None:
    """POST the payload to the named channel; NotifyError when it is not accepted."""
    channel = next((c for c in config.notify.webhooks if c.name == channel_name), None)
    if channel is None:
        raise NotifyError(f"no notification channel named {channel_name!r} in the configuration")
    headers = {"User-Agent": "caretaker"}
    if channel.token is not None:
        try:
            headers["Authorization"] = f"Bearer {channel.token.reveal()}"
        except KeyError as exc:
            raise NotifyError(f"channel {channel_name!r}: {exc.args[0]}") from exc
    try:
        response = httpx.post(channel.url, json=payload, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise NotifyError(f"channel {channel_name!r} unreachable: {exc}") from exc
    if response.status_code >= 300:
        raise NotifyError(f"channel {channel_name!r} answered {response.status_code}")
    log.info("notification delivered channel=%s status=%s", channel_name, response.status_code)

"""Alertmanager's webhook payload (version 4) as pydantic models."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Alertmanager's fingerprints are 16 hex digits; anything far longer is not a fingerprint.
FINGERPRINT_MAX = 256


class Alert(BaseModel):
    """One alert of a notification; its own status counts, not the group's."""

    # Newer Alertmanagers add keys; ignoring them keeps old and new senders working.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    starts_at: datetime = Field(alias="startsAt")
    ends_at: datetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = Field(default="", max_length=FINGERPRINT_MAX)

    @field_validator("labels", "annotations", mode="after")
    @classmethod
    def _storable(cls, value: dict[str, str]) -> dict[str, str]:
        # PostgreSQL text cannot hold NUL; one such byte must not cost the whole group.
        return {_storable_text(k): _storable_text(v) for k, v in value.items()}

    @field_validator("fingerprint", "generator_url", mode="after")
    @classmethod
    def _storable_str(cls, value: str) -> str:
        return _storable_text(value)

    @field_validator("ends_at", mode="after")
    @classmethod
    def _no_end(cls, value: datetime | None) -> datetime | None:
        # A firing alert carries endsAt "0001-01-01T00:00:00Z", which means "no end".
        if value is None or value.year <= 1:
            return None
        return value

    @field_validator("starts_at", mode="after")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.year <= 1:
            raise ValueError("startsAt is the zero time")
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    @model_validator(mode="after")
    def _fingerprint(self) -> Alert:
        if not self.fingerprint:
            self.fingerprint = label_fingerprint(self.labels)
        return self


class Notification(BaseModel):
    """A webhook notification: one group of alerts."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    version: str = "4"
    receiver: str = ""
    status: str = ""
    group_key: str = Field(default="", alias="groupKey")
    truncated_alerts: int = Field(default=0, ge=0, le=2**31 - 1, alias="truncatedAlerts")
    group_labels: dict[str, str] = Field(default={}, alias="groupLabels")
    external_url: str = Field(default="", alias="externalURL")
    alerts: list[Alert]

    @field_validator("group_key", mode="after")
    @classmethod
    def _storable_key(cls, value: str) -> str:
        return _storable_text(value)


def _storable_text(text: str) -> str:
    return text.replace("\x00", "\ufffd")


def label_fingerprint(labels: dict[str, str]) -> str:
    """A stable fingerprint from the label set, for senders that do not supply one."""
    digest = hashlib.sha256()
    for name in sorted(labels):
        digest.update(name.encode() + b"\xff" + labels[name].encode() + b"\xff")
    return digest.hexdigest()[:16]

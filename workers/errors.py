"""The exception tree; retry policies catch `TransientError` as one family."""

from __future__ import annotations


class CaretakerError(Exception):
    """Base of every error caretaker raises on purpose."""


class ConfigError(CaretakerError):
    """The configuration file or a setting is invalid."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class PayloadError(CaretakerError):
    """A webhook payload cannot be accepted as it is."""


class TransientError(CaretakerError):
    """Something outside caretaker is briefly unavailable; trying again may succeed."""


class DatabaseUnavailable(TransientError):
    """PostgreSQL cannot be reached or refused the connection."""


class DatabaseConflict(TransientError):
    """PostgreSQL aborted a transaction for a deadlock or serialisation failure."""


class BrokerUnavailable(TransientError):
    """The Celery broker cannot be reached."""


class NotifyError(TransientError):
    """A notification endpoint did not accept the message."""


class SourceError(CaretakerError):
    """A metric source could not give the series asked for (never to be read as "no data")."""


class ActionError(CaretakerError):
    """A runbook action could not be carried out as configured."""


class NotAllowed(ActionError):
    """An executable is not on the configured allowlist."""


class NotFound(CaretakerError):
    """A record asked for by id does not exist."""


class Conflict(CaretakerError):
    """The record is not in a state that allows the change asked for."""

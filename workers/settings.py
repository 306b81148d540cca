"""The one typed settings object, read from CARETAKER_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Scalar settings; structured configuration lives in the YAML file at `config`."""

    model_config = SettingsConfigDict(env_prefix="CARETAKER_", extra="ignore")

    broker_url: str = "redis://localhost:6379/0"
    database_url: str = "postgresql://localhost/caretaker"
    config: Path | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=9095, ge=1, le=65535)
    # Alertmanager authenticates with either a bearer token or basic auth; unset means open.
    webhook_token: SecretStr | None = None
    webhook_username: str | None = None
    webhook_password: SecretStr | None = None
    webhook_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    # Redis redelivers an unacknowledged task after this long; kept short so a killed worker
    # delays alert work by minutes. Long steps hold a lease in PostgreSQL instead.
    visibility_timeout_s: int = Field(default=300, ge=10)
    lease_s: int = Field(default=120, ge=5)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # Work recorded or dispatched this long ago and still not started is dispatched again.
    dispatch_grace_s: float = Field(default=60.0, ge=0)
    health_interval_s: float = Field(default=60.0, gt=0)
    check_history_days: float = Field(default=30.0, gt=0)
    daily_report_hour_utc: int = Field(default=6, ge=0, le=23)
    # Backups are made daily at this hour, verified by restore two hours later, and databases
    # maintained on Sundays an hour after the backups.
    backup_hour_utc: int = Field(default=2, ge=0, le=23)

    task_soft_time_limit_s: int = Field(default=300, ge=1)
    task_time_limit_s: int = Field(default=360, ge=1)
    db_pool_min: int = Field(default=1, ge=0)
    db_pool_max: int = Field(default=10, ge=1)
    db_connect_timeout_s: float = Field(default=5.0, gt=0)

    notify_timeout_s: float = Field(default=10.0, gt=0)
    # With backoff up to 120 s, ten retries keep trying for about 13 minutes.
    notify_max_retries: int = Field(default=10, ge=0)

    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_user: str = "admin"
    flower_password: SecretStr | None = None
    # Flower keeps at most this many tasks in memory, persisted to flower_db across restarts.
    flower_max_tasks: int = Field(default=10000, ge=100)
    flower_db: Path = Path("flower.db")
    beat_schedule_file: Path = Path("celerybeat-schedule")

    # Prometheus's HTTP API for analysis; unset means series come from the check history.
    prometheus_url: str | None = Field(default=None, pattern=r"^https?://")
    prometheus_timeout_s: float = Field(default=30.0, gt=0)
    # Scheduled anomaly detection scores the points that arrived since its previous run.
    anomaly_interval_s: float = Field(default=300.0, gt=0)

    # Security advisories: the OSV API when set, otherwise a directory of OSV JSON files.
    osv_url: str | None = Field(default=None, pattern=r"^https?://")
    osv_dir: Path | None = None
    # pip's index for hotfixes: a URL, or a directory of wheels; unset means pip's default.
    package_index_url: str | None = None

    log_level: str = "INFO"

    @field_validator("database_url", mode="after")
    @classmethod
    def _postgres_url(cls, value: str) -> str:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(value)
        except Exception as exc:
            raise ValueError(f"not a PostgreSQL connection URL: {exc}") from None
        return value

    @field_validator(
        "webhook_token",
        "webhook_password",
        "prometheus_url",
        "osv_url",
        "package_index_url",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Empty means unset: never a credential that an empty header matches, nor a URL.
        return None if value == "" else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once; ConfigError names every bad variable."""
    from workers.errors import ConfigError

    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError([_problem(err) for err in exc.errors()]) from None


def _problem(err: Any) -> str:
    variable = "CARETAKER_" + str(err["loc"][0]).upper() if err["loc"] else "settings"
    return f"{variable}: {err['msg'].removeprefix('Value error, ')}"


def read_env_secret(name: str) -> str:
    """The value of the environment variable a configuration secret refers to."""
    import os

    value = os.environ.get(name)
    if value is None:
        raise KeyError(f"environment variable {name!r} named by a secret reference is not set")
    return value

"""The registry of step actions a runbook may name, with their parameter models."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from tasks.checks import CheckResult, HttpParams, SystemParams, check_http, check_system
from tasks.commands import CommandParams
from tasks.datachecks import PostgresParams, RedisParams, check_postgres, check_redis
from tasks.hotfix import (
    InstallParams,
    PinParams,
    RestoreParams,
    TargetParams,
    pin_in_repository,
    pip_install,
    record_versions,
    restore_versions,
)
from tasks.incidents import EscalateParams
from tasks.netchecks import DnsParams, TlsParams, check_dns, check_tls
from tasks.restore import (
    CopiedParams,
    CopyParams,
    StampParams,
    restore_copy,
    swap_back,
    swap_in,
    verify_copy,
)
from tasks.selfchecks import QueuesParams, check_queues
from tasks.update import (
    CheckoutParams,
    ContinueParams,
    archive_app,
    checkout_version,
    continue_update,
    dump_database,
    install_requirements,
    restore_app,
    restore_database,
)
from workers.config import ActionsConfig
from workers.runs import Outcome, StepContext

log = logging.getLogger(__name__)

CHECK_KINDS = ("check", "verify")


@dataclass(frozen=True)
class Action:
    """How a step action is validated and what kinds of step may use it."""

    name: str
    kinds: tuple[str, ...]
    params: type[BaseModel]
    check: Callable[[Any], CheckResult] | None = None
    # A built-in recover action: carried out in the worker with its run's context.
    perform: Callable[[Any, StepContext], Outcome] | None = None

    def check_params(self, params: dict[str, Any], actions: ActionsConfig, where: str) -> list[str]:
        """Every problem with a step's parameters, each prefixed by its path."""
        # A reference's value is only known per alert: it is checked again when the step runs.
        references = {key for key, value in params.items() if _is_reference(value)}
        literal = {key: value for key, value in params.items() if key not in references}
        try:
            model = self.params.model_validate(literal)
        except ValidationError as exc:
            errors = [
                err for err in exc.errors() if err["loc"][:1] not in {(k,) for k in references}
            ]
            return [_format(where, err) for err in errors]
        if isinstance(model, CommandParams) and model.argv[0] not in actions.allowlist:
            return [f"{where}.argv[0]: executable {model.argv[0]!r} is not in actions.allowlist"]
        return []


def run_check(name: str, params: dict[str, Any]) -> CheckResult:
    """Run a check action; a bad parameter or a crash is an `unknown` result, never raised."""
    action = ACTIONS[name]
    assert action.check is not None
    started = time.monotonic()
    try:
        return action.check(action.params.model_validate(params))
    except ValidationError as exc:
        summary = f"bad parameters: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
    except Exception as exc:
        log.exception("check crashed name=%s", name)
        summary = f"check crashed: {type(exc).__name__}: {exc}"
    return CheckResult(
        status="unknown", summary=summary, duration_s=round(time.monotonic() - started, 4)
    )


def _is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("{{")


def _format(where: str, err: Any) -> str:
    path = where
    for part in err["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    message = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{path}: {message.removeprefix('Value error, ')}"


ACTIONS: dict[str, Action] = {
    action.name: action
    for action in (
        Action("check_http", CHECK_KINDS, HttpParams, check_http),
        Action("check_system", CHECK_KINDS, SystemParams, check_system),
        Action("check_tls", CHECK_KINDS, TlsParams, check_tls),
        Action("check_dns", CHECK_KINDS, DnsParams, check_dns),
        Action("check_postgres", CHECK_KINDS, PostgresParams, check_postgres),
        Action("check_redis", CHECK_KINDS, RedisParams, check_redis),
        Action("check_queues", CHECK_KINDS, QueuesParams, check_queues),
        Action("run_command", ("recover",), CommandParams),
        Action("escalate", ("escalate",), EscalateParams),
        Action("record_versions", ("recover",), TargetParams, perform=record_versions),
        Action("pip_install", ("recover",), InstallParams, perform=pip_install),
        Action("restore_versions", ("recover",), RestoreParams, perform=restore_versions),
        Action("pin_in_repository", ("recover",), PinParams, perform=pin_in_repository),
        Action("restore_copy", ("recover",), CopyParams, perform=restore_copy),
        Action("verify_copy", ("recover",), CopiedParams, perform=verify_copy),
        Action("swap_in", ("recover",), CopiedParams, perform=swap_in),
        Action("swap_back", ("recover",), StampParams, perform=swap_back),
        Action("archive_app", ("recover",), TargetParams, perform=archive_app),
        Action("dump_database", ("recover",), TargetParams, perform=dump_database),
        Action("checkout_version", ("recover",), CheckoutParams, perform=checkout_version),
        Action("install_requirements", ("recover",), TargetParams, perform=install_requirements),
        Action("continue_update", ("recover",), ContinueParams, perform=continue_update),
        Action("restore_app", ("recover",), TargetParams, perform=restore_app),
        Action("restore_database", ("recover",), TargetParams, perform=restore_database),
    )
}

"""Executing one runbook step: claim it, act under a lease, record the result, go on."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from tasks.actions import ACTIONS
from tasks.checks import CheckResult
from tasks.commands import CommandParams, run_command
from tasks.incidents import EscalateParams, escalate_step
from workers import dispatch, runs
from workers.app import app
from workers.config import get_config
from workers.db import transaction
from workers.errors import (
    CaretakerError,
    DatabaseConflict,
    DatabaseUnavailable,
    TransientError,
)
from workers.runs import Claim, Outcome, StepRef
from workers.settings import get_settings

log = logging.getLogger(__name__)

WORKER = f"worker:{socket.gethostname()}"
# Seconds between attempts to record a step's result while PostgreSQL is unreachable.
RECORD_RETRY_DELAYS_S = (1, 2, 4, 8)


@app.task(name="caretaker.runs.execute_step", acks_late=True, reject_on_worker_lost=True)
def execute_step(step_id: int) -> str:
    """Run one step of a run. Idempotent: a step already taken, done or cancelled is left
    alone, so duplicate deliveries are harmless. Not retried; the sweeper re-sends lost ones.
    Changes whatever the step's action changes, and records it on the run."""
    settings = get_settings()
    with transaction() as conn:
        claim = runs.claim_step(conn, step_id, WORKER, settings.lease_s)
        # Escalation is claimed, carried out and recorded in one transaction holding the run's
        # lock: an alert resolving meanwhile either cancels it first or resolves its incident.
        if claim is not None and claim.step["action"] == "escalate":
            outcome = _escalate(conn, claim)
            following = runs.finish_step(conn, claim, outcome, WORKER)
    if claim is None:
        return "nothing to do"

    if claim.step["action"] != "escalate":
        with _lease(claim, settings.lease_s):
            outcome = _perform(claim)
            following = _record(claim, outcome)

    log.info("step finished step_id=%s run_id=%s ok=%s", step_id, claim.run["id"], outcome.ok)
    dispatch.try_send("next steps", dispatch.execute_steps, following)
    dispatch.try_send(
        "notifications", dispatch.send_notifications, outcome.result.get("notifications", [])
    )
    return "succeeded" if outcome.ok else "failed"


def _record(claim: Claim, outcome: Outcome) -> list[StepRef]:
    # The action has happened: losing its result to a short database outage would turn it into
    # "outcome unknown", so recording is retried while the lease is still renewed.
    for delay_s in (*RECORD_RETRY_DELAYS_S, None):
        try:
            with transaction() as conn:
                return runs.finish_step(conn, claim, outcome, WORKER)
        except psycopg.DataError as exc:
            # The result itself cannot be stored: record that, rather than leave the step
            # running until its lease says "outcome unknown".
            log.error("step result not storable step_id=%s error=%s", claim.step["id"], exc)
            if delay_s is None:
                raise
            outcome = Outcome(ok=False, result={}, error=f"result could not be stored: {exc}")
        except (DatabaseUnavailable, DatabaseConflict) as exc:
            if delay_s is None:
                raise
            log.warning(
                "recording step result failed step_id=%s retry_in_s=%s error=%s",
                claim.step["id"],
                delay_s,
                exc,
            )
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def _escalate(conn: Any, claim: Claim) -> Outcome:
    try:
        params = EscalateParams.model_validate(claim.step["params"])
    except ValidationError as exc:
        return Outcome(ok=False, result={}, error=f"bad escalate parameters: {exc}")
    return escalate_step(conn, params, claim)


def _perform(claim: Claim) -> Outcome:
    step = claim.step
    try:
        if step["kind"] == "recover":
            return _recover(claim)
        return _check(claim)
    except SoftTimeLimitExceeded:
        return Outcome(
            ok=False, result={}, error=f"step overran its time limit ({step['spec']['timeout_s']}s)"
        )
    except ValidationError as exc:
        return Outcome(ok=False, result={}, error=f"bad parameters: {_first_error(exc)}")
    except (CaretakerError, OSError) as exc:
        return Outcome(ok=False, result={}, error=str(exc))
    except Exception as exc:
        # A bug in an action must not leave its step running until the lease runs out.
        log.exception("step action crashed step_id=%s", step["id"])
        return Outcome(ok=False, result={}, error=f"action crashed: {type(exc).__name__}: {exc}")


def _recover(claim: Claim) -> Outcome:
    action = ACTIONS.get(claim.step["action"])
    if action is not None and action.perform is not None:
        params = action.params.model_validate(claim.step["params"])
        with transaction() as conn:
            context = runs.step_context(conn, claim)
        return action.perform(params, context)
    params = CommandParams.model_validate(claim.step["params"])
    result = run_command(params, get_config())
    error = None
    if result.timed_out:
        error = f"command timed out after {params.timeout_s}s"
    elif result.exit_code != 0:
        error = f"command exited with {result.exit_code}"
    return Outcome(ok=result.ok, result=result.model_dump(), error=error)


def _check(claim: Claim) -> Outcome:
    step = claim.step
    action = ACTIONS[step["action"]]
    assert action.check is not None
    params = action.params.model_validate(step["params"])
    spec = step["spec"]
    attempts = spec["attempts"] if step["kind"] == "verify" else 1

    results: list[CheckResult] = []
    for attempt in range(attempts):
        if attempt:
            time.sleep(spec["delay_s"])
        results.append(action.check(params))
        if results[-1].status in spec["accept"]:
            break

    last = results[-1]
    document = last.model_dump() | {"attempts": len(results)}
    # A diagnosis passes whatever it finds; a verification passes only on an accepted status.
    if step["kind"] == "check" or last.status in spec["accept"]:
        return Outcome(ok=True, result=document)
    return Outcome(
        ok=False,
        result=document,
        error=f"{last.status} after {len(results)} attempts: {last.summary}",
    )


@contextmanager
def _lease(claim: Claim, lease_s: float) -> Iterator[None]:
    """Renew the step's lease in the background while it runs."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                with transaction() as conn:
                    if not runs.renew_lease(conn, claim.step["id"], claim.tries, lease_s):
                        log.warning("lease lost step_id=%s", claim.step["id"])
                        return
            except TransientError as exc:
                log.warning("lease renewal failed step_id=%s error=%s", claim.step["id"], exc)

    thread = threading.Thread(target=renew, name=f"lease-{claim.step['id']}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"

"""The webhook service: Alertmanager's notifications in, durably recorded, work dispatched."""

from __future__ import annotations

import base64
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from workers import dispatch, metrics
from workers.config import get_config
from workers.db import transaction
from workers.errors import DatabaseConflict, DatabaseUnavailable, PayloadError
from workers.occurrences import Recorded, record_notification
from workers.payloads import Notification
from workers.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application of the webhook service."""
    settings = settings or get_settings()
    api = FastAPI(title="caretaker", version="0.1.0")

    @api.post("/api/v1/alerts")
    async def receive_alerts(request: Request) -> Response:
        """Record an Alertmanager notification; 2xx only once it is committed."""
        if not _authorized(request, settings):
            metrics.WEBHOOK_REJECTED.labels("unauthorized").inc()
            return _error(
                401,
                "missing or wrong credentials",
                {"WWW-Authenticate": 'Bearer realm="caretaker"'},
            )
        try:
            body = await _read_limited(request, settings.webhook_max_body_bytes)
            notification = _parse(body)
        except PayloadError as exc:
            status = 413 if "too large" in str(exc) else 400
            metrics.WEBHOOK_REJECTED.labels("too_large" if status == 413 else "bad_payload").inc()
            return _error(status, str(exc))

        started = time.perf_counter()
        try:
            recorded = await run_in_threadpool(_commit, notification)
        except (DatabaseUnavailable, DatabaseConflict) as exc:
            metrics.WEBHOOK_REJECTED.labels(
                "database_unavailable" if isinstance(exc, DatabaseUnavailable) else "conflict"
            ).inc()
            log.warning("notification not recorded, asking for a retry: %s", exc)
            what = "unavailable" if isinstance(exc, DatabaseUnavailable) else "busy"
            return _error(503, f"database {what}; retry later", {"Retry-After": "5"})
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        _count(notification, recorded)

        # The answer never waits for the broker: the sweeper dispatches whatever this misses.
        work = recorded.new_ids or recorded.notification_ids
        task = BackgroundTask(_dispatch, recorded) if work else None
        return JSONResponse(_answer(notification, recorded), background=task)

    @api.get("/healthz")
    async def healthz() -> Response:
        """Process up, with database and broker reachability."""
        checks = {
            "database": await run_in_threadpool(_database_ok),
            "broker": await run_in_threadpool(dispatch.ping_broker),
        }
        healthy = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ok" if healthy else "degraded", **checks},
            status_code=200 if healthy else 503,
        )

    stored = CollectorRegistry(auto_describe=False)
    stored.register(metrics.StoredMetrics(_target_names))

    @api.get("/metrics")
    async def prometheus_metrics() -> Response:
        text = generate_latest() + await run_in_threadpool(generate_latest, stored)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return api


def _authorized(request: Request, settings: Settings) -> bool:
    token = settings.webhook_token
    password = settings.webhook_password
    if token is None and password is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if token is not None and scheme.lower() == "bearer":
        return hmac.compare_digest(credentials.encode(), token.get_secret_value().encode())
    if password is not None and scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except ValueError:
            return False
        expected = f"{settings.webhook_username or ''}:{password.get_secret_value()}"
        return hmac.compare_digest(decoded, expected.encode())
    return False


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(f"body too large: {declared} bytes, limit {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"body too large: over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> Notification:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PayloadError(f"malformed json: {exc}") from exc
    except RecursionError as exc:
        raise PayloadError("malformed json: nested too deeply") from exc
    if not isinstance(data, dict):
        raise PayloadError(f"payload must be a json object, got {type(data).__name__}")
    if "alerts" not in data:
        raise PayloadError("payload has no 'alerts' list")
    try:
        return Notification.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:10]
        )
        raise PayloadError(f"invalid alertmanager payload: {problems}") from exc


def _commit(notification: Notification) -> Recorded:
    config = get_config()
    with transaction() as conn:
        return record_notification(conn, notification, config)


def _dispatch(recorded: Recorded) -> None:
    started = time.perf_counter()
    dispatch.try_send("new occurrences", dispatch.route_occurrences, recorded.new_ids)
    dispatch.try_send("notifications", dispatch.send_notifications, recorded.notification_ids)
    metrics.DISPATCH_SECONDS.observe(time.perf_counter() - started)


def _count(notification: Notification, recorded: Recorded) -> None:
    for alert in notification.alerts:
        metrics.ALERTS_RECEIVED.labels(alert.status).inc()
    metrics.ALERTS_NEW.inc(len(recorded.new_ids))
    metrics.ALERTS_DEDUPLICATED.inc(recorded.deduplicated)
    metrics.ALERTS_IGNORED.inc(recorded.ignored)
    metrics.TRUNCATED_ALERTS.inc(notification.truncated_alerts)
    log.info(
        "notification recorded group_key=%s alerts=%d new=%d repeats=%d resolved=%d",
        notification.group_key,
        len(notification.alerts),
        len(recorded.new_ids),
        recorded.deduplicated,
        recorded.resolved,
    )


def _answer(notification: Notification, recorded: Recorded) -> dict[str, Any]:
    return {
        "status": "recorded",
        "alerts": len(notification.alerts),
        "new": len(recorded.new_ids),
        "deduplicated": recorded.deduplicated,
        "resolved": recorded.resolved,
        "ignored": recorded.ignored,
        "truncated_alerts": notification.truncated_alerts,
    }


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _target_names() -> list[str]:
    return [target.name for _, target in get_config().checks.targets()]


def _database_ok() -> str:
    try:
        with transaction() as conn:
            conn.execute("SELECT 1")
    except DatabaseUnavailable as exc:
        return str(exc)
    return "ok"

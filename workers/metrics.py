"""Prometheus metrics of the webhook service."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

ALERTS_RECEIVED = Counter(
    "caretaker_alerts_received",
    "Alerts received from Alertmanager, by their own status.",
    ["status"],
)
ALERTS_NEW = Counter("caretaker_alerts_new", "Alerts recorded as new occurrences.")
ALERTS_DEDUPLICATED = Counter(
    "caretaker_alerts_deduplicated", "Firing alerts already recorded: repeats of a notification."
)
ALERTS_IGNORED = Counter(
    "caretaker_alerts_ignored", "Resolved alerts never seen firing, or already resolved."
)
WEBHOOK_REJECTED = Counter(
    "caretaker_webhook_rejected", "Webhook requests refused, by reason.", ["reason"]
)
TRUNCATED_ALERTS = Counter(
    "caretaker_alerts_truncated", "Alerts Alertmanager reported dropping from its groups."
)
COMMIT_SECONDS = Histogram(
    "caretaker_webhook_commit_seconds", "Time to validate and commit one notification."
)
DISPATCH_SECONDS = Histogram(
    "caretaker_webhook_dispatch_seconds", "Time to hand a notification's new work to the broker."
)

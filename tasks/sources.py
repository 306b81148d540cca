"""Metric sources behind one interface: Prometheus's query_range, the check history, CSV files.

Every source answers with `Fetched` series on a UTC time index: real timestamps, never positions,
so gaps stay gaps. A source that cannot answer raises SourceError; it never returns "no data"
for a failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd

from workers.config import SeriesSource
from workers.db import Connection
from workers.errors import SourceError
from workers.settings import Settings


@dataclass(frozen=True)
class Fetched:
    """One series: its labels (empty for a single-series source) and its values."""

    values: pd.Series
    labels: dict[str, str] = field(default_factory=dict)


def fetch(
    source: SeriesSource,
    start: datetime,
    end: datetime,
    settings: Settings,
    conn: Connection | None = None,
) -> list[Fetched]:
    """The series `source` names over [start, end]; the check history is read on `conn`, or
    in a transaction of its own."""
    if source.query is not None:
        if settings.prometheus_url is None:
            raise SourceError(
                "a query needs Prometheus: set CARETAKER_PROMETHEUS_URL, or use target: instead"
            )
        from tasks.prometheus import query_range

        return query_range(
            settings.prometheus_url,
            source.query,
            start,
            end,
            timeout_s=settings.prometheus_timeout_s,
        )
    assert source.target is not None
    if conn is None:
        # A short transaction of its own: a caller never holds one open while Prometheus
        # answers, and needs none for the history either.
        from workers.db import transaction

        with transaction() as own:
            return [Fetched(check_history(own, source.target, start, end))]
    return [Fetched(check_history(conn, source.target, start, end))]


def check_history(conn: Connection, target: str, start: datetime, end: datetime) -> pd.Series:
    """The values recorded for a check target over [start, end]; results without a value
    (a check that could not measure) are left out."""
    rows = conn.execute(
        """
        SELECT checked_at, value FROM check_results
         WHERE target = %s AND checked_at BETWEEN %s AND %s AND value IS NOT NULL
         ORDER BY checked_at
        """,
        (target, start, end),
    ).fetchall()
    index = pd.DatetimeIndex([row["checked_at"] for row in rows], tz="UTC")
    return pd.Series([row["value"] for row in rows], index=index, dtype=float, name=target)


def is_counter(query: str | None, declared: bool | None) -> bool:
    """Whether a series is a counter to turn into a rate: as declared, else by the name of a
    bare `*_total` metric."""
    if declared is not None:
        return declared
    if query is None:
        return False
    name = query.strip().split("{", 1)[0]
    return name.endswith("_total") and name.replace("_", "").replace(":", "").isalnum()

"""Series from Prometheus's range query API, kept within its limit of points per series."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pandas as pd

from tasks.sources import Fetched
from workers.errors import SourceError

log = logging.getLogger(__name__)

# Prometheus refuses a range query that would give a series more points than this.
MAX_POINTS = 11_000
# Steps a person would choose, in seconds; without a step, the smallest that fits is used.
ROUND_STEPS_S = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 10800, 21600, 43200, 86400)
SECONDS_PER_DAY = 86400
# A step this fine for the range would mean too many requests: over a million points a series.
MAX_REQUESTS = 100

Labels = tuple[tuple[str, str], ...]


def query_range(
    url: str,
    query: str,
    start: datetime,
    end: datetime,
    step_s: float | None = None,
    timeout_s: float = 30.0,
) -> list[Fetched]:
    """Every series `query` gives over [start, end], one point each step_s seconds.

    Without a step, the smallest round step that keeps a series within Prometheus's limit of
    points; a given step that passes it is fetched in consecutive pieces, joined per series.
    Points fall on multiples of the step, so repeated queries evaluate at the same instants.
    """
    start_ms, end_ms = _ms(start), _ms(end)
    if end_ms < start_ms:
        raise SourceError(
            f"the range ends before it starts: {start.isoformat()} > {end.isoformat()}"
        )
    step_ms = _step_ms(step_s, end_ms - start_ms)
    pieces = _pieces(start_ms, end_ms, step_ms)

    found = _fetch(url, query, pieces, step_ms, timeout_s)

    log.debug(
        "prometheus range query url=%s step_s=%g requests=%d series=%d",
        shown_url(url),
        step_ms / 1000,
        len(pieces),
        len(found),
    )
    return [_joined(labels, found[labels]) for labels in sorted(found)]


def auto_step_s(range_s: float) -> float:
    """The smallest round step that keeps a range of range_s seconds within MAX_POINTS."""
    for step_s in ROUND_STEPS_S:
        if math.floor(range_s / step_s) + 1 <= MAX_POINTS:
            return float(step_s)
    return float(math.ceil(range_s / (MAX_POINTS - 1) / SECONDS_PER_DAY) * SECONDS_PER_DAY)


def shown_url(url: str) -> str:
    """The URL without credentials or query string, fit for messages and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _ms(moment: datetime) -> int:
    # A naive datetime is taken as UTC, as every timestamp in caretaker is.
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return round(aware.timestamp() * 1000)


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}"


def _step_ms(step_s: float | None, range_ms: int) -> int:
    step_ms = round(1000 * (auto_step_s(range_ms / 1000) if step_s is None else step_s))
    if step_ms < 1:
        raise SourceError(f"the step must be at least 1 ms, not {step_s:g} s")
    return step_ms


def _pieces(start_ms: int, end_ms: int, step_ms: int) -> list[tuple[int, int]]:
    """[start, end] of each request: MAX_POINTS points at most, none shared with the next."""
    first_ms = -(-start_ms // step_ms) * step_ms
    if first_ms > end_ms:
        # No multiple of the step falls in a range shorter than it: one point, at its start.
        first_ms = start_ms
    span_ms = (MAX_POINTS - 1) * step_ms
    starts = range(first_ms, end_ms + 1, span_ms + step_ms)
    if len(starts) > MAX_REQUESTS:
        raise SourceError(
            f"a step of {step_ms / 1000:g} s over {(end_ms - start_ms) / 1000:g} s needs "
            f"{len(starts)} requests (at most {MAX_REQUESTS}): choose a larger step"
        )
    return [(piece_ms, min(piece_ms + span_ms, end_ms)) for piece_ms in starts]


def _fetch(
    url: str, query: str, pieces: list[tuple[int, int]], step_ms: int, timeout_s: float
) -> dict[Labels, list[pd.Series]]:
    """Each series' values from every piece, in time order, by its labels."""
    found: dict[Labels, list[pd.Series]] = {}
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        for start_ms, end_ms in pieces:
            params = {
                "query": query,
                "start": _seconds(start_ms),
                "end": _seconds(end_ms),
                "step": _seconds(step_ms),
            }
            for item in _matrix(client, url, params, timeout_s):
                labels, values = _series(item, query)
                found.setdefault(labels, []).append(values)
    return found


def _matrix(client: httpx.Client, url: str, params: dict[str, str], timeout_s: float) -> list[Any]:
    """The result of one range query; an error of any kind is a SourceError, never no data."""
    where = shown_url(url)
    try:
        answer = client.get(f"{url.rstrip('/')}/api/v1/query_range", params=params)
    except httpx.TimeoutException as exc:
        raise SourceError(f"prometheus at {where} did not answer within {timeout_s:g} s") from exc
    except httpx.HTTPError as exc:
        raise SourceError(f"cannot reach prometheus at {where}: {exc}") from exc

    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.is_error:
        raise SourceError(_refusal(answer, body, where))
    if not isinstance(body, dict):
        kind = answer.headers.get("content-type", "no content type")
        raise SourceError(f"prometheus at {where} answered with something other than JSON ({kind})")
    if body.get("status") != "success":
        raise SourceError(f"prometheus at {where} answered status {body.get('status')!r}")
    data = body.get("data")
    kind = data.get("resultType") if isinstance(data, dict) else None
    result = data.get("result") if isinstance(data, dict) else None
    if kind != "matrix" or not isinstance(result, list):
        raise SourceError(f"prometheus at {where} answered a {kind!r}, not a matrix")
    for warning in body.get("warnings") or []:
        log.warning("prometheus warned url=%s warning=%s", where, warning)
    return result


def _refusal(answer: httpx.Response, body: Any, where: str) -> str:
    status = answer.status_code
    if not isinstance(body, dict) or not body.get("error"):
        return f"prometheus at {where} answered {status} {answer.reason_phrase}"
    verb = "refused" if status < 500 else "could not run"
    error = " ".join(str(body["error"]).split())
    return f"prometheus {verb} the query ({status} {body.get('errorType', 'error')}): {error}"


def _series(item: Any, query: str) -> tuple[Labels, pd.Series]:
    """One series of a matrix: values parsed as floats ("NaN" and "+Inf" included), on the
    real timestamps."""
    try:
        labels = {str(name): str(value) for name, value in item["metric"].items()}
        pairs = item["values"]
        stamps_ms = np.array([round(float(stamp) * 1000) for stamp, _ in pairs], dtype=np.int64)
        values = np.array([float(value) for _, value in pairs], dtype=float)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        shape = "native histograms" if isinstance(item, dict) and "histograms" in item else exc
        raise SourceError(f"prometheus answered a series that cannot be read: {shape}") from exc
    index = pd.DatetimeIndex(pd.to_datetime(stamps_ms, unit="ms", utc=True))
    name = labels.get("__name__") or query
    return tuple(sorted(labels.items())), pd.Series(values, index=index, name=name)


def _joined(labels: Labels, pieces: list[pd.Series]) -> Fetched:
    # The pieces come in time order and share no instant, so joining keeps every point once.
    values = pieces[0] if len(pieces) == 1 else pd.concat(pieces)
    return Fetched(values=values, labels=dict(labels))

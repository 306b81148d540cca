"""Change windows: the recurring slots in which planned changes may run."""

from __future__ import annotations

from datetime import datetime, timedelta

from croniter import croniter

from workers.config import ChangeWindow

# What a run waiting for a change window waits for, as runs.waiting_for records it.
CHANGE_WINDOW = "change window"


def open_window(windows: list[ChangeWindow], now: datetime) -> ChangeWindow | None:
    """The window open at `now` (UTC, aware), if any; a window is open from each start the
    cron expression gives, inclusive, for its duration."""
    for window in windows:
        # A second past now, so a window opening exactly now counts as open.
        started = croniter(window.cron, now + timedelta(seconds=1)).get_prev(datetime)
        if now < started + timedelta(hours=window.duration_h):
            return window
    return None


def next_opening(windows: list[ChangeWindow], now: datetime) -> datetime | None:
    """When the next window opens after `now`; None without windows."""
    starts = [croniter(window.cron, now).get_next(datetime) for window in windows]
    return min(starts, default=None)

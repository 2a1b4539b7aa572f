"""Calling windows and zones that are open or closed right now, whatever the wall clock says.

The use cases read the real clock (formcall.messages.now), so tests pick the zone or the
weekday instead of freezing time.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from formcall.window import CallWindow

# Every day, all day but the last second: open now in a zone whose local time is mid-day.
ALL_DAY = CallWindow(frozenset(range(7)), time(0, 0), time(23, 59, 59))


def now() -> datetime:
    return datetime.now(UTC)


def midday_zone() -> str:
    """An Etc/GMT zone whose local hour is 10-13 now (ALL_DAY is open there for hours)."""
    offset = 12 - now().hour  # local = UTC + offset; Etc/GMT signs are inverted
    offset = max(-12, min(14, offset))
    return "Etc/GMT" + ("" if offset == 0 else f"{-offset:+d}")


def closed_window() -> tuple[CallWindow, datetime]:
    """A window (UTC) open only three days from now, 09:00-10:00, and its next opening."""
    day = now().date() + timedelta(days=3)
    window = CallWindow(frozenset({day.weekday()}), time(9, 0), time(10, 0))
    return window, datetime(day.year, day.month, day.day, 9, tzinfo=UTC)

"""The calling window: the weekdays and hours a patient may be phoned, in their own time zone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_EVERY_DAY = frozenset(range(7))
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
# How far apart the offset is sampled when looking for a daylight-saving change. Two
# changes closer than this could cancel out unseen; across every zone from 1970 to 2070
# (tzdata 2025b) the closest pair of offset changes is 6.96 days apart.
_PROBE_STEP = timedelta(days=1)

_WINDOW = re.compile(
    r"\s*(?:(?P<days>\S.*?)\s+)?"
    r"(?P<start>\d{1,2}:\d{2}(?::\d{2})?)\s*-\s*(?P<end>\d{1,2}:\d{2}(?::\d{2})?)\s*",
    re.ASCII,
)
_EXAMPLE = "expected e.g. '09:00-20:00', 'Mon-Fri 09:00-20:00' or 'Mon,Wed,Fri 08:30-17:00'"


@dataclass(frozen=True)
class CallWindow:
    """Allowed weekdays (0=Monday .. 6=Sunday) and a same-day [start, end) of wall-clock time.

    Overnight windows (22:00-02:00) are not supported: start must be before end. Times are
    naive and in whole seconds, so that str() and parse_window() round-trip.
    """

    days: frozenset[int]
    start: time
    end: time

    def __post_init__(self) -> None:
        if not self.days or not self.days <= _EVERY_DAY:
            raise ValueError(
                f"call window days must be a non-empty subset of 0-6, got {sorted(self.days)}"
            )
        for t in (self.start, self.end):
            if t.tzinfo is not None or t.microsecond:
                raise ValueError(f"call window times must be naive whole seconds, got {t!r}")
        if not self.start < self.end:
            raise ValueError(
                f"call window must start before it ends (overnight windows are "
                f"not supported), got {_clock(self.start)}-{_clock(self.end)}"
            )

    def __str__(self) -> str:
        return f"{_day_list(self.days)} {_clock(self.start)}-{_clock(self.end)}"


def parse_window(text: str) -> CallWindow:
    """Reads "[DAYS ]HH:MM[:SS]-HH:MM[:SS]" (the CALL_WINDOW setting).

    DAYS is "daily" or a comma-separated list of days ("Mon") and ranges ("Mon-Fri", and
    "Sat-Mon" wraps round the week); without DAYS the window is open every day.
    """
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ValueError(f"bad call window {text!r}: {_EXAMPLE}")
    days = _parse_days(match["days"], text) if match["days"] else _EVERY_DAY
    return CallWindow(days, _parse_time(match["start"], text), _parse_time(match["end"], text))


def _parse_days(text: str, whole: str) -> frozenset[int]:
    if text.lower() == "daily":
        return _EVERY_DAY
    days: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.partition("-")
        start = _day_number(first, whole)
        stop = _day_number(last, whole) if dash else start
        # A range wraps round the week: Sat-Mon is Saturday, Sunday and Monday.
        days.update((start + step) % 7 for step in range((stop - start) % 7 + 1))
    return frozenset(days)


def _day_number(name: str, whole: str) -> int:
    try:
        return _DAY_NAMES.index(name.strip().lower())
    except ValueError:
        raise ValueError(
            f"bad call window {whole!r}: {name.strip()!r} is not a day "
            f"(use {', '.join(d.title() for d in _DAY_NAMES)} or 'daily')"
        ) from None


def _parse_time(text: str, whole: str) -> time:
    hour, minute, second = (int(part) for part in (text + ":00").split(":")[:3])
    if hour > 23 or minute > 59 or second > 59:
        raise ValueError(
            f"bad call window {whole!r}: {text} is not a time of day (00:00 to 23:59:59)"
        )
    return time(hour, minute, second)


DEFAULT_WINDOW = parse_window("09:00-20:00")


def zone_for(name: str | None) -> tuple[ZoneInfo, bool]:
    """The patient's zone, or (UTC, False) when the name is not a zone of the tz database.

    Never raises for a bad name; it raises ZoneInfoNotFoundError only when the tz database
    itself is missing (not even UTC loads), because then no patient's hours can be known.
    """
    key = name.strip() if isinstance(name, str) else ""
    # "localtime" is the server's own zone (a symlink), not a patient's.
    if key and key != "localtime":
        try:
            return ZoneInfo(key), True
        except (ValueError, OSError, ZoneInfoNotFoundError):
            # ValueError covers path-like keys and files that are not TZif data; OSError a
            # key naming a directory or too long for the file system.
            pass
    return ZoneInfo("UTC"), False


def is_open(at: datetime, zone: ZoneInfo, window: CallWindow) -> bool:
    """Whether `at` (aware) falls inside the window on the local clock and calendar of `zone`."""
    _require_aware(at)
    # Through UTC: astimezone() returns a datetime already in `zone` unchanged, even a wall
    # time that a spring-forward skipped, which would then be judged by its face value.
    return _inside(at.astimezone(UTC).astimezone(zone), window)


def next_opening(at: datetime, zone: ZoneInfo, window: CallWindow) -> datetime | None:
    """None when the window is open at `at`, else the earliest later instant it is (in UTC).

    Follows the local wall clock exactly: when the start time falls in a spring-forward gap
    the window opens at the gap's end (if that is still before the end time; a window wholly
    inside the gap does not open that day), an ambiguous start opens at its first occurrence,
    and a fall-back that jumps the clock back into the window reopens it. Dates a zone
    skipped (Pacific/Apia, 2011-12-30) never open.
    """
    _require_aware(at)
    now = at.astimezone(UTC)
    local = now.astimezone(zone)
    if _inside(local, window):
        return None
    # Walk forward one stretch of constant UTC offset at a time: inside a stretch the local
    # clock runs evenly, so the first opening is plain arithmetic; at an offset change the
    # clock jumps and may land inside the window.
    for _ in range(32):
        offset = local.utcoffset()
        assert offset is not None
        candidate = _opening_at_offset(local.replace(tzinfo=None), offset, window)
        change = _first_offset_change(now, candidate, zone, offset)
        if change is None:
            return candidate
        now = change
        local = now.astimezone(zone)
        if _inside(local, window):
            return now
    # Offset changes are days apart, so a week's walk meets only a few of them.
    raise RuntimeError(f"no calling window found after {at.isoformat()} in {zone.key}")


def _inside(local: datetime, window: CallWindow) -> bool:
    return local.weekday() in window.days and window.start <= local.time() < window.end


def _opening_at_offset(wall: datetime, offset: timedelta, window: CallWindow) -> datetime:
    """The first window start after `wall` (a closed moment) if the offset never changed."""
    for ahead in range(8):
        day = wall.date() + timedelta(days=ahead)
        if day.weekday() in window.days:
            start = datetime.combine(day, window.start)
            if start > wall:
                return start.replace(tzinfo=UTC) - offset
    raise AssertionError("a non-empty set of weekdays recurs within 8 days")


def _first_offset_change(
    after: datetime, until: datetime, zone: ZoneInfo, offset: timedelta
) -> datetime | None:
    """The first instant in (after, until] whose UTC offset in `zone` is not `offset`."""
    low = after
    while low < until:
        high = min(low + _PROBE_STEP, until)
        if high.astimezone(zone).utcoffset() != offset:
            return _bisect_change(low, high, zone, offset)
        low = high
    return None


def _bisect_change(low: datetime, high: datetime, zone: ZoneInfo, offset: timedelta) -> datetime:
    # Transitions fall on whole seconds (TZif data and POSIX rules count seconds), so the
    # search runs over integer timestamps: `offset` holds at floor(low), not at ceil(high).
    old = (low - _EPOCH) // _SECOND
    new = -((_EPOCH - high) // _SECOND)
    while new - old > 1:
        middle = (old + new) // 2
        if (_EPOCH + middle * _SECOND).astimezone(zone).utcoffset() == offset:
            old = middle
        else:
            new = middle
    return _EPOCH + new * _SECOND


def _require_aware(at: datetime) -> None:
    # A naive datetime would silently be read as the server's local time.
    if at.utcoffset() is None:
        raise ValueError(f"expected an aware datetime, got {at!r}")


def _clock(t: time) -> str:
    return t.strftime("%H:%M:%S" if t.second else "%H:%M")


def _day_list(days: frozenset[int]) -> str:
    if days == _EVERY_DAY:
        return "daily"
    # Runs of consecutive days, a run across Sunday-Monday kept whole ("Sat-Mon").
    runs: list[list[int]] = []
    for day in range(7):
        if day in days and (day - 1) % 7 not in days:
            runs.append([day])
            while (runs[-1][-1] + 1) % 7 in days:
                runs[-1].append((runs[-1][-1] + 1) % 7)
    parts = []
    for run in runs:
        names = [_DAY_NAMES[d].title() for d in run]
        parts.append(f"{names[0]}-{names[-1]}" if len(run) >= 3 else ",".join(names))
    return ",".join(parts)

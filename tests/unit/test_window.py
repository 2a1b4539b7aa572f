"""The calling window: parsing, patient zones, and openings across daylight-saving changes."""

from __future__ import annotations

import functools
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formcall.window import (
    DEFAULT_WINDOW,
    CallWindow,
    is_open,
    next_opening,
    parse_window,
    zone_for,
)

UTC = UTC
NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
APIA = ZoneInfo("Pacific/Apia")

# Zones with odd offsets, 30-minute and 2-hour DST, changes at midnight or 00:01 (the local
# date steps back), Ramadan suspensions, and days skipped or repeated.
ZONES = [
    "UTC",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",
    "Pacific/Apia",
    "America/Sao_Paulo",
    "America/St_Johns",
    "America/Havana",
    "America/Santiago",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "Africa/Casablanca",
    "Asia/Gaza",
    "Antarctica/Troll",
    "Europe/Moscow",
    "Pacific/Kiritimati",
    "Pacific/Kwajalein",
]
# Zones that skipped a whole local date, so a one-day window may wait nearly two weeks.
SKIPPED_A_DAY = {"Pacific/Apia", "Pacific/Kiritimati", "Pacific/Kwajalein"}


def local(zone: ZoneInfo, text: str, fold: int = 0) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# Parsing


@pytest.mark.parametrize(
    "text, days, start, end",
    [
        ("09:00-20:00", set(range(7)), time(9), time(20)),
        ("daily 09:00-20:00", set(range(7)), time(9), time(20)),
        ("DAILY 09:00-20:00", set(range(7)), time(9), time(20)),
        ("Mon-Fri 09:00-20:00", {0, 1, 2, 3, 4}, time(9), time(20)),
        ("Mon,Wed,Fri 08:30-17:00", {0, 2, 4}, time(8, 30), time(17)),
        ("Sat-Mon 10:00-14:00", {5, 6, 0}, time(10), time(14)),
        ("sun-tue 10:00-14:00", {6, 0, 1}, time(10), time(14)),
        ("Mon-Wed,Fri 10:00-14:00", {0, 1, 2, 4}, time(10), time(14)),
        ("Tue-Mon 10:00-14:00", set(range(7)), time(10), time(14)),
        ("Thu 10:00-14:00", {3}, time(10), time(14)),
        ("09:00:30-20:00", set(range(7)), time(9, 0, 30), time(20)),
        ("  mon , fri  9:00 - 20:00:59 \n", {0, 4}, time(9), time(20, 0, 59)),
        ("00:00-23:59:59", set(range(7)), time(0), time(23, 59, 59)),
    ],
)
def test_parse_accepts(text, days, start, end):
    assert parse_window(text) == CallWindow(frozenset(days), start, end)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "garbage",
        "09:00",
        "09:00-",
        "-20:00",
        "9-20",
        "09.00-20.00",
        "20:00-09:00",
        "09:00-09:00",
        "22:00-02:00",
        "24:00-25:00",
        "09:00-24:00",
        "09:60-10:00",
        "09:00:60-10:00",
        "Mo 09:00-10:00",
        "Monday 09:00-10:00",
        "Mon,,Fri 09:00-10:00",
        "Mon-Fri-Sat 09:00-10:00",
        "daily,Mon 09:00-10:00",
        "09:00-20:00 Mon",
        "Mon-Fri09:00-20:00",
        "Mon-Fri 09:00-20:00.5",
        "\u0660\u0669:00-20:00",
    ],
)
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="call window"):
        parse_window(text)


def test_default_window_is_nine_to_eight_every_day():
    assert DEFAULT_WINDOW == CallWindow(frozenset(range(7)), time(9), time(20))
    assert str(DEFAULT_WINDOW) == "daily 09:00-20:00"


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("Mon-Fri 09:00-20:00", "Mon-Fri 09:00-20:00"),
        ("Fri,Wed,Mon 08:30-17:00", "Mon,Wed,Fri 08:30-17:00"),
        ("Sun,Sat,Mon 10:00-14:00", "Sat-Mon 10:00-14:00"),
        ("Sat,Sun 10:00:05-14:00", "Sat,Sun 10:00:05-14:00"),
    ],
)
def test_str_is_canonical(text, canonical):
    assert str(parse_window(text)) == canonical


@pytest.mark.parametrize(
    "days, start, end",
    [
        (frozenset(), time(9), time(20)),
        (frozenset({7}), time(9), time(20)),
        (frozenset({0}), time(20), time(9)),
        (frozenset({0}), time(9, 0, 0, 1), time(20)),
        (frozenset({0}), time(9, tzinfo=UTC), time(20)),
    ],
)
def test_window_rejects_what_parse_could_not_write(days, start, end):
    with pytest.raises(ValueError):
        CallWindow(days, start, end)


@given(st.text(max_size=40))
def test_parse_raises_only_value_error(text):
    try:
        parse_window(text)
    except ValueError:
        pass


# Patient zones


def test_zone_for_valid_name():
    assert zone_for("America/New_York") == (NEW_YORK, True)
    assert zone_for(" Europe/London\n") == (LONDON, True)
    assert zone_for("UTC") == (ZoneInfo("UTC"), True)


@pytest.mark.parametrize(
    "name",
    [
        None,
        "",
        "   ",
        "Mars/Olympus_Mons",
        "america/new_york",
        "America",
        "America/",
        "../etc/passwd",
        "/etc/localtime",
        "/usr/share/zoneinfo/UTC",
        "America/../Europe/London",
        "zone.tab",
        "tzdata.zi",
        "localtime",
        "a\x00b",
        "\ud800",
        "x" * 5000,
        "a/" * 3000,
        ".",
    ],
)
def test_zone_for_bad_name_falls_back_to_utc(name):
    assert zone_for(name) == (ZoneInfo("UTC"), False)


@given(st.text())
def test_zone_for_never_raises(name):
    zone, valid = zone_for(name)
    assert isinstance(zone, ZoneInfo)
    assert valid == (zone.key == name.strip())


def test_invalid_zone_falls_back_to_utc_hours():
    zone, valid = zone_for("Not/A_Zone")
    assert not valid
    assert next_opening(utc("2024-06-05T03:00"), zone, DEFAULT_WINDOW) == utc("2024-06-05T09:00")


# Openings, by example


def test_new_york_at_three_opens_at_nine_that_day():
    opening = next_opening(local(NEW_YORK, "2024-06-05T03:00"), NEW_YORK, DEFAULT_WINDOW)
    assert opening == local(NEW_YORK, "2024-06-05T09:00")
    assert opening.utcoffset() == timedelta(0)


def test_open_now_gives_none():
    assert next_opening(local(NEW_YORK, "2024-06-05T09:00"), NEW_YORK, DEFAULT_WINDOW) is None
    assert (
        next_opening(local(NEW_YORK, "2024-06-05T19:59:59.999999"), NEW_YORK, DEFAULT_WINDOW)
        is None
    )


def test_end_is_excluded():
    at = local(NEW_YORK, "2024-06-05T20:00")
    assert not is_open(at, NEW_YORK, DEFAULT_WINDOW)
    assert next_opening(at, NEW_YORK, DEFAULT_WINDOW) == local(NEW_YORK, "2024-06-06T09:00")


def test_friday_evening_waits_for_monday():
    weekdays = parse_window("Mon-Fri 09:00-20:00")
    at = local(NEW_YORK, "2024-06-07T20:30")  # a Friday
    assert next_opening(at, NEW_YORK, weekdays) == local(NEW_YORK, "2024-06-10T09:00")


def test_weekday_is_the_patients_local_one():
    tokyo = ZoneInfo("Asia/Tokyo")
    weekdays = parse_window("Mon-Fri 08:00-20:00")
    monday_morning = local(tokyo, "2024-06-10T08:30")  # still Sunday in UTC
    assert monday_morning.astimezone(UTC).weekday() == 6
    assert is_open(monday_morning, tokyo, weekdays)
    assert is_open(monday_morning.astimezone(UTC), tokyo, weekdays)


def test_naive_datetime_is_refused():
    with pytest.raises(ValueError, match="aware"):
        is_open(datetime(2024, 6, 5, 9), NEW_YORK, DEFAULT_WINDOW)
    with pytest.raises(ValueError, match="aware"):
        next_opening(datetime(2024, 6, 5, 9), NEW_YORK, DEFAULT_WINDOW)


# 2024-03-10: New York's clocks go from 02:00 EST to 03:00 EDT (07:00 UTC).
def test_us_spring_forward_start_in_gap_opens_at_gap_end():
    window = parse_window("02:30-05:00")
    at = local(NEW_YORK, "2024-03-10T01:00")
    assert next_opening(at, NEW_YORK, window) == utc("2024-03-10T07:00")


def test_us_spring_forward_window_wholly_in_gap_waits_a_day():
    window = parse_window("02:00-02:45")
    at = local(NEW_YORK, "2024-03-10T01:00")
    assert next_opening(at, NEW_YORK, window) == local(NEW_YORK, "2024-03-11T02:00")


def test_us_spring_forward_window_ending_at_gap_end_waits_a_day():
    window = parse_window("02:00-03:00")
    at = local(NEW_YORK, "2024-03-10T01:00")
    assert next_opening(at, NEW_YORK, window) == local(NEW_YORK, "2024-03-11T02:00")


def test_us_spring_forward_swallowing_a_sunday_only_window_waits_a_week():
    # 02:59:59-03:00:00 on 1990-04-01 was skipped (02:00 EST -> 03:00 EDT): next Sunday, 8 days on.
    window = CallWindow(frozenset({6}), time(2, 59, 59), time(3))
    opening = next_opening(utc("1990-03-31T06:59:58"), NEW_YORK, window)
    assert opening == local(NEW_YORK, "1990-04-08T02:59:59")
    assert opening == utc("1990-04-08T06:59:59")


def test_skipped_wall_time_stands_for_the_instant_it_names():
    # 02:30 on 2024-03-10 never showed on New York clocks; as an aware datetime it names
    # 07:30 UTC (its EST offset), which the clocks showed as 03:30 EDT.
    window = parse_window("02:00-03:00")
    skipped = local(NEW_YORK, "2024-03-10T02:30")
    assert not is_open(skipped, NEW_YORK, window)
    assert next_opening(skipped, NEW_YORK, window) == local(NEW_YORK, "2024-03-11T02:00")


# 2024-11-03: New York's clocks go from 02:00 EDT back to 01:00 EST (06:00 UTC).
def test_us_fall_back_ambiguous_start_opens_at_first_occurrence():
    window = parse_window("01:30-05:00")
    at = local(NEW_YORK, "2024-11-03T00:00")
    assert next_opening(at, NEW_YORK, window) == utc("2024-11-03T05:30")


def test_us_fall_back_reopens_when_clock_jumps_back_into_window():
    # Closed at 01:50 EDT; at 02:00 EDT the clock reads 01:00 EST, inside again.
    window = parse_window("00:30-01:30")
    at = local(NEW_YORK, "2024-11-03T01:50")
    assert next_opening(at, NEW_YORK, window) == utc("2024-11-03T06:00")


def test_us_fall_back_second_occurrence_of_start_after_first_pass():
    window = parse_window("01:30-01:45")
    at = local(NEW_YORK, "2024-11-03T01:50", fold=0)
    opening = next_opening(at, NEW_YORK, window)
    assert opening == utc("2024-11-03T06:30")
    assert opening.astimezone(NEW_YORK).fold == 1  # 01:30 EST, the second 01:30


# 2024-03-31: London goes from 01:00 GMT to 02:00 BST; 2024-10-27 back from 02:00 to 01:00.
def test_london_spring_forward_start_in_gap():
    window = parse_window("01:30-05:00")
    at = local(LONDON, "2024-03-31T00:00")
    assert next_opening(at, LONDON, window) == utc("2024-03-31T01:00")


def test_london_fall_back_ambiguous_start():
    window = parse_window("01:30-05:00")
    at = local(LONDON, "2024-10-27T00:00")
    assert next_opening(at, LONDON, window) == utc("2024-10-27T00:30")


# Lord Howe moves by 30 minutes: 02:00 -> 02:30 on 2024-10-06, 02:00 -> 01:30 on 2024-04-07.
def test_lord_howe_half_hour_gap():
    window = parse_window("02:10-05:00")
    at = local(LORD_HOWE, "2024-10-06T00:00")
    opening = next_opening(at, LORD_HOWE, window)
    assert opening == utc("2024-10-05T15:30")
    assert opening.astimezone(LORD_HOWE).time() == time(2, 30)


def test_lord_howe_half_hour_overlap():
    window = parse_window("01:45-05:00")
    at = local(LORD_HOWE, "2024-04-07T00:00")
    assert next_opening(at, LORD_HOWE, window) == utc("2024-04-06T14:45")  # 01:45 at +11


# Samoa skipped Friday 2011-12-30: Thursday 23:59:59 -10 was followed by Saturday 00:00 +14.
def test_apia_skipped_friday_goes_to_monday():
    weekdays = parse_window("Mon-Fri 09:00-20:00")
    at = local(APIA, "2011-12-29T21:00")
    assert next_opening(at, APIA, weekdays) == local(APIA, "2012-01-02T09:00")


def test_apia_friday_only_window_waits_two_weeks():
    fridays = parse_window("Fri 09:00-20:00")
    at = local(APIA, "2011-12-23T21:00")
    assert next_opening(at, APIA, fridays) == local(APIA, "2012-01-06T09:00")


def test_apia_daily_window_opens_saturday():
    at = local(APIA, "2011-12-29T21:00")
    assert next_opening(at, APIA, DEFAULT_WINDOW) == local(APIA, "2011-12-31T09:00")


# Openings, as properties


@functools.cache
def offset_changes(key: str, year: int) -> tuple[datetime, ...]:
    """Instants in the UTC year at which the zone's offset changes (a daily scan, then bisection:
    the zones here never change their offset twice within a day)."""
    zone = ZoneInfo(key)
    step = timedelta(days=1)
    found = []
    t = datetime(year, 1, 1, tzinfo=UTC)
    before = t.astimezone(zone).utcoffset()
    while t.year == year:
        after = (t + step).astimezone(zone).utcoffset()
        if after != before:
            low, high = 0, int(step.total_seconds())
            while high - low > 1:
                middle = (low + high) // 2
                if (t + timedelta(seconds=middle)).astimezone(zone).utcoffset() == before:
                    low = middle
                else:
                    high = middle
            found.append(t + timedelta(seconds=high))
        t, before = t + step, after
    return tuple(found)


clock_times = st.builds(
    time,
    st.integers(0, 23),
    st.sampled_from([0, 1, 15, 29, 30, 45, 59]),
    st.sampled_from([0, 0, 0, 1, 59]),
)


# Strategies are built once, here: a composite that builds its own on every draw spends most of
# a property's time validating them.
window_days = st.one_of(
    st.just(frozenset(range(7))),
    st.just(frozenset(range(5))),
    st.frozensets(st.integers(0, 6), min_size=1),
)
window_lengths = st.one_of(
    st.sampled_from([1, 60, 1800, 3600, 5400, 7200, 11 * 3600]), st.integers(1, 86399)
)


@st.composite
def windows(draw, start: time | None = None) -> CallWindow:
    days = draw(window_days)
    if start is None:
        start = draw(clock_times)
    length = draw(window_lengths)
    end_moment = datetime.combine(datetime(2000, 1, 1), start) + timedelta(seconds=length)
    end = end_moment.time() if end_moment.day == 1 else time(23, 59, 59)
    if end <= start:
        start, end = time(0), time(23, 59, 59)
    return CallWindow(days, start, end)


# Where to put a time relative to a clock change, in units of the jump: before the gap or
# overlap, on its edges, inside it, after it.
JUMP_SHARES = [-1.5, -1, -0.5, 0, 0.25, 0.5, 1, 1.5, 2]
NUDGES = [timedelta(seconds=s) for s in (0, 0, 0, -1, 1, -60, 60, -3600, 3600)]
zones = st.sampled_from(ZONES)
years = st.sampled_from(range(1990, 2061))
micro_parts = st.sampled_from([0, 0, 1, 500_000, 999_999])
where = st.sampled_from(["anywhere", "change", "change", "change"])
year_seconds = st.integers(0, 365 * 86400)
jump_shares = st.sampled_from(JUMP_SHARES)
nudges = st.sampled_from(NUDGES)
aheads = st.sampled_from([-86400, -21600, -7200, -3600, -1800, -1, 0, 1, 1800, 7200])
jitters = st.integers(-900, 900)
folds = st.sampled_from([0, 1])


@st.composite
def cases(draw) -> tuple[datetime, ZoneInfo, CallWindow]:
    """An instant, a zone and a window, mostly placed around one of the zone's clock changes."""
    zone = ZoneInfo(draw(zones))
    year = draw(years)
    micros = timedelta(microseconds=draw(micro_parts))
    # The caller's instant may come in any zone; only the instant matters.
    shown_in = draw(st.sampled_from([UTC, zone, NEW_YORK]))
    changes = offset_changes(zone.key, year)
    if not changes or draw(where) != "change":
        seconds = draw(year_seconds)
        at = datetime(year, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)
        return (at + micros).astimezone(shown_in), zone, draw(windows())

    change = draw(st.sampled_from(changes))
    old = (change - timedelta(seconds=1)).astimezone(zone).utcoffset()
    jump = change.astimezone(zone).utcoffset() - old
    # The old clock's reading at the change: a spring-forward gap or a fall-back overlap
    # spans `jump` from here.
    wall = change.replace(tzinfo=None) + old
    start = wall + jump * draw(jump_shares) + draw(nudges)
    window = draw(windows(start=start.time()))
    if draw(st.booleans()):
        ahead = draw(aheads)
        at = change + timedelta(seconds=ahead + draw(jitters)) + micros
        return at.astimezone(shown_in), zone, window
    # A wall time near the change, possibly one the clocks skipped or repeated: an aware
    # datetime stands for the instant its utcoffset() gives.
    near = wall + jump * draw(jump_shares) + draw(nudges)
    return (near + micros).replace(tzinfo=zone, fold=draw(folds)), zone, window


def swallowed_by_a_gap(day: date, zone: ZoneInfo, window: CallWindow) -> bool:
    """Whether the clocks skipped every wall time of the window on the local date `day`."""

    def skipped(wall: datetime) -> bool:
        # A skipped wall time does not survive the round trip through UTC.
        return (
            wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall
        )

    start = datetime.combine(day, window.start)
    return skipped(start) and skipped(datetime.combine(day, window.end) - timedelta(microseconds=1))


def longest_wait(at: datetime, zone: ZoneInfo, window: CallWindow) -> timedelta:
    """An upper bound on the wait for an opening: a week and a day (offset changes included),
    two weeks and a day when an allowed day within that week's reach lost the whole window to a
    clock change or the zone skipped a date."""
    today = at.astimezone(zone).date()
    lost = any(
        (today + timedelta(days=ahead)).weekday() in window.days
        and swallowed_by_a_gap(today + timedelta(days=ahead), zone, window)
        for ahead in range(9)
    )
    return timedelta(days=15 if lost or zone.key in SKIPPED_A_DAY else 8)


def probes(at: datetime, opening: datetime, zone: ZoneInfo, window: CallWindow):
    """Instants strictly between `at` and `opening` where an opening could hide."""
    at = at.astimezone(UTC)
    # A coarse grid: the openings themselves are probed below (each day's window start, both
    # folds, and every offset change), where an earlier opening would have to be.
    t = at + timedelta(minutes=30)
    while t < opening:
        yield t
        t += timedelta(minutes=30)
    first = at.astimezone(zone).date() - timedelta(days=1)
    for ahead in range((opening.astimezone(zone).date() - first).days + 2):
        for fold in (0, 1):
            wall = datetime.combine(first + timedelta(days=ahead), window.start)
            yield wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
    for year in range(at.year, opening.year + 1):
        for change in offset_changes(zone.key, year):
            yield change
            yield change - timedelta(seconds=1)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
# A Sunday-only window wholly inside New York's 1990 spring-forward gap: the opening is 8 days on.
@example(
    (
        datetime(1990, 3, 31, 6, 59, 58, tzinfo=UTC),
        NEW_YORK,
        CallWindow(frozenset({6}), time(2, 59, 59), time(3)),
    )
)
def test_next_opening_is_the_first_open_instant(case):
    at, zone, window = case
    opening = next_opening(at, zone, window)
    assert (opening is None) == is_open(at, zone, window)
    if opening is None:
        return
    assert opening.tzinfo is UTC
    assert opening > at
    assert is_open(opening, zone, window)
    for before in (opening - timedelta(seconds=1), opening - timedelta(microseconds=1)):
        assert before <= at or not is_open(before, zone, window)
    assert opening - at <= longest_wait(at, zone, window)
    for probe in probes(at, opening, zone, window):
        if at < probe < opening:
            assert not is_open(probe, zone, window), probe


@settings(max_examples=500, deadline=None)
@given(cases(), st.floats(0, 1))
def test_next_opening_is_the_same_from_any_closed_instant_before_it(case, share):
    at, zone, window = case
    opening = next_opening(at, zone, window)
    if opening is None:
        return
    later = at.astimezone(UTC) + (opening - at) * share
    if later < opening:
        assert next_opening(later, zone, window) == opening


@given(windows())
def test_str_round_trips(window):
    assert parse_window(str(window)) == window

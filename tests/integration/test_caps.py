"""The per-patient caps (47 CFR 64.1200(a)(9)(iv)) as the SQL claim applies them, against an oracle.

`patient_next_call_at` is the one place the caps are computed; the claim calls it inside the
patient's lock. Properties over random call histories, zones and instants: the moment it gives
is allowed, nothing earlier is, and a call there keeps both caps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

# Zones with daylight-saving changes at odd hours and offsets, and one without any.
ZONES = [
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
    "America/Phoenix",
    "Pacific/Honolulu",
    "America/Anchorage",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Europe/London",
    "UTC",
]
START = datetime(2024, 1, 1, tzinfo=UTC)
SPAN = timedelta(days=3 * 365)


@pytest.fixture(scope="module")
def sql(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:

        def next_call_at(calls, now, zone, per_day, per_week):
            return conn.execute(
                "select patient_next_call_at(%s::timestamptz[], %s, %s, %s, %s)",
                (calls, now, zone, per_day, per_week),
            ).fetchone()[0]

        yield next_call_at


def allowed(calls: list[datetime], at: datetime, zone: str, per_day: int, per_week: int) -> bool:
    """The rule as the regulation reads: fewer than the cap today (patient's day) and in 7 days."""
    tz = ZoneInfo(zone)
    today = at.astimezone(tz).date()
    return (
        sum(c.astimezone(tz).date() == today for c in calls) < per_day
        and sum(c > at - timedelta(days=7) for c in calls) < per_week
    )


histories = st.builds(
    lambda now, gaps: (now, sorted(now - timedelta(seconds=g) for g in gaps)),
    st.datetimes(
        min_value=START.replace(tzinfo=None), max_value=(START + SPAN).replace(tzinfo=None)
    ).map(lambda d: d.replace(tzinfo=UTC)),
    st.lists(st.integers(min_value=0, max_value=9 * 86400), max_size=8),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    history=histories,
    zone=st.sampled_from(ZONES),
    per_day=st.integers(1, 3),
    per_week=st.integers(1, 7),
)
# A call just before a midnight that a clock change skips (Santiago springs forward at 00:00).
@example(
    history=(
        datetime(2024, 9, 8, 3, 30, tzinfo=UTC),
        [datetime(2024, 9, 8, 3, 0, tzinfo=UTC)],
    ),
    zone="America/Santiago",
    per_day=1,
    per_week=3,
)
# A day of 25 hours (New York, first Sunday of November).
@example(
    history=(
        datetime(2024, 11, 3, 5, 0, tzinfo=UTC),
        [datetime(2024, 11, 3, 4, 30, tzinfo=UTC)],
    ),
    zone="America/New_York",
    per_day=1,
    per_week=3,
)
def test_the_moment_given_is_the_earliest_allowed(sql, history, zone, per_day, per_week):
    now, calls = history
    per_week = max(per_week, per_day)
    moment = sql(calls, now, zone, per_day, per_week)
    assert moment >= now
    assert allowed(calls, moment, zone, per_day, per_week)
    if moment > now:
        assert not allowed(calls, moment - timedelta(microseconds=1), zone, per_day, per_week)
    else:
        assert allowed(calls, now, zone, per_day, per_week)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(history=histories, zone=st.sampled_from(ZONES))
def test_calling_whenever_allowed_never_breaks_a_cap(sql, history, zone):
    """Place a call at each moment the function gives: every local day and 7 days stay within."""
    now, calls = history
    calls = [c for c in calls if c < now - timedelta(days=9)]  # an empty recent past
    placed: list[datetime] = []
    at = now
    for _ in range(8):
        at = sql(calls + placed, at, zone, 1, 3)
        placed.append(at)
        at += timedelta(minutes=1)
    tz = ZoneInfo(zone)
    days = [p.astimezone(tz).date() for p in placed]
    assert len(set(days)) == len(days)  # at most one a local day
    for p in placed:
        assert sum(p - timedelta(days=7) < q <= p for q in placed) <= 3


def test_an_invalid_zone_counts_days_in_utc(sql):
    now = datetime(2025, 3, 1, 23, 30, tzinfo=UTC)
    moment = sql([now - timedelta(minutes=10)], now, "Not/AZone", 1, 3)
    assert moment == datetime(2025, 3, 2, tzinfo=UTC)
    assert sql([now - timedelta(minutes=10)], now, "'; drop table calls; --", 1, 3) == moment

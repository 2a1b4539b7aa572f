"""The form lifecycle end to end on the local stack: webhooks, cancels, moves, failures, window, burst."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import Stack, fake_vapi
from tests.support.reads import form_events, form_row


def calls_for(info, form_id) -> list[dict]:
    return fake_vapi(info, "GET", "/calls", params={"formId": form_id})


def qstash_message(info, message_id) -> dict | None:
    answer = httpx.get(
        f"{info.qstash_url}/v2/messages/{message_id}",
        headers={"Authorization": f"Bearer {info.credentials['QSTASH_TOKEN']}"},
        timeout=30,
    )
    return answer.json() if answer.status_code == 200 else None


def placed_at(call: dict) -> datetime:
    return datetime.fromisoformat(call["createdAt"].replace("Z", "+00:00"))


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("lifecycle"), qstash_time_scale=0.0001) as started:
        yield started


@pytest.fixture
def conn(info):
    with psycopg.connect(info.dsn, autocommit=True) as connection:
        yield connection


def test_created_form_is_called_at_its_deadline(info, conn):
    patient = create_patient(conn)
    deadline = datetime.now(UTC) + timedelta(seconds=2)
    form = create_form(conn, patient_id=patient, deadline=deadline)
    wait_until(lambda: form_row(conn, form)["call_status"] == "called", timeout=10)
    assert len(calls_for(info, form)) == 1
    assert placed_at(calls_for(info, form)[0]) >= deadline
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached")
    assert form_events(conn, form) == ["scheduled", "delivered", "claimed", "called", "call_ended"]


def test_submitted_early_is_never_called_and_its_message_is_cancelled(info, conn):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(seconds=2))
    message_id = wait_until(lambda: form_row(conn, form)["qstash_message_id"])
    conn.execute("update forms set submitted_at = now() where id = %s", (form,))
    wait_until(lambda: form_events(conn, form)[-1:] == ["cancelled"])
    assert qstash_message(info, message_id) is None
    time.sleep(3)  # past the deadline: nothing may arrive
    assert calls_for(info, form) == []
    assert form_events(conn, form) == ["scheduled", "cancelled"]


def test_moved_deadline_gives_one_call_at_the_new_time(info, conn):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(seconds=2))
    first = wait_until(lambda: form_row(conn, form)["qstash_message_id"])
    new_deadline = datetime.now(UTC) + timedelta(seconds=4)
    conn.execute("update forms set deadline = %s where id = %s", (new_deadline, form))
    wait_until(lambda: form_row(conn, form)["call_status"] == "called", timeout=10)
    calls = calls_for(info, form)
    assert len(calls) == 1
    assert placed_at(calls[0]) >= new_deadline
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached")
    assert form_events(conn, form) == [
        "scheduled",
        "rescheduled",
        "delivered",
        "claimed",
        "called",
        "call_ended",
    ]
    assert qstash_message(info, first) is None


def test_rejected_call_reaches_failure_callback_and_ends_failed(info, conn):
    patient = create_patient(conn, phone="+15550107777")
    fake_vapi(info, "POST", "/rules", json={"customer_number": "+15550107777", "status": 400})
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC))
    wait_until(lambda: "delivery_failed" in form_events(conn, form))
    assert form_row(conn, form)["call_status"] == "failed"
    assert form_events(conn, form) == [
        "scheduled",
        "delivered",
        "claimed",
        "failed",
        "delivery_failed",
    ]


def test_transient_failures_exhausting_retries_end_failed_through_the_callback(info, conn):
    patient = create_patient(conn, phone="+15550106666")
    # 429: refused before any call was created (a 5xx is an unknown outcome: reconciled).
    fake_vapi(info, "POST", "/rules", json={"customer_number": "+15550106666", "status": 429})
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC))
    wait_until(lambda: "delivery_failed" in form_events(conn, form), timeout=30)
    row = form_row(conn, form)
    # Five attempts (MAX_CALL_ATTEMPTS), then the form fails for good and QStash's failure
    # callback is recorded beside it.
    assert row["call_status"] == "failed"
    assert row["last_call_error"] == "gave up after 5 attempts; last error: Vapi answered HTTP 429"
    requests = fake_vapi(info, "GET", "/requests", params={"formId": form})
    assert len(requests) == 5
    assert calls_for(info, form) == []


def night_window(now: datetime, opens_in: int) -> tuple[str, str, datetime]:
    """A window opening `opens_in` seconds from now, in a fixed-offset zone on the same day."""
    for hours in range(-12, 15):
        local = now + timedelta(hours=hours)
        if 1 <= local.hour < 22:
            zone = "UTC" if hours == 0 else f"Etc/GMT{'-' if hours > 0 else '+'}{abs(hours)}"
            start = (local + timedelta(seconds=opens_in)).replace(microsecond=0)
            return f"{start:%H:%M:%S}-23:59:59", zone, start - timedelta(hours=hours)
    raise AssertionError("unreachable")


def test_due_at_night_is_called_at_the_windows_opening(tmp_path):
    now = datetime.now(UTC)
    # Far enough ahead that the stack is up and both forms are scheduled before it opens.
    window, zone, opening = night_window(now, opens_in=20)
    with (
        Stack(tmp_path, call_window=window) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        due = create_form(
            conn,
            patient_id=create_patient(conn, timezone=zone),
            deadline=datetime.now(UTC),
        )
        # Another patient's: one patient's due forms would share one call.
        missed = create_form(
            conn,
            patient_id=create_patient(conn, timezone=zone),
            silent=True,
            deadline=datetime.now(UTC) - timedelta(hours=1),
        )
        sweep = httpx.get(
            info.check_forms_url,
            timeout=30,
            headers={"Authorization": f"Bearer {info.credentials['CRON_SECRET']}"},
        )
        assert sweep.json()["enqueued"] == 2  # both are overdue; both go for the opening
        wait_until(
            lambda: all(form_row(conn, f)["call_status"] == "called" for f in (due, missed)),
            timeout=45,
        )
        for form in (due, missed):
            calls = calls_for(info, form)
            assert len(calls) == 1
            assert placed_at(calls[0]) >= opening.replace(tzinfo=UTC)
        scheduled = conn.execute(
            "select detail->>'not_before' from form_call_events"
            " where form_id = %s and event = 'scheduled'",
            (due,),
        ).fetchone()
        assert datetime.fromisoformat(scheduled[0]) == opening.replace(tzinfo=UTC)


def test_burst_of_200_against_5_lines(tmp_path):
    lines, call_seconds = 5, 0.3
    started = time.monotonic()
    # QStash's retry backoff is not what this measures: a delivery that needs a retry (a
    # transient fault on a loaded machine) comes back in seconds, not minutes.
    with (
        Stack(
            tmp_path,
            vapi_concurrency=lines,
            vapi_call_seconds=call_seconds,
            vapi_ring_seconds=0,
            qstash_time_scale=0.01,
            extra_env={"VAPI_CALLS_PER_MINUTE": str(int(lines * 60 / call_seconds))},
        ) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        deadline = datetime.now(UTC) + timedelta(seconds=3)
        with conn.transaction():
            # 200 patients: one patient's due forms would share one call.
            forms = [
                create_form(
                    conn,
                    patient_id=create_patient(conn, phone=f"+1555030{i:04d}"),
                    deadline=deadline,
                )
                for i in range(200)
            ]

        def settled() -> bool:
            return conn.execute(
                "select count(*) from forms where call_status in ('called', 'failed')"
            ).fetchone()[0] == len(forms)

        try:
            wait_until(settled, timeout=180, interval=0.5)
        except AssertionError:
            states = conn.execute("select call_status, count(*) from forms group by 1").fetchall()
            events = conn.execute(
                "select event, count(*) from form_call_events group by 1"
            ).fetchall()
            raise AssertionError(
                f"not settled: forms {states}, events {events}, Vapi {fake_vapi(info, 'GET', '/stats')}"
            ) from None
        drained = (datetime.now(UTC) - deadline).total_seconds()
        stats = fake_vapi(info, "GET", "/stats")
        per_form = conn.execute(
            "select count(*) filter (where event = 'called'),"
            " count(*) filter (where event = 'failed') from form_call_events"
        ).fetchone()
    print(
        f"\nburst: 200 forms, {lines} lines, {call_seconds}s calls: drained {drained:.1f} s"
        f" after the deadline (limit {200 * call_seconds / lines:.1f} s), placed"
        f" {stats['placed']}, blocked {stats['blocked']}, max lines {stats['max_concurrent']},"
        f" total {time.monotonic() - started:.1f} s"
    )
    assert stats["placed"] == 200
    assert stats["max_concurrent"] <= lines
    assert per_form == (200, 0)

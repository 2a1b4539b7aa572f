"""schedule-form, failure-callback and the calling window through their Lambda handlers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from formcall import clients, settings
from formcall.signatures import sign
from formcall_cli.events import http_event, webhook_headers
from formcall_dev.seed import create_form, create_patient
from tests.support.lambda_handlers import DOMAIN, call_form_event, failure_event, invoke
from tests.support.reads import form_events, form_row, qstash_message

WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"


@pytest.fixture
def hook_env(stack_env, monkeypatch):
    monkeypatch.setenv("WEBHOOK_SECRET", WEBHOOK_SECRET)
    monkeypatch.setenv("FAILURE_CALLBACK_URL", f"https://{DOMAIN}/api/jobs/failed")
    clients.reset()
    return stack_env


def webhook(
    kind: str,
    record: dict | None,
    old: dict | None = None,
    *,
    secret=WEBHOOK_SECRET,
    header="x-webhook-secret",
) -> dict:
    """A webhook signed as the trigger signs it (header="static": the old static-secret form)."""
    body = json.dumps(
        {"type": kind, "table": "forms", "schema": "public", "record": record, "old_record": old},
        default=str,
    )
    headers = {"content-type": "application/json"}
    if secret is not None and header == "static":
        headers["x-webhook-secret"] = secret
    elif secret is not None:
        headers = webhook_headers(body, secret=secret)
    return http_event(
        method="POST", path="/api/webhooks/forms", body=body, headers=headers, domain=DOMAIN
    )


def row(conn, form_id) -> dict:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in form_row(conn, form_id).items()
    }


def message(env, keys, message_id):
    return qstash_message(env["QSTASH_URL"], keys.qstash_token, message_id)


def test_insert_publishes_the_deadline_message(hook_env, conn, keys):
    patient = create_patient(conn)
    deadline = datetime.now(UTC) + timedelta(hours=2)
    form = create_form(conn, patient_id=patient, deadline=deadline)
    answer = invoke("schedule_form", webhook("INSERT", row(conn, form)))
    assert answer.status == 200 and answer.body["status"] == "scheduled"
    stored = form_row(conn, form)
    assert stored["qstash_message_id"] == answer.body["messageId"]
    queued = message(hook_env, keys, answer.body["messageId"])
    assert queued["url"] == hook_env["CALL_FORM_URL"]
    assert json.loads(queued["body"]) == {"formId": form}
    assert queued["notBefore"] // 1000 == int(deadline.timestamp()) + 1  # whole seconds, up
    assert queued["failureCallback"] == f"https://{DOMAIN}/api/jobs/failed"
    assert queued["flowControlKey"] == "formcall-vapi-calls"
    assert form_events(conn, form) == ["scheduled"]
    # The same webhook again (Supabase retries): nothing new.
    again = invoke("schedule_form", webhook("INSERT", row(conn, form)))
    assert again.body["status"] == "unchanged"
    assert form_events(conn, form) == ["scheduled"]


def test_moved_deadline_replaces_the_message(hook_env, conn, keys):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(hours=2))
    first = invoke("schedule_form", webhook("INSERT", row(conn, form))).body["messageId"]
    old = row(conn, form)
    conn.execute("update forms set deadline = deadline + interval '1 day' where id = %s", (form,))
    answer = invoke("schedule_form", webhook("UPDATE", row(conn, form), old))
    assert answer.body["status"] == "rescheduled"
    assert answer.body["messageId"] != first
    assert message(hook_env, keys, first) is None  # cancelled
    assert message(hook_env, keys, answer.body["messageId"]) is not None
    assert form_events(conn, form) == ["scheduled", "rescheduled"]


@pytest.mark.parametrize(
    "change, reason", [("submitted_at = now()", "submitted"), ("deadline = null", "no deadline")]
)
def test_submission_or_removed_deadline_cancels_the_message(hook_env, conn, keys, change, reason):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(hours=2))
    first = invoke("schedule_form", webhook("INSERT", row(conn, form))).body["messageId"]
    old = row(conn, form)
    conn.execute(f"update forms set {change} where id = %s", (form,))
    answer = invoke("schedule_form", webhook("UPDATE", row(conn, form), old))
    assert answer.body == {
        "status": "cancelled",
        "formId": form,
        "messageId": first,
        "notBefore": None,
    }
    assert message(hook_env, keys, first) is None
    assert form_row(conn, form)["qstash_message_id"] is None
    events = conn.execute(
        "select event, detail->>'reason' from form_call_events where form_id = %s order by id",
        (form,),
    ).fetchall()
    assert events == [("scheduled", None), ("cancelled", reason)]


def test_delete_cancels_the_message(hook_env, conn, keys):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(hours=2))
    first = invoke("schedule_form", webhook("INSERT", row(conn, form))).body["messageId"]
    old = row(conn, form)
    conn.execute("delete from forms where id = %s", (form,))
    answer = invoke("schedule_form", webhook("DELETE", None, old))
    assert answer.body["status"] == "cancelled"
    assert message(hook_env, keys, first) is None


def test_unrelated_update_is_ignored(hook_env, conn, keys):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=None)
    old = row(conn, form)
    conn.execute("update forms set title = 'Renamed' where id = %s", (form,))
    answer = invoke("schedule_form", webhook("UPDATE", row(conn, form), old))
    assert answer.body["status"] == "unchanged"


def test_late_night_deadline_is_scheduled_for_the_window(hook_env, conn, keys, monkeypatch):
    now = datetime.now(UTC)
    window, zone, opening = closed_window(now)
    monkeypatch.setenv("CALL_WINDOW", window)
    clients.reset()
    patient = create_patient(conn, timezone=zone)
    form = create_form(conn, patient_id=patient, deadline=now + timedelta(minutes=1))
    answer = invoke("schedule_form", webhook("INSERT", row(conn, form)))
    assert datetime.fromisoformat(answer.body["notBefore"]) == opening


@pytest.mark.parametrize(
    "kwargs", [{"secret": None}, {"secret": "wrong-secret-0123456789"}, {"header": "static"}]
)
def test_webhook_without_the_signature_is_refused(hook_env, conn, keys, kwargs):
    # The static secret itself (X-Webhook-Secret, as a plain Database Webhook sends it) is
    # refused too: only a signature proves a fresh webhook.
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC))
    answer = invoke("schedule_form", webhook("INSERT", row(conn, form), **kwargs))
    assert answer.status == 401
    assert form_row(conn, form)["qstash_message_id"] is None


@pytest.mark.parametrize(
    "body",
    [
        "nope",
        "[]",
        '{"type": "TRUNCATE", "table": "forms", "record": {"id": "x"}}',
        '{"type": "INSERT", "table": "patients", "record": {"id": "6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11"}}',
        '{"type": "INSERT", "table": "forms", "record": null}',
        '{"type": "INSERT", "table": "forms", "record": {"id": "not-a-uuid"}}',
    ],
)
def test_bad_webhooks_get_400(hook_env, body):
    event = http_event(
        method="POST",
        path="/",
        body=body,
        domain=DOMAIN,
        headers=webhook_headers(body, secret=WEBHOOK_SECRET),
    )
    assert invoke("schedule_form", event).status == 400


def test_failure_callback_fails_the_form_with_a_readable_reason(hook_env, conn, due_form, keys):
    answer = invoke("failure_callback", failure_event(keys, due_form))
    assert answer.status == 200
    assert answer.body == {"status": "recorded", "formId": due_form, "callStatus": "failed"}
    stored = form_row(conn, due_form)
    assert stored["call_status"] == "failed"
    assert stored["last_call_error"] == (
        "QStash gave up after 5 retries: last answer HTTP 503 (Vapi answered HTTP 503)"
    )
    # Idempotent: the same callback again changes nothing.
    again = invoke("failure_callback", failure_event(keys, due_form))
    assert again.status == 200
    assert form_events(conn, due_form) == ["failed"]


def test_failure_callback_leaves_a_called_form_called(hook_env, conn, due_form, keys, vapi):
    vapi.configure(hold=True)  # the call rings on: no end report lands among the events read
    invoke("call_form", call_form_event(due_form, key=keys.current_key))
    answer = invoke("failure_callback", failure_event(keys, due_form, source="msg_other"))
    assert answer.body["callStatus"] == "called"
    assert form_row(conn, due_form)["call_status"] == "called"
    assert form_events(conn, due_form)[-1] == "delivery_failed"


def test_failure_callback_needs_a_qstash_signature(hook_env, conn, due_form, keys):
    event = failure_event(keys, due_form)
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key, url=f"https://{DOMAIN}/", body=event["body"].encode()
    )
    assert invoke("failure_callback", event).status == 401
    assert form_row(conn, due_form)["call_status"] == "pending"


def test_failure_callback_with_a_foreign_body_is_400(hook_env, keys):
    body = json.dumps({"sourceBody": "!!!"})
    url = f"https://{DOMAIN}/"
    event = http_event(
        method="POST",
        path="/",
        body=body,
        domain=DOMAIN,
        headers={"upstash-signature": sign(key=keys.current_key, url=url, body=body.encode())},
    )
    assert invoke("failure_callback", event).status == 400


def closed_window(now: datetime) -> tuple[str, str, datetime]:
    """A window closed now that opens in three hours, in a fixed-offset zone where that is
    the same local day: (CALL_WINDOW, zone name, the opening as a UTC instant)."""
    for hours in range(-12, 15):
        local = now + timedelta(hours=hours)
        if 1 <= local.hour < 12:
            # Etc/GMT+N is UTC-N (the POSIX sign).
            zone = "UTC" if hours == 0 else f"Etc/GMT{'-' if hours > 0 else '+'}{abs(hours)}"
            start = (local + timedelta(hours=3)).replace(microsecond=0)
            opening = (start - timedelta(hours=hours)).replace(tzinfo=UTC)
            return f"{start:%H:%M:%S}-23:59:59", zone, opening
    raise AssertionError("some offset always puts the local time in the morning")


def test_delivery_outside_the_window_is_deferred_to_its_opening(
    hook_env, conn, keys, vapi, monkeypatch
):
    now = datetime.now(UTC)
    window, zone, opening = closed_window(now)
    monkeypatch.setenv("CALL_WINDOW", window)
    clients.reset()
    patient = create_patient(conn, timezone=zone)
    form = create_form(conn, patient_id=patient, deadline=now - timedelta(minutes=1))
    answer = invoke("call_form", call_form_event(form, key=keys.current_key))
    assert answer.status == 200
    assert answer.body["status"] == "deferred"
    until = datetime.fromisoformat(answer.body["until"])
    assert until == opening
    assert vapi.requests == []
    stored = form_row(conn, form)
    assert (stored["call_status"], stored["call_attempts"]) == ("pending", 0)
    assert form_events(conn, form) == ["deferred"]
    queued = message(hook_env, keys, stored["qstash_message_id"])
    assert queued["url"] == hook_env["CALL_FORM_URL"]  # the configured call-form URL only
    assert queued["notBefore"] // 1000 == int(until.timestamp())


def call_form_loads() -> tuple[dict[str, int], dict[str, int]]:
    """settings' load and validation counts, less call-events': the fake Vapi reports each call
    to the function server in this process."""
    return tuple(  # type: ignore[return-value]
        {k: n for k, n in counts.items() if k != "CallEventsSettings"}
        for counts in (settings.loads, settings.validations)
    )


def test_a_call_form_request_loads_its_settings_once(hook_env, conn, keys, vapi, monkeypatch):
    """The edge loads call-form's model once a request; every client is built from that one."""
    now = datetime.now(UTC)
    # A called form: the store, the Vapi client and the window.
    form = create_form(conn, patient_id=create_patient(conn), deadline=now - timedelta(minutes=1))
    clients.reset()
    assert (
        invoke("call_form", call_form_event(form, key=keys.current_key)).body["status"] == "called"
    )
    assert call_form_loads() == ({"CallFormSettings": 1}, {"CallFormSettings": 1})

    # Deferred forms: the publisher too; the second request validates nothing again.
    window, zone, _ = closed_window(now)
    monkeypatch.setenv("CALL_WINDOW", window)
    clients.reset()
    patient = create_patient(conn, timezone=zone)
    for loaded in (1, 2):
        form = create_form(conn, patient_id=patient, deadline=now - timedelta(minutes=1))
        answer = invoke("call_form", call_form_event(form, key=keys.current_key))
        assert answer.body["status"] == "deferred"
        assert call_form_loads() == ({"CallFormSettings": loaded}, {"CallFormSettings": 1})
    assert len(vapi.requests) == 1


def test_invalid_time_zone_is_treated_as_utc(hook_env, conn, keys, vapi, monkeypatch):
    now = datetime.now(UTC)
    start = now + timedelta(hours=2)
    if start.date() != now.date():  # late in the UTC day: a window that opened earlier today
        window = f"00:00-{(now - timedelta(minutes=5)):%H:%M:%S}"
        expected = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    else:
        window = f"{start:%H:%M:%S}-23:59:59"
        expected = start.replace(microsecond=0)
    monkeypatch.setenv("CALL_WINDOW", window)
    clients.reset()
    patient = create_patient(conn, timezone="Not/AZone")
    form = create_form(conn, patient_id=patient, deadline=now - timedelta(minutes=1))
    answer = invoke("call_form", call_form_event(form, key=keys.current_key))
    assert datetime.fromisoformat(answer.body["until"]) == expected


def test_sweep_enqueues_out_of_window_forms_for_the_opening(
    hook_env, conn, keys, vapi, monkeypatch
):
    now = datetime.now(UTC)
    window, zone, opening = closed_window(now)
    monkeypatch.setenv("CALL_WINDOW", window)
    clients.reset()
    patient = create_patient(conn, timezone=zone)
    form = create_form(conn, patient_id=patient, deadline=now - timedelta(hours=2))
    event = http_event(
        method="GET",
        path="/",
        domain=DOMAIN,
        headers={"authorization": f"Bearer {keys.cron_secret}"},
    )
    assert invoke("check_forms", event).body["enqueued"] == 1
    listed = httpx.get(
        f"{hook_env['QSTASH_URL']}/v2/_local/messages",
        headers={"Authorization": f"Bearer {keys.qstash_token}"},
    ).json()
    bodies = [message(hook_env, keys, m["messageId"]) for m in listed["messages"]]
    mine = [m for m in bodies if m and json.loads(m["body"]) == {"formId": form}]
    assert len(mine) == 1
    assert mine[0]["notBefore"] // 1000 == int(opening.timestamp())
    assert vapi.requests == []


def test_malformed_call_window_is_named(hook_env, conn, keys, monkeypatch, due_form):
    monkeypatch.setenv("CALL_WINDOW", "whenever")
    clients.reset()
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert (answer.status, answer.body["settings"]) == (500, ["CALL_WINDOW"])


def test_busy_lines_give_a_fresh_message_whatever_upstash_retried_says(
    hook_env, conn, keys, vapi, due_form
):
    # Upstash-Retried is not signed: a forged "last retry" must decide nothing.
    vapi.configure(concurrency_limit=0)
    answers = []
    for retried in ("0", "5"):
        event = call_form_event(due_form, key=keys.current_key)
        event["headers"]["upstash-retried"] = retried
        answers.append(invoke("call_form", event))
    assert [(a.status, a.body["status"], a.body["reason"]) for a in answers] == [
        (200, "deferred", "busy")
    ] * 2
    stored = form_row(conn, due_form)
    assert (stored["call_status"], stored["call_attempts"]) == ("pending", 0)
    queued = message(hook_env, keys, stored["qstash_message_id"])
    assert json.loads(queued["body"]) == {"formId": due_form}
    assert queued["url"] == hook_env["CALL_FORM_URL"]
    assert vapi.placed_calls() == []
    delivered = conn.execute(
        "select detail from form_call_events where form_id = %s and event = 'delivered'",
        (due_form,),
    ).fetchall()
    assert [d[0]["unverified_retried"] for d in delivered] == ["0", "5"]

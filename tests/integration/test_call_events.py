"""call-events through its Lambda handler: Vapi's server messages, authenticated, recorded, acted on.

The messages are built as Vapi's spec describes them (and checked against it); the flows run on
real Postgres, the local QStash and the fake Vapi, whose own reports reach the function server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from formcall import clients
from formcall_cli.events import http_event, webhook_headers
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.vapi.spec import validate
from tests.support.lambda_handlers import EVENTS_DOMAIN, call_form_event, invoke
from tests.support.reads import form_events, form_row, qstash_message

NOW = datetime.now(UTC)


def vapi_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def call_object(vapi_call_id: str, form_ids: list[str], **fields) -> dict:
    return {
        "id": vapi_call_id,
        "orgId": "org-1",
        "type": "outboundPhoneCall",
        "createdAt": vapi_time(NOW),
        "updatedAt": vapi_time(NOW),
        "assistantOverrides": {"metadata": {"formId": form_ids[0], "formIds": form_ids}},
        **fields,
    }


def end_of_call_report(
    vapi_call_id: str,
    form_ids: list[str],
    ended_reason: str,
    *,
    opt_out: bool = False,
    started: datetime | None = None,
) -> dict:
    started = started or datetime.now(UTC) - timedelta(seconds=40)
    ended = started + timedelta(seconds=35)
    return {
        "message": {
            "type": "end-of-call-report",
            "endedReason": ended_reason,
            "startedAt": vapi_time(started),
            "endedAt": vapi_time(ended),
            "cost": 0.12,
            "timestamp": int(ended.timestamp() * 1000),
            "artifact": {"transcript": "AI: Hello, this is the clinic. User: not now, thanks."},
            "analysis": {
                "summary": "The patient was reminded.",
                "structuredData": {"optOut": opt_out},
            },
            "call": call_object(vapi_call_id, form_ids, status="ended", endedReason=ended_reason),
        }
    }


def status_update(
    vapi_call_id: str, form_ids: list[str], status: str, ended_reason: str | None = None
) -> dict:
    message = {
        "type": "status-update",
        "status": status,
        "call": call_object(vapi_call_id, form_ids, status=status),
    }
    if ended_reason:
        message["endedReason"] = ended_reason
    return {"message": message}


def event(
    body: dict | str,
    *,
    secret: str | None = None,
    hmac_secret: str | None = None,
    stamp: str | None = None,
    headers: dict | None = None,
) -> dict:
    raw = body if isinstance(body, str) else json.dumps(body)
    sent = {"content-type": "application/json", **(headers or {})}
    if secret is not None:
        sent["x-vapi-secret"] = secret
    if hmac_secret is not None:
        stamp = stamp or str(int(time.time() * 1000))
        sent["x-timestamp"] = stamp
        sent["x-signature"] = hmac.new(
            hmac_secret.encode(), f"{stamp}.{raw}".encode(), hashlib.sha256
        ).hexdigest()
    return http_event(
        method="POST", path="/api/webhooks/vapi", body=raw, headers=sent, domain=EVENTS_DOMAIN
    )


@pytest.fixture
def rules(stack_env, vapi, monkeypatch):
    """stack_env with a follow-up an hour after a call and caps that let a test call twice.

    The fake Vapi's calls ring until a test ends them: the reports here are the test's own.
    """
    vapi.configure(hold=True)
    values = {
        # An hour: a follow-up never comes back while a test still reads the first call's record.
        "FOLLOW_UP_DELAY_SECONDS": "3600",
        "PATIENT_MAX_CALLS_PER_DAY": "5",
        "PATIENT_MAX_CALLS_PER_WEEK": "20",
        "WEBHOOK_SECRET": "w" * 32,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    clients.reset()
    return {**stack_env, **values}


def place_call(conn, keys, vapi, form_id: str) -> str:
    """Deliver the form's deadline; returns the Vapi call id the fake created."""
    answer = invoke("call_form", call_form_event(form_id, key=keys.current_key))
    assert answer.body["status"] == "called", answer.body
    return answer.body["callId"]


def report(keys, body: dict):
    assert (
        validate(
            "ServerMessageEndOfCallReport"
            if body["message"]["type"] == "end-of-call-report"
            else "ServerMessageStatusUpdate",
            body["message"],
        )
        == []
    )
    return invoke("call_events", event(body, secret=keys.vapi_webhook_secret))


def test_messages_here_are_vapis_own_shapes():
    # The builders above are checked against the spec; the check itself can fail.
    bad = end_of_call_report("c", ["f"], "customer-did-not-answer")
    bad["message"]["endedReason"] = "no-such-reason"
    assert validate("ServerMessageEndOfCallReport", bad["message"]) != []


@pytest.mark.parametrize(
    "ended_reason, outcome, status, follow_up",
    [
        ("customer-ended-call", "reached", "called", False),
        ("assistant-ended-call", "reached", "called", False),
        ("voicemail", "voicemail", "pending", True),
        ("customer-did-not-answer", "no_answer", "pending", True),
        ("customer-busy", "busy", "pending", True),
        ("twilio-failed-to-connect-call", "not_connected", "pending", True),
        ("pipeline-error-openai-llm-failed", "not_connected", "pending", True),
        ("twilio-reported-customer-misdialed", "bad_number", "failed", False),
    ],
)
def test_every_ending_class_and_its_decision(
    rules, vapi, conn, keys, ended_reason, outcome, status, follow_up
):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    answer = report(keys, end_of_call_report(vapi_call, [form], ended_reason))
    assert answer.status == 200
    assert answer.body == {
        "status": "recorded",
        "type": "end-of-call-report",
        "callId": vapi_call,
        "ended": True,
        "outcome": outcome,
        "followUps": int(follow_up),
    }
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == (status, outcome)
    call = conn.execute(
        "select status, outcome, ended_reason, started_at, ended_at, cost"
        " from calls where vapi_call_id = %s",
        (vapi_call,),
    ).fetchone()
    assert call[:3] == ("ended", outcome, ended_reason)
    assert call[3] is not None and call[4] > call[3] and float(call[5]) == 0.12
    expected = (
        ["call_ended", "follow_up_scheduled", "scheduled"]
        if follow_up
        else ["call_ended", "failed"]
        if status == "failed"
        else ["call_ended"]
    )
    assert form_events(conn, form)[-len(expected) :] == expected
    if follow_up:
        assert row["next_call_at"] == call[4] + timedelta(seconds=3600)
        queued = qstash_message(rules["QSTASH_URL"], keys.qstash_token, row["qstash_message_id"])
        assert queued is not None and json.loads(queued["body"]) == {"formId": form}
        assert queued["notBefore"] // 1000 >= int(row["next_call_at"].timestamp())
    else:
        assert row["next_call_at"] is None
    if status == "failed":
        assert row["last_call_error"] == f"bad number: {ended_reason}"


def test_no_answer_is_followed_up_until_reached(rules, vapi, conn, keys, monkeypatch):
    monkeypatch.setenv("FOLLOW_UP_DELAY_SECONDS", "1")  # the follow-up within the test
    clients.reset()
    patient = create_patient(conn, phone="+15550177001")
    form = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    first = place_call(conn, keys, vapi, form)
    report(keys, end_of_call_report(first, [form], "customer-did-not-answer"))
    # The follow-up message comes back through the local QStash a second later and calls again.
    wait_until(lambda: len(vapi.calls_for_form(form)) == 2, timeout=30)
    wait_until(lambda: form_row(conn, form)["call_status"] == "called")
    second = form_row(conn, form)["vapi_call_id"]
    assert second != first
    report(keys, end_of_call_report(second, [form], "customer-ended-call"))
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"], row["next_call_at"]) == (
        "called",
        "reached",
        None,
    )
    assert conn.execute("select count(*) from calls where outcome is not null").fetchone()[0] == 2


def test_the_last_allowed_call_ends_the_form_with_its_outcome(rules, vapi, conn, keys, monkeypatch):
    monkeypatch.setenv("MAX_CALLS_PER_FORM", "1")
    clients.reset()
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    answer = report(keys, end_of_call_report(vapi_call, [form], "customer-did-not-answer"))
    assert answer.body["followUps"] == 0
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"], row["next_call_at"]) == (
        "called",
        "no_answer",
        None,
    )
    # Done: recorded, not failed; a later delivery does not call.
    again = invoke("call_form", call_form_event(form, key=keys.current_key))
    assert again.body["reason"] == "already_called"
    assert len(vapi.requests) == 1


def test_a_form_submitted_during_the_call_is_never_called_again(rules, vapi, conn, keys):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    conn.execute("update forms set submitted_at = now() where id = %s", (form,))
    answer = report(keys, end_of_call_report(vapi_call, [form], "customer-did-not-answer"))
    assert answer.body["followUps"] == 0
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == ("called", "no_answer")


def test_duplicated_and_reordered_reports_end_in_one_record_and_one_follow_up(
    rules, vapi, conn, keys
):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    end = end_of_call_report(vapi_call, [form], "customer-busy")
    answers = [report(keys, end) for _ in range(3)]
    # A late status-update (in-progress, then ended with another reason) changes nothing.
    answers.append(report(keys, status_update(vapi_call, [form], "in-progress")))
    answers.append(report(keys, status_update(vapi_call, [form], "ended", "customer-ended-call")))
    assert [a.status for a in answers] == [200] * 5
    assert [a.body["ended"] for a in answers] == [True, False, False, False, False]
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == ("pending", "busy")
    call = conn.execute("select status, outcome, ended_reason from calls").fetchone()
    assert call == ("ended", "busy", "customer-busy")
    events = form_events(conn, form)
    assert events.count("call_ended") == 1 and events.count("follow_up_scheduled") == 1
    # One follow-up message: published once, the repeats found it recorded.
    assert events.count("scheduled") == 1 and "rescheduled" not in events, events


def test_reports_arriving_together_publish_and_record_one_follow_up(rules, vapi, conn, keys):
    # Both reports can see the follow-up unpublished and both publish it: one deduplication
    # id, so QStash keeps one message, and recording it the second time writes nothing.
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    end = end_of_call_report(vapi_call, [form], "customer-did-not-answer")
    late = status_update(vapi_call, [form], "in-progress")
    start = threading.Barrier(4)

    def send(body):
        start.wait()
        return httpx.post(
            rules["CALL_EVENTS_URL"],
            json=body,
            headers={"x-vapi-secret": keys.vapi_webhook_secret},
            timeout=30,
        )

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, [end, late, end, late]))
    assert [a.status_code for a in answers] == [200] * 4
    assert sum(a.json()["ended"] for a in answers) == 1
    events = form_events(conn, form)
    assert events.count("follow_up_scheduled") == 1
    assert events.count("scheduled") == 1 and "rescheduled" not in events, events


def test_recording_the_same_message_twice_writes_one_event(rules, conn):
    deadline = NOW + timedelta(hours=1)
    form = create_form(conn, patient_id=create_patient(conn), deadline=deadline, silent=True)
    record = "select record_form_scheduled(%s, %s, %s, %s)"
    answers = [
        conn.execute(record, (form, "msg-1", deadline, deadline)).fetchone()[0],
        conn.execute(record, (form, "msg-1", deadline, deadline)).fetchone()[0],
        conn.execute(record, (form, "msg-2", deadline, deadline)).fetchone()[0],
    ]
    assert [a["changed"] for a in answers] == [True, False, True]
    assert form_events(conn, form) == ["scheduled", "rescheduled"]


def test_progress_only_moves_forward(rules, vapi, conn, keys):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    for status in ("in-progress", "ringing", "queued"):
        assert report(keys, status_update(vapi_call, [form], status)).body["ended"] is False
    assert conn.execute("select status from calls").fetchone()[0] == "in-progress"
    assert form_row(conn, form)["call_outcome"] is None


def test_a_report_before_the_call_was_recorded_as_placed_resolves_it(rules, vapi, conn, keys):
    # call-form claimed and Vapi placed the call, but the answer was never recorded (the
    # process died): the form is 'calling' and its call row has no Vapi id yet.
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    conn.execute("select claim_form_call(%s)", (form,))
    answer = report(keys, end_of_call_report("vapi-call-77", [form], "customer-ended-call"))
    assert answer.body["status"] == "recorded" and answer.body["ended"] is True
    row = form_row(conn, form)
    assert (row["call_status"], row["vapi_call_id"], row["call_outcome"]) == (
        "called",
        "vapi-call-77",
        "reached",
    )
    assert form_events(conn, form) == ["claimed", "called", "call_ended"]


@pytest.mark.parametrize(
    "body, reason",
    [
        (
            lambda form: end_of_call_report(
                "not-ours", ["00000000-0000-0000-0000-000000000000"], "customer-ended-call"
            ),
            "unknown call",
        ),
        (
            lambda form: {"message": {"type": "conversation-update", "messages": []}},
            "not a call event formcall follows",
        ),
        (
            lambda form: {"message": {"type": "status-update", "status": "ringing"}},
            "not a call event formcall follows",
        ),
    ],
)
def test_messages_formcall_does_not_use_are_ignored(rules, vapi, conn, keys, body, reason):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    answer = invoke("call_events", event(body(form), secret=keys.vapi_webhook_secret))
    assert (answer.status, answer.body["status"], answer.body["reason"]) == (200, "ignored", reason)
    assert form_events(conn, form) == []


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "not json",
        "[]",
        '{"message": "x"}',
        '{"message": {}}',
        '{"message": {"type": 7}}',
        '{"message": {"type": "status-update", "call": {"id": "c", "startedAt": "yesterday"}}}',
    ],
)
def test_a_body_that_is_not_a_vapi_server_message_is_400(rules, conn, keys, raw):
    answer = invoke("call_events", event(raw, secret=keys.vapi_webhook_secret))
    assert answer.status == 400
    assert "Vapi server message" in answer.body["error"]


def _attacks(keys):
    return {
        "unsigned": {},
        "wrong secret": {"secret": "x" * 32},
        "secret of another setting": {"secret": keys.cron_secret},
        "hmac instead of the header": {"hmac_secret": keys.vapi_webhook_secret},
    }


@pytest.mark.parametrize(
    "attack",
    ["unsigned", "wrong secret", "secret of another setting", "hmac instead of the header"],
)
def test_unauthenticated_messages_are_refused_and_change_nothing(rules, vapi, conn, keys, attack):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    answer = invoke(
        "call_events",
        event(
            end_of_call_report(vapi_call, [form], "customer-ended-call", opt_out=True),
            **_attacks(keys)[attack],
        ),
    )
    assert (answer.status, answer.body) == (401, {"error": "unauthorized"})
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == ("called", None)
    assert conn.execute("select opted_out_at from patients").fetchone()[0] is None


@pytest.fixture
def hmac_mode(rules, monkeypatch):
    monkeypatch.setenv("VAPI_SERVER_CREDENTIAL_ID", "cred-formcall")
    clients.reset()
    return rules


def test_hmac_credential_mode_asks_vapi_to_sign(hmac_mode, vapi, conn, keys):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    place_call(conn, keys, vapi, form)
    server = vapi.requests[0].body["assistantOverrides"]["server"]
    assert server["credentialId"] == "cred-formcall" and "headers" not in server


@pytest.mark.parametrize("unit", ["milliseconds", "seconds"])
def test_hmac_signed_messages_are_accepted_in_either_unit(hmac_mode, vapi, conn, keys, unit):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    stamp = str(int(time.time() * 1000)) if unit == "milliseconds" else str(int(time.time()))
    answer = invoke(
        "call_events",
        event(
            end_of_call_report(vapi_call, [form], "customer-ended-call"),
            hmac_secret=keys.vapi_webhook_secret,
            stamp=stamp,
        ),
    )
    assert (answer.status, answer.body["outcome"]) == (200, "reached")


@pytest.mark.parametrize(
    "attack",
    [
        "expired",
        "from the future",
        "wrong key",
        "tampered body",
        "no timestamp",
        "header secret instead",
    ],
)
def test_bad_hmac_signatures_are_refused(hmac_mode, vapi, conn, keys, attack):
    form = create_form(conn, patient_id=create_patient(conn), deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, form)
    body = end_of_call_report(vapi_call, [form], "customer-ended-call", opt_out=True)
    now_ms = int(time.time() * 1000)
    kwargs = {
        "expired": {"hmac_secret": keys.vapi_webhook_secret, "stamp": str(now_ms - 301_000)},
        "from the future": {
            "hmac_secret": keys.vapi_webhook_secret,
            "stamp": str(now_ms + 301_000),
        },
        "wrong key": {"hmac_secret": "y" * 32},
        "tampered body": {"hmac_secret": keys.vapi_webhook_secret},
        "no timestamp": {"hmac_secret": keys.vapi_webhook_secret},
        "header secret instead": {"secret": keys.vapi_webhook_secret},
    }[attack]
    sent = event(body, **kwargs)
    if attack == "tampered body":
        sent["body"] = sent["body"].replace("customer-ended-call", "customer-did-not-answer")
    if attack == "no timestamp":
        del sent["headers"]["x-timestamp"]
    answer = invoke("call_events", sent)
    assert (answer.status, answer.body) == (401, {"error": "unauthorized"})
    assert form_row(conn, form)["call_outcome"] is None
    assert conn.execute("select opted_out_at from patients").fetchone()[0] is None


def test_database_unreachable_is_503_so_vapi_retries(rules, monkeypatch, keys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    clients.reset()
    answer = report(
        keys,
        end_of_call_report("c-1", ["00000000-0000-0000-0000-000000000001"], "customer-ended-call"),
    )
    assert (answer.status, answer.body) == (503, {"error": "database unavailable"})


def test_opt_out_in_the_report_stops_every_call_to_the_patient(rules, vapi, conn, keys):
    patient = create_patient(conn)
    due = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    later = create_form(conn, patient_id=patient, deadline=NOW + timedelta(hours=2))
    hook = invoke("schedule_form", _insert_webhook(conn, later))
    later_message = form_row(conn, later)["qstash_message_id"]
    assert hook.body["status"] == "scheduled" and later_message
    vapi_call = place_call(conn, keys, vapi, due)
    answer = report(keys, end_of_call_report(vapi_call, [due], "customer-ended-call", opt_out=True))
    assert answer.body["outcome"] == "reached" and answer.body["followUps"] == 0
    assert conn.execute(
        "select opted_out_at is not null from patients where id = %s", (patient,)
    ).fetchone()[0]
    for form in (due, later):
        row = form_row(conn, form)
        assert (row["call_status"], row["qstash_message_id"]) == ("opted_out", None)
        assert "opted_out" in form_events(conn, form)
    # The later form's message is cancelled; a delivery anyway does not call.
    assert qstash_message(rules["QSTASH_URL"], keys.qstash_token, later_message) is None
    conn.execute("update forms set deadline = now() - interval '1 minute' where id = %s", (later,))
    again = invoke("call_form", call_form_event(later, key=keys.current_key))
    assert (again.body["status"], again.body["reason"]) == ("skipped", "opted_out")
    assert len(vapi.requests) == 1


def test_an_opt_out_recorded_by_the_clinic_is_honoured_by_the_claim(rules, vapi, conn, keys):
    patient = create_patient(conn)
    due = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    other = create_form(conn, patient_id=patient, deadline=NOW + timedelta(hours=2))
    invoke("schedule_form", _insert_webhook(conn, other))
    other_message = form_row(conn, other)["qstash_message_id"]
    conn.execute("update patients set opted_out_at = now() where id = %s", (patient,))
    answer = invoke("call_form", call_form_event(due, key=keys.current_key))
    assert (answer.body["status"], answer.body["reason"]) == ("skipped", "opted_out")
    assert vapi.requests == []
    assert [form_row(conn, f)["call_status"] for f in (due, other)] == ["opted_out"] * 2
    assert qstash_message(rules["QSTASH_URL"], keys.qstash_token, other_message) is None


def _insert_webhook(conn, form_id):
    from tests.support.reads import form_row as read

    record = {
        k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in read(conn, form_id).items()
    }
    body = json.dumps(
        {
            "type": "INSERT",
            "table": "forms",
            "schema": "public",
            "record": record,
            "old_record": None,
        },
        default=str,
    )
    return http_event(
        method="POST",
        path="/api/webhooks/forms",
        body=body,
        headers=webhook_headers(body, secret="w" * 32),
        domain=EVENTS_DOMAIN,
    )


def test_a_lost_report_is_recorded_by_the_sweep_from_vapis_record(
    rules, vapi, conn, keys, monkeypatch
):
    # Every report of the fake's is lost (dropped).
    monkeypatch.setenv("CALL_OUTCOME_TIMEOUT_SECONDS", "0")
    clients.reset()
    vapi.configure(scripts={"+15550100044": ["no_answer"]}, report_drop_rate=1.0)
    form = create_form(
        conn,
        patient_id=create_patient(conn, phone="+15550100044"),
        deadline=NOW - timedelta(minutes=5),
    )
    vapi_call = place_call(conn, keys, vapi, form)
    wait_until(lambda: (vapi.get_call(vapi_call) or {}).get("status") == "ended")
    sweep = invoke(
        "check_forms",
        http_event(
            method="GET",
            path="/api/cron/check-forms",
            domain=EVENTS_DOMAIN,
            headers={"authorization": f"Bearer {keys.cron_secret}"},
        ),
    )
    assert sweep.body["outcomes"] == {"ended": 1, "open": 0, "unresolved": 0}
    call = conn.execute("select outcome, ended_reason, outcome_source from calls").fetchone()
    assert call == ("no_answer", "customer-did-not-answer", "lookup")
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == ("pending", "no_answer")
    assert row["qstash_message_id"]  # its follow-up is published like any other
    # A late report now changes nothing.
    late = report(keys, end_of_call_report(vapi_call, [form], "customer-did-not-answer"))
    assert late.body["ended"] is False


def test_caps_across_two_forms_defer_to_the_next_local_day(rules, vapi, conn, keys, monkeypatch):
    monkeypatch.setenv("PATIENT_MAX_CALLS_PER_DAY", "1")
    clients.reset()
    patient = create_patient(conn, timezone="America/Chicago")
    first = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=5))
    vapi_call = place_call(conn, keys, vapi, first)
    report(keys, end_of_call_report(vapi_call, [first], "customer-ended-call"))
    second = create_form(conn, patient_id=patient, deadline=NOW - timedelta(minutes=1))
    answer = invoke("call_form", call_form_event(second, key=keys.current_key))
    assert (answer.body["status"], answer.body["reason"]) == ("deferred", "patient_cap")
    until = datetime.fromisoformat(answer.body["until"])
    from zoneinfo import ZoneInfo

    local = until.astimezone(ZoneInfo("America/Chicago"))
    today = datetime.now(ZoneInfo("America/Chicago")).date()
    assert local.date() == today + timedelta(days=1) and local.time().hour == 0
    row = form_row(conn, second)
    assert row["next_call_at"] == until and row["call_status"] == "pending"
    assert "capped" in form_events(conn, second)
    assert len(vapi.requests) == 1

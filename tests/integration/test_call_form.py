"""call-form end to end through its Lambda handler: real signatures, real Postgres, fake Vapi over HTTP."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from formcall import clients, settings
from formcall.signatures import body_hash, sign
from formcall.sweep import reconcile_stale_calls
from formcall_cli.events import http_event
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from tests.support.lambda_handlers import DOMAIN, call_form_event, invoke
from tests.support.reads import form_events, form_row


def vapi_requests(vapi):
    return [r for r in vapi.requests]


def test_due_form_is_called_once_and_recorded(env, vapi, conn, due_form, keys):
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))

    assert answer.status == 200
    assert answer.body["status"] == "called"
    assert answer.body["formId"] == due_form
    calls = vapi.calls_for_form(due_form)
    assert len(calls) == 1
    assert answer.body["callId"] == calls[0]["id"]
    sent = vapi.requests[0].body
    assert sent["assistantId"] == "asst-test" and sent["phoneNumberId"] == "phone-test"
    assert sent["customer"] == {"number": "+15550100001", "name": "Ada Lovelace"}
    assert "metadata" not in sent
    overrides = sent["assistantOverrides"]
    assert overrides["metadata"] == {"formId": due_form, "formIds": [due_form]}
    assert overrides["variableValues"]["formTitle"] == "Pre-visit questionnaire"
    assert overrides["variableValues"]["formTitles"] == "Pre-visit questionnaire"
    assert overrides["variableValues"]["formCount"] == 1
    assert overrides["variableValues"]["patientName"] == "Ada Lovelace"
    assert overrides["variableValues"]["deadline"]
    # Vapi reports the call's progress and end to call-events, proving itself with the secret.
    assert overrides["server"] == {
        "url": env["CALL_EVENTS_URL"],
        "timeoutSeconds": 20,
        "backoffPlan": {"type": "exponential", "maxRetries": 5, "baseDelaySeconds": 2},
        "headers": {"X-Vapi-Secret": keys.vapi_webhook_secret},
    }
    assert set(overrides["serverMessages"]) == {"status-update", "end-of-call-report"}
    row = form_row(conn, due_form)
    assert row["call_status"] == "called" and row["call_outcome"] is None
    assert row["vapi_call_id"] == calls[0]["id"]
    assert row["call_attempts"] == 1 and row["called_at"] is not None
    assert form_events(conn, due_form) == ["delivered", "claimed", "called"]
    (call,) = conn.execute("select vapi_call_id, status, outcome, patient_id from calls").fetchall()
    assert call[0] == calls[0]["id"] and call[1] == "queued" and call[2] is None


def test_redelivery_after_call_is_skipped(env, vapi, conn, due_form, keys):
    invoke("call_form", call_form_event(due_form, key=keys.current_key))
    again = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert (again.status, again.body["status"], again.body["reason"]) == (
        200,
        "skipped",
        "already_called",
    )
    assert len(vapi.requests) == 1


@pytest.mark.parametrize(
    "case, reason",
    [
        ("submitted", "submitted"),
        ("not_due", "not_due"),
        ("no_deadline", "no_deadline"),
        ("in_progress", "in_progress"),
    ],
)
def test_forms_that_must_not_be_called_are_skipped(env, vapi, conn, keys, case, reason):
    patient = create_patient(conn)
    now = datetime.now(UTC)
    deadline = {"not_due": now + timedelta(hours=1), "no_deadline": None}.get(
        case, now - timedelta(1)
    )
    form = create_form(
        conn,
        patient_id=patient,
        deadline=deadline,
        submitted_at=now - timedelta(hours=2) if case == "submitted" else None,
    )
    if case == "in_progress":
        conn.execute(
            "update forms set call_status = 'calling', claimed_at = now() where id = %s", (form,)
        )
    answer = invoke("call_form", call_form_event(form, key=keys.current_key))
    assert answer.status == 200
    assert answer.body == {"status": "skipped", "formId": form, "reason": reason}
    assert vapi.requests == []
    assert form_row(conn, form)["call_attempts"] == 0


def test_delivery_just_before_the_deadline_comes_back_at_the_deadline(env, vapi, conn, keys):
    # QStash's not-before is whole seconds and clocks differ: early by a little is not "not due".
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) + timedelta(seconds=3))
    answer = invoke("call_form", call_form_event(form, key=keys.current_key))
    assert answer.status == 503
    assert 3 <= int(answer.headers["retry-after"]) <= 5
    assert answer.body == {"error": "form not due yet", "formId": form}
    assert vapi.requests == []
    assert form_row(conn, form)["call_attempts"] == 0


def test_next_signing_key_is_accepted(env, vapi, due_form, keys):
    answer = invoke("call_form", call_form_event(due_form, key=keys.next_key))
    assert answer.status == 200 and answer.body["status"] == "called"


def test_design_path_through_http_api(env, vapi, due_form, keys):
    event = call_form_event(due_form, key=keys.current_key, path="/api/jobs/call-form")
    assert invoke("call_form", event).body["status"] == "called"


def test_base64_body_is_decoded_before_the_hash(env, vapi, due_form, keys):
    event = call_form_event(due_form, key=keys.current_key, base64_body=True)
    assert event["isBase64Encoded"] is True
    assert invoke("call_form", event).body["status"] == "called"


def _tampered(event, keys, due_form):
    event["body"] = json.dumps({"formId": due_form, "x": 1})
    return event


def _expired(event, keys, due_form):
    body = event["body"].encode()
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key, url=f"https://{DOMAIN}/", body=body, now=time.time() - 600
    )
    return event


def _wrong_subject(event, keys, due_form):
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key,
        url=f"https://{DOMAIN}/api/cron/check-forms",
        body=event["body"].encode(),
    )
    return event


def _wrong_issuer(event, keys, due_form):
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key, url=f"https://{DOMAIN}/", body=event["body"].encode(), iss="Someone"
    )
    return event


def _wrong_key(event, keys, due_form):
    event["headers"]["upstash-signature"] = sign(
        key="sig_" + "x" * 28, url=f"https://{DOMAIN}/", body=event["body"].encode()
    )
    return event


def _missing(event, keys, due_form):
    del event["headers"]["upstash-signature"]
    return event


def _alg_none(event, keys, due_form):
    claims = {
        "iss": "Upstash",
        "sub": f"https://{DOMAIN}/",
        "exp": int(time.time()) + 300,
        "nbf": 0,
        "iat": int(time.time()),
        "body": body_hash(event["body"].encode()),
    }
    event["headers"]["upstash-signature"] = jwt.encode(claims, None, algorithm="none")
    return event


def _hs512(event, keys, due_form):
    claims = {
        "iss": "Upstash",
        "sub": f"https://{DOMAIN}/",
        "exp": int(time.time()) + 300,
        "nbf": 0,
        "iat": int(time.time()),
        "body": body_hash(event["body"].encode()),
    }
    event["headers"]["upstash-signature"] = jwt.encode(
        claims, keys.current_key.encode() * 2, algorithm="HS512"
    )
    return event


def _not_yet_valid(event, keys, due_form):
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key,
        url=f"https://{DOMAIN}/",
        body=event["body"].encode(),
        nbf=int(time.time()) + 600,
    )
    return event


def _two_headers(event, keys, due_form):
    # API Gateway and Function URLs join repeated headers with commas.
    token = event["headers"]["upstash-signature"]
    event["headers"]["upstash-signature"] = f"{token},{token}"
    return event


@pytest.mark.parametrize(
    "attack",
    [
        _tampered,
        _expired,
        _wrong_subject,
        _wrong_issuer,
        _wrong_key,
        _missing,
        _alg_none,
        _hs512,
        _not_yet_valid,
        _two_headers,
    ],
)
def test_bad_signatures_are_refused_and_change_nothing(env, vapi, conn, due_form, keys, attack):
    event = attack(call_form_event(due_form, key=keys.current_key), keys, due_form)
    answer = invoke("call_form", event)
    assert answer.status == 401
    assert answer.body == {"error": "invalid signature"}
    assert vapi.requests == []
    assert form_row(conn, due_form)["call_status"] == "pending"
    assert form_events(conn, due_form) == []


@pytest.mark.parametrize(
    "body, message",
    [
        ("not json", 'body must be JSON like {"formId": "<uuid>"}'),
        ('{"formId": "not-a-uuid"}', "formId must be a UUID"),
        ('{"formId": 42}', "formId must be a UUID"),
        ("{}", "formId is required"),
        ("[1]", "body must be a JSON object"),
        ("", 'body must be JSON like {"formId": "<uuid>"}'),
    ],
)
def test_bad_bodies_get_400(env, vapi, conn, due_form, keys, body, message):
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key, body=body))
    assert (answer.status, answer.body) == (400, {"error": message})
    assert vapi.requests == []
    assert form_row(conn, due_form)["call_status"] == "pending"


def test_other_methods_get_405(env, vapi, keys):
    answer = invoke("call_form", http_event(method="GET", path="/", domain=DOMAIN))
    assert (answer.status, answer.body) == (405, {"error": "Method Not Allowed"})
    assert answer.headers["allow"] == "POST"


def test_oversized_body_is_refused(env, vapi, due_form, keys):
    body = json.dumps({"formId": due_form, "pad": "x" * 70_000})
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key, body=body))
    assert answer.status == 413


def test_unknown_form_is_permanent(env, vapi, keys):
    answer = invoke(
        "call_form", call_form_event("6f1c1b9e-2a53-4c1e-9d55-0a5b3f7f2c11", key=keys.current_key)
    )
    assert answer.status == 489
    assert answer.headers["upstash-nonretryable-error"] == "true"
    assert answer.body["error"] == "unknown form"
    assert vapi.requests == []


def test_vapi_rejection_is_recorded_and_permanent(env, vapi, conn, due_form, keys, capsys):
    # A provider's error can quote the number dialled and the patient's name.
    vapi.add_rule(
        form_id=due_form,
        status=400,
        body={
            "message": ["customer.number +15550100001 (Ada Lovelace) is not reachable"],
            "error": "Bad Request",
            "statusCode": 400,
        },
    )
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.status == 489
    assert answer.headers["upstash-nonretryable-error"] == "true"
    assert answer.body == {"error": "Vapi rejected the call: HTTP 400", "formId": due_form}
    row = form_row(conn, due_form)
    assert row["call_status"] == "failed"
    assert row["last_call_error"] == (
        "HTTP 400: customer.number [number] ([name]) is not reachable"
    )
    assert form_events(conn, due_form) == ["delivered", "claimed", "failed"]
    again = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert again.body["reason"] == "already_failed"
    assert len(vapi.requests) == 1
    # No call was placed: the caps do not count it.
    assert conn.execute("select count(*) from calls").fetchone()[0] == 0
    logged = capsys.readouterr().out
    assert "5550100001" not in logged and "Lovelace" not in logged


def test_rate_limited_vapi_then_retry_calls_once(env, vapi, conn, due_form, keys):
    # 429 is a refusal before anything was created: released, QStash retries.
    vapi.add_rule(form_id=due_form, status=429, times=1, headers={"Retry-After": "7"})
    first = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert first.status == 503 and first.headers["retry-after"] == "7"
    row = form_row(conn, due_form)
    assert row["call_status"] == "pending"
    assert row["last_call_error"] == "Vapi answered HTTP 429"

    retry = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert retry.status == 200 and retry.body["status"] == "called"
    assert len(vapi.calls_for_form(due_form)) == 1
    assert form_row(conn, due_form)["call_attempts"] == 2
    assert form_events(conn, due_form) == [
        "delivered",
        "claimed",
        "released",
        "delivered",
        "claimed",
        "called",
    ]


def _lease_over(conn):
    """As if the claim's lease (CLAIM_LEASE_SECONDS) had passed."""
    conn.execute(
        "update calls set created_at = created_at - interval '2 minutes' where vapi_call_id is null"
    )


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest.mark.parametrize("created", [True, False], ids=["call-created", "no-call"])
def test_a_vapi_5xx_never_places_a_second_call(
    stack_env, vapi, conn, due_form, keys, status, created
):
    # Vapi's spec: a 5xx is a failure after validation; the call may exist. (Its reports are
    # lost here, so Vapi's call list must settle the claim; a report would settle it at once.)
    vapi.configure(hold=True, report_drop_rate=1.0)
    vapi.add_rule(form_id=due_form, status=status, times=1, place=created)
    first = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert (first.status, first.body["status"]) == (202, "unknown")
    row = form_row(conn, due_form)
    assert row["call_status"] == "calling"
    assert row["last_call_error"] == f"outcome unknown: Vapi answered HTTP {status}"
    # A reconcile message is queued for when the claim's lease is over.
    assert conn.execute("select count(*) from calls where vapi_call_id is null").fetchone()[0] == 1

    # Within the lease a delivery is told to come back (it never calls).
    early = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert early.status == 503 and int(early.headers["retry-after"]) >= 1
    assert len(vapi.requests) == 1

    # After it, Vapi's list decides: the call exists -> recorded; none -> released and called.
    _lease_over(conn)
    later = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert later.status == 200
    placed = vapi.placed_calls()
    assert len(placed) == 1  # never a second call
    row = form_row(conn, due_form)
    assert (row["call_status"], row["vapi_call_id"]) == ("called", placed[0]["id"])
    if created:
        assert (later.body["status"], later.body["reason"]) == ("skipped", "already_called")
        assert len(vapi.requests) == 1
    else:
        assert later.body["status"] == "called" and len(vapi.requests) == 2


def test_concurrency_blocked_call_comes_back_in_a_fresh_message(
    stack_env, vapi, conn, due_form, keys
):
    # Whatever the (unsigned) Upstash-Retried header says, a busy line never uses up QStash's
    # retries: the delivery is answered "deferred" and a new message comes back in seconds.
    vapi.configure(concurrency_limit=0)
    event = call_form_event(due_form, key=keys.current_key)
    event["headers"]["upstash-retried"] = "0"
    answer = invoke("call_form", event)
    assert answer.status == 200
    assert answer.body["status"] == "deferred" and answer.body["reason"] == "busy"
    row = form_row(conn, due_form)
    assert row["call_status"] == "pending"
    assert row["call_attempts"] == 0  # a blocked call is not the form's attempt
    assert row["qstash_message_id"]
    assert vapi.calls_for_form(due_form) == []
    assert conn.execute("select count(*) from calls").fetchone()[0] == 0
    vapi.configure(concurrency_limit=10)
    # The fresh message is delivered by the local QStash a few seconds later and calls once.
    wait_until(lambda: form_row(conn, due_form)["call_status"] == "called", timeout=30)
    assert len(vapi.calls_for_form(due_form)) == 1


def test_database_unreachable_is_transient(env, vapi, monkeypatch, due_form, keys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    clients.reset()
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.status == 503
    assert answer.body == {"error": "database unavailable"}
    assert vapi.requests == []


def test_missing_setting_is_named_and_changes_nothing(env, vapi, monkeypatch, conn, due_form, keys):
    monkeypatch.delenv("VAPI_PRIVATE_KEY")
    clients.reset()
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.status == 500
    assert answer.body["settings"] == ["VAPI_PRIVATE_KEY"]
    assert "VAPI_PRIVATE_KEY" in answer.body["error"]
    assert form_row(conn, due_form)["call_status"] == "pending"


def test_malformed_setting_is_named(env, vapi, monkeypatch, due_form, keys):
    monkeypatch.setenv("VAPI_BASE_URL", "not a url")
    clients.reset()
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert (answer.status, answer.body["settings"]) == (500, ["VAPI_BASE_URL"])


@pytest.mark.parametrize("fault", [{"delay": 4.0}, {"drop": True}])
def test_unknown_outcome_is_never_retried_blindly(env, vapi, conn, due_form, keys, fault):
    vapi.add_rule(form_id=due_form, times=1, **fault)
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.status == 202
    assert answer.body["status"] == "unknown"
    row = form_row(conn, due_form)
    assert row["call_status"] == "calling"
    assert row["last_call_error"].startswith("outcome unknown")

    # QStash's retry (or a duplicate) cannot claim it again: it is told to come back later.
    again = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert again.status == 503 and again.body["error"] == "call outcome not known yet"
    placed = vapi.calls_for_form(due_form)
    assert len(placed) == 1

    # Once the claim is stale the sweep finds the call in Vapi's list and records it.
    config = settings.load(settings.CheckFormsSettings)
    outcome = reconcile_stale_calls(
        store=clients.store(config),
        vapi=clients.vapi(config),
        lease_seconds=0,
    )
    assert outcome == {"found": 1, "released": 0, "unresolved": 0}
    row = form_row(conn, due_form)
    assert (row["call_status"], row["vapi_call_id"]) == ("called", placed[0]["id"])
    assert form_events(conn, due_form) == [
        "delivered",
        "claimed",
        "outcome_unknown",
        "delivered",
        "skipped",
        "called",
    ]
    assert len(vapi.requests) == 1


def test_claim_that_never_reached_vapi_is_released_by_reconciliation(
    env, vapi, conn, due_form, keys
):
    # The process died between the claim and the call: the row is 'calling', Vapi has nothing.
    conn.execute("select claim_form_call(%s)", (due_form,))
    config = settings.load(settings.CheckFormsSettings)
    outcome = reconcile_stale_calls(
        store=clients.store(config),
        vapi=clients.vapi(config),
        lease_seconds=0,
    )
    assert outcome == {"found": 0, "released": 1, "unresolved": 0}
    assert form_row(conn, due_form)["call_status"] == "pending"
    answer = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert answer.body["status"] == "called"
    assert len(vapi.calls_for_form(due_form)) == 1


def test_attempts_are_capped_and_the_form_fails(env, vapi, conn, due_form, keys, monkeypatch):
    monkeypatch.setenv("MAX_CALL_ATTEMPTS", "2")
    clients.reset()
    vapi.add_rule(form_id=due_form, status=429)
    for _ in range(2):
        assert invoke("call_form", call_form_event(due_form, key=keys.current_key)).status == 503
    final = invoke("call_form", call_form_event(due_form, key=keys.current_key))
    assert final.status == 489
    row = form_row(conn, due_form)
    assert row["call_status"] == "failed"
    assert row["last_call_error"] == "gave up after 2 attempts; last error: Vapi answered HTTP 429"
    assert len(vapi.requests) == 2

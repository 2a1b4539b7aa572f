"""Replayed QStash deliveries (issue 14, finding 1): a captured signed request does its work once.

The attack: a delivery captured while Vapi answers 503, played again six times within a second.
Before, each replay was a fresh delivery to call-form: the six used up the form's attempts and
it ended `failed` with no call. Now every QStash-facing function accepts a token's `jti` once
and refuses a token issued longer ago than QStash's token lifetime.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from formcall import clients, settings
from formcall.signatures import TOKEN_LIFETIME, sign
from formcall_cli.events import http_event, sign_event
from formcall_dev.polling import wait_until
from tests.support.lambda_handlers import DOMAIN, call_form_event, invoke
from tests.support.reads import form_events, form_row

REPLAYED = {"error": "replayed token"}


def test_a_delivery_replayed_six_times_while_vapi_fails_leaves_the_form_callable(
    env, vapi, conn, due_form, keys
):
    vapi.add_rule(form_id=due_form, status=429)  # refused before anything was created
    captured = call_form_event(due_form, key=keys.current_key)

    first = invoke("call_form", captured)
    replays = [invoke("call_form", captured) for _ in range(6)]

    assert first.status == 503
    assert [(r.status, r.body) for r in replays] == [(409, REPLAYED)] * 6
    assert "upstash-nonretryable-error" not in replays[0].headers
    row = form_row(conn, due_form)
    assert (row["call_status"], row["call_attempts"]) == ("pending", 1)
    # The replays reached nothing: one delivery in the audit trail, one request to Vapi.
    assert form_events(conn, due_form) == ["delivered", "claimed", "released"]
    assert len(vapi.requests) == 1
    # The sweep still sees the form as due.
    assert [
        f.id
        for f in clients.store(settings.load(settings.CheckFormsSettings)).overdue_page(limit=10)
    ] == [due_form]

    # QStash's retry is signed afresh, and Vapi is back: the patient gets exactly one call.
    vapi.clear_rules()
    retry = invoke("call_form", sign_event(captured, key=keys.current_key))
    assert (retry.status, retry.body["status"]) == (200, "called")
    assert invoke("call_form", captured).status == 409
    assert len(vapi.calls_for_form(due_form)) == 1
    assert form_row(conn, due_form)["call_status"] == "called"


@pytest.mark.parametrize(
    "function, path",
    [("check_forms", "/api/cron/check-forms"), ("failure_callback", "/api/jobs/failed")],
)
def test_the_other_qstash_endpoints_refuse_a_replay(
    stack_env, monkeypatch, vapi, conn, due_form, keys, function, path
):
    monkeypatch.setenv("FAILURE_CALLBACK_URL", f"https://{DOMAIN}/api/jobs/failed")
    clients.reset()
    body = (
        ""
        if function == "check_forms"
        else json.dumps(
            {
                "status": 503,
                "retried": 5,
                "maxRetries": 5,
                "sourceMessageId": "msg_replayed",
                "body": "",
                "url": f"https://{DOMAIN}/api/jobs/call-form",
                "method": "POST",
                "sourceBody": base64.b64encode(json.dumps({"formId": due_form}).encode()).decode(),
            }
        )
    )
    event = sign_event(
        http_event(
            method="POST",
            path=path,
            body=body,
            domain=DOMAIN,
            headers={"content-type": "application/json"},
        ),
        key=keys.current_key,
    )
    vapi.configure(hold=True)  # the sweep's call rings on: no end report arrives later
    first = invoke(function, event)
    if function == "check_forms":
        # The sweep enqueued the form; its call-form delivery lands after the answer.
        wait_until(lambda: "called" in form_events(conn, due_form))
    events_after_first = form_events(conn, due_form)
    again = invoke(function, event)

    assert first.status == 200
    assert (again.status, again.body) == (409, REPLAYED)
    assert form_events(conn, due_form) == events_after_first


def test_a_token_issued_longer_ago_than_qstash_token_lifetime_is_refused(
    env, vapi, conn, due_form, keys
):
    # Still unexpired by its own `exp`, but QStash never issues a token that lives this long.
    issued = int(time.time()) - TOKEN_LIFETIME - 60
    body = json.dumps({"formId": due_form})
    event = http_event(
        method="POST",
        path="/",
        body=body,
        domain=DOMAIN,
        headers={"content-type": "application/json"},
    )
    event["headers"]["upstash-signature"] = sign(
        key=keys.current_key, url=f"https://{DOMAIN}/", body=body.encode(), now=issued, ttl=3600
    )
    answer = invoke("call_form", event)
    assert (answer.status, answer.body) == (401, {"error": "invalid signature"})
    assert vapi.requests == [] and form_events(conn, due_form) == []


@pytest.mark.parametrize("claims", [{"jti": None}, {"jti": 7}, {"iat": None}, {"iat": "now"}])
def test_a_token_without_a_usable_jti_or_iat_is_refused(env, vapi, conn, due_form, keys, claims):
    import jwt as pyjwt

    body = json.dumps({"formId": due_form})
    token = sign(key=keys.current_key, url=f"https://{DOMAIN}/", body=body.encode())
    decoded = pyjwt.decode(token, options={"verify_signature": False})
    decoded.update(claims)
    decoded = {k: v for k, v in decoded.items() if v is not None}
    forged = pyjwt.encode(decoded, keys.current_key.encode(), algorithm="HS256")
    event = http_event(
        method="POST",
        path="/",
        body=body,
        domain=DOMAIN,
        headers={"content-type": "application/json", "upstash-signature": forged},
    )
    answer = invoke("call_form", event)
    assert answer.status == 401
    assert vapi.requests == [] and form_events(conn, due_form) == []


def test_concurrent_uses_of_one_token_accept_exactly_one(env, conn):
    store = clients.store(settings.load(settings.CheckFormsSettings))
    until = datetime.now(UTC) + timedelta(minutes=5)
    results: list[bool] = []
    start = threading.Barrier(20)

    def use() -> None:
        start.wait()
        results.append(store.accept_qstash_token("jwt_concurrent", expires_at=until))

    threads = [threading.Thread(target=use) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 19 + [True]


def test_expired_tokens_are_pruned_and_a_live_one_is_kept(env, conn):
    conn.execute("delete from qstash_tokens")
    past = datetime.now(UTC) - timedelta(seconds=1)
    conn.execute("insert into qstash_tokens values ('jwt_old', %s)", (past,))
    store = clients.store(settings.load(settings.CheckFormsSettings))
    assert store.accept_qstash_token("jwt_new", expires_at=past + timedelta(minutes=6))
    kept = {r[0] for r in conn.execute("select jti from qstash_tokens").fetchall()}
    assert kept == {"jwt_new"}


def test_a_forged_message_id_never_becomes_the_log_correlation_id(env, vapi, due_form, keys):
    # Finding 8: the correlation id is set only once the request is authenticated.
    from formcall.observability import logger

    unsigned = http_event(
        method="POST",
        path="/",
        body=json.dumps({"formId": due_form}),
        domain=DOMAIN,
        headers={"content-type": "application/json", "upstash-message-id": "msg_forged"},
    )
    assert invoke("call_form", unsigned).status == 401
    assert logger.get_correlation_id() == unsigned["requestContext"]["requestId"]

    signed = call_form_event(due_form, key=keys.current_key)
    assert invoke("call_form", signed).status == 200
    assert logger.get_correlation_id() == signed["headers"]["upstash-message-id"]

"""Signed form webhooks, and cancels only of a form's own message (issue 14, finding 2).

The attack: a DELETE webhook naming any form and any message id cancelled the victim's message
(its row kept pointing at it, so later syncs said `unchanged`); the static webhook secret made a
captured webhook good forever. Now the trigger signs each webhook (HMAC-SHA256 of timestamp and
body, in SQL), schedule-form refuses unsigned or old ones, and a message is cancelled only when
QStash's copy of it names the form, and for a DELETE only when the form is really gone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from formcall import clients, settings
from formcall.schedule import sync_form_schedule
from formcall.signatures import verify_webhook
from formcall_cli.events import http_event, webhook_headers
from formcall_dev.seed import create_form, create_patient
from formcall_dev.supabase import webhooks
from tests.support.lambda_handlers import DOMAIN, invoke
from tests.support.reads import form_row, qstash_message

SECRET = "webhook-secret-for-signed-tests-0123"


@pytest.fixture
def hook_env(stack_env, monkeypatch):
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    clients.reset()
    return stack_env


def payload(kind: str, record: dict | None, old: dict | None = None) -> str:
    return json.dumps(
        {"type": kind, "table": "forms", "schema": "public", "record": record, "old_record": old},
        default=str,
    )


def row(conn, form_id) -> dict:
    return {
        k: (v.isoformat() if isinstance(v, datetime) else v)
        for k, v in form_row(conn, form_id).items()
    }


def scheduled_form(conn, env, *, phone="+15550100021") -> tuple[str, str]:
    form = create_form(
        conn,
        patient_id=create_patient(conn, phone=phone),
        deadline=datetime.now(UTC) + timedelta(hours=2),
    )
    config = settings.load(settings.CheckFormsSettings)
    result = sync_form_schedule(
        form,
        store=clients.store(config),
        publisher=clients.publisher(config),
        call_form_url=env["CALL_FORM_URL"],
        window=clients.window(config),
    )
    return form, result.message_id


def queued(env, message_id):
    return qstash_message(env["QSTASH_URL"], env["QSTASH_TOKEN"], message_id)


@pytest.mark.parametrize(
    "key", [b"", b"k", b"webhook-secret", b"x" * 64, b"y" * 65, b"z" * 200, "s\u00e9cret".encode()]
)
@pytest.mark.parametrize(
    "message", [b"", b"1764580000.{}", '{"t": "\u00fc"}'.encode(), b"m" * 1000]
)
def test_the_sql_hmac_equals_pythons(conn, key, message):
    # The built-in sha256() path (the embedded PostgreSQL has no pgcrypto).
    assert (
        conn.execute("select count(*) from pg_extension where extname = 'pgcrypto'").fetchone()[0]
        == 0
    )
    made = conn.execute("select formcall_hmac_sha256(%s, %s)", (key, message)).fetchone()[0]
    assert bytes(made) == hmac.new(key, message, hashlib.sha256).digest()


@pytest.fixture
def trigger(db, hook_env, function_server):
    """The migration's trigger pointed at schedule-form (the dev Vault fallback), listened to."""
    webhooks.install(db, url=f"{function_server}/api/webhooks/forms", secret=SECRET)
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute(f"listen {webhooks.CHANNEL}")
        yield listener
    webhooks.uninstall(db)


def next_request(listener, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for notify in listener.notifies(timeout=0.2, stop_after=1):
            return json.loads(notify.payload)
    raise AssertionError("no webhook NOTIFY")


def test_the_trigger_signs_what_it_sends_and_schedule_form_accepts_it(trigger, conn, hook_env):
    form = create_form(
        conn,
        patient_id=create_patient(conn),
        deadline=datetime.now(UTC) + timedelta(hours=2),
    )
    request = next_request(trigger)

    # What pg_net would send: the body is jsonb's own text of the payload.
    assert (
        conn.execute("select (%s::jsonb)::text", (request["body"],)).fetchone()[0]
        == request["body"]
    )
    sent = json.loads(request["body"])
    assert (sent["type"], sent["record"]["id"], sent["old_record"]) == ("INSERT", form, None)
    headers = {k.lower(): v for k, v in request["headers"].items()}
    verify_webhook(
        secret=SECRET,
        timestamp=headers["x-formcall-timestamp"],
        signatures=[headers["x-formcall-signature"]],
        body=request["body"].encode(),
        now=time.time(),
    )
    with httpx.Client(timeout=30) as http:
        answer = webhooks.deliver(http, request)
    assert (answer.status_code, answer.json()["status"]) == (200, "scheduled")
    assert form_row(conn, form)["qstash_message_id"] == answer.json()["messageId"]


def test_without_settings_the_trigger_sends_nothing_and_the_write_succeeds(db, conn):
    webhooks.uninstall(db)
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute(f"listen {webhooks.CHANNEL}")
        form = create_form(conn, patient_id=create_patient(conn), deadline=None)
        assert list(listener.notifies(timeout=0.5, stop_after=1)) == []
    assert str(form_row(conn, form)["id"]) == form


@pytest.mark.parametrize(
    "case",
    [
        "unsigned",
        "static secret",
        "bearer secret",
        "wrong secret",
        "six minutes old",
        "from the future",
        "body changed",
        "two signatures",
        "timestamp changed",
    ],
)
def test_schedule_form_refuses_unsigned_old_or_forged_webhooks(hook_env, conn, case):
    form = create_form(
        conn,
        patient_id=create_patient(conn),
        deadline=datetime.now(UTC) + timedelta(hours=2),
    )
    body = payload("INSERT", row(conn, form))
    now = time.time()
    headers = {
        "unsigned": {"content-type": "application/json"},
        "static secret": {"x-webhook-secret": SECRET},
        "bearer secret": {"authorization": f"Bearer {SECRET}"},
        "wrong secret": webhook_headers(body, secret="another-secret-0123456789"),
        "six minutes old": webhook_headers(body, secret=SECRET, now=now - 360),
        "from the future": webhook_headers(body, secret=SECRET, now=now + 600),
        "body changed": webhook_headers(body.replace('"INSERT"', '"UPDATE"'), secret=SECRET),
        "two signatures": webhook_headers(body, secret=SECRET),
        "timestamp changed": webhook_headers(body, secret=SECRET),
    }[case]
    if case == "two signatures":
        headers["x-formcall-signature"] += ", " + headers["x-formcall-signature"]
    if case == "timestamp changed":
        headers["x-formcall-timestamp"] = str(int(headers["x-formcall-timestamp"]) - 1)
    event = http_event(
        method="POST", path="/api/webhooks/forms", body=body, headers=headers, domain=DOMAIN
    )
    answer = invoke("schedule_form", event)
    assert (answer.status, answer.body) == (401, {"error": "unauthorized"})
    assert form_row(conn, form)["qstash_message_id"] is None


def test_a_delete_webhook_for_a_live_form_cancels_nothing(hook_env, conn):
    # The attack, even signed: a DELETE naming the victim's form and message.
    victim, message = scheduled_form(conn, hook_env)
    body = payload("DELETE", None, row(conn, victim))
    event = http_event(
        method="POST",
        path="/api/webhooks/forms",
        body=body,
        headers=webhook_headers(body, secret=SECRET),
        domain=DOMAIN,
    )
    answer = invoke("schedule_form", event)
    assert (answer.status, answer.body["status"]) == (200, "unchanged")
    assert queued(hook_env, message) is not None
    assert form_row(conn, victim)["qstash_message_id"] == message


def test_a_deleted_forms_webhook_naming_another_forms_message_cancels_nothing(hook_env, conn):
    victim, message = scheduled_form(conn, hook_env)
    mine, my_message = scheduled_form(conn, hook_env, phone="+15550100022")
    old = {**row(conn, mine), "qstash_message_id": message}  # pointed at the victim's
    conn.execute("delete from forms where id = %s", (mine,))
    body = payload("DELETE", None, old)
    event = http_event(
        method="POST",
        path="/api/webhooks/forms",
        body=body,
        headers=webhook_headers(body, secret=SECRET),
        domain=DOMAIN,
    )
    answer = invoke("schedule_form", event)
    assert (answer.status, answer.body["status"]) == (200, "gone")
    assert queued(hook_env, message) is not None


def test_a_deleted_forms_own_message_is_still_cancelled(hook_env, conn):
    form, message = scheduled_form(conn, hook_env)
    old = row(conn, form)
    conn.execute("delete from forms where id = %s", (form,))
    body = payload("DELETE", None, old)
    event = http_event(
        method="POST",
        path="/api/webhooks/forms",
        body=body,
        headers=webhook_headers(body, secret=SECRET),
        domain=DOMAIN,
    )
    answer = invoke("schedule_form", event)
    assert (answer.body["status"], answer.body["messageId"]) == ("cancelled", message)
    assert queued(hook_env, message) is None


def test_a_row_pointing_at_another_forms_message_is_cleared_without_cancelling_it(hook_env, conn):
    # However a row came to point at a foreign message (before the column guard, a clinic user
    # could set it), submitting that form cancels nothing of the victim's.
    victim, message = scheduled_form(conn, hook_env)
    mine, my_message = scheduled_form(conn, hook_env, phone="+15550100023")
    conn.execute(
        "update forms set qstash_message_id = %s, submitted_at = now() where id = %s",
        (message, mine),
    )
    config = settings.load(settings.CheckFormsSettings)
    result = sync_form_schedule(
        mine,
        store=clients.store(config),
        publisher=clients.publisher(config),
        call_form_url=hook_env["CALL_FORM_URL"],
        window=clients.window(config),
    )
    assert result.action == "cancelled"
    assert queued(hook_env, message) is not None
    assert form_row(conn, mine)["qstash_message_id"] is None
    assert form_row(conn, victim)["qstash_message_id"] == message

"""The line ledger: formcall's calls hold Vapi's lines from claim to end; no race takes one more.

Deliveries go over real HTTP to the function server, the fake Vapi's reports come back to
call-events, and the local QStash delivers the messages a freed line publishes.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from formcall import clients
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_forms_one_patient_each
from tests.support.lambda_handlers import deliver
from tests.support.reads import form_events, form_row


@pytest.fixture
def lines(stack_env, monkeypatch):
    def configure(total: int, reserved: int = 0, **extra: str) -> dict:
        values = {"VAPI_MAX_CONCURRENCY": str(total), "VAPI_RESERVED_LINES": str(reserved), **extra}
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        clients.reset()
        return {**stack_env, **values}

    return configure


def due_forms(conn, count: int) -> list[str]:
    return create_forms_one_patient_each(
        conn,
        count=count,
        title="Ledger form",
        deadline=datetime.now(UTC) - timedelta(minutes=1),
    )


def in_flight(conn) -> int:
    return conn.execute("select lines_in_use(660)").fetchone()[0]


def test_fifty_concurrent_claims_on_three_free_lines_take_exactly_three(lines, vapi, conn, keys):
    env = lines(3)
    vapi.configure(hold=True)  # every call rings until the test ends it
    forms = due_forms(conn, 50)
    with ThreadPoolExecutor(25) as pool:
        answers = list(
            pool.map(lambda f: deliver(env["CALL_FORM_URL"], f, keys.current_key), forms)
        )
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) == 3 and statuses.count(503) == 47
    assert len(vapi.requests) == 3 and vapi.max_concurrent == 3
    refused = [a for a in answers if a.status_code == 503]
    assert {a.json()["error"] for a in refused} == {"no Vapi line free"}
    assert all(5 <= int(a.headers["retry-after"]) <= 600 for a in refused)
    waiting = conn.execute("select count(*) from forms where line_wait_at is not null").fetchone()
    assert waiting[0] == 47

    # A call ends: its line goes to the oldest waiting form at once, through call-events.
    oldest = conn.execute(
        "select id from forms where line_wait_at is not null order by line_wait_at, id limit 1"
    ).fetchone()[0]
    first_call = vapi.placed_calls()[0]["id"]
    vapi.end_call(first_call, "reached")
    wait_until(lambda: form_row(conn, str(oldest))["call_status"] == "called", timeout=30)
    assert len(vapi.requests) == 4 and vapi.max_concurrent == 3
    assert in_flight(conn) == 3
    assert "waiting_for_line" in form_events(conn, str(oldest))


def test_reserved_lines_are_never_taken(lines, vapi, conn, keys):
    env = lines(3, reserved=1)
    vapi.configure(hold=True)
    forms = due_forms(conn, 6)
    answers = [deliver(env["CALL_FORM_URL"], f, keys.current_key) for f in forms]
    assert [a.status_code for a in answers].count(200) == 2
    assert vapi.max_concurrent == 2


def test_a_line_without_a_report_frees_after_the_longest_call(lines, vapi, conn, keys):
    env = lines(1, VAPI_MAX_CALL_SECONDS="60")
    vapi.configure(hold=True)
    first, second = due_forms(conn, 2)
    assert deliver(env["CALL_FORM_URL"], first, keys.current_key).status_code == 200
    assert deliver(env["CALL_FORM_URL"], second, keys.current_key).status_code == 503
    # No report came for a minute (lost): the ledger no longer counts that call.
    conn.execute("update calls set created_at = created_at - interval '61 seconds'")
    assert deliver(env["CALL_FORM_URL"], second, keys.current_key).status_code == 200


def test_without_the_ledger_only_flow_control_limits_calls(lines, vapi, conn, keys):
    env = lines(1, VAPI_LINE_LEDGER="false")
    vapi.configure(hold=True, concurrency_limit=10)
    forms = due_forms(conn, 3)
    answers = [deliver(env["CALL_FORM_URL"], f, keys.current_key) for f in forms]
    assert [a.status_code for a in answers] == [200] * 3
    assert vapi.max_concurrent == 3


def test_qstash_giving_up_never_fails_a_form_waiting_for_a_line(lines, vapi, conn, keys):
    import base64

    from formcall_cli.events import http_event, sign_event
    from tests.support.lambda_handlers import DOMAIN, invoke

    env = lines(1)
    vapi.configure(hold=True)
    busy, waiting = due_forms(conn, 2)
    deliver(env["CALL_FORM_URL"], busy, keys.current_key)
    assert deliver(env["CALL_FORM_URL"], waiting, keys.current_key).status_code == 503
    payload = json.dumps(
        {
            "status": 503,
            "retried": 5,
            "sourceMessageId": "msg_waiting",
            "sourceBody": base64.b64encode(json.dumps({"formId": waiting}).encode()).decode(),
            "body": base64.b64encode(b'{"error": "no Vapi line free"}').decode(),
        }
    )
    event = sign_event(
        http_event(
            method="POST",
            path="/api/jobs/failed",
            body=payload,
            domain=DOMAIN,
            headers={"content-type": "application/json"},
        ),
        key=keys.current_key,
    )
    answer = invoke("failure_callback", event)
    assert answer.status == 200 and answer.body["callStatus"] == "pending"
    assert form_row(conn, waiting)["call_status"] == "pending"
    # Its turn comes when the line frees.
    vapi.end_call(vapi.placed_calls()[0]["id"], "no_answer")
    wait_until(lambda: form_row(conn, waiting)["call_status"] == "called", timeout=30)


@pytest.mark.parametrize(
    "fault",
    [{"drop": True}, {"status": 502, "place": True}, {"status": 502}],
    ids=["timeout", "created-then-502", "502"],
)
def test_an_unknown_outcome_is_resolved_by_the_reconcile_message(lines, vapi, conn, keys, fault):
    # The lease is a second here: the reconcile message call-form publishes to itself comes
    # back through the local QStash and settles the claim against Vapi's call list.
    env = lines(10, CLAIM_LEASE_SECONDS="1")
    (form,) = due_forms(conn, 1)
    vapi.add_rule(form_id=form, times=1, **fault)
    first = deliver(env["CALL_FORM_URL"], form, keys.current_key)
    assert (first.status_code, first.json()["status"]) == (202, "unknown")
    wait_until(lambda: form_row(conn, form)["call_status"] == "called", timeout=30)
    placed = vapi.calls_for_form(form)
    assert len(placed) == 1  # never a second call
    assert form_row(conn, form)["vapi_call_id"] == placed[0]["id"]
    created = fault.get("place", False) or fault.get("drop", False)
    assert len(vapi.requests) == (1 if created else 2)

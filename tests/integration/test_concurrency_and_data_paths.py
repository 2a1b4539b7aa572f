"""The invariants under concurrency, over both data paths (direct Postgres and Supabase RPC)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from formcall import clients, settings
from formcall_dev.seed import create_form, create_patient
from formcall_dev.servers import serve_in_thread
from formcall_dev.supabase import rest as supabase_rpc
from tests.support.lambda_handlers import deliver
from tests.support.reads import form_events, form_row


@pytest.fixture(scope="module")
def supabase_server(pg_dsn, keys):
    handle = serve_in_thread(
        supabase_rpc.create_app(dsn=pg_dsn, service_role_key=keys.service_role_key)
    )
    yield handle.url
    handle.stop()


@pytest.fixture(params=["postgres", "supabase"])
def data_path(request, env, monkeypatch, keys, supabase_server):
    if request.param == "supabase":
        monkeypatch.delenv("DATABASE_URL")
        monkeypatch.setenv("SUPABASE_URL", supabase_server)
        monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", keys.service_role_key)
    clients.reset()
    return request.param


def test_supabase_path_really_goes_through_the_rpc_stand_in(data_path, keys, supabase_server):
    store = clients.store(settings.load(settings.CheckFormsSettings))
    assert type(store._rpc).__name__ == (
        "SupabaseRpc" if data_path == "supabase" else "PostgresRpc"
    )


def test_twenty_concurrent_deliveries_make_one_call(data_path, vapi, conn, keys, function_server):
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) - timedelta(1))
    vapi.configure(latency=0.2)  # hold the first call open while the others arrive
    url = f"{function_server}/api/jobs/call-form"
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: deliver(url, form, keys.current_key), range(20)))

    assert [a.status_code for a in answers] == [200] * 20
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses.count("called") == 1
    assert {a.json().get("reason") for a in answers if a.json()["status"] == "skipped"} <= {
        "in_progress",
        "already_called",
    }
    assert len(vapi.calls_for_form(form)) == 1
    assert len(vapi.requests) == 1
    row = form_row(conn, form)
    assert (row["call_status"], row["call_attempts"]) == ("called", 1)
    assert form_events(conn, form).count("called") == 1


def test_many_forms_many_duplicates(data_path, vapi, conn, keys, function_server):
    """Five patients with two due forms each, every form delivered four times at once,
    interleaved: one call per patient, covering both of their forms."""
    past = datetime.now(UTC) - timedelta(minutes=5)
    patients = [create_patient(conn, phone=f"+1555010{i:04d}") for i in range(5)]
    forms = {
        p: [create_form(conn, patient_id=p, deadline=past - timedelta(minutes=n)) for n in range(2)]
        for p in patients
    }
    submitted = create_form(conn, patient_id=patients[0], deadline=past, submitted_at=past)
    url = f"{function_server}/api/jobs/call-form"
    jobs = [f for p in patients for f in forms[p] + [submitted] for _ in range(4)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda f: deliver(url, f, keys.current_key), jobs))
    assert all(a.status_code == 200 for a in answers)
    assert len(vapi.placed_calls()) == 5
    for own in forms.values():
        (call,) = [
            c
            for c in vapi.placed_calls()
            if c["assistantOverrides"]["metadata"]["formIds"][0] in own
        ]
        metadata = call["assistantOverrides"]["metadata"]
        # In deadline order: the older deadline first.
        assert metadata["formIds"] == [own[1], own[0]] and metadata["formId"] == own[1]
        assert call["assistantOverrides"]["variableValues"]["formCount"] == 2
    assert all(form_row(conn, f)["call_status"] == "called" for own in forms.values() for f in own)
    assert form_row(conn, submitted)["call_status"] == "pending"


def test_twenty_deliveries_for_five_forms_of_one_patient_make_one_call(
    data_path, vapi, conn, keys, function_server
):
    patient = create_patient(conn)
    past = datetime.now(UTC) - timedelta(minutes=5)
    forms = [
        create_form(
            conn, patient_id=patient, title=f"Form {n}", deadline=past + timedelta(seconds=n)
        )
        for n in range(5)
    ]
    vapi.configure(latency=0.2)
    url = f"{function_server}/api/jobs/call-form"
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda i: deliver(url, forms[i % 5], keys.current_key), range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert [a.json()["status"] for a in answers].count("called") == 1
    assert len(vapi.requests) == 1
    (call,) = vapi.placed_calls()
    assert call["assistantOverrides"]["metadata"]["formIds"] == forms
    assert call["assistantOverrides"]["variableValues"]["formTitles"] == (
        "Form 0, Form 1, Form 2, Form 3, Form 4"
    )
    assert conn.execute("select count(*) from calls").fetchone()[0] == 1
    assert conn.execute("select count(*) from call_forms").fetchone()[0] == 5


def test_supabase_rpc_stand_in_refuses_a_wrong_key(supabase_server):
    answer = httpx.post(
        f"{supabase_server}/rest/v1/rpc/find_overdue_forms",
        json={},
        headers={"apikey": "wrong", "Authorization": "Bearer wrong"},
    )
    assert answer.status_code == 401


def test_call_reports_are_recorded_over_both_data_paths(
    data_path, vapi, conn, keys, function_server, monkeypatch
):
    """call-events' SQL (arrays, numbers, times) over Supabase RPC as over direct Postgres."""
    monkeypatch.setenv("FOLLOW_UP_DELAY_SECONDS", "3600")
    monkeypatch.setenv("QSTASH_URL", "http://127.0.0.1:9")  # no follow-up publish reaches out
    clients.reset()
    patient = create_patient(conn)
    form = create_form(conn, patient_id=patient, deadline=datetime.now(UTC) - timedelta(1))
    conn.execute("select claim_form_call(%s)", (form,))
    body = json.dumps(
        {
            "message": {
                "type": "end-of-call-report",
                "endedReason": "customer-ended-call",
                "startedAt": "2026-12-01T09:00:00.000Z",
                "endedAt": "2026-12-01T09:01:30.500Z",
                "cost": 0.0731,
                "artifact": {},
                "analysis": {"structuredData": {"optOut": False}},
                "call": {
                    "id": "vapi-data-path",
                    "assistantOverrides": {"metadata": {"formId": form, "formIds": [form]}},
                },
            }
        }
    )
    answer = httpx.post(
        f"{function_server}/api/webhooks/vapi",
        content=body,
        headers={"content-type": "application/json", "x-vapi-secret": keys.vapi_webhook_secret},
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outcome"] == "reached"
    call = conn.execute(
        "select vapi_call_id, outcome, cost, started_at, ended_at from calls"
    ).fetchone()
    assert call[:2] == ("vapi-data-path", "reached") and float(call[2]) == 0.0731
    assert (call[4] - call[3]).total_seconds() == 90.5
    assert (form_row(conn, form)["call_status"], form_row(conn, form)["call_outcome"]) == (
        "called",
        "reached",
    )

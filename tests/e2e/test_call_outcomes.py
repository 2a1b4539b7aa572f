"""Call outcomes end to end on the local stack: follow-ups, one call per patient, opt-out, a lost report."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import DEV_CALL_RULES, Stack, fake_vapi
from tests.support.reads import form_events, form_row

FOLLOW_UP_DELAY = int(DEV_CALL_RULES["FOLLOW_UP_DELAY_SECONDS"])


def calls_to(info, number: str) -> list[dict]:
    return [c for c in fake_vapi(info, "GET", "/calls") if c["customer"]["number"] == number]


def moment(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def sweep(info) -> dict:
    answer = httpx.get(
        info.check_forms_url,
        timeout=60,
        headers={"Authorization": f"Bearer {info.credentials['CRON_SECRET']}"},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def qstash_holds(info, message_id: str) -> bool:
    answer = httpx.get(
        f"{info.qstash_url}/v2/messages/{message_id}",
        headers={"Authorization": f"Bearer {info.credentials['QSTASH_TOKEN']}"},
        timeout=30,
    )
    return answer.status_code == 200


def call_rows(conn, form_id: str) -> list[dict]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select c.* from calls c join call_forms cf on cf.call_id = c.id"
            " where cf.form_id = %s order by c.created_at",
            (form_id,),
        ).fetchall()


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    # A short create-call timeout, so an unanswered request leaves its claim stale quickly.
    with Stack(
        tmp_path_factory.mktemp("outcomes"), extra_env={"VAPI_TIMEOUT_SECONDS": "1"}
    ) as started:
        yield started


@pytest.fixture
def conn(info):
    with psycopg.connect(info.dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture(autouse=True)
def quiet_fake(info):
    # Each test starts with the fake as the stack made it (no scripts, no faults).
    fake_vapi(info, "POST", "/reset")


def test_no_answer_is_followed_up_and_the_patient_reached(info, conn):
    number = "+15550200001"
    fake_vapi(info, "POST", "/configure", json={"scripts": {number: ["no_answer", "reached"]}})
    form = create_form(
        conn, patient_id=create_patient(conn, phone=number), deadline=datetime.now(UTC)
    )
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached", timeout=30)

    row = form_row(conn, form)
    assert (row["call_status"], row["next_call_at"]) == ("called", None)
    first, second = calls_to(info, number)
    assert (first["endedReason"], second["endedReason"]) == (
        "customer-did-not-answer",
        "customer-ended-call",
    )
    # The follow-up waited FOLLOW_UP_DELAY_SECONDS after the first call ended.
    assert moment(second["createdAt"]) >= moment(first["endedAt"]) + timedelta(
        seconds=FOLLOW_UP_DELAY
    ) - timedelta(milliseconds=1)
    assert [(c["outcome"], c["outcome_source"]) for c in call_rows(conn, form)] == [
        ("no_answer", "call-events"),
        ("reached", "call-events"),
    ]
    assert form_events(conn, form) == [
        "scheduled",
        "delivered",
        "claimed",
        "called",
        "call_ended",
        "follow_up_scheduled",
        "scheduled",
        "delivered",
        "claimed",
        "called",
        "call_ended",
    ]
    # Every report reached call-events signed with the HMAC credential, and was accepted.
    reports = fake_vapi(info, "GET", "/reports")
    assert reports and all(r["signed"] and r["answer"] == 200 for r in reports)


def test_two_due_forms_of_one_patient_make_one_call(info, conn):
    number = "+15550200002"
    patient = create_patient(conn, phone=number)
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    forms = [
        create_form(conn, patient_id=patient, title=title, deadline=deadline)
        for title in ("Health history", "Dental history")
    ]
    wait_until(
        lambda: all(form_row(conn, f)["call_outcome"] == "reached" for f in forms), timeout=30
    )
    # Both messages were delivered (the second finds its form called) and only one call went.
    wait_until(lambda: all(form_events(conn, f).count("delivered") == 1 for f in forms))
    calls = calls_to(info, number)
    assert len(calls) == 1
    overrides = calls[0]["assistantOverrides"]
    assert sorted(overrides["metadata"]["formIds"]) == sorted(forms)
    assert overrides["variableValues"]["formCount"] in (2, "2")
    assert {form_row(conn, f)["vapi_call_id"] for f in forms} == {calls[0]["id"]}
    assert (
        conn.execute("select count(*) from calls where patient_id = %s", (patient,)).fetchone()[0]
        == 1
    )


def test_opt_out_stops_every_call_to_the_patient(info, conn):
    number = "+15550200003"
    fake_vapi(info, "POST", "/configure", json={"scripts": {number: ["opt_out"]}})
    patient = create_patient(conn, phone=number)
    now = datetime.now(UTC)
    called = create_form(conn, patient_id=patient, title="Travel questionnaire", deadline=now)
    later = create_form(
        conn, patient_id=patient, title="Follow-up survey", deadline=now + timedelta(seconds=6)
    )
    later_message = wait_until(lambda: form_row(conn, later)["qstash_message_id"])
    wait_until(lambda: form_row(conn, called)["call_status"] == "opted_out", timeout=30)

    assert conn.execute(
        "select opted_out_at is not null from patients where id = %s", (patient,)
    ).fetchone() == (True,)
    assert form_row(conn, later)["call_status"] == "opted_out"
    assert not qstash_holds(info, later_message)
    # A form that comes due after the opt-out is refused at the claim and ends opted_out too.
    newer = create_form(conn, patient_id=patient, title="Another form", deadline=now)
    assert sweep(info)["enqueued"] >= 1
    wait_until(lambda: form_row(conn, newer)["call_status"] == "opted_out")
    # Past the later form's deadline, nothing more reached Vapi for this patient.
    wait_until(lambda: datetime.now(UTC) > now + timedelta(seconds=7), timeout=10)
    sweep(info)
    time.sleep(1)  # a delivery the sweep enqueued would be claimed by now
    assert len(calls_to(info, number)) == 1
    assert fake_vapi(info, "GET", "/requests", params={"formId": later}) == []
    assert fake_vapi(info, "GET", "/requests", params={"formId": newer}) == []
    for form in (called, later, newer):
        assert form_row(conn, form)["call_status"] == "opted_out"
    assert form_events(conn, newer) == ["delivered", "opted_out"]


def test_a_lost_report_is_recorded_by_the_sweeps_lookup(info, conn):
    number = "+15550200004"
    timeout = int(DEV_CALL_RULES["CALL_OUTCOME_TIMEOUT_SECONDS"])
    fake_vapi(
        info,
        "POST",
        "/configure",
        json={"scripts": {number: ["no_answer", "reached"]}, "report_drop_rate": 1},
    )
    form = create_form(
        conn, patient_id=create_patient(conn, phone=number), deadline=datetime.now(UTC)
    )
    first = wait_until(lambda: calls_to(info, number))[0]
    # Every message of the first call is lost (Vapi's outage); the next call reports again.
    wait_until(
        lambda: any(
            r["type"] == "end-of-call-report" and r["dropped"]
            for r in fake_vapi(info, "GET", "/reports", params={"callId": first["id"]})
        ),
        timeout=15,
    )
    fake_vapi(info, "POST", "/configure", json={"report_drop_rate": 0})
    assert all(
        r["dropped"] for r in fake_vapi(info, "GET", "/reports", params={"callId": first["id"]})
    )
    row = form_row(conn, form)
    assert (row["call_status"], row["call_outcome"]) == ("called", None)
    # Not before CALL_OUTCOME_TIMEOUT_SECONDS: the sweep leaves a recent call alone.
    placed = call_rows(conn, form)[0]["placed_at"]
    if datetime.now(UTC) < placed + timedelta(seconds=timeout - 3):
        assert sweep(info)["outcomes"]["ended"] == 0
    wait_until(lambda: sweep(info)["outcomes"]["ended"] == 1, timeout=20, interval=0.5)

    first_row = call_rows(conn, form)[0]
    assert (first_row["outcome"], first_row["outcome_source"], first_row["ended_reason"]) == (
        "no_answer",
        "lookup",
        "customer-did-not-answer",
    )
    # The follow-up the lookup scheduled goes out, and its report arrives as usual.
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached", timeout=30)
    assert [(c["outcome"], c["outcome_source"]) for c in call_rows(conn, form)] == [
        ("no_answer", "lookup"),
        ("reached", "call-events"),
    ]
    assert len(calls_to(info, number)) == 2
    assert "follow_up_scheduled" in form_events(conn, form)


def test_status_shows_a_forms_calls_and_outcomes(info, conn, monkeypatch):
    from typer.testing import CliRunner

    from formcall_cli.main import app as cli

    number = "+15550200005"
    fake_vapi(info, "POST", "/configure", json={"scripts": {number: ["voicemail", "reached"]}})
    form = create_form(
        conn, patient_id=create_patient(conn, phone=number), deadline=datetime.now(UTC)
    )
    wait_until(lambda: form_row(conn, form)["call_outcome"] == "reached", timeout=30)
    for name, value in info.env().items():
        monkeypatch.setenv(name, value)
    # Narrow on purpose: ids are shown whole however little room there is.
    one = CliRunner().invoke(cli, ["status", form], env={"COLUMNS": "100"})
    assert one.exit_code == 0, one.output
    for call in calls_to(info, number):
        assert call["id"] in one.output
    for text in (
        "call outcome: reached",
        "voicemail",
        "customer-ended-call",
        "call_ended",
        "follow_up_scheduled",
        "patient opted out: no",
        form,
    ):
        assert text in one.output
    assert "{'" not in one.output and "UUID(" not in one.output
    every = CliRunner().invoke(cli, ["status"], env={"COLUMNS": "250"})
    assert every.exit_code == 0, every.output
    assert "outcome" in every.output and "reached" in every.output


def test_dev_help_names_the_compressed_times():
    from typer.testing import CliRunner

    from formcall_cli.main import app as cli

    text = " ".join(
        CliRunner().invoke(cli, ["dev", "--help"], env={"COLUMNS": "250"}).output.split()
    )
    assert "Time is compressed" in text
    for flag, name in (
        ("--follow-up-delay", "FOLLOW_UP_DELAY_SECONDS"),
        ("--outcome-timeout", "CALL_OUTCOME_TIMEOUT_SECONDS"),
        ("--max-calls-per-day", "PATIENT_MAX_CALLS_PER_DAY"),
        ("--max-calls-per-week", "PATIENT_MAX_CALLS_PER_WEEK"),
    ):
        assert flag in text and f"dev: {DEV_CALL_RULES[name]};" in text


def test_a_stale_follow_up_claim_is_not_matched_to_the_previous_call(info, conn, monkeypatch):
    """A follow-up soon after a call (FOLLOW_UP_DELAY_SECONDS is a few seconds here; any value
    under a minute in production) whose create-call got no answer: Vapi never placed it, so the
    reconciliation must release it, not take the form's previous call (still within its one
    minute of clock slack) for it."""
    from formcall import clients, settings
    from formcall.sweep import reconcile_stale_calls

    number = "+15550200006"
    fake_vapi(info, "POST", "/configure", json={"scripts": {number: ["no_answer", "reached"]}})
    form = create_form(
        conn, patient_id=create_patient(conn, phone=number), deadline=datetime.now(UTC)
    )
    first = wait_until(lambda: form_row(conn, form)["next_call_at"], timeout=30)
    assert first is not None
    # The follow-up's create-call: no call is placed and no answer comes within the timeout.
    fake_vapi(
        info,
        "POST",
        "/rules",
        json={"customer_number": number, "status": 500, "delay": 3, "times": 1},
    )
    wait_until(lambda: "outcome_unknown" in form_events(conn, form), timeout=30)
    assert len(calls_to(info, number)) == 1

    for name, value in info.env().items():
        monkeypatch.setenv(name, value)
    clients.reset()
    try:
        # The sweep would do this once the claim is older than its 15-minute lease.
        config = settings.load(settings.CheckFormsSettings)
        outcome = reconcile_stale_calls(
            store=clients.store(config),
            vapi=clients.vapi(config),
            lease_seconds=0,
        )
    finally:
        clients.reset()
    assert outcome == {"found": 0, "released": 1, "unresolved": 0}
    assert form_row(conn, form)["call_status"] == "pending"

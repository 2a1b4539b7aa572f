"""The design's own test plan, played on the local stack and shown live in the terminal.

Forms are inserted into the database like the clinic app would; the dev stack forwards each
change to schedule-form as a Supabase Database Webhook, which publishes (or cancels) the form's
one-time QStash message. The journey shown is the form's audit trail (form_call_events).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import httpx
import psycopg
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import StackInfo
from formcall_dev.status import as_text, print_table


@dataclass
class Case:
    """One seeded form, what the demo does to it, and where its journey must end."""

    key: str
    title: str
    phone: str
    expect: str                       # called | cancelled | failed | unscheduled
    due_in: float | None = 4.0        # seconds from now; None: no deadline
    webhook: bool = True              # False: inserted as if the webhook (the job) was missed
    submit: bool = False              # the patient submits before the deadline
    move_to: float | None = None      # the doctor moves the deadline to this many seconds from now
    vapi_rule: dict | None = None     # fault the fake Vapi injects for this phone
    form_id: str = ""
    journey: list[str] = field(default_factory=list)
    status: str = "pending"
    detail: str = ""


def cases() -> list[Case]:
    return [
        Case("on-time", "Pre-visit questionnaire", "+15550100101", "called"),
        Case("submitted", "Consent form", "+15550100102", "cancelled", submit=True),
        Case("moved", "Lab results review", "+15550100107", "called", due_in=3, move_to=7),
        Case("no-deadline", "Optional feedback", "+15550100103", "unscheduled", due_in=None),
        Case("rejected", "Insurance details", "+15550100104", "failed",
             vapi_rule={"status": 400}),
        Case("flaky", "Medication list", "+15550100105", "called",
             vapi_rule={"status": 503, "times": 1}),
        Case("missed-job", "Allergy form", "+15550100106", "called", due_in=-60, webhook=False),
    ]


def seed(info: StackInfo, demo: list[Case]) -> None:
    if not info.real_vapi:
        admin = {"Authorization": f"Bearer {info.credentials['VAPI_PRIVATE_KEY']}"}
        httpx.post(f"{info.vapi_url}/_fake/reset", headers=admin).raise_for_status()
        for case in demo:
            if case.vapi_rule:
                httpx.post(f"{info.vapi_url}/_fake/rules", headers=admin,
                           json={"customer_number": case.phone, **case.vapi_rule}
                           ).raise_for_status()
    now = datetime.now(timezone.utc)
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        for case in demo:
            patient = create_patient(conn, full_name=f"Demo {case.key}", phone=case.phone)
            deadline = None if case.due_in is None else now + timedelta(seconds=case.due_in)
            # A silent insert: schedule-form never hears of the form (a lost webhook or job).
            case.form_id = create_form(conn, patient_id=patient, title=case.title,
                                       deadline=deadline, silent=not case.webhook)


def change_forms(info: StackInfo, demo: list[Case]) -> None:
    """What happens after creation: a submission before the deadline, a moved deadline."""
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        for case in demo:
            if case.submit:
                conn.execute("update forms set submitted_at = now() where id = %s",
                             (case.form_id,))
            if case.move_to is not None:
                conn.execute("update forms set deadline = now() + make_interval(secs => %s)"
                             " where id = %s", (case.move_to, case.form_id))


LABELS = {"claimed": "claimed", "released": "retry", "outcome_unknown": "unknown"}


def refresh(info: StackInfo, demo: list[Case]) -> None:
    with psycopg.connect(info.dsn) as conn:
        for case in demo:
            status, error = conn.execute(
                "select call_status, last_call_error from forms where id = %s",
                (case.form_id,)).fetchone()
            rows = conn.execute("select event, detail from form_call_events where form_id = %s"
                                " order by id", (case.form_id,)).fetchall()
            case.journey = ["created"] + [LABELS.get(event, event) for event, _ in rows]
            case.status = status
            skipped = [d.get("reason") for e, d in rows if e == "skipped"]
            case.detail = error or (f"skipped: {skipped[-1]}" if skipped else "")


def outcome(case: Case) -> str:
    if case.status in ("called", "failed"):
        return case.status
    if case.journey and case.journey[-1] == "cancelled":
        return "cancelled"
    if case.status == "pending" and case.due_in is None and len(case.journey) == 1:
        return "unscheduled"
    return "waiting"


def render(demo: list[Case], elapsed: float, phase: str) -> Table:
    done = sum(outcome(c) == c.expect for c in demo)
    table = Table(title=f"formcall demo: {phase}  [{done}/{len(demo)} settled, {elapsed:4.1f} s]")
    for column in ("form", "expect", "journey", "now", "detail"):
        table.add_column(column)
    for case in demo:
        now = outcome(case)
        style = "green" if now == case.expect else ("red" if now in ("called", "failed") else "")
        table.add_row(case.key, case.expect, " → ".join(case.journey),
                      f"[{style}]{now}[/]" if style else now, escape(case.detail[:60]))
    return table


def describe_answer(answer: httpx.Response) -> str:
    """An HTTP answer as one line of text: its status, then its JSON as `name: value` pairs."""
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}: {answer.text[:200]}"
    return f"HTTP {answer.status_code}: {as_text(body)}"


def run(info: StackInfo, console: Console, *, timeout: float = 50.0) -> bool:
    """Play the demo; True when every form ended where it should."""
    started = time.monotonic()
    setup = httpx.get(info.setup_url, params={"secret": info.credentials["CRON_SECRET"]},
                      timeout=30)
    console.print(f"[bold]setup[/] {escape(describe_answer(setup))}")
    demo = cases()
    seed(info, demo)
    time.sleep(1.0)
    change_forms(info, demo)
    trigger = httpx.get(info.check_forms_url, timeout=60, headers={
        "Authorization": f"Bearer {info.credentials['CRON_SECRET']}"})
    console.print(f"[bold]manual sweep[/] {escape(describe_answer(trigger))}")
    with Live(render(demo, 0, "running"), console=console, refresh_per_second=4) as live:
        while time.monotonic() - started < timeout:
            refresh(info, demo)
            live.update(render(demo, time.monotonic() - started, "running"))
            if all(outcome(c) == c.expect for c in demo):
                break
            time.sleep(0.25)
        refresh(info, demo)
        ok = all(outcome(c) == c.expect for c in demo)
        live.update(render(demo, time.monotonic() - started, "done" if ok else "TIMED OUT"))
    summary = Table(title="summary")
    for column in ("form", "form id", "expected", "outcome", "ok"):
        summary.add_column(column)
    for case in demo:
        summary.add_row(case.key, case.form_id, case.expect, outcome(case),
                        "✔" if outcome(case) == case.expect else "✘")
    print_table(console, summary)
    return ok

"""The design's own test plan, played on the local stack and shown live in the terminal.

Forms are inserted into the database like the clinic app would; the dev stack forwards each
change to schedule-form as a Supabase Database Webhook, which publishes (or cancels) the form's
one-time QStash message. The fake Vapi plays each patient's call from a per-number script and
reports it to call-events, signed as Vapi signs. The journey shown is the form's audit trail
(form_call_events); the closing table shows every call placed and how it ended.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from formcall_cli.status import as_text, print_table
from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import StackInfo


@dataclass
class Case:
    """One seeded form, what the demo does to it, and where its journey must end."""

    key: str
    title: str
    phone: str
    expect: str  # reached | cancelled | failed | unscheduled | opted_out
    calls: int = 1  # calls placed for the form by the end
    due_in: float | None = 4.0  # seconds from now; None: no deadline
    webhook: bool = True  # False: inserted as if the webhook (the job) was missed
    submit: bool = False  # the patient submits before the deadline
    move_to: float | None = None  # the doctor moves the deadline to this many seconds from now
    vapi_rule: dict | None = None  # fault the fake Vapi injects for this phone
    script: list[str] | None = None  # how the fake plays this number's calls, one per call
    patient: str = ""  # cases with the same patient share one (default: own)
    form_id: str = ""
    patient_id: str = ""
    journey: list[str] = field(default_factory=list)
    status: str = "pending"
    call_outcome: str | None = None
    next_call_at: datetime | None = None
    placed: list[tuple[str, str | None]] = field(default_factory=list)  # (vapi id, outcome)
    detail: str = ""


def cases() -> list[Case]:
    return [
        Case("on-time", "Pre-visit questionnaire", "+15550100101", "reached"),
        Case("submitted", "Consent form", "+15550100102", "cancelled", calls=0, submit=True),
        Case("moved", "Lab results review", "+15550100107", "reached", due_in=3, move_to=7),
        Case(
            "no-deadline", "Optional feedback", "+15550100103", "unscheduled", calls=0, due_in=None
        ),
        Case(
            "rejected",
            "Insurance details",
            "+15550100104",
            "failed",
            calls=0,
            vapi_rule={"status": 400},
        ),
        Case(
            "flaky",
            "Medication list",
            "+15550100105",
            "reached",
            vapi_rule={"status": 503, "times": 1},
        ),
        Case("missed-job", "Allergy form", "+15550100106", "reached", due_in=-60, webhook=False),
        # Call outcomes: follow-ups, one call per patient, opt-out.
        Case(
            "no-answer",
            "Vaccination record",
            "+15550100108",
            "reached",
            calls=2,
            script=["no_answer", "reached"],
        ),
        Case("two-forms-a", "Health history", "+15550100109", "reached", patient="two-forms"),
        Case("two-forms-b", "Dental history", "+15550100109", "reached", patient="two-forms"),
        Case(
            "voicemail",
            "Emergency contacts",
            "+15550100110",
            "reached",
            calls=2,
            script=["voicemail", "reached"],
        ),
        Case(
            "opt-out",
            "Travel questionnaire",
            "+15550100111",
            "opted_out",
            script=["opt_out"],
            patient="opt-out",
        ),
        # Due after the opt-out: its message is cancelled and it is never called.
        Case(
            "opt-out-later",
            "Follow-up survey",
            "+15550100111",
            "opted_out",
            calls=0,
            due_in=12,
            patient="opt-out",
        ),
    ]


def _fake(info: StackInfo, path: str, **kwargs) -> None:
    admin = {"Authorization": f"Bearer {info.credentials['VAPI_PRIVATE_KEY']}"}
    httpx.post(f"{info.vapi_url}/_fake{path}", headers=admin, **kwargs).raise_for_status()


def seed(info: StackInfo, demo: list[Case]) -> None:
    if not info.real_vapi:
        _fake(info, "/reset")
        for case in demo:
            if case.vapi_rule:
                _fake(info, "/rules", json={"customer_number": case.phone, **case.vapi_rule})
        _fake(
            info,
            "/configure",
            json={"scripts": {case.phone: case.script for case in demo if case.script}},
        )
    now = datetime.now(UTC)
    patients: dict[str, str] = {}
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        for case in demo:
            who = case.patient or case.key
            if who not in patients:
                patients[who] = create_patient(conn, full_name=f"Demo {who}", phone=case.phone)
            case.patient_id = patients[who]
            deadline = None if case.due_in is None else now + timedelta(seconds=case.due_in)
            # A silent insert: schedule-form never hears of the form (a lost webhook or job).
            case.form_id = create_form(
                conn,
                patient_id=case.patient_id,
                title=case.title,
                deadline=deadline,
                silent=not case.webhook,
            )


def change_forms(info: StackInfo, demo: list[Case]) -> None:
    """What happens after creation: a submission before the deadline, a moved deadline."""
    with psycopg.connect(info.dsn, autocommit=True) as conn:
        for case in demo:
            if case.submit:
                conn.execute("update forms set submitted_at = now() where id = %s", (case.form_id,))
            if case.move_to is not None:
                conn.execute(
                    "update forms set deadline = now() + make_interval(secs => %s) where id = %s",
                    (case.move_to, case.form_id),
                )


LABELS = {
    "claimed": "claimed",
    "released": "retry",
    "outcome_unknown": "unknown",
    "follow_up_scheduled": "follow-up",
    "opted_out": "opted out",
}


def _label(event: str, detail: dict | None) -> str:
    if event == "call_ended":
        return f"ended: {(detail or {}).get('outcome')}"
    return LABELS.get(event, event)


def refresh(info: StackInfo, demo: list[Case]) -> None:
    with psycopg.connect(info.dsn) as conn:
        for case in demo:
            case.status, case.call_outcome, case.next_call_at, error = conn.execute(
                "select call_status, call_outcome, next_call_at, last_call_error from forms"
                " where id = %s",
                (case.form_id,),
            ).fetchone()
            rows = conn.execute(
                "select event, detail from form_call_events where form_id = %s order by id",
                (case.form_id,),
            ).fetchall()
            case.journey = ["created"] + [_label(event, detail) for event, detail in rows]
            case.placed = conn.execute(
                "select c.vapi_call_id, c.outcome from calls c join call_forms cf"
                " on cf.call_id = c.id where cf.form_id = %s and c.vapi_call_id is not null"
                " order by c.created_at",
                (case.form_id,),
            ).fetchall()
            skipped = [d.get("reason") for e, d in rows if e == "skipped"]
            case.detail = error or (f"skipped: {skipped[-1]}" if skipped else "")


def outcome(case: Case) -> str:
    """Where the form is now, in the words of Case.expect."""
    if case.status in ("failed", "opted_out"):
        return case.status
    if case.status == "called":
        if case.call_outcome is None:
            return "in call"
        return case.call_outcome
    if case.journey and case.journey[-1] == "cancelled":
        return "cancelled"
    if case.status == "pending" and case.due_in is None and len(case.journey) == 1:
        return "unscheduled"
    if case.next_call_at is not None:
        return "follow-up due"
    return "waiting"


def settled(case: Case, elapsed: float) -> bool:
    # A form is only done once its (final) deadline has passed: nothing may come after.
    due = max(case.due_in or 0, case.move_to or 0)
    return outcome(case) == case.expect and len(case.placed) == case.calls and elapsed >= due + 1


def render(demo: list[Case], elapsed: float, phase: str) -> Table:
    done = sum(settled(c, elapsed) for c in demo)
    table = Table(title=f"formcall demo: {phase}  [{done}/{len(demo)} settled, {elapsed:4.1f} s]")
    for column in ("form", "expect", "journey", "now", "detail"):
        table.add_column(column)
    for case in demo:
        now = outcome(case)
        style = (
            "green"
            if settled(case, elapsed)
            else ("red" if now in ("reached", "failed", "opted_out") else "")
        )
        table.add_row(
            case.key,
            case.expect,
            " → ".join(case.journey),
            f"[{style}]{now}[/]" if style else now,
            escape(case.detail[:60]),
        )
    return table


def describe_answer(answer: httpx.Response) -> str:
    """An HTTP answer as one line of text: its status, then its JSON as `name: value` pairs."""
    try:
        body = answer.json()
    except ValueError:
        return f"HTTP {answer.status_code}: {answer.text[:200]}"
    return f"HTTP {answer.status_code}: {as_text(body)}"


def message_gone(info: StackInfo, message_id: str) -> bool:
    answer = httpx.get(
        f"{info.qstash_url}/v2/messages/{message_id}",
        timeout=10,
        headers={"Authorization": f"Bearer {info.credentials['QSTASH_TOKEN']}"},
    )
    return answer.status_code == 404


def opted_out_messages(info: StackInfo, demo: list[Case]) -> list[tuple[Case, str, bool]]:
    """Each opted-out form's cancelled message and whether QStash still holds it."""
    out = []
    with psycopg.connect(info.dsn) as conn:
        for case in demo:
            for (message_id,) in conn.execute(
                "select detail->>'message_id' from form_call_events where form_id = %s"
                " and event = 'opted_out' and detail->>'message_id' is not null",
                (case.form_id,),
            ):
                out.append((case, message_id, message_gone(info, message_id)))
    return out


def outcome_table(demo: list[Case]) -> Table:
    table = Table(title="outcomes: every form, every call placed for it")
    for column in (
        "form",
        "form id",
        "patient",
        "calls placed",
        "each call's outcome",
        "final status / outcome",
        "ok",
    ):
        table.add_column(column, no_wrap=column == "form id")
    for case in demo:
        final = case.status + (f" / {case.call_outcome}" if case.call_outcome else "")
        if case.status == "pending" and outcome(case) != "waiting":
            final += f" ({outcome(case)})"
        table.add_row(
            case.key,
            case.form_id,
            f"Demo {case.patient or case.key}",
            str(len(case.placed)),
            " → ".join(o or "(under way)" for _, o in case.placed) or "-",
            final,
            "✔" if settled(case, float("inf")) else "✘",
        )
    return table


def run(info: StackInfo, console: Console, *, timeout: float = 50.0) -> bool:
    """Play the demo; True when every form ended where it should."""
    started = time.monotonic()
    setup = httpx.get(
        info.setup_url, params={"secret": info.credentials["CRON_SECRET"]}, timeout=30
    )
    console.print(f"[bold]setup[/] {escape(describe_answer(setup))}")
    demo = cases()
    seed(info, demo)
    time.sleep(1.0)
    change_forms(info, demo)
    trigger = httpx.get(
        info.check_forms_url,
        timeout=60,
        headers={"Authorization": f"Bearer {info.credentials['CRON_SECRET']}"},
    )
    console.print(f"[bold]manual sweep[/] {escape(describe_answer(trigger))}")
    # In a terminal the journeys update in place; a pipe or log gets the final table once, whole.
    piped = not console.is_terminal
    with Live(
        render(demo, 0, "running"), console=console, refresh_per_second=4, transient=piped
    ) as live:
        while time.monotonic() - started < timeout:
            refresh(info, demo)
            elapsed = time.monotonic() - started
            live.update(render(demo, elapsed, "running"))
            if all(settled(c, elapsed) for c in demo):
                break
            time.sleep(0.25)
        refresh(info, demo)
        elapsed = time.monotonic() - started
        ok = all(settled(c, elapsed) for c in demo)
        live.update(render(demo, elapsed, "done" if ok else "TIMED OUT"))
    if piped:
        print_table(console, render(demo, elapsed, "done" if ok else "TIMED OUT"))
    print_table(console, outcome_table(demo))
    ok = _shared_calls(console, demo) and ok
    for case, message_id, gone in opted_out_messages(info, demo):
        console.print(
            f"opt-out: {case.key}'s message {message_id} "
            + ("cancelled in QStash" if gone else "[red]still queued[/]")
        )
        ok = ok and gone
    return ok


def _shared_calls(console: Console, demo: list[Case]) -> bool:
    """A patient with several due forms got one call about all of them."""
    by_patient: dict[str, list[Case]] = defaultdict(list)
    for case in demo:
        if case.patient and case.calls:
            by_patient[case.patient].append(case)
    ok = True
    for patient, group in by_patient.items():
        if len(group) < 2:
            continue
        ids = {tuple(v for v, _ in case.placed) for case in group}
        one = len(ids) == 1 and len(next(iter(ids))) == 1
        console.print(
            f"patient Demo {patient}: {len(group)} forms, "
            + (
                f"one call {next(iter(ids))[0]} about all of them"
                if one
                else "[red]not one shared call[/]"
            )
        )
        ok = ok and one
    return ok

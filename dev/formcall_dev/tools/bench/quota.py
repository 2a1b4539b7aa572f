"""6. QStash requests per form for a realistic day, counted on the local QStash, beside the seed's.

A day (compressed to seconds) of forms: each is created with a deadline; most patients submit
before it, some deadlines are moved once, the rest are called at the deadline. The same day is
played twice on the same stack and counted on the local QStash (`GET /v2/_local/stats`):
- formcall: inserts and updates go through the Database Webhook to schedule-form, which
  publishes, moves (cancel + publish) and cancels each form's one-time message;
- the seed's design: one delayed message published per form when it is created and one more per
  deadline change, never cancelled (a submitted form's message is still delivered and skipped;
its deliveries go to formcall's call-form, which skips as the seed's handler would).
Both designs have the hourly sweep: 24 schedule triggers a day, whatever the number of forms.
"""

from __future__ import annotations

import math
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from formcall_dev.polling import wait_until
from formcall_dev.stack import fake_vapi
from formcall_dev.tools.bench.common import BenchStack, qstash

SUBMITTED, MOVED = 0.6, 0.15
SWEEPS_PER_DAY = 24


def plan_day(forms: int, seconds: float, seed: int = 5) -> list[dict]:
    """Each form's creation, deadline and fate (submitted early, moved once, or called)."""
    rng = random.Random(seed)
    notice = min(3.0, seconds / 2)  # time for the webhook and schedule-form before the deadline
    plan = []
    for number in range(forms):
        created = rng.uniform(0, seconds / 2)
        deadline = created + rng.uniform(notice, seconds / 2 + notice)
        roll = rng.random()
        fate = (
            "submitted" if roll < SUBMITTED else "moved" if roll < SUBMITTED + MOVED else "called"
        )
        form = {"n": number, "created": created, "deadline": deadline, "fate": fate}
        if fate != "called":
            # Moved earlier: the seed's old message then finds the form called and skips it,
            # as a move of hours or days would have it (a move of seconds later would make it
            # a "not due yet" delivery, which only a compressed day produces).
            form["changed"] = created + (deadline - created) * rng.uniform(0.2, 0.6)
            form["new_deadline"] = form["changed"] + (deadline - form["changed"]) * rng.uniform(
                0.4, 0.8
            )
        plan.append(form)
    return plan


def play_day(conn, info, plan: list[dict], *, design: str) -> None:
    """Run the day's inserts and updates at their times (seconds from now)."""
    from qstash import QStash

    client = QStash(info.credentials["QSTASH_TOKEN"], base_url=info.qstash_url, retry=False)
    start = datetime.now(UTC)
    events = sorted(
        [(f["created"], "create", f) for f in plan]
        + [(f["changed"], f["fate"], f) for f in plan if "changed" in f],
        key=lambda e: e[0],
    )
    ids: dict[int, str] = {}

    def run(sql: str, params: tuple):
        if design == "formcall":  # the webhook does the rest
            return conn.execute(sql, params).fetchone()
        with conn.transaction():
            conn.execute("set local session_replication_role = replica")
            return conn.execute(sql, params).fetchone()

    def publish(form_id: str, deadline: datetime) -> None:
        client.message.publish_json(
            url=info.call_form_url,
            body={"formId": form_id},
            not_before=math.ceil(deadline.timestamp()),
            retries=3,
        )

    for at, kind, form in events:
        time.sleep(max(0.0, at - (datetime.now(UTC) - start).total_seconds()))
        deadline = start + timedelta(seconds=form["deadline"])
        if kind == "create":
            # Each form its own patient: the day's forms are many patients' (one call each).
            ids[form["n"]] = str(
                run(
                    "with p as (insert into patients (full_name, phone)"
                    " values ('Day Patient', '+15550100000') returning id)"
                    " insert into forms (patient_id, title, deadline)"
                    " select id, 'Day form', %s from p returning id",
                    (deadline,),
                )[0]
            )
            if design == "seed":
                publish(ids[form["n"]], deadline)
        elif kind == "submitted":
            run(
                "update forms set submitted_at = now() where id = %s returning id",
                (ids[form["n"]],),
            )
        else:
            moved = start + timedelta(seconds=form["new_deadline"])
            run(
                "update forms set deadline = %s where id = %s returning id", (moved, ids[form["n"]])
            )
            if design == "seed":
                publish(ids[form["n"]], moved)


def count_day(info, conn, plan: list[dict], *, design: str) -> dict:
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("delete from form_call_events")
        conn.execute("delete from forms")
        # The line ledger too: each design's day starts with every line free.
        conn.execute("delete from call_forms")
        conn.execute("delete from calls")
    fake_vapi(info, "POST", "/reset")
    qstash(info, "POST", "/_local/stats/reset")
    play_day(conn, info, plan, design=design)
    to_call = sum(1 for f in plan if f["fate"] != "submitted")
    wait_until(
        lambda: (
            conn.execute("select count(*) from forms where call_status = 'called'").fetchone()[0]
            >= to_call
        ),
        timeout=60,
        interval=0.2,
    )
    # Every message delivered (or cancelled), nothing left in flight.
    wait_until(
        lambda: qstash(info, "GET", "/_local/stats")["queued"] == 0, timeout=60, interval=0.2
    )
    stats = qstash(info, "GET", "/_local/stats")
    requests, deliveries = stats["requests"], stats["deliveries"]
    # One hourly sweep, as its schedule fires it: what each of the day's 24 costs.
    qstash(info, "POST", "/_local/stats/reset")
    qstash(info, "POST", "/_local/schedules/formcall-check-forms/trigger")
    wait_until(
        lambda: (
            qstash(info, "GET", "/_local/stats")["deliveries"]["delivered"] >= 1
            and qstash(info, "GET", "/_local/stats")["queued"] == 0
        ),
        timeout=30,
        interval=0.1,
    )
    sweep = qstash(info, "GET", "/_local/stats")
    sweep_messages = 1 + sweep["requests"]["batchMessages"] + sweep["requests"]["publish"]
    called = conn.execute("select count(*) from forms where call_status = 'called'").fetchone()[0]
    # What formcall recorded of its messages: a publish leaves 'scheduled' or 'rescheduled'; a
    # cancel 'cancelled', or 'rescheduled' when a move replaced the message.
    recorded = dict(
        conn.execute(
            "select event, count(*) from form_call_events"
            " where event in ('scheduled', 'rescheduled', 'cancelled') group by 1"
        ).fetchall()
    )
    vapi = fake_vapi(info, "GET", "/stats")
    placed = vapi["placed"]
    forms = len(plan)
    messages = requests["publish"] + requests["batchMessages"] + deliveries["callbacksQueued"]
    day_messages = messages + SWEEPS_PER_DAY * sweep_messages
    return {
        "design": design,
        "forms": forms,
        "called": called,
        "placed": placed,
        "publish": requests["publish"],
        "batch_messages": requests["batchMessages"],
        "cancel": requests["cancel"],
        "recorded_publishes": recorded.get("scheduled", 0) + recorded.get("rescheduled", 0),
        "recorded_cancels": recorded.get("cancelled", 0) + recorded.get("rescheduled", 0),
        "deliveries": deliveries["attempted"],
        "retries": deliveries["retriesScheduled"],
        "callbacks": deliveries["callbacksQueued"],
        "refused": vapi["blocked"],
        "sweep_messages": sweep_messages,
        "messages_per_form": messages / forms,
        "day_messages_per_form": day_messages / forms,
        "requests_per_form": (requests["publish"] + requests["batch"] + requests["cancel"]) / forms,
        "deliveries_per_form": deliveries["attempted"] / forms,
        "attempts_billed_per_form": (day_messages + deliveries["retriesScheduled"]) / forms,
    }


def bench_quota(work: Path, sizes) -> dict:
    plan = plan_day(sizes.day_forms, sizes.day_seconds)
    with BenchStack(work / "quota") as info, psycopg.connect(info.dsn, autocommit=True) as conn:
        conn.execute(
            "insert into patients (full_name, phone) values ('Day Patient', '+15550100000')"
        )
        answer = httpx.get(
            info.setup_url, params={"secret": info.credentials["CRON_SECRET"]}, timeout=30
        )
        answer.raise_for_status()
        formcall = count_day(info, conn, plan, design="formcall")
        seed = count_day(info, conn, plan, design="seed")
    fates = {
        fate: sum(1 for f in plan if f["fate"] == fate) for fate in ("submitted", "moved", "called")
    }
    return {
        "forms": sizes.day_forms,
        "fates": fates,
        "formcall": formcall,
        "seed": seed,
        "ratio": formcall["day_messages_per_form"] / seed["day_messages_per_form"],
    }

"""Chaos run: forms through the local stack while Vapi, the function server, the database and QStash fail.

`python -m formcall_dev.tools.chaos` (`make chaos`) starts a local stack (real processes, as `formcall
dev`), seeds 1,000 forms (due during the run, overdue, not yet due, submitted early, deadline
moved later, earlier or away, some inserted with no webhook; some patients have several forms
due together, a few opt out on their call) and lets their one-time messages fire while it
injects faults: Vapi 5xx answers, Vapi timeouts after the call was placed (the outcome is
unknown to call-form), Vapi rejections, duplicate deliveries (a signed delivery re-POSTed twice,
and a second message published), the function server SIGKILLed while a call is in flight at
Vapi, the function server's database connections terminated, the local QStash killed and
restarted once, and Vapi's call reports lost, duplicated and reordered. Calls end as a mix of
outcomes (no answer, voicemail, busy... are followed up 2 s later, within tight per-patient
caps). When nothing is due any more, sweeps run until a round changes nothing: stale claims are
reconciled with `reconcile_stale_calls(lease_seconds=0)` and lost reports looked up with
`look_up_lost_outcomes(timeout_seconds=0)` (in production only claims older than the 15-minute
lease and calls older than CALL_OUTCOME_TIMEOUT_SECONDS are, which no run can wait for), then
check-forms is triggered over HTTP. Then the fake Vapi's own record, the database and the local
QStash's tables are checked, and the figures printed. `--write BENCHMARKS.md` puts them in the
file's "## Chaos" section; the hostile-input suites run scaled up after it (`--hostile-cases`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

from formcall_dev.seed import create_form, create_patient
from formcall_dev.stack import Stack, StackInfo, fake_vapi

REPO_ROOT = Path(__file__).resolve().parents[3]
MUST_CALL = ("due", "overdue", "overdue_silent", "moved_later", "moved_earlier")
MUST_NOT_CALL = ("not_due", "submitted", "moved_away")
# Shares of the forms; the rest are due during the run.
MIX = {
    "overdue": 0.04,
    "overdue_silent": 0.04,
    "not_due": 0.12,
    "submitted": 0.12,
    "moved_later": 0.10,
    "moved_earlier": 0.04,
    "moved_away": 0.04,
}
# How the fake Vapi's calls end (weights); opt-outs are scripted for chosen patients.
OUTCOME_MIX = {
    "reached": 0.62,
    "no_answer": 0.14,
    "voicemail": 0.1,
    "busy": 0.06,
    "not_connected": 0.06,
    "bad_number": 0.02,
}
# The call rules of the run: follow-ups seconds apart, caps tight enough to be met.
CALL_RULES = {
    "FOLLOW_UP_DELAY_SECONDS": "2",
    "MAX_CALLS_PER_FORM": "3",
    "PATIENT_MAX_CALLS_PER_DAY": "2",
    "PATIENT_MAX_CALLS_PER_WEEK": "3",
    "CALL_OUTCOME_TIMEOUT_SECONDS": "5",
    # An unknown outcome is reconciled this long after its claim (production: 60 s, twice
    # call-form's timeout). Here call-form gives up on Vapi after 1 s and the slowest fault
    # answers after 2.5 s, so 5 s still finds every claimant done, and the run does not sit
    # a minute on each reconcile message.
    "CLAIM_LEASE_SECONDS": "5",
}


@dataclass
class ChaosConfig:
    """How big and how hostile a run is. Fault shares are of all forms, drawn among forms to call."""

    forms: int = 1000
    seed: int = 20261129
    lead_s: float = 25.0  # first deadlines this long after the forms are in
    window_s: float = 60.0  # deadlines spread over this long
    vapi_5xx: float = 0.10
    vapi_timeout: float = 0.05
    vapi_reject: float = 0.02
    duplicates: float = 0.10
    kills: float = 0.05  # forms whose call at Vapi triggers a SIGKILL of the function server
    max_kills: int = 12
    kill_gap_s: float = 4.0  # at least this long between two kills (a restart takes ~1.5 s)
    db_drop_every_s: float = 4.0
    qstash_crash: bool = True  # SIGKILL (leases run out, 30 s) or a graceful restart
    vapi_timeout_s: float = 1.0  # VAPI_TIMEOUT_SECONDS of the functions
    qstash_time_scale: float = 0.001
    settle_timeout_s: float = 420.0
    shared: float = 0.30  # forms due together with other forms of their patient
    opt_outs: float = 0.02  # forms whose patient opts out on the first call
    report_drop_rate: float = 0.10  # Vapi's server messages lost (each message)
    report_duplicate_rate: float = 0.10
    reorder: bool = True  # the final status-update after the end-of-call report


QUICK = dict(
    forms=120,
    lead_s=6.0,
    window_s=12.0,
    max_kills=3,
    kill_gap_s=3.0,
    db_drop_every_s=4.0,
    qstash_crash=False,
    qstash_time_scale=0.0005,
    settle_timeout_s=40.0,
)


@dataclass
class Form:
    id: str
    case: str
    deadline: datetime | None  # as inserted
    final_deadline: datetime | None  # after a move
    faults: list[str] = field(default_factory=list)
    act_at: datetime | None = None  # submit or move: planned
    acted_at: datetime | None = None  # when the submission or move had committed
    patient: int = 0  # index of the form's patient
    opt_out: bool = False  # the patient opts out on the first call
    shared: bool = False  # due together with other forms of its patient


@dataclass
class ChaosResult:
    figures: dict
    violations: list[str]


class _ChaosStack(Stack):
    """The local stack with each process's PostgreSQL connections named after it (PGAPPNAME)."""

    def _spawn(self, name: str, port: int, env: dict[str, str]) -> None:
        super()._spawn(name, port, {**env, "PGAPPNAME": f"formcall-{name}"})


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def plan_forms(config: ChaosConfig, start: float) -> list[Form]:
    """Each form's case, deadlines and faults, reproducibly from the seed."""
    rng = random.Random(config.seed)
    cases = []
    for case, share in MIX.items():
        cases += [case] * round(config.forms * share)
    cases += ["due"] * (config.forms - len(cases))
    rng.shuffle(cases)
    first, last = start + config.lead_s, start + config.lead_s + config.window_s
    forms = []
    for case in cases:
        deadline = _utc(rng.uniform(first, last))
        form = Form(id=str(uuid.uuid4()), case=case, deadline=deadline, final_deadline=deadline)
        if case in ("overdue", "overdue_silent"):
            form.deadline = form.final_deadline = _utc(start - rng.uniform(60, 1800))
        elif case == "not_due":
            form.deadline = form.final_deadline = _utc(start + rng.uniform(1, 3) * 86400)
        elif case == "submitted":
            form.act_at = deadline - timedelta(seconds=rng.uniform(0.5, 3))
        elif case == "moved_later":
            form.act_at = deadline - timedelta(seconds=rng.uniform(0.5, 3))
            form.final_deadline = deadline + timedelta(seconds=rng.uniform(1, 8))
        elif case == "moved_earlier":
            form.deadline = _utc(rng.uniform(last, last + 30))  # the original, after the window
            form.act_at = _utc(rng.uniform(first, last - 3))
            form.final_deadline = form.act_at + timedelta(seconds=rng.uniform(1, 3))
        elif case == "moved_away":
            form.act_at = deadline - timedelta(seconds=rng.uniform(0.5, 3))
            form.final_deadline = deadline + timedelta(days=rng.uniform(1, 3))
        if form.act_at is not None:
            form.act_at = max(form.act_at, _utc(start + 2))
        forms.append(form)
    _assign_patients(forms, config, rng)
    # Vapi's faults match a call's first form: a form that shares its call gets none.
    callable_forms = [f for f in forms if f.case in MUST_CALL and not f.shared]
    rng.shuffle(callable_forms)

    def draw(share: float) -> list[Form]:
        return rng.sample(callable_forms, min(len(callable_forms), round(config.forms * share)))

    for form in draw(config.vapi_reject):
        form.faults.append("vapi_reject")
    for kind, share in (
        ("vapi_5xx", config.vapi_5xx),
        ("vapi_timeout", config.vapi_timeout),
        ("kill", config.kills),
        ("duplicate", config.duplicates),
    ):
        for form in draw(share):
            if kind in ("vapi_timeout", "kill") and "vapi_reject" in form.faults:
                continue
            form.faults.append(kind)
    return forms


def _assign_patients(forms: list[Form], config: ChaosConfig, rng: random.Random) -> None:
    """Most forms have a patient of their own; `shared` of them are due together with one or two
    more forms of the same patient (one call about all); `opt_outs` of them opt out."""
    together = [f for f in forms if f.case in ("due", "overdue")]
    rng.shuffle(together)
    grouped = together[: round(config.forms * config.shared)]
    patient = 0
    while grouped:
        size = min(len(grouped), rng.choice([2, 2, 3]))
        group, grouped = grouped[:size], grouped[size:]
        for form in group:
            # One due moment and one case for the group: a clinic sends its forms at once.
            form.patient, form.case, form.shared = patient, group[0].case, True
            form.deadline = form.final_deadline = group[0].deadline
        patient += 1
    alone = [f for f in forms if not f.shared]
    for form in alone:
        form.patient = patient
        patient += 1
    candidates = [f for f in alone if f.case in ("due", "overdue", "overdue_silent")]
    for form in rng.sample(candidates, min(len(candidates), round(config.forms * config.opt_outs))):
        form.opt_out = True


def _calls_over_caps(times: list[datetime], per_day: int, per_week: int) -> bool:
    """Whether calls at `times` (UTC patients) break either cap."""
    times = sorted(times)
    days = Counter(t.date() for t in times)
    if any(n > per_day for n in days.values()):
        return True
    return any(
        sum(1 for u in times[i:] if u < t + timedelta(days=7)) > per_week
        for i, t in enumerate(times)
    )


class Chaos:
    """One run: the stack, the plan, the fault injectors, the checks."""

    def __init__(self, config: ChaosConfig, data_dir: Path, *, log=print) -> None:
        self.config = config
        self.data_dir = data_dir
        self.log = log
        self.rng = random.Random(config.seed + 1)
        self.stack: _ChaosStack | None = None
        self.info: StackInfo | None = None
        self.forms: list[Form] = []
        self.injected: Counter[str] = Counter()
        self.kill_rules: set[str] = set()
        self.timeout_rules: set[str] = set()
        self.stop = threading.Event()
        self.restart_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=32)
        self.timings: dict[str, float] = {}

    # ---- plumbing ---------------------------------------------------------------------------

    def admin(self, method: str, path: str, **kwargs):
        assert self.info is not None
        return fake_vapi(self.info, method, path, **kwargs)

    def db(self) -> psycopg.Connection:
        assert self.info is not None
        return psycopg.connect(self.info.dsn, autocommit=True, application_name="formcall-chaos")

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> ChaosResult:
        started = time.monotonic()
        config = self.config
        self.stack = _ChaosStack(
            self.data_dir,
            qstash_time_scale=config.qstash_time_scale,
            vapi_call_seconds=0.5,
            vapi_ring_seconds=0.3,
            vapi_concurrency=200,
            call_rules=CALL_RULES,
            extra_env={
                "VAPI_TIMEOUT_SECONDS": str(config.vapi_timeout_s),
                "VAPI_CALLS_PER_MINUTE": "60000",
                "POWERTOOLS_LOG_LEVEL": "INFO",
            },
        )
        self.info = self.stack.start()
        self.timings["stack start"] = time.monotonic() - started
        try:
            with self.db() as conn:
                self.seed(conn)
                self.traffic(conn)
                before_sweeps = self.settle(conn, "traffic")
                sweeps = self.sweep(conn)
                return self.check(conn, before_sweeps, sweeps, started)
        finally:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.stack.stop()

    def seed(self, conn: psycopg.Connection) -> None:
        start = time.time()
        self.forms = plan_forms(self.config, start)
        for form in self.forms:
            rules = []
            if "vapi_reject" in form.faults:
                rules.append(
                    {
                        "form_id": form.id,
                        "status": 422,
                        "body": {
                            "message": ["customer.number is not reachable"],
                            "error": "Unprocessable Entity",
                            "statusCode": 422,
                        },
                    }
                )
            if "vapi_5xx" in form.faults:
                rules.append(
                    {
                        "form_id": form.id,
                        "status": self.rng.choice([500, 502, 503]),
                        "times": self.rng.choice([1, 1, 2]),
                    }
                )
            if "vapi_timeout" in form.faults:
                rules.append(
                    {"form_id": form.id, "delay": self.config.vapi_timeout_s + 1.5, "times": 1}
                )
            if "kill" in form.faults:
                # Long enough to be caught in flight, shorter than VAPI_TIMEOUT_SECONDS.
                rules.append(
                    {"form_id": form.id, "delay": self.config.vapi_timeout_s * 0.7, "times": 1}
                )
            for rule in rules:
                made = self.admin("POST", "/rules", json=rule)
                if "delay" in rule:
                    (
                        self.timeout_rules
                        if "vapi_timeout" in form.faults
                        and rule["delay"] > self.config.vapi_timeout_s
                        else self.kill_rules
                    ).add(made["id"])
        count = max(f.patient for f in self.forms) + 1
        self.phones = [f"+1555{2000000 + i:07d}" for i in range(count)]
        self.admin(
            "POST",
            "/configure",
            json={
                "outcome_mix": OUTCOME_MIX,
                "seed": self.config.seed,
                "report_drop_rate": self.config.report_drop_rate,
                "report_duplicate_rate": self.config.report_duplicate_rate,
                "reorder": self.config.reorder,
                "scripts": {self.phones[f.patient]: ["opt_out"] for f in self.forms if f.opt_out},
            },
        )
        with conn.transaction():
            self.patients = [
                create_patient(conn, full_name=f"Chaos Patient {i}", phone=phone)
                for i, phone in enumerate(self.phones)
            ]
            for index, form in enumerate(self.forms):
                if form.case != "overdue_silent":
                    create_form(
                        conn,
                        patient_id=self.patients[form.patient],
                        title=f"Chaos form {index}",
                        deadline=form.deadline,
                        form_id=form.id,
                    )
        # Apart: a silent insert's `set local session_replication_role` lasts to the commit.
        for index, form in enumerate(self.forms):
            if form.case == "overdue_silent":
                create_form(
                    conn,
                    patient_id=self.patients[form.patient],
                    title=f"Chaos form {index}",
                    deadline=form.deadline,
                    form_id=form.id,
                    silent=True,
                )
        self.log(f"seeded {len(self.forms)} forms in {time.time() - start:.1f} s")

    def traffic(self, conn: psycopg.Connection) -> None:
        """Play the moves, submissions, duplicates, database drops and the QStash restart."""
        config = self.config
        actions: list[tuple[datetime, str, object]] = []
        for form in self.forms:
            if form.case == "submitted":
                actions.append((form.act_at, "submit", form))
            elif form.case.startswith("moved_"):
                actions.append((form.act_at, "move", form))
            if "duplicate" in form.faults:
                at = form.final_deadline
                actions.append((at - timedelta(seconds=1), "publish_duplicate", form))
                actions.append((at + timedelta(seconds=self.rng.uniform(0, 0.3)), "replay", form))
        window_start = min(f.deadline for f in self.forms if f.case == "due")
        window_end = max(f.final_deadline for f in self.forms if f.case in MUST_CALL)
        at = window_start
        while at < window_end:
            actions.append((at, "db_drop", None))
            at += timedelta(seconds=config.db_drop_every_s)
        actions.append((window_start + (window_end - window_start) * 0.4, "qstash_restart", None))
        actions.sort(key=lambda a: a[0])

        killer = threading.Thread(
            target=self.kill_on_victim_calls, name="chaos-killer", daemon=True
        )
        killer.start()
        for at, kind, form in actions:
            wait = (at - datetime.now(UTC)).total_seconds()
            if wait > 0:
                time.sleep(wait)
            try:
                getattr(self, f"do_{kind}")(conn, form)
            except Exception as exc:  # a fault injector must not end the run
                self.injected[f"{kind} errors"] += 1
                self.log(f"{kind} failed: {type(exc).__name__}: {exc}")
        # Calls at the end of the window may still be in flight at Vapi.
        time.sleep(config.vapi_timeout_s + 2)
        self.stop.set()
        killer.join(timeout=30)

    def do_submit(self, conn, form: Form) -> None:
        conn.execute("update forms set submitted_at = now() where id = %s", (form.id,))
        form.acted_at = datetime.now(UTC)
        self.late_actions(form)

    def do_move(self, conn, form: Form) -> None:
        conn.execute("update forms set deadline = %s where id = %s", (form.final_deadline, form.id))
        form.acted_at = datetime.now(UTC)
        self.late_actions(form)

    def late_actions(self, form: Form) -> None:
        if form.deadline is not None and form.acted_at >= form.deadline:
            self.injected["submissions or moves made after the old deadline (late)"] += 1

    def do_publish_duplicate(self, conn, form: Form) -> None:
        from qstash import QStash

        assert self.info is not None
        client = QStash(
            self.info.credentials["QSTASH_TOKEN"], base_url=self.info.qstash_url, retry=False
        )
        client.message.publish_json(
            url=self.info.call_form_url,
            body={"formId": form.id},
            not_before=int(form.final_deadline.timestamp()) + 1,
            retries=5,
            failure_callback=self.info.failure_callback_url,
        )
        self.injected["duplicate messages published"] += 1

    def do_replay(self, conn, form: Form) -> None:
        """Re-POST the form's delivery twice at once, signed as QStash signs it (same message id)."""
        from formcall.signatures import sign

        assert self.info is not None
        row = conn.execute(
            "select qstash_message_id from forms where id = %s", (form.id,)
        ).fetchone()
        body = json.dumps({"formId": form.id}).encode()
        headers = {
            "content-type": "application/json",
            "upstash-retried": "0",
            "upstash-message-id": (row and row[0]) or f"msg_replay_{form.id}",
            "user-agent": "Upstash-QStash",
            "upstash-signature": sign(
                key=self.info.credentials["QSTASH_CURRENT_SIGNING_KEY"],
                url=self.info.call_form_url,
                body=body,
            ),
        }

        def post() -> None:
            try:
                answer = httpx.post(
                    self.info.call_form_url, content=body, headers=headers, timeout=30
                )
                self.injected[f"duplicate deliveries answered {answer.status_code}"] += 1
            except httpx.HTTPError:
                self.injected["duplicate deliveries refused (server down)"] += 1

        for _ in range(2):
            self.pool.submit(post)
        self.injected["duplicate deliveries sent"] += 2

    def do_db_drop(self, conn, _form) -> None:
        terminated = conn.execute(
            "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity"
            " where application_name = 'formcall-functions'"
        ).fetchone()[0]
        self.injected["database drops"] += 1
        self.injected["database connections terminated"] += terminated

    def do_qstash_restart(self, conn, _form) -> None:
        assert self.stack is not None
        queued = conn.execute("select count(*) from local_qstash.messages").fetchone()[0]
        with self.restart_lock:
            if self.config.qstash_crash:
                process = self.stack.processes["qstash"]
                process.kill()
                process.wait()
            self.stack.restart("qstash")
        self.injected["qstash restarts"] += 1
        self.injected["messages queued at the qstash restart"] += queued
        self.log(
            f"QStash {'killed' if self.config.qstash_crash else 'stopped'} and restarted"
            f" with {queued} messages queued"
        )

    def kill_on_victim_calls(self) -> None:
        """SIGKILL the function server whenever a victim's call is in flight at Vapi."""
        assert self.stack is not None
        seen, last_kill = 0, 0.0
        while not self.stop.is_set():
            try:
                hits = sum(
                    r["hits"] for r in self.admin("GET", "/rules") if r["id"] in self.kill_rules
                )
            except httpx.HTTPError:
                hits = seen
            if (
                hits > seen
                and self.injected["function server kills"] < self.config.max_kills
                and time.monotonic() - last_kill >= self.config.kill_gap_s
            ):
                last_kill = time.monotonic()
                with self.restart_lock:
                    process = self.stack.processes["functions"]
                    process.kill()
                    process.wait()
                    self.injected["function server kills"] += 1
                    self.stack.restart("functions")
            seen = hits
            self.stop.wait(0.05)

    # ---- settling and sweeps ----------------------------------------------------------------

    def settle(self, conn: psycopg.Connection, phase: str) -> dict:
        """Wait until QStash holds nothing due, in flight or retrying (only future messages)."""
        started = time.monotonic()
        deadline = started + self.config.settle_timeout_s
        while True:
            busy = conn.execute(
                "select count(*) from local_qstash.messages"
                " where state = 'ACTIVE' or due_at < now() + interval '1 hour'"
            ).fetchone()[0]
            if busy == 0:
                break
            if time.monotonic() > deadline:
                for row in conn.execute(
                    "select m.state, m.due_at - now(), m.url, convert_from(m.body, 'utf8'),"
                    " (select string_agg(e.event || coalesce(' ' || (e.detail->>'reason'), ''),"
                    "  ', ' order by e.id) from form_call_events e"
                    "  where e.form_id::text = convert_from(m.body, 'utf8')::jsonb->>'formId')"
                    " from local_qstash.messages m"
                    " where m.state = 'ACTIVE' or m.due_at < now() + interval '1 hour'"
                ):
                    self.log(f"still busy after {phase}: {row}")
                break
            time.sleep(0.25)
        time.sleep(1.0)  # a last webhook or response in flight
        self.timings[f"settle after {phase}"] = time.monotonic() - started
        snapshot = dict(
            conn.execute(
                "select case when call_status = 'calling' and last_call_error like 'outcome unknown%%'"
                " then 'calling (outcome unknown)' else call_status end, count(*) from forms"
                " group by 1"
            ).fetchall()
        )
        snapshot["messages still busy"] = busy
        return snapshot

    def sweep(self, conn: psycopg.Connection) -> list[dict]:
        """Reconcile (lease 0) and trigger check-forms until a round changes nothing."""
        from formcall import clients

        assert self.info is not None
        from formcall.observability import logger

        saved, level = dict(os.environ), logger.log_level
        os.environ.update({**self.info.env(), "VAPI_TIMEOUT_SECONDS": "10"})
        clients.reset()
        logger.setLevel("ERROR")  # one "stale call reconciled" line per form is noise here
        try:
            return self._sweep_rounds(conn)
        finally:
            logger.setLevel(level)
            os.environ.clear()
            os.environ.update(saved)
            clients.reset()

    def _sweep_rounds(self, conn: psycopg.Connection) -> list[dict]:
        from functools import partial

        from formcall import clients, settings
        from formcall.sweep import look_up_lost_outcomes, reconcile_stale_calls

        assert self.info is not None
        config = settings.load(settings.CheckFormsSettings)  # the sweep's own settings
        rounds = []
        for _ in range(10):
            reconciled = Counter()
            while True:
                outcome = reconcile_stale_calls(
                    store=clients.store(config), vapi=clients.vapi(config), lease_seconds=0
                )
                reconciled.update(outcome)
                if sum(outcome.values()) == outcome["unresolved"]:
                    break
            # Calls whose end was never reported (lost reports, a kill before the record).
            looked_up = look_up_lost_outcomes(
                store=clients.store(config),
                vapi=clients.vapi(config),
                publisher=partial(clients.publisher, config),
                call_form_url=self.info.call_form_url,
                window=clients.window(config),
                timeout_seconds=0,
            )
            answer = httpx.get(
                self.info.check_forms_url,
                timeout=120,
                headers={"Authorization": f"Bearer {self.info.credentials['CRON_SECRET']}"},
            ).json()
            self.settle(conn, f"sweep {len(rounds) + 1}")
            rounds.append(
                {
                    "reconciled": dict(reconciled),
                    "looked up": looked_up,
                    "found": answer["found"],
                    "enqueued": answer["enqueued"],
                    "failed": answer["failed"],
                }
            )
            self.log(f"sweep {len(rounds)}: {rounds[-1]}")
            if (
                not answer["found"]
                and not reconciled["found"]
                and not reconciled["released"]
                and not looked_up["ended"]
                and not looked_up["open"]
            ):
                break
            if looked_up["open"]:
                time.sleep(1.0)  # calls still ringing or talking at Vapi
        return rounds

    # ---- checks and figures -----------------------------------------------------------------

    def check(
        self, conn: psycopg.Connection, before_sweeps: dict, sweeps: list[dict], started: float
    ) -> ChaosResult:
        from formcall_dev.vapi.fake import ENDED_REASONS, form_ids_of

        violations: list[str] = []
        by_id = {f.id: f for f in self.forms}
        requests = self.admin("GET", "/requests")
        # How each call ended, by Vapi's (the fake's) own record.
        ended = {c["id"]: c for c in self.admin("GET", "/calls")}
        class_of = {
            reason: ("reached" if outcome == "opt_out" else outcome)
            for outcome, reason in ENDED_REASONS.items()
        }
        placed: dict[str, list[dict]] = {}
        for request in requests:
            if request["outcome"] != "placed":
                continue
            # One call covers every due form of the patient (metadata.formIds).
            for form_id in form_ids_of(request["body"]):
                if form_id in by_id:
                    placed.setdefault(form_id, []).append(request)
        rows = {
            str(r[0]): r[1:]
            for r in conn.execute(
                "select id, call_status, vapi_call_id, last_call_error, deadline, submitted_at,"
                " call_outcome, next_call_at from forms"
            ).fetchall()
        }
        rules = self.stack.call_rules if self.stack else CALL_RULES
        delay = timedelta(seconds=int(rules["FOLLOW_UP_DELAY_SECONDS"]))
        follow_up_on = {"no_answer", "busy", "voicemail", "not_connected"}

        # Twice for one due moment: a second call that is not a follow-up of the first.
        twice = []
        for form_id, calls in placed.items():
            calls.sort(key=lambda c: c["at"])
            for first, second in zip(calls, calls[1:], strict=False):
                record = ended.get(first["call_id"]) or {}
                outcome = class_of.get(record.get("endedReason"))
                ended_at = record.get("endedAt")
                if (
                    outcome not in follow_up_on
                    or ended_at is None
                    or _moment(second["at"]) < _moment(ended_at) + delay - timedelta(milliseconds=1)
                ):
                    twice.append(form_id)
                    violations.append(
                        f"form {form_id} ({by_id[form_id].case}) was called again"
                        f" at {second['at']} after a call that ended {outcome}"
                    )
                    break
            if len(calls) > int(rules["MAX_CALLS_PER_FORM"]):
                violations.append(f"form {form_id} was called {len(calls)} times")
        called_before_act: set[str] = set()
        for form_id, calls in placed.items():
            status, call_id, _error, _deadline, submitted_at, _outcome, _next = rows[form_id]
            form = by_id[form_id]
            for call in calls:
                at = _moment(call["at"])
                # The deadline in force when the call was placed: a submission or move the
                # driver made late (after the old deadline) does not apply to an earlier call.
                before_act = form.acted_at is None or at < form.acted_at
                in_force = form.deadline if before_act else form.final_deadline
                if form.case == "not_due" or (form.case in MUST_NOT_CALL and not before_act):
                    violations.append(f"form {form_id} ({form.case}) was called")
                elif form.case in MUST_NOT_CALL:
                    called_before_act.add(form_id)
                if submitted_at is not None and at >= submitted_at:
                    violations.append(f"form {form_id} was called after it was submitted")
                if in_force is None or at < in_force - timedelta(milliseconds=1):
                    violations.append(
                        f"form {form_id} ({form.case}) was called before its deadline"
                    )
            if status == "called" and call_id not in {c["call_id"] for c in calls}:
                violations.append(f"form {form_id} records call {call_id}, Vapi has another")
        capped = {
            str(f)
            for (f,) in conn.execute(
                "select distinct form_id from form_call_events where event = 'capped'"
                " and detail->>'reason' = 'patient_cap'"
            )
        }
        outcomes: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for form in self.forms:
            status, call_id, error, deadline, submitted_at, outcome, next_call = rows[form.id]
            if form.id in called_before_act:
                outcomes[f"{form.case}: called before the (late) {form.case} was made"] += 1
                continue
            if form.case in MUST_NOT_CALL:
                outcomes[f"{form.case}: {status}"] += 1
                if status != "pending":
                    violations.append(f"form {form.id} ({form.case}) ended {status}")
                continue
            calls = len(placed.get(form.id, []))
            if status == "called" and call_id and outcome == "reached":
                label = "reached"
            elif (
                status == "called"
                and call_id
                and outcome is not None
                and (outcome not in follow_up_on or calls >= int(rules["MAX_CALLS_PER_FORM"]))
            ):
                label = f"called {calls} times, not reached (last: {outcome})"
            elif status == "failed" and error:
                label = "failed with a reason"
            elif status == "calling" and (error or "").startswith("outcome unknown"):
                label = "flagged (outcome unknown)"
            elif status == "opted_out" and form.opt_out:
                label = "opted out"
            elif (
                status == "pending"
                and form.id in capped
                and next_call is not None
                and next_call > datetime.now(UTC) + timedelta(hours=1)
            ):
                label = "capped: called again when the patient's caps allow"
            else:
                label = f"LOST ({status}, {outcome or 'no outcome'})"
                violations.append(
                    f"due form {form.id} ({form.case}) ended {status} ({outcome}): {error}"
                )
            outcomes[label] += 1
            if calls and "vapi_reject" in form.faults:
                violations.append(f"form {form.id} was called although Vapi rejects it")
            if label == "failed with a reason":
                failures[_failure_kind(error)] += 1

        # The caps, by the calls Vapi placed to each number (the patients are in UTC).
        times: dict[str, list[datetime]] = {}
        for request in requests:
            if request["outcome"] == "placed":
                number = (request["body"].get("customer") or {}).get("number")
                times.setdefault(number, []).append(_moment(request["at"]))
        over_cap = [
            n
            for n, t in times.items()
            if _calls_over_caps(
                t, int(rules["PATIENT_MAX_CALLS_PER_DAY"]), int(rules["PATIENT_MAX_CALLS_PER_WEEK"])
            )
        ]
        violations += [
            f"patient {n} was called over a cap: {sorted(map(str, times[n]))}" for n in over_cap
        ]
        opted = conn.execute(
            "select phone, opted_out_at from patients where opted_out_at is not null"
        ).fetchall()
        after_opt_out = [n for n, at in opted if any(t > at for t in times.get(n, []))]
        violations += [f"patient {n} was called after opting out" for n in after_opt_out]
        unended = conn.execute(
            "select count(*) from calls where vapi_call_id is not null and outcome is null"
        ).fetchone()[0]
        if unended:
            violations.append(f"{unended} placed calls have no outcome after the final sweep")
        reports = Counter()
        for delivery in self.admin("GET", "/reports"):
            reports[
                "dropped"
                if delivery["dropped"]
                else "duplicated"
                if delivery["duplicate"]
                else "delivered"
            ] += 1
        extra = conn.execute(
            "select count(*) from form_call_events where event = 'extra_call'"
        ).fetchone()[0]
        if extra:
            violations.append(f"{extra} extra_call events")

        # No queued message lost: each message QStash accepted was delivered, dead-lettered,
        # cancelled, or is still queued for a later time (forms not yet due).
        lost = conn.execute(
            "select c.message_id, c.url from local_qstash.events c where c.state = 'CREATED'"
            " and not exists (select 1 from local_qstash.events e where e.message_id = c.message_id"
            "   and e.state in ('DELIVERED', 'FAILED', 'CANCELED'))"
            " and not exists (select 1 from local_qstash.messages m where m.message_id = c.message_id"
            "   and m.not_before > now() + interval '1 hour')"
        ).fetchall()
        violations += [
            f"message {m} to {url} was neither delivered, dead-lettered, cancelled"
            " nor kept for later"
            for m, url in lost
        ]
        unrecorded = conn.execute(
            "select d.message_id from local_qstash.dlq d where d.url like '%%/api/jobs/call-form'"
            " and not exists (select 1 from form_call_events e where e.event in"
            "   ('failed', 'delivery_failed') and e.detail->>'source_message_id' = d.message_id)"
        ).fetchall()
        violations += [
            f"dead-lettered message {m} never reached failure-callback" for (m,) in unrecorded
        ]
        kept = conn.execute(
            "select count(*) filter (where m.message_id is not null), count(*) from forms f"
            " left join local_qstash.messages m on m.message_id = f.qstash_message_id"
            " where f.deadline > now() + interval '1 hour' and f.submitted_at is null"
        ).fetchone()

        events = dict(
            conn.execute("select state, count(*) from local_qstash.events group by 1").fetchall()
        )
        responses = self.function_responses()
        cases = Counter(f.case for f in self.forms)
        planned = Counter(kind for f in self.forms for kind in f.faults)
        vapi = Counter()
        for request in requests:
            if request["reason"] == "injected" and request["status"] >= 500:
                vapi["5xx answered"] += 1
            elif request["reason"] == "injected":
                vapi["4xx answered"] += 1
            elif request["rule_id"] in self.timeout_rules:
                vapi["timeouts after placing the call"] += 1
            elif request["rule_id"] in self.kill_rules:
                vapi["calls held 0.7 s at Vapi (what triggers a kill)"] += 1
            if request["outcome"] == "placed":
                vapi["calls placed"] += 1
        figures = {
            "forms": len(self.forms),
            "cases": dict(sorted(cases.items())),
            "patients": {
                "patients": len(self.phones),
                "forms sharing a call with others of their patient": sum(
                    f.shared for f in self.forms
                ),
                "planned opt-outs": sum(f.opt_out for f in self.forms),
                "opted out": len(opted),
            },
            "call rules": dict(rules),
            "faults planned (forms)": dict(sorted(planned.items())),
            "faults injected": dict(sorted(self.injected.items())),
            "vapi": dict(sorted(vapi.items())),
            "call reports (fake Vapi's server messages)": dict(sorted(reports.items())),
            "call-form answers": responses,
            "qstash": {
                "messages": events.get("CREATED", 0),
                "delivered": events.get("DELIVERED", 0),
                "failed attempts": events.get("ERROR", 0),
                "dead-lettered": events.get("FAILED", 0),
                "cancelled": events.get("CANCELED", 0),
                "not-yet-due forms whose message is still queued": f"{kept[0]} of {kept[1]}",
            },
            "before sweeps": before_sweeps,
            "sweeps": sweeps,
            "outcomes": dict(sorted(outcomes.items())),
            "failure reasons": dict(sorted(failures.items())),
            "checks": {
                "forms called twice for one due moment": len(twice),
                "patients over a cap": len(over_cap),
                "opted-out patients called after their opt-out": len(after_opt_out),
                "placed calls without an outcome after the final sweep": unended,
                "submitted or not-due forms called": sum(
                    1
                    for f in placed
                    if by_id[f].case in MUST_NOT_CALL and f not in called_before_act
                ),
                "calls before the deadline": sum(
                    1 for v in violations if "before its deadline" in v
                ),
                "due forms neither called, failed nor flagged": sum(
                    n for k, n in outcomes.items() if k.startswith("LOST")
                ),
                "queued messages lost": len(lost),
                "dead letters without failure-callback": len(unrecorded),
            },
            "seconds": {
                **{k: round(v, 1) for k, v in self.timings.items()},
                "total": round(time.monotonic() - started, 1),
            },
        }
        return ChaosResult(figures, violations)

    def function_responses(self) -> dict:
        """call-form's answers by status, and every 503's reason, from the function server's log."""
        answers: Counter[str] = Counter()
        log = self.data_dir / "logs" / "functions.log"
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "request" and entry.get("path") == "/api/jobs/call-form":
                answers[str(entry.get("status"))] += 1
            elif entry.get("message") == "request refused" and entry.get("status") == 503:
                answers[f"503 (any function): {entry.get('error')}"] += 1
        return dict(sorted(answers.items()))


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _failure_kind(error: str) -> str:
    if error.startswith(("Vapi rejected", "HTTP 4")):
        return "Vapi rejected the call (4xx)"
    if error.startswith("bad number"):
        return "bad number (Vapi: misdialed or invalid)"
    if error.startswith("QStash gave up"):
        return "QStash gave up (every retry met a fault)"
    if error.startswith("gave up after"):
        return "attempts exhausted (MAX_CALL_ATTEMPTS)"
    return error[:60]


# ---- reporting ------------------------------------------------------------------------------


def format_figures(figures: dict) -> str:
    lines = []
    for key, value in figures.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {v}" for k, v in value.items()]
        elif isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  {i + 1}. {v}" for i, v in enumerate(value)]
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)


def markdown_section(figures: dict, hostile: dict | None, command: str) -> str:
    def table(title: str, rows: dict) -> list[str]:
        out = [f"| {title} | count |", "|---|---:|"]
        out += [f"| {k} | {v} |" for k, v in rows.items()]
        return out + [""]

    parts = [
        "## Chaos",
        "",
        f"`{command}` on {datetime.now(UTC):%Y-%m-%d} (2 cores): "
        f"{figures['forms']} forms through the local stack (real processes), "
        f"{figures['seconds']['total']} s in all. Stale claims are reconciled with "
        "`reconcile_stale_calls(lease_seconds=0)` and lost reports looked up with "
        "`look_up_lost_outcomes(timeout_seconds=0)` once nothing is in flight (production "
        "waits for CLAIM_LEASE_SECONDS and CALL_OUTCOME_TIMEOUT_SECONDS); then check-forms "
        "sweeps until a round changes nothing.",
        "",
    ]
    parts += table("case", figures["cases"])
    parts += table("patients", figures["patients"])
    parts += table("call rule", figures["call rules"])
    parts += table(
        "fault injected",
        {**figures["faults injected"], **{f"Vapi: {k}": v for k, v in figures["vapi"].items()}},
    )
    parts += table("call report", figures["call reports (fake Vapi's server messages)"])
    parts += table("call-form answer", figures["call-form answers"])
    parts += table("QStash", figures["qstash"])
    parts += table("before the sweeps", figures["before sweeps"])
    parts += [
        "| sweep round | reconciled: found in Vapi | reconciled: released "
        "| lost reports looked up | overdue found | enqueued |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    parts += [
        f"| {i + 1} | {r['reconciled'].get('found', 0)} | "
        f"{r['reconciled'].get('released', 0)} | {r['looked up'].get('ended', 0)} | "
        f"{r['found']} | {r['enqueued']} |"
        for i, r in enumerate(figures["sweeps"])
    ] + [""]
    parts += table("outcome", figures["outcomes"])
    parts += table("failure reason", figures["failure reasons"])
    parts += table("check (all must be 0)", figures["checks"])
    if hostile:
        parts += [
            "Hostile input, after the run: tests/integration/test_hostile_input.py with "
            "FORMCALL_HOSTILE_CASES=10000 (schemathesis on docs/openapi.yaml, hypothesis "
            "for raw bodies and headers, signed garbage, near-miss secrets) and "
            "tests/integration/test_signature_attacks.py. Every case: no 5xx, no database "
            "write, no Vapi request, nothing published.",
            "",
        ]
        parts += table(
            "hostile input: generated cases",
            {k: v for k, v in hostile.items() if not k.startswith(("answers", "pytest"))},
        )
        parts += table(
            "hostile input: answers",
            {k.removeprefix("answers "): v for k, v in hostile.items() if k.startswith("answers")},
        )
    return "\n".join(parts).rstrip() + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the "## Chaos" section of `path` (appended at the end if it has none)."""
    text = path.read_text() if path.exists() else ""
    start = text.find("## Chaos\n")
    if start < 0:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text)


def run_hostile(cases: int) -> dict:
    """The hostile-input and signature suites, scaled up; their figures."""
    figures_file = Path(tempfile.mkstemp(suffix=".json")[1])
    env = {
        **os.environ,
        "FORMCALL_HOSTILE_CASES": str(cases),
        "FORMCALL_HOSTILE_FIGURES": str(figures_file),
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/integration/test_hostile_input.py",
            "tests/integration/test_signature_attacks.py",
        ],
        cwd=REPO_ROOT,
        env=env,
    )
    figures = json.loads(figures_file.read_text() or "{}") if figures_file.exists() else {}
    figures_file.unlink(missing_ok=True)
    figures["pytest exit code"] = done.returncode
    return figures


def run(config: ChaosConfig, *, data_dir: Path | None = None, log=print) -> ChaosResult:
    own = data_dir is None
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="formcall-chaos-"))
    try:
        return Chaos(config, data_dir, log=log).run()
    finally:
        if own:
            shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m formcall_dev.tools.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--forms", type=int, help=f"default {ChaosConfig.forms}, --quick {QUICK['forms']}"
    )
    parser.add_argument("--seed", type=int, default=ChaosConfig.seed)
    parser.add_argument("--quick", action="store_true", help="the bounded run of make test")
    parser.add_argument(
        "--hostile-cases",
        type=int,
        default=10_000,
        help="generated hostile-input cases after the run (0: skip)",
    )
    parser.add_argument(
        "--write", type=Path, help="put the figures in this file's ## Chaos section"
    )
    parser.add_argument("--data-dir", type=Path, help="keep the stack's data and logs here")
    args = parser.parse_args(argv)
    config = ChaosConfig(**(QUICK if args.quick else {}))
    config.seed = args.seed
    if args.forms:
        config.forms = args.forms
    result = run(config, data_dir=args.data_dir)
    print(format_figures(result.figures))
    hostile = None
    if args.hostile_cases:
        hostile = run_hostile(args.hostile_cases)
        print("hostile input:")
        print("\n".join(f"  {k}: {v}" for k, v in hostile.items()))
    if args.write:
        write_section(
            args.write,
            markdown_section(
                result.figures,
                hostile,
                "make chaos" if not args.quick else "python -m formcall_dev.tools.chaos --quick",
            ),
        )
    for violation in result.violations:
        print(f"VIOLATION: {violation}")
    ok = not result.violations and (hostile is None or hostile["pytest exit code"] == 0)
    print("chaos: all checks passed" if ok else "chaos: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

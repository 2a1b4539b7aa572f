"""7. Lines: a burst of real call lengths, rate flow control against the line ledger; drills.

The burst: N forms due at once (one patient each) onto C lines, the fake Vapi playing calls of
realistic lengths time-compressed, in two stacks one after the other: (a) today's QStash flow
control with VAPI_CALLS_PER_MINUTE set as README says (lines x 60 / a typical call's seconds)
and no ledger, (b) the line ledger. Everything is measured from what the fake Vapi saw (when
each call took and left its line) and what PostgreSQL recorded. The drills run in real time on
the ledger: Vapi creates the call and answers 502; Vapi answers concurrencyBlocked and queues
the call; Vapi creates the call and answers too late, with its reports and without them (so
only call-form's reconcile message can find the call). Each counts second calls and the time
from the claim to the call recorded placed.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from formcall.publisher import flow_control
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_forms_one_patient_each
from formcall_dev.stack import fake_vapi
from formcall_dev.tools.bench.common import BenchStack, median, percentile, qstash

# The mix of how outbound reminder calls end, and how long each kind holds a line (seconds,
# ring included). BENCHMARKS.md says why these shares.
MIX = {"no_answer": 35, "voicemail": 20, "reached": 45}
DURATIONS = {
    "no_answer": [25, 35],
    "voicemail": [30, 60],
    "reached": {"lognormal_median": 90, "sigma": 0.6, "max": 600},
}
RING_SECONDS = 8.0
# Vapi's default maximum call duration (600 s) plus a margin: the product's default.
MAX_CALL_SECONDS = 660
SHORTEST_CALL_SECONDS = 25.0
MODES = ("rate", "ledger")
DRILLS = ("created_502", "blocked_queued", "timeout", "timeout_reports_lost")
# Every call once: no follow-up, so a second call to a form is a double, nothing else.
ONE_CALL = {
    "MAX_CALLS_PER_FORM": "1",
    "FOLLOW_UP_DELAY_SECONDS": "86400",
    "PATIENT_MAX_CALLS_PER_DAY": "1",
    "PATIENT_MAX_CALLS_PER_WEEK": "3",
}


def mean_call_seconds(samples: int = 200_000, seed: int = 1) -> float:
    """The mix's mean call length (seconds), by a seeded draw: what keeps lines busy."""
    draw = random.Random(seed)
    outcomes = draw.choices(list(MIX), weights=list(MIX.values()), k=samples)
    total = 0.0
    for outcome in outcomes:
        spec = DURATIONS[outcome]
        if isinstance(spec, list):
            total += draw.uniform(*spec)
        else:
            total += min(
                draw.lognormvariate(math.log(spec["lognormal_median"]), spec["sigma"]), spec["max"]
            )
    return total / samples


class LinesStack(BenchStack):
    """The bench stack with call-events reachable: the fake Vapi's reports go to the function
    server's `/api/webhooks/vapi`, authenticated with a generated VAPI_WEBHOOK_SECRET (unless the
    stack already sets both)."""

    _webhook_secret = secrets.token_urlsafe(24)

    def _env(self) -> dict[str, str]:
        env = super()._env()
        assert self.info is not None
        env.setdefault("VAPI_WEBHOOK_SECRET", self._webhook_secret)
        if "CALL_EVENTS_URL" not in self.extra_env:
            env["CALL_EVENTS_URL"] = f"{self.info.functions_url}/api/webhooks/vapi"
        return env


def _due_burst(conn, forms: int) -> datetime:
    """N patients with one form each, all due in the same second far enough ahead for every
    webhook and publish (~80 a second here); returns the deadline."""
    lead = forms / 80 + 2.0
    deadline = (datetime.now(UTC) + timedelta(seconds=lead)).replace(microsecond=0)
    create_forms_one_patient_each(conn, count=forms, title="Lines form", deadline=deadline)
    return deadline


def _settled(conn) -> int:
    return conn.execute(
        "select count(*) from forms where call_status not in ('pending', 'calling')"
    ).fetchone()[0]


def _wait(condition, *, timeout: float, interval: float = 0.25) -> bool:
    """Wait, but measure what happened when time is up (a form not called by then is missed)."""
    try:
        wait_until(condition, timeout=timeout, interval=interval)
        return True
    except AssertionError:
        return False


def _line_calls(lines: dict) -> list[dict]:
    """The calls that rang (took a line), not those refused."""
    return [c for c in lines["calls"] if not c["blocked"]]


def _second_calls(lines: dict) -> int:
    return sum(n - 1 for n in lines["calls_per_form"].values() if n > 1)


def _configure_calls(
    info,
    *,
    lines: int,
    time_scale: float,
    seed: int,
    blocked_behaviour: str = "end",
    durations=None,
    report_drop_rate: float = 0.0,
) -> None:
    fake_vapi(
        info,
        "POST",
        "/configure",
        json={
            "concurrency_limit": lines,
            "time_scale": time_scale,
            "seed": seed,
            "outcome_mix": MIX,
            "durations": durations or DURATIONS,
            "ring_seconds": RING_SECONDS,
            "blocked_behaviour": blocked_behaviour,
            "hold": False,
            "report_drop_rate": report_drop_rate,
        },
    )


def run_mode(
    data_dir: Path,
    *,
    mode: str,
    forms: int,
    lines: int,
    compression: float,
    typical_s: float,
    seed: int = 11,
) -> dict:
    """One burst on a fresh stack; times in call seconds (the compressed run's x compression)."""
    # README: without the ledger, lines x 60 / a typical call's seconds; with it, generously,
    # lines x 60 / the shortest calls' seconds (the rate is only a guard then).
    call_s = typical_s if mode == "rate" else SHORTEST_CALL_SECONDS
    real_per_minute = max(1, round(lines * 60 / call_s))
    per_minute = max(1, round(lines * 60 / (call_s / compression)))
    env = {
        **ONE_CALL,
        "VAPI_LINE_LEDGER": "true" if mode == "ledger" else "false",
        "VAPI_CALLS_PER_MINUTE": str(per_minute),
        # The product's floor is 10 s; only a call whose reports were all lost waits for it.
        "VAPI_MAX_CALL_SECONDS": str(max(10, math.ceil(MAX_CALL_SECONDS / compression))),
    }
    with (
        LinesStack(
            data_dir,
            vapi_concurrency=lines,
            vapi_call_seconds=typical_s / compression,
            extra_env=env,
        ) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        _configure_calls(info, lines=lines, time_scale=1 / compression, seed=seed)
        deadline = _due_burst(conn, forms)
        expected = forms * mean_call_seconds() / lines / compression
        budget = (deadline - datetime.now(UTC)).total_seconds() + 30 + 6 * expected

        def drained() -> bool:
            stats = fake_vapi(info, "GET", "/stats")
            return stats["lines_in_use"] == 0 and stats["waiting"] == 0 and _settled(conn) == forms

        finished = _wait(drained, timeout=budget, interval=0.5)
        time.sleep(1.0)  # a late second call would show itself here
        found = fake_vapi(info, "GET", "/lines")
        deliveries = qstash(info, "GET", "/_local/stats")["deliveries"]
        statuses = dict(
            conn.execute("select call_status, count(*) from forms group by 1").fetchall()
        )
        answers = {
            f"{status}"[:40]: n
            for status, n in conn.execute(
                "select detail->>'responseStatus', count(*) from local_qstash.events"
                " where state = 'ERROR' group by 1"
            ).fetchall()
        }
        ids = {str(r[0]) for r in conn.execute("select id from forms").fetchall()}

    due = deadline.timestamp()
    calls = _line_calls(found)
    first: dict[str, float] = {}
    for call in calls:
        for form_id in call["formIds"]:
            first[form_id] = min(first.get(form_id, math.inf), call["started"])
    lateness = [(first[f] - due) * compression for f in ids if f in first]
    busy = sum(c["ended"] - c["started"] for c in calls if c["ended"] is not None)
    limit = busy / lines * compression
    drain = (max((c["ended"] or 0) for c in calls) - due) * compression if calls else math.nan
    flow = flow_control(lines, per_minute)
    real_flow = flow_control(lines, real_per_minute)
    return {
        "mode": mode,
        "forms": forms,
        "lines": lines,
        "compression": compression,
        "finished": finished,
        "limit_s": limit,
        "drain_s": drain,
        "ratio": drain / limit,
        "lateness_p50_s": median(lateness),
        "lateness_p99_s": percentile(lateness, 99),
        "refused": found["refused"] + found["queued"],
        "max_in_use": found["max_in_use"],
        "doubles": found["doubles"],
        "second_calls": _second_calls(found),
        "missed": sum(1 for f in ids if f not in first),
        "calls": len(calls),
        "called": statuses.get("called", 0),
        "failed": statuses.get("failed", 0),
        "calls_per_minute": per_minute,
        "real_calls_per_minute": real_per_minute,
        "max_call_seconds": env["VAPI_MAX_CALL_SECONDS"],
        # What flow control lets start, per real minute: compressed, and as it would be live.
        "flow_per_minute": flow["rate"] * 60 / flow["period"] / compression,
        "real_flow_per_minute": real_flow["rate"] * 60 / real_flow["period"],
        "deliveries": deliveries["attempted"],
        "retries": deliveries["retriesScheduled"],
        "retry_answers": answers,
        "series": [[(t - due) * compression, n] for t, n in found["series"]],
    }


def _resolution(conn) -> list[float]:
    """Per form: seconds from its first claim to its first call recorded placed."""
    rows = conn.execute(
        "select form_id, min(created_at) filter (where event = 'claimed'),"
        " min(created_at) filter (where event = 'called')"
        " from form_call_events group by form_id"
    ).fetchall()
    return [
        (called - claimed).total_seconds()
        for _, claimed, called in rows
        if claimed is not None and called is not None
    ]


def _log_count(log: Path, text: str) -> int:
    try:
        return log.read_text(errors="replace").count(text)
    except OSError:
        return 0


def run_drill(
    data_dir: Path,
    *,
    kind: str,
    forms: int,
    lines: int,
    timeout_s: float = 5.0,
    lease_s: int | None = None,
) -> dict:
    """One drill on the ledger, in real time, with short calls (2 to 4 s).

    Without reports a call's line is only freed after VAPI_MAX_CALL_SECONDS, so that drill has
    as many forms as lines: each claim gets a line, and only the reconcile resolves it.
    """
    if kind == "timeout_reports_lost":
        forms = min(forms, lines)
    env = {
        **ONE_CALL,
        "VAPI_LINE_LEDGER": "true",
        "VAPI_TIMEOUT_SECONDS": str(timeout_s),
        "VAPI_CALLS_PER_MINUTE": str(lines * 60 // 2),
    }
    if lease_s is not None:
        env["CLAIM_LEASE_SECONDS"] = str(lease_s)
    short = {"reached": [2, 4], "no_answer": [2, 4], "voicemail": [2, 4]}
    with (
        LinesStack(data_dir, vapi_concurrency=lines, vapi_call_seconds=3.0, extra_env=env) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        if kind == "blocked_queued":
            # Half the account's lines (fewer for a handful of forms) busy with calls formcall
            # does not know of, the clinic's inbound calls say: Vapi answers concurrencyBlocked
            # and queues formcall's calls until a line frees.
            vapi_lines = max(1, min(lines // 2, forms // 2))
            _configure_calls(
                info,
                lines=vapi_lines,
                time_scale=1,
                seed=5,
                blocked_behaviour="queue",
                durations=short,
            )
        else:
            vapi_lines = lines
            _configure_calls(info, lines=lines, time_scale=1, seed=5, durations=short)
            if kind == "timeout_reports_lost":
                _configure_calls(
                    info, lines=lines, time_scale=1, seed=5, durations=short, report_drop_rate=1.0
                )
            rule = (
                {"status": 502, "place": True}
                if kind == "created_502"
                else {"delay": timeout_s + 2}
            )  # created, answered after call-form gave up
            fake_vapi(info, "POST", "/rules", json=rule)
        _due_burst(conn, forms)
        finished = _wait(lambda: _settled(conn) == forms, timeout=forms * 10 + 240, interval=0.5)
        time.sleep(2.0)
        found = fake_vapi(info, "GET", "/lines")
        requests = fake_vapi(info, "GET", "/requests")
        resolution = _resolution(conn)
        statuses = dict(
            conn.execute("select call_status, count(*) from forms group by 1").fetchall()
        )
        unknown = conn.execute(
            "select count(distinct form_id) from form_call_events where event = 'outcome_unknown'"
        ).fetchone()[0]
    log = data_dir / "logs" / "functions.log"
    return {
        "kind": kind,
        "forms": forms,
        "lines": lines,
        "vapi_lines": vapi_lines,
        "finished": finished,
        "second_calls": _second_calls(found),
        "calls": len(_line_calls(found)),
        "create_requests": len(requests),
        "queued": found["queued"],
        "refused": found["refused"],
        "resolved": len(resolution),
        "resolution_p50_s": median(resolution),
        "resolution_p99_s": percentile(resolution, 99),
        "resolution_max_s": max(resolution, default=math.nan),
        "called": statuses.get("called", 0),
        "failed": statuses.get("failed", 0),
        "unresolved": forms - statuses.get("called", 0) - statuses.get("failed", 0),
        "timeout_s": timeout_s,
        "lease_s": lease_s,
        "unknown": unknown,
        # How the unknown outcomes were settled: a report for a form still calling, or the
        # reconcile's lookup in Vapi's call list.
        "reconciled_found": _log_count(log, "unknown outcome reconciled: the call exists"),
        "reconciled_released": _log_count(log, "unknown outcome reconciled: no call"),
    }


def bench_lines(work: Path, sizes) -> dict:
    typical = mean_call_seconds()
    modes = {
        mode: run_mode(
            work / f"lines-{mode}",
            mode=mode,
            forms=sizes.lines_forms,
            lines=sizes.lines_lines,
            compression=sizes.lines_compression,
            typical_s=typical,
        )
        for mode in MODES
    }
    # The drills wait on timers, not CPU: three stacks at once.
    with ThreadPoolExecutor(max_workers=len(DRILLS)) as pool:
        drills = dict(
            zip(
                DRILLS,
                pool.map(
                    lambda kind: run_drill(
                        work / f"drill-{kind}",
                        kind=kind,
                        forms=sizes.lines_drill_forms,
                        lines=sizes.lines_lines,
                        timeout_s=sizes.lines_timeout_s,
                        lease_s=sizes.lines_lease_s,
                    ),
                    DRILLS,
                ),
                strict=True,
            )
        )
    return {
        "modes": modes,
        "drills": drills,
        "params": {
            "forms": sizes.lines_forms,
            "lines": sizes.lines_lines,
            "compression": sizes.lines_compression,
            "typical_s": typical,
            "mix": MIX,
            "durations": DURATIONS,
            "ring_s": RING_SECONDS,
            "drill_forms": sizes.lines_drill_forms,
            "timeout_s": sizes.lines_timeout_s,
            "lease_s": sizes.lines_lease_s,
        },
    }

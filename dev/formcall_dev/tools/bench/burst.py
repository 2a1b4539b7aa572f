"""1. Burst drain: N forms due in the same second against C Vapi lines holding each call d seconds.

The forms go in through the real path (insert -> Database Webhook -> schedule-form -> one QStash
message each, with flow control) and are called by call-form when QStash delivers them. The
fake Vapi refuses calls over its line limit and records every request, so doubles, misses,
refusals and the calls in progress at any instant are counted from what Vapi saw.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from formcall_dev.polling import wait_until
from formcall_dev.seed import create_forms_one_patient_each
from formcall_dev.stack import fake_vapi
from formcall_dev.tools.bench.common import BenchStack, median, percentile, qstash


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _wait(condition, *, timeout: float, interval: float = 0.05) -> None:
    """Wait, but measure what happened when time is up: a form not called by then is missed."""
    try:
        wait_until(condition, timeout=timeout, interval=interval)
    except AssertionError:
        pass


def in_progress(starts: list[float], duration: float) -> list[tuple[float, int]]:
    """The step function of calls in progress: (time, count from then on), from call starts."""
    events = sorted(
        [(s, 1) for s in starts] + [(s + duration, -1) for s in starts], key=lambda e: (e[0], e[1])
    )
    steps, level = [], 0
    for moment, change in events:
        level += change
        steps.append((moment, level))
    return steps


def run_burst(
    data_dir: Path,
    *,
    forms: int,
    lines: int,
    call_seconds: float,
    calls_per_minute: int | None = None,
) -> dict:
    """One burst on a fresh stack, the deadline far enough ahead for every form to be scheduled."""
    calls_per_minute = calls_per_minute or round(lines * 60 / call_seconds)
    limit = forms / lines * call_seconds
    with (
        BenchStack(
            data_dir,
            vapi_concurrency=lines,
            vapi_call_seconds=call_seconds,
            extra_env={"VAPI_CALLS_PER_MINUTE": str(calls_per_minute)},
        ) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        # Time for every webhook and publish first (~100 a second here), up to a whole second.
        lead = forms / 80 + 1.0
        deadline = (datetime.now(UTC) + timedelta(seconds=lead + 1)).replace(microsecond=0)
        create_forms_one_patient_each(conn, count=forms, title="Burst form", deadline=deadline)

        def scheduled() -> int:
            return conn.execute(
                "select count(*) from forms where qstash_message_id is not null"
                " or call_status <> 'pending'"
            ).fetchone()[0]

        _wait(lambda: scheduled() == forms, timeout=lead + 30)
        scheduled_late = max(0.0, (datetime.now(UTC) - deadline).total_seconds())
        timeout = max(60.0, 8 * limit)
        _wait(
            lambda: (
                conn.execute(
                    "select count(*) from forms where call_status <> 'pending'"
                    " and call_status <> 'calling'"
                ).fetchone()[0]
                == forms
            ),
            timeout=(deadline - datetime.now(UTC)).total_seconds() + timeout,
            interval=0.25,
        )
        time.sleep(call_seconds + 0.5)  # let a late duplicate show itself, if there were one
        requests = fake_vapi(info, "GET", "/requests")
        stats = fake_vapi(info, "GET", "/stats")
        deliveries = qstash(info, "GET", "/_local/stats")["deliveries"]
        statuses = dict(
            conn.execute("select call_status, count(*) from forms group by 1").fetchall()
        )
        ids = [str(r[0]) for r in conn.execute("select id from forms").fetchall()]
        # Why QStash retried (failed attempts), from the local server's event log.
        errors = {
            f"{status} {error}"[:120]: n
            for error, status, n in conn.execute(
                "select detail->>'error', detail->>'responseStatus', count(*)"
                " from local_qstash.events where state = 'ERROR' group by 1, 2"
            ).fetchall()
        }

    placed = [r for r in requests if r["outcome"] == "placed"]
    per_form = Counter(r["form_id"] for r in placed)
    first = {}
    for r in placed:
        first.setdefault(r["form_id"], _at(r["at"]))
    lateness = [(first[f] - deadline).total_seconds() for f in ids if f in first]
    starts = [(_at(r["at"]) - deadline).total_seconds() for r in placed]
    drain = max(lateness) if lateness else float("nan")
    return {
        "forms": forms,
        "lines": lines,
        "call_seconds": call_seconds,
        "calls_per_minute": calls_per_minute,
        "limit_s": limit,
        "drain_s": drain,
        "ratio": drain / limit,
        "lateness_p50_s": median(lateness),
        "lateness_p99_s": percentile(lateness, 99),
        "placed": stats["placed"],
        "refused": stats["blocked"],
        "max_concurrent": stats["max_concurrent"],
        "doubles": sum(1 for n in per_form.values() if n > 1),
        "missed": sum(1 for f in ids if f not in per_form),
        "called": statuses.get("called", 0),
        "failed": statuses.get("failed", 0),
        "deliveries": deliveries["attempted"],
        "retries": deliveries["retriesScheduled"],
        "scheduled_late_s": scheduled_late,
        "retry_causes": errors,
        "starts": starts,
    }


def bench_burst(work: Path, sizes) -> dict:
    runs = [
        run_burst(
            work / f"burst-{i}",
            forms=sizes.burst_forms,
            lines=sizes.burst_lines,
            call_seconds=sizes.burst_call_seconds,
        )
        for i in range(sizes.burst_runs)
    ]
    keys = (
        "drain_s",
        "ratio",
        "lateness_p50_s",
        "lateness_p99_s",
        "refused",
        "deliveries",
        "retries",
    )
    summary = {k: median(r[k] for r in runs) for k in keys}
    summary |= {
        k: max(r[k] for r in runs)
        for k in ("doubles", "missed", "max_concurrent", "failed", "scheduled_late_s")
    }
    best = sorted(runs, key=lambda r: r["drain_s"])[len(runs) // 2]
    longer = None
    if sizes.burst_long_forms:
        longer = run_burst(
            work / "burst-long",
            forms=sizes.burst_long_forms,
            lines=sizes.burst_lines,
            call_seconds=sizes.burst_long_call_seconds,
        )
    return {
        "runs": runs,
        "median": summary,
        "plotted": best,
        "longer_calls": longer,
        "params": {
            "forms": sizes.burst_forms,
            "lines": sizes.burst_lines,
            "call_seconds": sizes.burst_call_seconds,
            "limit_s": sizes.burst_forms / sizes.burst_lines * sizes.burst_call_seconds,
        },
    }

"""3. Sweep at scale: a big `forms` table, a small overdue share: the query, its plan, the sweep.

The table holds what a clinic's table holds after a while: most forms submitted or called, some
pending with deadlines ahead, and a share overdue (pending, unsubmitted, deadline passed). The
overdue query is the sweep's own (`find_overdue_forms`, 100 rows a page, keyset paging), timed
through the SQL function and explained from its body; beside it, the same query with index scans
turned off (what it would cost if it had to read the table). The whole sweep is check-forms'
manual trigger on the local stack, its publishes counted on the local QStash. The calling window
is closed during the run, so every message waits for tomorrow's opening and none is delivered.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from formcall_dev.tools.bench.common import BenchStack, median, qstash, trigger_sweep

# Rows per 10,000 in each state besides the overdue ones (which take the first `overdue` slots).
PENDING_AHEAD, SUBMITTED = 500, 5400


def closed_window(now: datetime) -> str:
    """A one-hour daily window three hours from now: the sweep runs outside it."""
    start = (now.hour + 3) % 24
    return f"{start:02d}:00-{start:02d}:59:59"


def slot(g: str, rows: int) -> str:
    """SQL for form number g's slot out of 10,000: exact shares, scattered over the table."""
    return f"((({g})::bigint * 7919 %% {rows}) * 10000 / {rows})"


def fill_table(conn, rows: int, overdue_share: float, patients: int = 10_000) -> None:
    """`rows` forms, each one's state decided by its slot (silently: no webhooks)."""
    overdue = round(overdue_share * 10_000)
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute(
            "insert into patients (full_name, phone, timezone)"
            " select 'Patient ' || g, '+1555' || lpad(g::text, 7, '0'), 'UTC'"
            " from generate_series(1, %s) g",
            (patients,),
        )
        conn.execute(
            """
            with p as (select array_agg(id) as ids from patients)
            insert into forms (patient_id, title, deadline, submitted_at, call_status,
                               vapi_call_id, called_at, call_attempts)
            select p.ids[1 + g %% %(patients)s], 'Form ' || g, d.deadline,
                   case when k.state = 'submitted' then d.deadline - interval '1 hour' end,
                   case when k.state = 'called' then 'called' else 'pending' end,
                   case when k.state = 'called' then 'call-' || g end,
                   case when k.state = 'called' then d.deadline + interval '1 minute' end,
                   case when k.state = 'called' then 1 else 0 end
            from p, generate_series(0, %(rows)s - 1) g,
                 lateral (select """
            + slot("g", rows)
            + """ as slot) s,
                 lateral (select case when s.slot < %(overdue)s then 'overdue'
                                      when s.slot < %(overdue)s + %(ahead)s then 'ahead'
                                      when s.slot < %(overdue)s + %(ahead)s + %(submitted)s
                                        then 'submitted'
                                      else 'called' end as state) k,
                 lateral (select case when k.state = 'ahead'
                                      then now() + make_interval(mins => 1 + g %% 20000)
                                      else now() - make_interval(mins => 1 + g %% 40000)
                                 end as deadline) d
            """,
            {
                "patients": patients,
                "overdue": overdue,
                "ahead": PENDING_AHEAD,
                "submitted": SUBMITTED,
                "rows": rows,
            },
        )
    conn.execute("vacuum analyze forms")
    conn.execute("vacuum analyze patients")


def shrink_overdue(conn, share: float, rows: int) -> None:
    """Mark overdue forms beyond `share` of the table submitted (silently), then vacuum."""
    keep = round(share * 10_000)
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute(
            "update forms set submitted_at = now()"
            " where call_status = 'pending' and submitted_at is null and deadline <= now()"
            f" and {slot('substring(title from 6)', rows)} >= %s",
            (keep,),
        )
    conn.execute("vacuum analyze forms")


def overdue_body(conn) -> str:
    """find_overdue_forms' SQL with its parameters as $1..$3, read from the database itself."""
    source = conn.execute(
        "select prosrc from pg_proc where proname = 'find_overdue_forms' order by oid desc limit 1"
    ).fetchone()[0]
    for number, name in enumerate(("p_limit", "p_after_deadline", "p_after_id"), start=1):
        source = re.sub(rf"\b{name}\b", f"${number}", source)
    return source


def read_all_overdue(conn) -> tuple[int, float, float]:
    """Page through every overdue form as the sweep does: (rows, seconds for all, first page)."""
    started = time.perf_counter()
    rows, after, first = 0, None, None
    while True:
        page = conn.execute(
            "select find_overdue_forms(100, %s, %s)",
            (after[0], after[1]) if after else (None, None),
        ).fetchone()[0]
        if first is None:
            first = time.perf_counter() - started
        rows += len(page)
        if len(page) < 100:
            return rows, time.perf_counter() - started, first
        after = (page[-1]["deadline"], page[-1]["id"])


def explain(conn, body: str, *, index: bool) -> tuple[str, float]:
    """EXPLAIN ANALYZE of the first page; with `index` False, index scans are turned off."""
    with conn.transaction():
        if not index:
            conn.execute("set local enable_indexscan = off")
            conn.execute("set local enable_bitmapscan = off")
            conn.execute("set local enable_indexonlyscan = off")
        conn.execute(f"prepare overdue_page(int, timestamptz, uuid) as {body}")
        try:
            lines = [
                r[0]
                for r in conn.execute(
                    "explain (analyze, buffers, costs off, timing on)"
                    " execute overdue_page(100, null, null)"
                ).fetchall()
            ]
        finally:
            conn.execute("deallocate overdue_page")
    total = next(
        (
            float(m.group(1))
            for line in lines
            if (m := re.search(r"Execution Time: ([\d.]+) ms", line))
        ),
        float("nan"),
    )
    return "\n".join(lines), total


def bench_sweep(work: Path, sizes) -> dict:
    now = datetime.now(UTC)
    results = []
    with (
        BenchStack(work / "sweep", call_window=closed_window(now)) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        started = time.perf_counter()
        fill_table(conn, sizes.table_rows, max(sizes.overdue_fractions))
        fill_seconds = time.perf_counter() - started
        body = overdue_body(conn)
        for share in sorted(sizes.overdue_fractions, reverse=True):
            shrink_overdue(conn, share, sizes.table_rows)
            overdue = conn.execute(
                "select count(*) from forms where call_status = 'pending'"
                " and submitted_at is null and deadline <= now()"
            ).fetchone()[0]
            read_all_overdue(conn)  # warm the cache once, as an hourly sweep finds it
            reads = [read_all_overdue(conn) for _ in range(sizes.query_runs)]
            explained = [explain(conn, body, index=True) for _ in range(sizes.query_runs)]
            plan, page_ms = explained[-1][0], median(e[1] for e in explained)
            seq_ms = median(explain(conn, body, index=False)[1] for _ in range(sizes.query_runs))
            sweeps = []
            for _ in range(sizes.sweep_runs):
                conn.execute("delete from local_qstash.messages")
                conn.execute("delete from local_qstash.dedup")
                qstash(info, "POST", "/_local/stats/reset")
                answer, seconds = trigger_sweep(info)
                requests = qstash(info, "GET", "/_local/stats")["requests"]
                sweeps.append(
                    {
                        "seconds": seconds,
                        "found": answer["found"],
                        "enqueued": answer["enqueued"],
                        "failed": answer["failed"],
                        "batch_requests": requests["batch"],
                        "publish_requests": requests["publish"],
                        "messages": requests["batchMessages"] + requests["publish"],
                    }
                )
            results.append(
                {
                    "share": share,
                    "overdue": overdue,
                    "rows": sizes.table_rows,
                    "query_all_s": median(r[1] for r in reads),
                    "query_first_page_ms": median(r[2] for r in reads) * 1000,
                    "page_explain_ms": page_ms,
                    "page_seqscan_ms": seq_ms,
                    "uses_index": "forms_overdue_idx" in plan,
                    "plan": plan,
                    "sweep_s": median(s["seconds"] for s in sweeps),
                    "sweep_found": sweeps[-1]["found"],
                    "sweep_enqueued": sweeps[-1]["enqueued"],
                    "sweep_failed": max(s["failed"] for s in sweeps),
                    "qstash_requests": max(
                        s["batch_requests"] + s["publish_requests"] for s in sweeps
                    ),
                    "qstash_messages": sweeps[-1]["messages"],
                }
            )
    return {
        "rows": sizes.table_rows,
        "fill_s": fill_seconds,
        "shares": results,
        "window": closed_window(now),
    }

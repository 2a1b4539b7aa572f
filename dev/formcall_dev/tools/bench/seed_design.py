"""2. The seed's design side by side: the hourly sweep calling inline, or formcall's fan-out.

The same backlog of overdue forms (their one-time jobs lost) is drained twice on the same stack,
against the same fake Vapi answering create-call after VAPI_LATENCY seconds:
- the seed's way: one sweep invocation that claims, calls and records each form in turn,
  built from formcall's own store and Vapi client so only the design differs;
- formcall's way: check-forms enqueues one call-form message per form (batches of 100), and
  QStash delivers them under flow control to call-form, up to the line limit at once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from formcall.store import FormStore, PostgresRpc
from formcall.vapi import VapiClient, server_override
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_forms_one_patient_each
from formcall_dev.stack import fake_vapi
from formcall_dev.tools.bench.common import BenchStack, median, trigger_sweep

LAMBDA_LIMIT_S = 900
LINES, CALL_SECONDS = 10, 0.5


def inline_sweep(dsn: str, info) -> dict:
    """The seed's check-forms: every overdue form called inline, one after another."""
    store = FormStore(PostgresRpc(dsn))
    creds = info.credentials
    vapi = VapiClient(
        base_url=info.vapi_url,
        api_key=creds["VAPI_PRIVATE_KEY"],
        assistant_id=creds["VAPI_ASSISTANT_ID"],
        phone_number_id=creds["VAPI_PHONE_NUMBER_ID"],
        server=server_override(
            url=info.functions_url + "/api/webhooks/vapi",
            secret=creds.get("VAPI_WEBHOOK_SECRET", "x" * 16),
            credential_id=None,
        ),
    )
    placed = failed = 0
    started = time.perf_counter()
    after = None
    while page := store.overdue_page(limit=100, after=after):
        for form in page:
            claim = store.claim(form.id)
            if claim.outcome != "claimed":
                continue
            try:
                store.record_placed(claim.call.call_id, vapi.create_call(claim.call)[0])
                placed += 1
            except Exception as exc:  # the seed records the error and moves on
                store.release(claim.call.call_id, str(exc))
                failed += 1
        if len(page) < 100:
            break
        after = page[-1]
    return {"seconds": time.perf_counter() - started, "placed": placed, "failed": failed}


def reset_backlog(conn, forms: int) -> None:
    """`forms` overdue forms whose one-time jobs were lost (no webhook: only a sweep finds them)."""
    with conn.transaction():
        conn.execute("set local session_replication_role = replica")
        conn.execute("delete from form_call_events")
        conn.execute("delete from forms")
        conn.execute("delete from calls")
        conn.execute("delete from patients")
        create_forms_one_patient_each(
            conn,
            count=forms,
            title="Backlog form",
            deadline=datetime.now(UTC) - timedelta(hours=2),
        )


def called(conn) -> int:
    return conn.execute("select count(*) from forms where call_status = 'called'").fetchone()[0]


def bench_seed_design(work: Path, sizes, *, sweep: tuple[float, int] | None = None) -> dict:
    """`sweep`: (seconds, forms) of the largest sweep of benchmark 3, when it ran."""
    forms, latency = sizes.backlog_forms, sizes.vapi_latency
    inline, fanout = [], []
    with (
        BenchStack(
            work / "seed-design",
            vapi_concurrency=LINES,
            vapi_call_seconds=CALL_SECONDS,
            extra_env={"VAPI_CALLS_PER_MINUTE": str(round(LINES * 60 / CALL_SECONDS))},
        ) as info,
        psycopg.connect(info.dsn, autocommit=True) as conn,
    ):
        for _ in range(sizes.backlog_runs):
            for design in ("inline", "fanout"):  # alternate, so drift hits both alike
                reset_backlog(conn, forms)
                fake_vapi(info, "POST", "/reset")
                fake_vapi(info, "POST", "/configure", json={"latency": latency})
                if design == "inline":
                    result = inline_sweep(info.dsn, info)
                    result["drain_s"] = result["seconds"]
                    inline.append(result)
                    continue
                started = time.perf_counter()
                answer, sweep_s = trigger_sweep(info)
                wait_until(
                    lambda: called(conn) == forms, timeout=60 + forms * latency * 2, interval=0.05
                )
                fanout.append(
                    {
                        "seconds": sweep_s,
                        "drain_s": time.perf_counter() - started,
                        "placed": called(conn),
                        "enqueued": answer["enqueued"],
                    }
                )
        stats = fake_vapi(info, "GET", "/stats")
    inline_per_form = median(r["seconds"] for r in inline) / forms
    fanout_sweep = median(r["seconds"] for r in fanout)
    # check-forms' cost per form: from benchmark 3's largest sweep when it ran, else this backlog.
    per_form = sweep[0] / sweep[1] if sweep else fanout_sweep / forms
    return {
        "forms": forms,
        "latency_s": latency,
        "lines": LINES,
        "call_seconds": CALL_SECONDS,
        "runs": sizes.backlog_runs,
        "inline_drain_s": median(r["drain_s"] for r in inline),
        "fanout_drain_s": median(r["drain_s"] for r in fanout),
        "fanout_sweep_s": fanout_sweep,
        "speedup": median(r["drain_s"] for r in inline) / median(r["drain_s"] for r in fanout),
        "inline_per_form_s": inline_per_form,
        "inline_overhead_per_form_s": inline_per_form - latency,
        "inline_max_backlog": int(LAMBDA_LIMIT_S / inline_per_form),
        "fanout_sweep_per_form_s": per_form,
        "fanout_per_form_source": f"the {sweep[1]:,}-form sweep of benchmark 3"
        if sweep
        else f"this {forms}-form backlog",
        "fanout_max_backlog": int(LAMBDA_LIMIT_S / per_form),
        "inline_placed": min(r["placed"] for r in inline),
        "fanout_placed": min(r["placed"] for r in fanout),
        "max_concurrent": stats["max_concurrent"],
    }

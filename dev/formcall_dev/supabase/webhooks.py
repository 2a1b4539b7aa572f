"""Forward the dev database's signed form webhooks to schedule-form, as pg_net does on Supabase.

The signed-webhooks migration's trigger builds and signs each committed change of `forms`; where
pg_net is missing (the dev stack's plain PostgreSQL) it NOTIFYs the request instead, and this
loop POSTs it exactly as built (URL, headers, body bytes). `install` gives the trigger its URL
and secret where Vault is missing. A change made while nothing listens is lost, as a webhook can
be: the hourly sweep is the safety net.
"""

from __future__ import annotations

import json
import logging
import time

import httpx
import psycopg

CHANNEL = "formcall_forms_webhook"
log = logging.getLogger("formcall_dev.supabase.webhooks")


def install(dsn: str, *, url: str, secret: str) -> None:
    """Point the trigger at schedule-form with this secret (the dev fallback for Vault)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The forwarder of earlier versions had its own unsigned trigger.
        conn.execute("drop trigger if exists formcall_dev_forms_webhook on public.forms")
        conn.execute("drop function if exists public.formcall_dev_forms_webhook()")
        for name, value in (("formcall_webhook_url", url), ("formcall_webhook_secret", secret)):
            conn.execute(
                "insert into public.formcall_dev_webhook_settings (name, value)"
                " values (%s, %s) on conflict (name) do update set value = excluded.value",
                (name, value),
            )


def uninstall(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("delete from public.formcall_dev_webhook_settings")


def deliver(http: httpx.Client, request: dict) -> httpx.Response:
    """POST one request as the trigger built it: its URL, its headers, its body's exact bytes."""
    return http.post(request["url"], content=request["body"].encode(), headers=request["headers"])


def forward(dsn: str) -> None:
    """Listen and forward until interrupted; failed POSTs are retried a few times."""
    with psycopg.connect(dsn, autocommit=True) as conn, httpx.Client(timeout=30) as http:
        conn.execute(f"listen {CHANNEL}")
        for notify in conn.notifies():
            request = json.loads(notify.payload)
            for attempt in range(3):
                try:
                    if deliver(http, request).status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2 * (attempt + 1))
            else:
                log.error("webhook not delivered after 3 attempts")

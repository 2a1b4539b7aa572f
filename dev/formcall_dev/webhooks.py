"""Forward the dev database's form changes to schedule-form, as Supabase Database Webhooks would.

`webhooks.sql` (applied by the dev stack only) NOTIFYs each committed change of `forms` with
Supabase's payload; this loop POSTs it to schedule-form with the webhook secret. A change made
while nothing listens is lost, as a webhook can be: the hourly sweep is the safety net.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import psycopg

CHANNEL = "formcall_forms_webhook"
log = logging.getLogger("formcall_dev.webhooks")


def install(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((Path(__file__).with_name("webhooks.sql")).read_text())


def forward(dsn: str, *, url: str, secret: str) -> None:
    """Listen and forward until interrupted; failed POSTs are retried a few times."""
    with psycopg.connect(dsn, autocommit=True) as conn, httpx.Client(timeout=30) as http:
        conn.execute(f"listen {CHANNEL}")
        for notify in conn.notifies():
            for attempt in range(3):
                try:
                    answer = http.post(url, content=notify.payload, headers={
                        "content-type": "application/json", "x-webhook-secret": secret})
                    if answer.status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2 * (attempt + 1))
            else:
                log.error("webhook not delivered after 3 attempts")

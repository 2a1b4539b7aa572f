"""The sweep's deduplication through the local QStash: one message per form per sweep hour.

check-forms runs through its Lambda handler; the process's clock is moved (time-machine, the
stdlib clock only) to put sweeps in the same hour or an hour apart. QStash keeps deduplication
ids for a while (the local one for 10 minutes, real seconds here), so a sweep an hour later is
only enqueued again if its id differs.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
import time_machine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from formcall import clients
from formcall_cli.events import http_event
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from formcall_dev.servers import serve_in_thread
from tests.support.lambda_handlers import DOMAIN, invoke
from tests.support.reads import form_row


@pytest.fixture
def deliveries(stack_env, monkeypatch) -> list[tuple[str, str]]:
    """(message id, form id) of each call-form delivery, to a call-form that answers 200 and
    does nothing, so the form stays overdue for the next sweep."""
    seen: list[tuple[str, str]] = []

    async def record(request: Request) -> PlainTextResponse:
        seen.append((request.headers["upstash-message-id"], (await request.json())["formId"]))
        return PlainTextResponse("ok")

    handle = serve_in_thread(Starlette(routes=[Route("/", record, methods=["POST"])]))
    monkeypatch.setenv("CALL_FORM_URL", f"{handle.url}/")
    clients.reset()
    yield seen
    handle.stop()


def sweep(keys) -> dict:
    answer = invoke(
        "check_forms",
        http_event(
            method="GET",
            path="/api/cron/check-forms",
            domain=DOMAIN,
            headers={"authorization": f"Bearer {keys.cron_secret}"},
        ),
    )
    assert answer.status == 200, answer.body
    return answer.body


def queue_drained(stack_env, keys) -> bool:
    answer = httpx.get(
        f"{stack_env['QSTASH_URL']}/v2/_local/messages",
        headers={"Authorization": f"Bearer {keys.qstash_token}"},
    ).json()
    return not answer["messages"] and not answer["inFlight"]


def test_sweeps_in_one_hour_enqueue_a_form_once_and_an_hour_later_again(
    stack_env, conn, keys, deliveries
):
    patient = create_patient(conn)
    form = create_form(
        conn,
        patient_id=patient,
        silent=True,
        deadline=datetime.now(UTC) - timedelta(minutes=10),
    )
    # Hours in the past: the in-process local QStash reads the moved clock too, and would hold
    # a message published "in the future" until the real clock got there.
    hour = (datetime.now(UTC) - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)

    with time_machine.travel(hour + timedelta(minutes=20), tick=True):
        assert sweep(keys)["found"] == 1
    with time_machine.travel(hour + timedelta(minutes=50), tick=True):
        assert sweep(keys)["found"] == 1  # same hour: QStash deduplicates it
    wait_until(lambda: deliveries)
    with time_machine.travel(hour + timedelta(minutes=80), tick=True):
        assert sweep(keys)["found"] == 1  # the next hour: a message of its own
    wait_until(lambda: len(deliveries) >= 2)
    wait_until(lambda: queue_drained(stack_env, keys))

    assert [form_id for _, form_id in deliveries] == [form, form]
    assert len({message_id for message_id, _ in deliveries}) == 2
    assert form_row(conn, form)["call_status"] == "pending"

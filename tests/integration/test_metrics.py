"""The metrics three alarms watch, read from the CloudWatch EMF that real handler runs print.

Each test invokes a function's Lambda handler (Mangum + Powertools) on a real event against the
real database and the local QStash, and reads what Powertools' log_metrics printed to stdout:
the same EMF document CloudWatch turns into the SweepSucceeded, OverdueOverAnHour and
DeliveryFailed alarms' datapoints (template.yaml).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from formcall import clients
from formcall.observability import metrics
from formcall_cli.events import http_event
from formcall_dev.polling import wait_until
from formcall_dev.seed import create_form, create_patient
from tests.support.lambda_handlers import DOMAIN, failure_event, invoke
from tests.support.reads import form_row


@pytest.fixture
def emitted(capsys):
    """The metrics printed as EMF since the fixture started, as {name: summed value}."""
    # Deliveries to the in-process function server add to the same Powertools metric set
    # without flushing it; start each test from an empty one.
    metrics.clear_metrics()
    capsys.readouterr()

    def read() -> dict[str, float]:
        totals: dict[str, float] = {}
        for line in capsys.readouterr().out.splitlines():
            try:
                document = json.loads(line)
            except ValueError:
                continue
            if not isinstance(document, dict) or "_aws" not in document:
                continue  # a log line
            for directive in document["_aws"]["CloudWatchMetrics"]:
                assert directive["Namespace"] == "formcall"
                for metric in directive["Metrics"]:
                    assert metric["Unit"] == "Count"
                    values = document[metric["Name"]]
                    values = values if isinstance(values, list) else [values]
                    totals[metric["Name"]] = totals.get(metric["Name"], 0) + sum(values)
        return totals

    return read


def manual_sweep(keys) -> dict:
    return http_event(
        method="GET",
        path="/api/cron/check-forms",
        domain=DOMAIN,
        headers={"authorization": f"Bearer {keys.cron_secret}"},
    )


def test_a_sweep_emits_sweep_succeeded_and_counts_forms_overdue_over_an_hour(
    stack_env, vapi, conn, keys, emitted
):
    patient = create_patient(conn)
    now = datetime.now(UTC)
    late = [
        create_form(conn, patient_id=patient, silent=True, deadline=now - timedelta(hours=h))
        for h in (2, 30)
    ]
    recent = create_form(conn, patient_id=patient, silent=True, deadline=now - timedelta(minutes=5))
    forms = [*late, recent]

    answer = invoke("check_forms", manual_sweep(keys))

    assert (answer.status, answer.body["found"], answer.body["failed"]) == (200, 3, 0)
    found = emitted()
    assert found["SweepSucceeded"] == 1
    assert found["OverdueOverAnHour"] == len(late)
    assert (found["FormsFound"], found["FormsEnqueued"]) == (3, 3)
    # The enqueued messages reach call-form on the function server: let them finish here.
    wait_until(lambda: all(form_row(conn, f)["call_status"] == "called" for f in forms))


def test_a_sweep_with_a_failed_batch_emits_no_sweep_succeeded(
    stack_env, vapi, conn, keys, emitted, monkeypatch
):
    patient = create_patient(conn)
    create_form(
        conn,
        patient_id=patient,
        silent=True,
        deadline=datetime.now(UTC) - timedelta(minutes=5),
    )
    monkeypatch.setenv("QSTASH_URL", "http://127.0.0.1:1")  # nothing listens there
    clients.reset()

    answer = invoke("check_forms", manual_sweep(keys))

    assert (answer.status, answer.body["failed"]) == (200, 1)
    found = emitted()
    # The alarm fires on a missing SweepSucceeded: a sweep that could not enqueue must not emit it.
    assert "SweepSucceeded" not in found
    assert found["EnqueueFailed"] == 1 and "OverdueOverAnHour" not in found


def test_a_sweep_with_nothing_overdue_still_emits_sweep_succeeded(stack_env, vapi, keys, emitted):
    answer = invoke("check_forms", manual_sweep(keys))

    assert (answer.status, answer.body["found"]) == (200, 0)
    assert emitted().get("SweepSucceeded") == 1


def test_a_failure_callback_emits_delivery_failed(stack_env, conn, due_form, keys, emitted):
    answer = invoke("failure_callback", failure_event(keys, due_form))

    assert (answer.status, answer.body["callStatus"]) == (200, "failed")
    assert emitted()["DeliveryFailed"] == 1

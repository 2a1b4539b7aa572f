"""The hourly sweep: stale claims, lost outcomes, pages of due forms in batches, its schedule."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from formcall.errors import ConfigurationError, TransientFailure, VapiUnavailable
from formcall.store import CallRules, FormStore
from formcall.sweep import (
    CHECK_FORMS_CRON,
    CHECK_FORMS_SCHEDULE_ID,
    ensure_check_forms_schedule,
    look_up_lost_outcomes,
    reconcile_stale_calls,
    sweep_overdue_forms,
)
from tests.support import metrics
from tests.support.clock import ALL_DAY, closed_window, midday_zone, now
from tests.support.fakes import FakeCaller, FakePublisher
from tests.support.rpc import RECORDED, RELEASED, ScriptedRpc, recorded_event

URL = "https://call-form.example/configured"
FORM = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def overdue(n: int, *, minutes_late: int = 5, zone: str | None = None) -> dict:
    return {
        "id": f"form-{n}",
        "deadline": now() - timedelta(minutes=minutes_late + n),
        "timezone": zone or midday_zone(),
    }


def nothing_stale(rpc: ScriptedRpc) -> ScriptedRpc:
    return rpc.answer("find_stale_calls", []).answer("find_calls_awaiting_outcome", [])


def sweep(
    rpc: ScriptedRpc,
    publisher: FakePublisher,
    *,
    vapi: FakeCaller | None = None,
    window=ALL_DAY,
    page_size: int = 2,
):
    return sweep_overdue_forms(
        store=FormStore(rpc),
        vapi=vapi or FakeCaller(),
        publisher=publisher.factory,
        call_form_url=URL,
        window=window,
        page_size=page_size,
    )


def test_every_page_of_due_forms_is_enqueued_in_order():
    first, second = [overdue(1), overdue(2)], [overdue(3)]
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", first, second)
    publisher = FakePublisher()

    report = sweep(rpc, publisher)

    assert (report.found, report.enqueued, report.failed) == (3, 3, 0)
    assert [[m.form_id for m in batch] for batch, _ in publisher.batches] == [
        ["form-1", "form-2"],
        ["form-3"],
    ]
    assert {destination for _, destination in publisher.batches} == {URL}
    page1, page2 = rpc.params("find_overdue_forms")
    assert page1 == {"p_limit": 2}
    assert page2 == {
        "p_limit": 2,
        "p_after_deadline": first[-1]["deadline"].isoformat(),
        "p_after_id": "form-2",
    }
    counted = metrics.counted()
    assert (counted["FormsFound"], counted["FormsEnqueued"], counted["SweepSucceeded"]) == (3, 3, 1)
    assert "EnqueueFailed" not in counted and "OverdueOverAnHour" not in counted


def test_a_full_last_page_ends_at_the_next_empty_one():
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", [overdue(1), overdue(2)], [])
    publisher = FakePublisher()

    report = sweep(rpc, publisher)

    assert (report.found, report.enqueued) == (2, 2)
    assert len(rpc.params("find_overdue_forms")) == 2 and len(publisher.batches) == 1


def test_nothing_due_builds_no_publisher():
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", [])
    publisher = FakePublisher()

    report = sweep(rpc, publisher)

    assert (report.found, report.enqueued) == (0, 0)
    assert publisher.builds == 0
    assert metrics.counted() == {"SweepSucceeded": 1}


def test_one_message_per_form_per_sweep_hour_not_before_the_window():
    window, opens = closed_window()
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", [overdue(1, zone="UTC")])
    publisher = FakePublisher()
    before = now()

    sweep(rpc, publisher, window=window)

    [message] = publisher.batches[0][0]
    assert message.not_before == opens
    hour = int(message.dedup_id.rsplit("-", 1)[1])
    assert hour % 3600 == 0
    assert math.floor(before.timestamp() / 3600) * 3600 <= hour <= now().timestamp()


def test_a_due_form_inside_the_window_goes_now():
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", [overdue(1)])
    publisher = FakePublisher()

    sweep(rpc, publisher)

    assert publisher.batches[0][0][0].not_before is None


def test_forms_overdue_by_more_than_an_hour_are_counted():
    rpc = nothing_stale(ScriptedRpc()).answer(
        "find_overdue_forms", [overdue(1, minutes_late=90), overdue(2, minutes_late=61), overdue(3)]
    )

    sweep(rpc, FakePublisher(), page_size=10)

    assert metrics.counted()["OverdueOverAnHour"] == 2


def test_one_failed_batch_does_not_stop_the_rest():
    rpc = nothing_stale(ScriptedRpc()).answer(
        "find_overdue_forms", [overdue(1), overdue(2)], [overdue(3), overdue(4)], [overdue(5)]
    )
    publisher = FakePublisher(fail={"enqueue_calls": [None, TransientFailure("QStash 503"), None]})

    report = sweep(rpc, publisher)

    assert (report.found, report.enqueued, report.failed) == (5, 3, 2)
    assert [[m.form_id for m in batch] for batch, _ in publisher.batches] == [
        ["form-1", "form-2"],
        ["form-5"],
    ]
    counted = metrics.counted()
    assert counted["EnqueueFailed"] == 2 and "SweepSucceeded" not in counted


def test_an_unexpected_batch_error_is_a_failed_batch_too():
    rpc = nothing_stale(ScriptedRpc()).answer("find_overdue_forms", [overdue(1)])

    report = sweep(rpc, FakePublisher(fail={"enqueue_calls": RuntimeError("boom")}))

    assert (report.enqueued, report.failed) == (0, 1)


def test_a_refused_qstash_token_stops_the_sweep():
    rpc = nothing_stale(ScriptedRpc()).answer(
        "find_overdue_forms", [overdue(1), overdue(2)], [overdue(3)]
    )
    refused = ConfigurationError(["QSTASH_TOKEN"], "QStash refused the token")

    with pytest.raises(ConfigurationError) as raised:
        sweep(rpc, FakePublisher(fail={"enqueue_calls": refused}))

    assert raised.value is refused
    assert len(rpc.params("find_overdue_forms")) == 1  # no further page is read


# Stale claims


def stale(n: int, *, form_ids: list[str] | None = None) -> dict:
    return {
        "call_id": f"call-{n}",
        "claimed_at": now() - timedelta(minutes=10),
        "form_ids": [f"form-{n}"] if form_ids is None else form_ids,
    }


def test_stale_claims_are_found_released_or_left_unresolved():
    rpc = (
        ScriptedRpc()
        .answer("find_stale_calls", [stale(1), stale(2), stale(3), stale(4)])
        .answer("record_call_placed", RECORDED)
        .answer("release_call", RELEASED, RELEASED)
    )
    vapi = FakeCaller(
        finds=[{"id": "vapi-1", "status": "ended"}, None, VapiUnavailable("Vapi unreachable"), None]
    )

    outcome = reconcile_stale_calls(
        store=FormStore(rpc, rules=CallRules(lease_seconds=45)), vapi=vapi
    )

    assert outcome == {"found": 1, "released": 2, "unresolved": 1}
    assert rpc.params("find_stale_calls") == [{"p_lease_seconds": 45, "p_limit": 100}]
    assert rpc.params("record_call_placed") == [
        {"p_call_id": "call-1", "p_vapi_call_id": "vapi-1", "p_status": "ended"}
    ]
    assert [p["p_call_id"] for p in rpc.params("release_call")] == ["call-2", "call-4"]
    assert [form_id for form_id, _, _ in vapi.searched] == ["form-1", "form-2", "form-3", "form-4"]


def test_a_stale_claim_without_forms_is_released_without_asking_vapi():
    rpc = (
        ScriptedRpc()
        .answer("find_stale_calls", [stale(1, form_ids=[])])
        .answer("release_call", RELEASED)
    )
    vapi = FakeCaller()

    outcome = reconcile_stale_calls(store=FormStore(rpc), vapi=vapi, lease_seconds=5)

    assert outcome == {"found": 0, "released": 1, "unresolved": 0}
    assert vapi.searched == []
    assert rpc.params("find_stale_calls")[0]["p_lease_seconds"] == 5


# Lost outcomes


def vapi_record(call_id: str, status: str, ended_reason: str | None = None) -> dict:
    return {
        "id": call_id,
        "status": status,
        "endedReason": ended_reason,
        "assistantOverrides": {"metadata": {"formIds": [FORM]}},
    }


def test_lost_outcomes_are_recorded_from_vapi_record_or_its_absence():
    awaiting = [{"call_id": f"call-{n}", "vapi_call_id": f"vapi-{n}"} for n in range(1, 5)]
    rpc = (
        ScriptedRpc()
        .answer("find_calls_awaiting_outcome", awaiting)
        .answer(
            "record_call_event",
            recorded_event("call-1", ended=True, outcome="reached"),
            recorded_event("call-4", ended=True, outcome="not_connected"),
        )
        .always("forms_waiting_for_line", [])
    )
    vapi = FakeCaller(
        calls={
            "vapi-1": vapi_record("vapi-1", "ended", "customer-ended-call"),
            "vapi-2": vapi_record("vapi-2", "in-progress"),
            "vapi-3": VapiUnavailable("Vapi answered HTTP 503"),
            "vapi-4": None,
        }
    )

    outcome = look_up_lost_outcomes(
        store=FormStore(rpc, rules=CallRules(lines=1)),
        vapi=vapi,
        publisher=FakePublisher().factory,
        call_form_url=URL,
        window=ALL_DAY,
        timeout_seconds=1800,
    )

    assert outcome == {"ended": 2, "open": 1, "unresolved": 1}
    assert rpc.params("find_calls_awaiting_outcome") == [
        {"p_timeout_seconds": 1800, "p_limit": 100}
    ]
    assert vapi.looked_up == ["vapi-1", "vapi-2", "vapi-3", "vapi-4"]
    found, gone = rpc.params("record_call_event")
    assert (found["p_vapi_call_id"], found["p_outcome"], found["p_source"]) == (
        "vapi-1",
        "reached",
        "lookup",
    )
    assert found["p_form_ids"] == [FORM]
    # A call Vapi no longer knows (404) ended, never connected as far as anyone knows.
    assert (gone["p_vapi_call_id"], gone["p_outcome"], gone["p_status"]) == (
        "vapi-4",
        "not_connected",
        "ended",
    )
    assert datetime.fromisoformat(gone["p_ended_at"]) <= datetime.now(UTC)


def test_the_sweep_reports_reconciled_claims_and_lost_outcomes():
    rpc = (
        ScriptedRpc()
        .answer("find_stale_calls", [stale(1)])
        .answer("release_call", RELEASED)
        .answer("find_calls_awaiting_outcome", [{"call_id": "call-9", "vapi_call_id": "vapi-9"}])
        .answer("find_overdue_forms", [])
    )
    vapi = FakeCaller(finds=[None], calls={"vapi-9": vapi_record("vapi-9", "ringing")})

    report = sweep(rpc, FakePublisher(), vapi=vapi)

    assert report.reconciled == {"found": 0, "released": 1, "unresolved": 0}
    assert report.outcomes == {"ended": 0, "open": 1, "unresolved": 0}
    assert rpc.names()[:3] == ["find_stale_calls", "release_call", "find_calls_awaiting_outcome"]


def test_the_sweep_schedule_is_upserted_under_its_fixed_id():
    publisher = FakePublisher()

    ensure_check_forms_schedule(publisher=publisher, destination="https://check-forms.example/")

    assert publisher.schedules == [
        {
            "scheduleId": CHECK_FORMS_SCHEDULE_ID,
            "destination": "https://check-forms.example/",
            "cron": CHECK_FORMS_CRON,
        }
    ]
    assert CHECK_FORMS_CRON == "0 * * * *"

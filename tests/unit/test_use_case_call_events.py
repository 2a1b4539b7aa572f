"""record_call_event's every branch: ignored events, ended calls, opt-out and follow-ups."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from formcall.call_events import record_call_event
from formcall.errors import TransientFailure
from formcall.models import CallEvent
from formcall.store import CallRules, FormStore
from tests.support import metrics
from tests.support.clock import ALL_DAY, closed_window, now
from tests.support.fakes import FakePublisher
from tests.support.rpc import RECORDED, ScriptedRpc, recorded_event

FORM = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
CALL = "33333333-3333-4333-8333-333333333333"
URL = "https://call-form.example/configured"
ENDED = CallEvent(
    vapi_call_id="vapi-1",
    form_ids=(FORM,),
    status="ended",
    ended_reason="customer-ended-call",
    outcome="reached",
)


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def run(
    event,
    rpc: ScriptedRpc,
    *,
    publisher: FakePublisher | None = None,
    window=ALL_DAY,
    rules: CallRules = CallRules(lines=2),
    source: str = "call-events",
):
    return record_call_event(
        event,
        store=FormStore(rpc, rules=rules),
        publisher=(publisher or FakePublisher()).factory,
        call_form_url=URL,
        window=window,
        source=source,
    )


def test_a_message_formcall_does_not_follow_is_ignored_without_touching_anything():
    rpc, publisher = ScriptedRpc(), FakePublisher()

    result = run(None, rpc, publisher=publisher)

    assert result.status == "ignored"
    assert rpc.calls == [] and publisher.builds == 0


def test_an_event_for_a_call_formcall_did_not_place_is_ignored():
    rpc = ScriptedRpc().answer("record_call_event", {"status": "ignored", "reason": "unknown call"})
    publisher = FakePublisher()

    result = run(ENDED, rpc, publisher=publisher)

    assert (result.status, result.reason) == ("ignored", "unknown call")
    assert rpc.names() == ["record_call_event"]  # no line is freed by a call not ours
    assert publisher.builds == 0
    assert metrics.counted() == {"CallEventsIgnored": 1}


def test_the_event_reaches_the_sql_function_whole():
    rpc = ScriptedRpc().answer("record_call_event", recorded_event(CALL))
    event = CallEvent(
        vapi_call_id="vapi-1",
        form_ids=(FORM, OTHER),
        status="in-progress",
        started_at=now(),
        cost=0.25,
        opt_out=True,
    )

    run(
        event,
        rpc,
        source="lookup",
        rules=CallRules(follow_up_on=frozenset({"busy"}), max_calls_per_form=4),
    )

    [params] = rpc.params("record_call_event")
    assert params["p_vapi_call_id"] == "vapi-1"
    assert params["p_form_ids"] == [FORM, OTHER]
    assert (params["p_status"], params["p_outcome"], params["p_opt_out"]) == (
        "in-progress",
        None,
        True,
    )
    assert params["p_started_at"] == event.started_at.isoformat()
    assert (params["p_follow_up_on"], params["p_max_calls_per_form"]) == (["busy"], 4)
    assert params["p_source"] == "lookup"


def test_a_call_under_way_is_recorded_and_frees_no_line():
    rpc = ScriptedRpc().answer("record_call_event", recorded_event(CALL))

    result = run(CallEvent(vapi_call_id="vapi-1", status="ringing"), rpc)

    assert (result.status, result.ended) == ("recorded", False)
    assert rpc.names() == ["record_call_event"]
    assert metrics.counted() == {}


@pytest.mark.parametrize(
    "outcome, metric", [("reached", "CallsReached"), ("no_answer", "CallsNotReached")]
)
def test_an_ended_call_is_counted_and_wakes_the_forms_waiting_for_its_line(outcome, metric):
    rpc = (
        ScriptedRpc()
        .answer("record_call_event", recorded_event(CALL, ended=True, outcome=outcome))
        .answer("forms_waiting_for_line", ["w1", "w2"])
    )
    publisher = FakePublisher()

    result = run(ENDED, rpc, publisher=publisher)

    assert (result.status, result.ended, result.outcome) == ("recorded", True, outcome)
    [(batch, destination)] = publisher.batches
    assert destination == URL
    assert [m.form_id for m in batch] == ["w1", "w2"]
    assert all(m.dedup_id.startswith(f"call-form-{m.form_id}-line-") for m in batch)
    assert metrics.counted() == {"CallsEnded": 1, metric: 1, "LineWakeups": 2}


def test_an_opt_out_cancels_the_patient_messages():
    rpc = (
        ScriptedRpc()
        .answer(
            "record_call_event",
            recorded_event(
                CALL, ended=True, outcome="reached", cancel=[(FORM, "msg_a"), (OTHER, "msg_b")]
            ),
        )
        .answer("forms_waiting_for_line", [])
    )
    publisher = FakePublisher(holds={"msg_a": FORM, "msg_b": OTHER})

    result = run(ENDED, rpc, publisher=publisher)

    assert publisher.cancelled == ["msg_a", "msg_b"]
    assert len(result.cancel) == 2
    assert metrics.counted()["PatientsOptedOut"] == 1
    assert metrics.counted()["FormsCancelled"] == 2


def test_a_failing_cancel_leaves_the_event_recorded_and_follow_ups_published():
    follow_up = {"form_id": OTHER, "next_call_at": now() + timedelta(days=1), "timezone": "UTC"}
    rpc = (
        ScriptedRpc()
        .answer(
            "record_call_event",
            recorded_event(CALL, cancel=[(FORM, "msg_a")], follow_ups=[follow_up]),
        )
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher(
        fail={"cancel": TransientFailure("QStash unavailable")}, holds={"msg_a": FORM}
    )

    result = run(CallEvent(vapi_call_id="vapi-1", status="in-progress"), rpc, publisher=publisher)

    assert result.status == "recorded"
    assert publisher.cancelled == []
    assert [m.form_id for m, _ in publisher.published] == [OTHER]


def test_a_follow_up_is_published_for_the_window_opening_after_its_next_call():
    window, opens = closed_window()
    next_call_at = now() + timedelta(hours=2)
    rpc = (
        ScriptedRpc()
        .answer(
            "record_call_event",
            recorded_event(
                CALL,
                ended=True,
                outcome="no_answer",
                follow_ups=[{"form_id": FORM, "next_call_at": next_call_at, "timezone": "UTC"}],
            ),
        )
        .answer("forms_waiting_for_line", [])
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()

    run(ENDED, rpc, publisher=publisher, window=window)

    [(message, destination)] = publisher.published
    assert destination == URL
    assert message.not_before == opens
    assert message.dedup_id == f"call-form-{FORM}-follow-up-{math.ceil(next_call_at.timestamp())}"
    assert rpc.params("record_form_scheduled") == [
        {
            "p_form_id": FORM,
            "p_message_id": "msg_1",
            "p_deadline": next_call_at.isoformat(),
            "p_not_before": opens.isoformat(),
        }
    ]
    assert metrics.counted()["FollowUpsScheduled"] == 1


def test_a_follow_up_already_due_inside_the_window_goes_now_deduplicated_by_its_moment():
    next_call_at = now() - timedelta(minutes=3)
    follow_up = {"form_id": FORM, "next_call_at": next_call_at, "timezone": "Etc/GMT"}
    rpc = (
        ScriptedRpc()
        .answer("record_call_event", recorded_event(CALL, follow_ups=[follow_up]))
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()
    before = now()

    run(CallEvent(vapi_call_id="vapi-1", status="in-progress"), rpc, publisher=publisher)

    [(message, _)] = publisher.published
    # Not before now (never in the past); the id keeps the follow-up's own moment.
    assert message.not_before >= before
    assert message.dedup_id.endswith(f"-follow-up-{math.ceil(next_call_at.timestamp())}")

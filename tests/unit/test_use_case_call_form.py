"""call_form's every branch, over a FormStore on scripted SQL answers, a fake Vapi and publisher."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from formcall.call_form import call_form
from formcall.errors import (
    CallOutcomeUnknown,
    ConfigurationError,
    DatabaseUnavailable,
    PermanentFailure,
    TransientFailure,
    VapiBusy,
    VapiRejected,
    VapiUnavailable,
)
from formcall.store import CallRules, FormStore
from tests.support import metrics
from tests.support.clock import ALL_DAY, closed_window, midday_zone, now
from tests.support.fakes import FakeCaller, FakePublisher
from tests.support.rpc import (
    RECORDED,
    RELEASED,
    ScriptedRpc,
    capped,
    claimed,
    no_line,
    open_call,
    opted_out,
    schedule_state,
    skipped,
)

FORM = "11111111-1111-4111-8111-111111111111"
OTHER = "22222222-2222-4222-8222-222222222222"
CALL = "33333333-3333-4333-8333-333333333333"
URL = "https://call-form.example/configured"


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def due_state(timezone: str | None = None, **fields) -> dict:
    """A pending form past its deadline, in a zone where ALL_DAY is open now."""
    fields = {"due": True, **fields}
    return schedule_state(
        FORM, deadline=now() - timedelta(minutes=5), timezone=timezone or midday_zone(), **fields
    )


def a_claim(**fields) -> dict:
    return claimed(
        CALL, [FORM, OTHER], claimed_at=now(), deadline=now() - timedelta(minutes=5), **fields
    )


def run(
    rpc: ScriptedRpc,
    *,
    vapi: FakeCaller | None = None,
    publisher: FakePublisher | None = None,
    window=ALL_DAY,
    rules: CallRules = CallRules(),
    delivery: dict | None = None,
):
    return call_form(
        FORM,
        store=FormStore(rpc, rules=rules),
        vapi=vapi or FakeCaller(),
        publisher=(publisher or FakePublisher()).factory,
        call_form_url=URL,
        window=window,
        delivery=delivery,
    )


# The calling window


def test_outside_the_window_nothing_is_claimed_and_the_message_comes_back_at_the_opening():
    window, opens = closed_window()
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", due_state("UTC"))
        .answer("record_call_deferred", RECORDED)
    )
    publisher = FakePublisher()

    result = run(rpc, publisher=publisher, window=window)

    assert (result.status, result.until, result.reason) == ("deferred", opens, None)
    assert "claim_form_call" not in rpc.names()
    [(message, destination)] = publisher.published
    assert destination == URL
    assert message.not_before == opens
    assert message.dedup_id == f"call-form-{FORM}-window-{int(opens.timestamp())}"
    [deferred] = rpc.params("record_call_deferred")
    assert deferred == {"p_form_id": FORM, "p_until": opens.isoformat(), "p_message_id": "msg_1"}
    assert metrics.counted()["CallsDeferred"] == 1


@pytest.mark.parametrize(
    "fields", [{"submitted": True}, {"opted_out": True}, {"call_status": "calling"}, {"due": False}]
)
def test_the_window_is_not_checked_for_a_form_that_will_not_be_called(fields):
    window, _ = closed_window()
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", due_state("UTC", **fields))
        .answer("claim_form_call", skipped("submitted"))
    )
    publisher = FakePublisher()

    result = run(rpc, publisher=publisher, window=window)

    assert (result.status, result.reason) == ("skipped", "submitted")
    assert publisher.builds == 0


def test_the_delivery_is_recorded_with_the_claim():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", skipped("already_called"))
    )

    run(rpc, delivery={"message_id": "msg_7", "retried": 2})

    [params] = rpc.params("claim_form_call")
    assert params["p_delivery"] == {"message_id": "msg_7", "retried": 2}
    assert params["p_form_id"] == FORM


# Caps


def test_a_capped_patient_is_deferred_to_the_cap_with_its_reason():
    until = now() + timedelta(hours=20)
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", due_state())
        .answer("claim_form_call", capped("patient_cap", until, midday_zone()))
        .answer("record_call_deferred", RECORDED)
    )
    publisher = FakePublisher()

    result = run(rpc, publisher=publisher)

    assert (result.status, result.reason) == ("deferred", "patient_cap")
    # ALL_DAY closes for one second a day: the cap moment is either kept or moved by a second.
    assert until <= result.until <= until + timedelta(seconds=1)
    [(message, destination)] = publisher.published
    assert (message.not_before, destination) == (result.until, URL)
    assert message.dedup_id.startswith(f"call-form-{FORM}-patient_cap-")
    assert metrics.counted()["CallsCapped"] == 1


def test_a_cap_that_ends_outside_the_window_defers_to_the_opening_after_it():
    window, opens = closed_window()
    until = now() + timedelta(hours=1)
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", capped("patient_in_call", until, "UTC"))
        .answer("record_call_deferred", RECORDED)
    )
    publisher = FakePublisher()

    result = run(rpc, publisher=publisher, window=window)

    assert (result.status, result.until, result.reason) == ("deferred", opens, "patient_in_call")
    assert publisher.published[0][0].not_before == opens
    assert rpc.params("record_call_deferred")[0]["p_until"] == opens.isoformat()


# Forms that cannot be called


@pytest.mark.parametrize(
    "answer, message",
    [
        ({"outcome": "not_found"}, "unknown form"),
        (
            {"outcome": "failed", "reason": "gave up after 5 attempts"},
            "call failed: attempts exhausted",
        ),
    ],
)
def test_an_unknown_or_failed_form_is_a_permanent_failure(answer, message):
    rpc = ScriptedRpc().answer("form_schedule_state", None).answer("claim_form_call", answer)

    with pytest.raises(PermanentFailure) as raised:
        run(rpc)

    assert raised.value.status == 489
    assert raised.value.public_message == message
    assert metrics.counted()["CallsFailed"] == 1


@pytest.mark.parametrize("due_in, retry_after", [(0.2, 2), (12.3, 14), (300, 301)])
def test_a_delivery_a_little_early_comes_back_at_the_deadline(due_in, retry_after):
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", skipped("not_due", due_in_seconds=due_in))
    )

    with pytest.raises(TransientFailure) as raised:
        run(rpc)

    assert raised.value.status == 503
    assert raised.value.retry_after == retry_after == math.ceil(due_in) + 1


def test_a_delivery_long_before_the_deadline_is_skipped():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", skipped("not_due", due_in_seconds=300.5))
    )

    result = run(rpc)

    assert (result.status, result.reason) == ("skipped", "not_due")
    assert metrics.counted()["CallsSkipped"] == 1


@pytest.mark.parametrize(
    "reason", ["already_called", "already_failed", "submitted", "no_deadline", "in_progress"]
)
def test_a_form_that_is_not_to_be_called_is_skipped_with_the_reason(reason):
    rpc = (
        ScriptedRpc().answer("form_schedule_state", None).answer("claim_form_call", skipped(reason))
    )
    vapi, publisher = FakeCaller(), FakePublisher()

    result = run(rpc, vapi=vapi, publisher=publisher)

    assert (result.status, result.form_id, result.reason) == ("skipped", FORM, reason)
    assert vapi.created == [] and vapi.searched == []
    assert publisher.builds == 0


def test_an_opted_out_patient_has_the_messages_of_their_forms_cancelled():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer(
            "claim_form_call", opted_out([(FORM, "msg_a"), (OTHER, "msg_b"), (OTHER, "../v2/x")])
        )
    )
    publisher = FakePublisher(holds={"msg_a": FORM, "msg_b": OTHER, "../v2/x": OTHER})

    result = run(rpc, publisher=publisher)

    assert (result.status, result.reason) == ("skipped", "opted_out")
    assert publisher.cancelled == ["msg_a", "msg_b"]  # the id that cannot be QStash's is not sent


def test_cancelling_an_opted_out_patient_messages_is_best_effort():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", opted_out([(FORM, "msg_a")]))
    )
    publisher = FakePublisher(
        fail={"cancel": TransientFailure("QStash unavailable")}, holds={"msg_a": FORM}
    )

    result = run(rpc, publisher=publisher)

    assert (result.status, result.reason) == ("skipped", "opted_out")
    assert publisher.cancelled == []


# The line ledger


@pytest.mark.parametrize(
    "retry_after, expected", [(None, 5), (1, 5), (5, 5), (42, 42), (600, 600), (3600, 600)]
)
def test_no_free_line_waits_with_a_bounded_retry(retry_after, expected):
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", no_line(retry_after))
    )

    with pytest.raises(TransientFailure) as raised:
        run(rpc, rules=CallRules(lines=2))

    assert (raised.value.status, raised.value.retry_after) == (503, expected)
    assert metrics.counted()["CallsWaitingForLine"] == 1


# A claim held without a Vapi call id (in_progress with an open call)


def in_progress(age_seconds: float, **fields) -> dict:
    return skipped(
        "in_progress",
        due_in_seconds=-60,
        open_call=open_call(
            CALL, [FORM, OTHER], claimed_at=now() - timedelta(seconds=age_seconds), **fields
        ),
    )


def test_an_unknown_outcome_within_the_lease_comes_back_when_the_lease_is_over():
    rpc = (
        ScriptedRpc().answer("form_schedule_state", None).answer("claim_form_call", in_progress(10))
    )
    vapi = FakeCaller()

    with pytest.raises(TransientFailure) as raised:
        run(rpc, vapi=vapi, rules=CallRules(lease_seconds=60))

    assert raised.value.status == 503
    assert 2 <= raised.value.retry_after <= 51  # the rest of the lease, and a second
    assert vapi.searched == [] and vapi.created == []


def test_a_live_claim_within_the_lease_is_in_progress():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", in_progress(10, unknown=False))
    )
    vapi = FakeCaller()

    result = run(rpc, vapi=vapi, rules=CallRules(lease_seconds=60))

    assert (result.status, result.reason) == ("skipped", "in_progress")
    assert vapi.searched == [] and vapi.created == []
    assert rpc.names() == ["form_schedule_state", "claim_form_call"]


def test_a_placed_open_call_is_not_looked_up():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", in_progress(600, placed=True))
    )
    vapi = FakeCaller()

    result = run(rpc, vapi=vapi)

    assert (result.status, result.reason) == ("skipped", "in_progress")
    assert vapi.searched == []


def test_past_the_lease_a_call_vapi_has_is_recorded_placed_and_not_placed_again():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", in_progress(120))
        .answer("record_call_placed", RECORDED)
    )
    vapi = FakeCaller(finds=[{"id": "vapi-9", "status": "in-progress"}])

    result = run(rpc, vapi=vapi, rules=CallRules(lease_seconds=60))

    assert (result.status, result.reason, result.call_id) == ("skipped", "already_called", "vapi-9")
    [(form_id, after, before)] = vapi.searched
    assert form_id == FORM and after < now() - timedelta(seconds=120) < before
    assert rpc.params("record_call_placed") == [
        {"p_call_id": CALL, "p_vapi_call_id": "vapi-9", "p_status": "in-progress"}
    ]
    assert vapi.created == []


def test_past_the_lease_a_claim_vapi_has_no_call_for_is_released_and_called_now():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", in_progress(120), a_claim())
        .answer("release_call", RELEASED)
        .answer("record_call_placed", RECORDED)
    )
    vapi = FakeCaller(finds=[None], creates=[("vapi-2", "queued")])

    result = run(rpc, vapi=vapi, rules=CallRules(lease_seconds=60), delivery={"retried": 1})

    assert (result.status, result.call_id) == ("called", "vapi-2")
    assert rpc.names() == [
        "form_schedule_state",
        "claim_form_call",
        "release_call",
        "claim_form_call",
        "record_call_placed",
    ]
    [release] = rpc.params("release_call")
    assert release["p_call_id"] == CALL and release["p_refund_attempt"] is False
    first, again = rpc.params("claim_form_call")
    assert "p_delivery" in first and "p_delivery" not in again  # one delivery, recorded once
    assert [call.call_id for call in vapi.created] == [CALL]


def test_past_the_lease_an_unreadable_vapi_list_changes_nothing_and_is_retried():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", in_progress(120))
    )
    vapi = FakeCaller(finds=[VapiUnavailable("Vapi unreachable")])

    with pytest.raises(TransientFailure) as raised:
        run(rpc, vapi=vapi, rules=CallRules(lease_seconds=60))

    assert (raised.value.status, raised.value.retry_after) == (503, 30)
    assert raised.value.public_message == "Vapi's call list cannot be read"
    assert rpc.names() == ["form_schedule_state", "claim_form_call"]
    assert vapi.created == []


def test_past_the_lease_a_claim_whose_forms_are_gone_is_released_without_asking_vapi():
    answer = skipped(
        "in_progress", open_call=open_call(CALL, [], claimed_at=now() - timedelta(seconds=120))
    )
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", answer, skipped("already_called"))
        .answer("release_call", RELEASED)
    )
    vapi = FakeCaller()

    result = run(rpc, vapi=vapi)

    assert (result.status, result.reason) == ("skipped", "already_called")
    assert vapi.searched == []
    assert rpc.params("release_call")[0]["p_error"] == "the call's forms were deleted"


# What Vapi answers


def test_a_placed_call_is_recorded_with_its_status():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", due_state())
        .answer("claim_form_call", a_claim(name="Ada Lovelace", phone="+15550123"))
        .answer("record_call_placed", RECORDED)
    )
    vapi = FakeCaller(creates=[("vapi-1", "queued")])

    result = run(rpc, vapi=vapi)

    assert (result.status, result.form_id, result.call_id) == ("called", FORM, "vapi-1")
    [call] = vapi.created
    assert (call.call_id, call.patient_name, call.phone) == (CALL, "Ada Lovelace", "+15550123")
    assert call.form_ids == [FORM, OTHER]
    assert rpc.params("record_call_placed") == [
        {"p_call_id": CALL, "p_vapi_call_id": "vapi-1", "p_status": "queued"}
    ]
    assert metrics.counted()["CallsPlaced"] == 1


def test_a_placed_call_that_cannot_be_recorded_is_still_called():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("record_call_placed", DatabaseUnavailable("database unavailable"))
    )
    vapi = FakeCaller(creates=[("vapi-1", None)])

    result = run(rpc, vapi=vapi)

    assert (result.status, result.call_id) == ("called", "vapi-1")


def line_rules() -> CallRules:
    return CallRules(lines=2)


def woken(publisher: FakePublisher) -> list[str]:
    return [
        message.form_id
        for batch, destination in publisher.batches
        for message in batch
        if destination == URL
    ]


def test_busy_lines_release_the_claim_with_a_refund_and_defer_shortly():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("release_call", RELEASED)
        .answer("forms_waiting_for_line", ["w1"])
        .answer("record_call_deferred", RECORDED)
    )
    vapi = FakeCaller(creates=[VapiBusy("Vapi concurrency limit reached", retry_after=7)])
    publisher = FakePublisher()
    before = now()

    result = run(rpc, vapi=vapi, publisher=publisher, rules=line_rules())

    assert (result.status, result.reason) == ("deferred", "busy")
    assert before + timedelta(seconds=7) <= result.until <= now() + timedelta(seconds=7)
    assert rpc.params("release_call") == [
        {"p_call_id": CALL, "p_refund_attempt": True, "p_error": "Vapi concurrency limit reached"}
    ]
    [(message, destination)] = publisher.published
    assert destination == URL and message.not_before == result.until
    assert message.dedup_id.startswith(f"call-form-{FORM}-busy-")
    assert woken(publisher) == ["w1"]
    assert metrics.counted()["CallsRetried"] == 1


def test_busy_lines_without_a_retry_after_defer_five_seconds():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("release_call", RELEASED)
        .answer("record_call_deferred", RECORDED)
    )
    before = now()

    result = run(rpc, vapi=FakeCaller(creates=[VapiBusy("busy")]))

    assert before + timedelta(seconds=5) <= result.until <= now() + timedelta(seconds=5)


def test_vapi_unavailable_releases_the_claim_and_is_retried():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("release_call", RELEASED)
        .answer("forms_waiting_for_line", ["w1", "w2"])
    )
    failure = VapiUnavailable("Vapi answered HTTP 429", retry_after=3)
    publisher = FakePublisher()

    with pytest.raises(VapiUnavailable) as raised:
        run(rpc, vapi=FakeCaller(creates=[failure]), publisher=publisher, rules=line_rules())

    assert raised.value is failure and raised.value.status == 503
    assert rpc.params("release_call") == [
        {"p_call_id": CALL, "p_refund_attempt": False, "p_error": "Vapi answered HTTP 429"}
    ]
    assert woken(publisher) == ["w1", "w2"]
    assert publisher.published == []


@pytest.mark.parametrize(
    "detail, stored",
    [
        (
            {"stored": "HTTP 400: number [number] invalid for [name]"},
            "HTTP 400: number [number] invalid for [name]",
        ),
        ({}, "Vapi rejected the call: HTTP 400"),
    ],
)
def test_a_rejected_call_fails_for_good_with_only_the_redacted_text_stored(detail, stored):
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("record_call_failed", RECORDED)
        .answer("forms_waiting_for_line", [])
    )
    rejected = VapiRejected("Vapi rejected the call: HTTP 400", **detail)
    publisher = FakePublisher()

    with pytest.raises(PermanentFailure) as raised:
        run(rpc, vapi=FakeCaller(creates=[rejected]), publisher=publisher, rules=line_rules())

    assert type(raised.value) is PermanentFailure and raised.value.status == 489
    assert raised.value.public_message == "Vapi rejected the call: HTTP 400"
    assert raised.value.detail == {"formId": FORM}
    assert rpc.params("record_call_failed") == [{"p_call_id": CALL, "p_error": stored}]
    assert "forms_waiting_for_line" in rpc.names()
    assert metrics.counted()["CallsFailed"] == 2  # both forms of the call


def test_an_unknown_outcome_is_recorded_and_reconciled_after_the_lease():
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("record_call_unknown", RECORDED)
    )
    publisher = FakePublisher()
    before = now()

    result = run(
        rpc,
        vapi=FakeCaller(creates=[CallOutcomeUnknown("ReadTimeout")]),
        publisher=publisher,
        rules=CallRules(lease_seconds=90),
    )

    assert (result.status, result.reason) == ("unknown", "outcome unknown: ReadTimeout")
    assert rpc.params("record_call_unknown") == [{"p_call_id": CALL, "p_error": "ReadTimeout"}]
    [(message, destination)] = publisher.published
    assert destination == URL
    assert before + timedelta(seconds=91) <= message.not_before <= now() + timedelta(seconds=91)
    assert message.dedup_id == (
        f"call-form-{FORM}-reconcile-{math.ceil(message.not_before.timestamp())}"
    )
    assert "release_call" not in rpc.names()  # the claim stays: no second call


@pytest.mark.parametrize(
    "failure",
    [
        TransientFailure("QStash unavailable"),
        ConfigurationError(["QSTASH_TOKEN"], "QStash refused"),
    ],
)
def test_an_unknown_outcome_whose_reconcile_message_fails_is_left_to_the_sweep(failure):
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", None)
        .answer("claim_form_call", a_claim())
        .answer("record_call_unknown", RECORDED)
    )
    publisher = FakePublisher(fail={"publish_call": failure})

    result = run(
        rpc, vapi=FakeCaller(creates=[CallOutcomeUnknown("HTTP 502")]), publisher=publisher
    )

    assert result.status == "unknown"
    assert publisher.published == []

"""schedule.py's use cases: one message per wanted form, cancels, message-id checks, wake-ups."""

from __future__ import annotations

from datetime import timedelta

import pytest

from formcall.errors import ConfigurationError, DatabaseUnavailable, TransientFailure
from formcall.models import FollowUp, MessageToCancel
from formcall.schedule import (
    cancel_form_messages,
    cancel_message,
    publish_follow_ups,
    sync_form_schedule,
    wake_waiting_forms,
)
from formcall.store import CallRules, FormStore
from tests.support import metrics
from tests.support.clock import ALL_DAY, closed_window, midday_zone, now
from tests.support.fakes import FakePublisher
from tests.support.rpc import RECORDED, ScriptedRpc, schedule_state

OTHER_FORM = "22222222-2222-4222-8222-222222222222"
FORM = "11111111-1111-4111-8111-111111111111"
URL = "https://call-form.example/configured"
HOSTILE_IDS = [
    "../v2/schedules/formcall-check-forms",
    "msg_1/../../x",
    "msg\x00",
    "",
    "a b",
    "x" * 257,
]


@pytest.fixture(autouse=True)
def clean_metrics():
    metrics.reset()
    yield
    metrics.reset()


def sync(rpc: ScriptedRpc, publisher: FakePublisher, window=ALL_DAY):
    return sync_form_schedule(
        FORM, store=FormStore(rpc), publisher=publisher, call_form_url=URL, window=window
    )


def test_a_deleted_form_is_gone():
    rpc, publisher = ScriptedRpc().answer("form_schedule_state", None), FakePublisher()

    assert sync(rpc, publisher).action == "gone"
    assert publisher.published == [] and publisher.cancelled == []


def test_a_wanted_form_gets_one_message_for_its_deadline():
    deadline = (now() + timedelta(days=2)).replace(microsecond=0)
    rpc = (
        ScriptedRpc()
        .answer(
            "form_schedule_state", schedule_state(FORM, deadline=deadline, timezone=midday_zone())
        )
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()

    result = sync(rpc, publisher)

    assert (result.action, result.message_id) == ("scheduled", "msg_1")
    [(message, destination)] = publisher.published
    assert destination == URL
    assert message.dedup_id == f"call-form-{FORM}-deadline-{int(deadline.timestamp())}"
    assert rpc.params("record_form_scheduled") == [
        {
            "p_form_id": FORM,
            "p_message_id": "msg_1",
            "p_deadline": deadline.isoformat(),
            "p_not_before": result.not_before.isoformat(),
        }
    ]
    assert deadline <= result.not_before <= deadline + timedelta(days=1)
    assert metrics.counted() == {"FormsScheduled": 1}


def test_a_deadline_outside_the_window_is_moved_to_the_opening():
    window, opens = closed_window()
    deadline = now() + timedelta(minutes=30)
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", schedule_state(FORM, deadline=deadline))
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()

    result = sync(rpc, publisher, window)

    assert result.not_before == opens == publisher.published[0][0].not_before
    assert rpc.params("record_form_scheduled")[0]["p_deadline"] == deadline.isoformat()


def test_a_past_deadline_is_scheduled_from_now_not_in_the_past():
    window, opens = closed_window()
    deadline = now() - timedelta(days=10)
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", schedule_state(FORM, deadline=deadline))
        .answer("record_form_scheduled", RECORDED)
    )

    result = sync(rpc, FakePublisher(), window)

    assert result.not_before == opens


def test_a_form_due_at_a_later_next_call_gets_a_follow_up_message():
    deadline, due_at = now() - timedelta(days=1), now() + timedelta(hours=5)
    rpc = (
        ScriptedRpc()
        .answer(
            "form_schedule_state",
            schedule_state(FORM, deadline=deadline, due_at=due_at, next_call_at=due_at),
        )
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()

    sync(rpc, publisher)

    assert "-follow-up-" in publisher.published[0][0].dedup_id
    assert rpc.params("record_form_scheduled")[0]["p_deadline"] == due_at.isoformat()


def test_a_form_whose_message_matches_is_unchanged():
    deadline = now() + timedelta(days=2)
    rpc = ScriptedRpc().answer(
        "form_schedule_state",
        schedule_state(FORM, deadline=deadline, message_id="msg_old", scheduled_deadline=deadline),
    )
    publisher = FakePublisher()

    result = sync(rpc, publisher)

    assert (result.action, result.message_id) == ("unchanged", "msg_old")
    assert rpc.names() == ["form_schedule_state"]
    assert publisher.published == [] and publisher.cancelled == []


def test_a_moved_deadline_is_rescheduled_and_the_old_message_cancelled():
    deadline = now() + timedelta(days=2)
    rpc = (
        ScriptedRpc()
        .answer(
            "form_schedule_state",
            schedule_state(
                FORM,
                deadline=deadline,
                message_id="msg_old",
                scheduled_deadline=deadline - timedelta(days=1),
            ),
        )
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher(holds={"msg_old": FORM})

    result = sync(rpc, publisher)

    assert (result.action, result.message_id) == ("rescheduled", "msg_1")
    assert publisher.cancelled == ["msg_old"]


def test_a_republished_message_with_the_same_id_is_not_cancelled():
    # QStash answers a duplicate (same deduplication id) with the id it already has.
    deadline = now() + timedelta(days=2)
    rpc = (
        ScriptedRpc()
        .answer(
            "form_schedule_state",
            schedule_state(FORM, deadline=deadline, message_id="msg_1", scheduled_deadline=None),
        )
        .answer("record_form_scheduled", RECORDED)
    )
    publisher = FakePublisher()

    assert sync(rpc, publisher).action == "rescheduled"
    assert publisher.cancelled == []


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"submitted": True}, "submitted"),
        ({"deadline": None}, "no deadline"),
        ({"opted_out": True}, "opted out"),
        ({"call_status": "called"}, "call called"),
        ({"call_status": "failed"}, "call failed"),
    ],
)
def test_an_unwanted_form_has_its_message_cancelled(fields, reason):
    state = {"deadline": now() + timedelta(days=1), "message_id": "msg_old", **fields}
    rpc = (
        ScriptedRpc()
        .answer("form_schedule_state", schedule_state(FORM, **state))
        .answer("record_form_unscheduled", RECORDED)
    )
    publisher = FakePublisher(holds={"msg_old": FORM})

    result = sync(rpc, publisher)

    assert (result.action, result.message_id) == ("cancelled", "msg_old")
    assert publisher.cancelled == ["msg_old"] and publisher.published == []
    assert rpc.params("record_form_unscheduled") == [
        {"p_form_id": FORM, "p_message_id": "msg_old", "p_reason": reason}
    ]


def test_an_unwanted_form_without_a_message_is_unchanged():
    rpc = ScriptedRpc().answer(
        "form_schedule_state", schedule_state(FORM, deadline=now(), submitted=True)
    )
    publisher = FakePublisher()

    assert sync(rpc, publisher).action == "unchanged"
    assert rpc.names() == ["form_schedule_state"] and publisher.cancelled == []


@pytest.mark.parametrize("message_id", HOSTILE_IDS[:3])
def test_a_stored_id_that_cannot_be_qstash_never_reaches_the_publisher(message_id):
    rpc = (
        ScriptedRpc()
        .answer(
            "form_schedule_state",
            schedule_state(FORM, deadline=now(), submitted=True, message_id=message_id),
        )
        .answer("record_form_unscheduled", RECORDED)
    )
    publisher = FakePublisher()

    assert sync(rpc, publisher).action == "cancelled"
    assert publisher.cancelled == []
    # The form still forgets it, so nothing points at it any more.
    assert rpc.params("record_form_unscheduled")[0]["p_message_id"] == message_id


def test_a_cancel_qstash_refuses_is_not_recorded_as_done():
    rpc = ScriptedRpc().answer(
        "form_schedule_state",
        schedule_state(FORM, deadline=now(), submitted=True, message_id="msg_old"),
    )
    publisher = FakePublisher(
        fail={"cancel": TransientFailure("QStash unavailable")}, holds={"msg_old": FORM}
    )

    with pytest.raises(TransientFailure):
        sync(rpc, publisher)

    assert "record_form_unscheduled" not in rpc.names()


def gone_form() -> FormStore:
    """A store whose form was deleted (schedule state: none)."""
    return FormStore(ScriptedRpc().answer("form_schedule_state", None))


@pytest.mark.parametrize("message_id", [None, "", *HOSTILE_IDS, 42, ["msg_1"]])
def test_a_deleted_form_message_id_that_is_not_a_qstash_id_is_not_cancelled(message_id):
    publisher = FakePublisher(holds={str(message_id): FORM})

    result = cancel_message(FORM, message_id, store=gone_form(), publisher=publisher)

    assert result.action in ("gone", "unchanged") and publisher.cancelled == []


def test_a_deleted_form_message_is_cancelled():
    publisher = FakePublisher(holds={"msg_2Kx=-_9": FORM})

    result = cancel_message(FORM, "msg_2Kx=-_9", store=gone_form(), publisher=publisher)

    assert (result.action, result.message_id) == ("cancelled", "msg_2Kx=-_9")
    assert publisher.cancelled == ["msg_2Kx=-_9"]


def test_a_delete_webhook_naming_another_forms_message_cancels_nothing():
    publisher = FakePublisher(holds={"msg_victim": OTHER_FORM})

    cancel_message(FORM, "msg_victim", store=gone_form(), publisher=publisher)

    assert publisher.cancelled == []


def test_a_delete_webhook_for_a_live_form_cancels_nothing():
    live = FormStore(
        ScriptedRpc().answer(
            "form_schedule_state", schedule_state(FORM, deadline=now(), message_id="msg_live")
        )
    )
    publisher = FakePublisher(holds={"msg_live": FORM})

    assert cancel_message(FORM, "msg_live", store=live, publisher=publisher).action == "unchanged"
    assert publisher.cancelled == []


def test_cancel_form_messages_sends_only_qstash_ids():
    publisher = FakePublisher(holds={"msg_a": FORM, "../x": FORM, "msg_b": FORM})
    messages = [
        MessageToCancel(FORM, "msg_a"),
        MessageToCancel(FORM, "../x"),
        MessageToCancel(FORM, "msg_b"),
    ]

    cancel_form_messages(messages, publisher=publisher)

    assert publisher.cancelled == ["msg_a", "msg_b"]


# Waking forms that wait for a line


def wake(rpc: ScriptedRpc, publisher: FakePublisher, rules: CallRules = CallRules(lines=3)):
    return wake_waiting_forms(
        store=FormStore(rpc, rules=rules), publisher=publisher.factory, call_form_url=URL
    )


def test_without_a_line_ledger_nothing_waits():
    rpc, publisher = ScriptedRpc(), FakePublisher()

    assert wake(rpc, publisher, CallRules(lines=None)) == 0
    assert rpc.calls == [] and publisher.builds == 0


def test_no_waiting_form_builds_no_publisher():
    rpc, publisher = ScriptedRpc().answer("forms_waiting_for_line", []), FakePublisher()

    assert wake(rpc, publisher) == 0
    assert publisher.builds == 0
    assert rpc.params("forms_waiting_for_line") == [{"p_lines": 3, "p_max_call_seconds": 660}]


def test_waiting_forms_are_woken_now_in_one_batch():
    rpc = ScriptedRpc().answer("forms_waiting_for_line", ["w1", "w2"])
    publisher = FakePublisher()
    before = now()

    assert wake(rpc, publisher) == 2

    [(batch, destination)] = publisher.batches
    assert destination == URL
    assert [m.form_id for m in batch] == ["w1", "w2"]
    assert all(m.not_before is None for m in batch)
    stamp = int(batch[0].dedup_id.rsplit("-", 1)[1])
    assert before.timestamp() <= stamp <= now().timestamp() + 1
    assert metrics.counted() == {"LineWakeups": 2}


@pytest.mark.parametrize(
    "failure",
    [TransientFailure("QStash unavailable"), ConfigurationError(["QSTASH_TOKEN"], "refused")],
)
def test_a_wake_up_the_publisher_fails_is_left_to_qstash_retries(failure):
    rpc = ScriptedRpc().answer("forms_waiting_for_line", ["w1"])

    assert wake(rpc, FakePublisher(fail={"enqueue_calls": failure})) == 0
    assert metrics.counted() == {}


def test_a_wake_up_the_database_fails_is_left_to_qstash_retries():
    rpc = ScriptedRpc().answer("forms_waiting_for_line", DatabaseUnavailable("down"))

    assert wake(rpc, FakePublisher()) == 0


def test_publish_follow_ups_records_each_message_on_its_form():
    at = now() + timedelta(days=1)
    rpc = ScriptedRpc().answer("record_form_scheduled", RECORDED, RECORDED)
    publisher = FakePublisher()
    follow_ups = [FollowUp(FORM, at, midday_zone()), FollowUp("f2", at, "Not/AZone")]

    count = publish_follow_ups(
        follow_ups, store=FormStore(rpc), publisher=publisher, call_form_url=URL, window=ALL_DAY
    )

    assert count == 2
    assert [p["p_message_id"] for p in rpc.params("record_form_scheduled")] == ["msg_1", "msg_2"]
    assert [m.form_id for m, _ in publisher.published] == [FORM, "f2"]

"""schedule-form's use case: keep each form's one-time call-form message matching the form."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from formcall.errors import FormcallError
from formcall.messages import call_message, deadline_message, now, opening
from formcall.observability import count, logger
from formcall.ports import Publisher
from formcall.store import FormStore
from formcall.models import FollowUp, MessageToCancel
from formcall.window import CallWindow

# What a QStash message id can look like ("msg_" and URL-safe characters). An id is pasted into
# the QStash API path by the client, so anything else (a "/", "..", a NUL) must never reach it.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_=-]{1,256}")


@dataclass(frozen=True)
class ScheduleResult:
    action: str                      # scheduled | rescheduled | cancelled | unchanged | gone
    message_id: str | None = None
    not_before: datetime | None = None


def sync_form_schedule(form_id: str, *, store: FormStore, publisher: Publisher,
                       call_form_url: str, window: CallWindow) -> ScheduleResult:
    """Make the form's one-time message match the form, whatever happened before.

    A pending, unsubmitted form with a deadline has exactly one message, for that deadline
    (moved to the calling window's opening); any other form has none. Reading the row rather
    than trusting the webhook's payload makes this idempotent and order-independent.
    """
    state = store.schedule_state(form_id)
    if state is None:
        return ScheduleResult("gone")
    wanted = (state.deadline is not None and not state.submitted
              and state.call_status == "pending" and not state.opted_out)
    if not wanted:
        if state.message_id is None:
            return ScheduleResult("unchanged")
        _cancel(state.message_id, publisher=publisher, form_id=form_id)
        reason = ("submitted" if state.submitted else "no deadline" if state.deadline is None
                  else "opted out" if state.opted_out else f"call {state.call_status}")
        store.record_unscheduled(form_id, message_id=state.message_id, reason=reason)
        count("FormsCancelled")
        logger.info("call message cancelled", extra={"form_id": form_id, "reason": reason})
        return ScheduleResult("cancelled", state.message_id)

    assert state.deadline is not None
    # Due at the deadline, or at a later next call (a follow-up, a cap): one message for it.
    due = state.due_at or state.deadline
    if state.message_id and state.scheduled_deadline == due:
        return ScheduleResult("unchanged", state.message_id)
    not_before = opening(max(due, now()), state.timezone, window, form_id) or due
    message = (deadline_message(form_id, due, not_before) if due == state.deadline
               else call_message(form_id, reason="follow-up", moment=due, not_before=not_before))
    message_id = publisher.publish_call(message, destination=call_form_url)
    if state.message_id and state.message_id != message_id:
        _cancel(state.message_id, publisher=publisher, form_id=form_id)
    store.record_scheduled(form_id, message_id=message_id, deadline=due, not_before=not_before)
    count("FormsScheduled")
    action = "rescheduled" if state.message_id else "scheduled"
    logger.info("call message published", extra={"form_id": form_id, "action": action,
                                                  "not_before": not_before.isoformat()})
    return ScheduleResult(action, message_id, not_before)


def _is_message_id(value: object) -> bool:
    return isinstance(value, str) and _MESSAGE_ID.fullmatch(value) is not None


def _cancel(message_id: str, *, publisher: Publisher, form_id: str) -> bool:
    """Cancel a message only if it is this form's: QStash's copy of it must name the form.

    The id comes from the form's row (or, for a deleted form, the webhook's old record); a row
    pointed at another patient's message must never cancel it. Returns whether it cancelled.
    """
    if not _is_message_id(message_id):
        logger.warning("not a QStash message id; nothing cancelled", extra={"form_id": form_id})
        return False
    owner = publisher.form_of_message(message_id)
    if owner is None:
        return False  # already delivered, cancelled or never QStash's: nothing to cancel
    if owner != form_id:
        logger.warning("message belongs to another form; not cancelled",
                       extra={"form_id": form_id, "message_id": message_id})
        count("ForeignMessageNotCancelled")
        return False
    publisher.cancel(message_id)
    return True


def cancel_message(form_id: str, message_id: object, *, store: FormStore,
                   publisher: Publisher) -> ScheduleResult:
    """A deleted form: cancel the message its last row pointed at (the id is the webhook's).

    Only if the form is really gone (a DELETE webhook for a live form is not believed) and the
    message is really this form's.
    """
    if not message_id:
        return ScheduleResult("gone")
    if store.schedule_state(form_id) is not None:
        logger.warning("delete webhook for a form that exists; nothing cancelled",
                       extra={"form_id": form_id})
        return ScheduleResult("unchanged")
    if not _is_message_id(message_id):
        logger.warning("deleted form's message id is not a QStash message id; nothing cancelled")
        return ScheduleResult("gone")
    if not _cancel(message_id, publisher=publisher, form_id=form_id):
        return ScheduleResult("gone")
    count("FormsCancelled")
    return ScheduleResult("cancelled", message_id)


def cancel_form_messages(messages: Iterable[MessageToCancel], *, publisher: Publisher) -> int:
    """Cancel the messages of forms that will not be called (an opted-out patient's)."""
    cancelled = 0
    for message in messages:
        _cancel(message.message_id, publisher=publisher, form_id=message.form_id)
        cancelled += 1
    if cancelled:
        count("FormsCancelled", cancelled)
    return cancelled


def wake_waiting_forms(*, store: FormStore, publisher: Callable[[], Publisher],
                       call_form_url: str) -> int:
    """A line freed: publish call-form messages for the oldest forms waiting for one, now.

    Best effort: a form not woken here still has its QStash retry and the sweep.
    """
    try:
        waiting = store.forms_waiting_for_line()
        if not waiting:
            return 0
        at = now()
        woken = publisher().enqueue_calls(
            [call_message(form_id, reason="line", moment=at) for form_id in waiting],
            destination=call_form_url)
    except FormcallError as exc:
        logger.warning("waiting forms not woken", extra={"error": exc.public_message})
        return 0
    count("LineWakeups", woken)
    return woken


def publish_follow_ups(follow_ups: Iterable[FollowUp], *, store: FormStore, publisher: Publisher,
                       call_form_url: str, window: CallWindow) -> int:
    """One message per follow-up, for its next call (or the window's opening after it).

    Deduplicated by form and moment, and recorded on the form: a repeated report publishes
    the same message again at most, never a second one.
    """
    published = 0
    for follow_up in follow_ups:
        at = max(follow_up.next_call_at, now())
        not_before = opening(at, follow_up.timezone, window, follow_up.form_id) or at
        message = call_message(follow_up.form_id, reason="follow-up",
                               moment=follow_up.next_call_at, not_before=not_before)
        message_id = publisher.publish_call(message, destination=call_form_url)
        store.record_scheduled(follow_up.form_id, message_id=message_id,
                               deadline=follow_up.next_call_at, not_before=not_before)
        published += 1
        logger.info("follow-up call scheduled", extra={"form_id": follow_up.form_id,
                                                        "not_before": not_before.isoformat()})
    if published:
        count("FollowUpsScheduled", published)
    return published

"""schedule-form's use case: keep each form's one-time call-form message matching the form."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from formcall.messages import deadline_message, now, opening
from formcall.observability import count, logger
from formcall.ports import Publisher
from formcall.store import FormStore
from formcall.window import DEFAULT_WINDOW, CallWindow

# What a QStash message id can look like ("msg_" and URL-safe characters). An id is pasted into
# the QStash API path by the client, so anything else (a "/", "..", a NUL) must never reach it.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_=-]{1,256}")


@dataclass(frozen=True)
class ScheduleResult:
    action: str                      # scheduled | rescheduled | cancelled | unchanged | gone
    message_id: str | None = None
    not_before: datetime | None = None


def sync_form_schedule(form_id: str, *, store: FormStore, publisher: Publisher,
                       call_form_url: str, window: CallWindow = DEFAULT_WINDOW) -> ScheduleResult:
    """Make the form's one-time message match the form, whatever happened before.

    A pending, unsubmitted form with a deadline has exactly one message, for that deadline
    (moved to the calling window's opening); any other form has none. Reading the row rather
    than trusting the webhook's payload makes this idempotent and order-independent.
    """
    state = store.schedule_state(form_id)
    if state is None:
        return ScheduleResult("gone")
    wanted = (state.deadline is not None and not state.submitted
              and state.call_status == "pending")
    if not wanted:
        if state.message_id is None:
            return ScheduleResult("unchanged")
        _cancel(state.message_id, publisher=publisher, form_id=form_id)
        reason = ("submitted" if state.submitted else "no deadline" if state.deadline is None
                  else f"call {state.call_status}")
        store.record_unscheduled(form_id, message_id=state.message_id, reason=reason)
        count("FormsCancelled")
        logger.info("call message cancelled", extra={"form_id": form_id, "reason": reason})
        return ScheduleResult("cancelled", state.message_id)

    assert state.deadline is not None
    if state.message_id and state.scheduled_deadline == state.deadline:
        return ScheduleResult("unchanged", state.message_id)
    not_before = opening(max(state.deadline, now()), state.timezone, window, form_id) \
        or state.deadline
    message_id = publisher.publish_call(deadline_message(form_id, state.deadline, not_before),
                                        destination=call_form_url)
    if state.message_id and state.message_id != message_id:
        _cancel(state.message_id, publisher=publisher, form_id=form_id)
    store.record_scheduled(form_id, message_id=message_id, deadline=state.deadline,
                           not_before=not_before)
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

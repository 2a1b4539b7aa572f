"""call-events' use case: record how a call went, and act on it (follow-ups, opt-out).

The same path serves Vapi's server messages (call-events) and Vapi's own record of a call
looked up by the sweep when a report was lost, so both end in one correct record.
"""

from __future__ import annotations

from collections.abc import Callable

from formcall.errors import TransientFailure
from formcall.models import CallEvent, RecordedEvent
from formcall.observability import count, logger
from formcall.ports import Publisher
from formcall.schedule import cancel_form_messages, publish_follow_ups, wake_waiting_forms
from formcall.store import FormStore
from formcall.window import CallWindow


def record_call_event(event: CallEvent | None, *, store: FormStore,
                      publisher: Callable[[], Publisher], call_form_url: str, window: CallWindow,
                      source: str = "call-events") -> RecordedEvent:
    """Record the event atomically, then publish its follow-ups and cancel opted-out messages.

    A follow-up whose publish fails is returned again by the next report of the same call
    (Vapi retries a 503), so none is lost and none is published twice.
    """
    if event is None:
        return RecordedEvent("ignored", reason="not a call event formcall follows")
    result = store.record_call_event(event, source=source)
    if result.status == "ignored":
        count("CallEventsIgnored")
        logger.info("call event for a call formcall did not place", extra={"reason": result.reason})
        return result
    if result.ended:
        count("CallsEnded")
        count("CallsReached" if result.outcome == "reached" else "CallsNotReached")
        logger.info("call ended", extra={"call_id": result.call_id, "outcome": result.outcome,
                                         "ended_reason": event.ended_reason, "source": source})
        # Its line is free: the oldest form waiting for one goes now.
        wake_waiting_forms(store=store, publisher=publisher, call_form_url=call_form_url)
    if result.opted_out:
        count("PatientsOptedOut")
        logger.info("patient opted out; their calls are stopped",
                    extra={"call_id": result.call_id, "messages": len(result.cancel)})
    if result.cancel:
        try:
            cancel_form_messages(result.cancel, publisher=publisher())
        except TransientFailure as exc:
            # A message left behind is delivered and skipped: the forms are opted out already.
            logger.warning("messages of an opted-out patient not cancelled",
                           extra={"error": exc.public_message})
    if result.follow_ups:
        publish_follow_ups(result.follow_ups, store=store, publisher=publisher(),
                           call_form_url=call_form_url, window=window)
    return result

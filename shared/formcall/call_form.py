"""call-form's use case: claim the patient's due forms atomically, place one call, record it.

Every path that could call goes through here, so the calling window and the caps hold by
construction: outside the patient's window nothing is claimed and the message is published
again for the opening; over a cap the claim refuses and the message is published for the
earliest moment the caps and the window allow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta

from formcall.errors import (CallOutcomeUnknown, DatabaseUnavailable, PermanentFailure,
                             TransientFailure, VapiBusy, VapiRejected, VapiUnavailable)
from formcall.messages import call_message, now, opening
from formcall.models import CallResult, MessageToCancel
from formcall.observability import count, logger
from formcall.ports import Caller, Publisher
from formcall.schedule import cancel_form_messages
from formcall.store import FormStore
from formcall.window import CallWindow

# A delivery this close before the deadline is retried at the deadline rather than skipped;
# further ahead means the deadline moved and a newer message will come.
EARLY_DELIVERY_SECONDS = 300


def call_form(form_id: str, *, store: FormStore, vapi: Caller,
              publisher: Callable[[], Publisher], call_form_url: str, window: CallWindow,
              delivery: dict | None = None) -> CallResult:
    """Call the patient about `form_id` (and their other due forms), or say why not now.

    Deferred messages go to `call_form_url`, the configured call-form URL, never to one
    taken from the request.
    """
    state = store.schedule_state(form_id)
    if (state and state.call_status == "pending" and state.due and not state.submitted
            and not state.opted_out):
        until = opening(now(), state.timezone, window, form_id)
        if until is not None:
            return _defer(form_id, until, None, store=store, publisher=publisher,
                          call_form_url=call_form_url)

    claim = store.claim(form_id, delivery=delivery)
    if claim.outcome == "not_found":
        count("CallsFailed")
        raise PermanentFailure("unknown form", formId=form_id)
    if claim.outcome == "failed":
        count("CallsFailed")
        raise PermanentFailure("call failed: attempts exhausted", formId=form_id)
    if claim.outcome == "capped":
        assert claim.until is not None
        until = opening(claim.until, claim.timezone, window, form_id) or claim.until
        count("CallsCapped")
        return _defer(form_id, until, claim.reason, store=store, publisher=publisher,
                      call_form_url=call_form_url)
    if claim.outcome == "skipped" and claim.reason == "not_due" and (
            claim.due_in_seconds is not None and claim.due_in_seconds <= EARLY_DELIVERY_SECONDS):
        # QStash's not-before has whole-second resolution and clocks differ: a delivery a
        # little early must come back at the deadline, not be dropped as "not due".
        raise TransientFailure("form not due yet", retry_after=math.ceil(claim.due_in_seconds) + 1,
                               formId=form_id)
    if claim.outcome == "skipped":
        if claim.cancel:
            _cancel_opted_out(claim.cancel, publisher=publisher)
        count("CallsSkipped")
        logger.info("call skipped", extra={"form_id": form_id, "reason": claim.reason})
        return CallResult("skipped", form_id, reason=claim.reason)

    call = claim.call
    assert call is not None
    try:
        vapi_call_id, status = vapi.create_call(call)
    except VapiBusy as exc:
        # Refused by the concurrency limit: never placed, not the patient's attempt. A fresh
        # message comes back shortly (this one is done), so no QStash retry count runs out.
        store.release(call.call_id, exc.public_message, refund_attempt=True)
        count("CallsRetried")
        logger.warning("Vapi lines busy, call deferred", extra={"form_id": form_id})
        return _defer(form_id, now() + timedelta(seconds=exc.retry_after or 5), "busy",
                      store=store, publisher=publisher, call_form_url=call_form_url)
    except VapiUnavailable as exc:
        store.release(call.call_id, exc.public_message)
        count("CallsRetried")
        logger.warning("call not placed, will retry", extra={"form_id": form_id,
                                                             "error": exc.public_message})
        raise
    except VapiRejected as exc:
        store.record_failed(call.call_id, str(exc.detail.get("stored") or exc.public_message))
        count("CallsFailed", len(call.forms))
        logger.error("call rejected by Vapi", extra={"form_id": form_id,
                                                     "error": exc.public_message})
        raise PermanentFailure(exc.public_message, formId=form_id) from None
    except CallOutcomeUnknown as exc:
        store.record_unknown(call.call_id, str(exc))
        count("CallsOutcomeUnknown")
        logger.error("call outcome unknown; the sweep reconciles it",
                     extra={"form_id": form_id, "error": str(exc)})
        return CallResult("unknown", form_id, reason=f"outcome unknown: {exc}")

    try:
        store.record_placed(call.call_id, vapi_call_id, status=status)
    except DatabaseUnavailable:
        # The call is real; its forms stay 'calling' (never claimable) until call-events'
        # report or the sweep's reconciliation finds it and records it.
        logger.exception("call placed but not recorded", extra={"form_id": form_id,
                                                                "call_id": vapi_call_id})
    count("CallsPlaced")
    logger.info("call placed", extra={"form_id": form_id, "call_id": vapi_call_id,
                                      "forms": len(call.forms)})
    return CallResult("called", form_id, call_id=vapi_call_id)


def _defer(form_id: str, until: datetime, reason: str | None, *, store: FormStore,
           publisher: Callable[[], Publisher], call_form_url: str) -> CallResult:
    """Publish the form's message again for `until` (the window's opening, a cap, busy lines)."""
    message = call_message(form_id, reason=reason or "window", moment=until, not_before=until)
    message_id = publisher().publish_call(message, destination=call_form_url)
    store.record_deferred(form_id, until=until, message_id=message_id)
    count("CallsDeferred")
    logger.info("call deferred", extra={"form_id": form_id, "until": until.isoformat(),
                                        "reason": reason or "window"})
    return CallResult("deferred", form_id, until=until, reason=reason)


def _cancel_opted_out(messages: tuple[MessageToCancel, ...], *,
                      publisher: Callable[[], Publisher]) -> None:
    """Best effort: a message that is not cancelled is delivered and skipped (opted out)."""
    try:
        cancel_form_messages(messages, publisher=publisher())
    except TransientFailure as exc:
        logger.warning("messages of an opted-out patient not cancelled",
                       extra={"error": exc.public_message})

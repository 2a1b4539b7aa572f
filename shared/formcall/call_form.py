"""call-form's use case: claim the form atomically, place its call, record the outcome."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta

from formcall.errors import (CallOutcomeUnknown, DatabaseUnavailable, PermanentFailure,
                             TransientFailure, VapiBusy, VapiRejected, VapiUnavailable)
from formcall.messages import call_message, now, opening
from formcall.models import CallResult
from formcall.observability import count, logger
from formcall.ports import Caller, Publisher
from formcall.publisher import CALL_RETRIES
from formcall.store import FormStore
from formcall.window import DEFAULT_WINDOW, CallWindow

# A delivery this close before the deadline is retried at the deadline rather than skipped;
# further ahead means the deadline moved and a newer message will come.
EARLY_DELIVERY_SECONDS = 300


def _last_delivery(delivery: dict | None) -> bool:
    """Whether QStash makes no further attempt after this one (Upstash-Retried is 0-based)."""
    try:
        return int((delivery or {}).get("retried") or 0) >= CALL_RETRIES
    except ValueError:
        return False


def call_form(form_id: str, *, store: FormStore, vapi: Caller,
              window: CallWindow = DEFAULT_WINDOW,
              publisher: Callable[[], Publisher] | None = None, self_url: str | None = None,
              delivery: dict | None = None) -> CallResult:
    """Claim the form atomically, place its call, record the outcome.

    Outside the patient's calling window nothing is claimed: the message is published again
    for the window's opening (to `self_url`, this endpoint) and the answer is "deferred".
    """
    if publisher is not None and self_url:
        state = store.schedule_state(form_id)
        if state and state.call_status == "pending" and state.due and not state.submitted:
            until = opening(now(), state.timezone, window, form_id)
            if until is not None:
                message = call_message(form_id, reason="window", moment=until, not_before=until)
                message_id = publisher().publish_call(message, destination=self_url)
                store.record_deferred(form_id, until=until, message_id=message_id)
                count("CallsDeferred")
                logger.info("call deferred to the calling window",
                            extra={"form_id": form_id, "until": until.isoformat()})
                return CallResult("deferred", form_id, until=until)

    claim = store.claim(form_id, delivery=delivery)
    if claim.outcome == "not_found":
        count("CallsFailed")
        raise PermanentFailure("unknown form", formId=form_id)
    if claim.outcome == "failed":
        count("CallsFailed")
        raise PermanentFailure(claim.reason or "call failed", formId=form_id)
    if claim.outcome == "skipped" and claim.reason == "not_due" and (
            claim.due_in_seconds is not None and claim.due_in_seconds <= EARLY_DELIVERY_SECONDS):
        # QStash's not-before has whole-second resolution and clocks differ: a delivery a
        # little early must come back at the deadline, not be dropped as "not due".
        raise TransientFailure("form not due yet", retry_after=math.ceil(claim.due_in_seconds) + 1,
                               formId=form_id)
    if claim.outcome == "skipped":
        count("CallsSkipped")
        logger.info("call skipped", extra={"form_id": form_id, "reason": claim.reason})
        return CallResult("skipped", form_id, reason=claim.reason)

    assert claim.form is not None
    try:
        call_id = vapi.create_call(claim.form)
    except VapiUnavailable as exc:
        busy = isinstance(exc, VapiBusy)
        # A call refused by the concurrency limit was never placed: not the form's attempt.
        store.release(form_id, exc.public_message, refund_attempt=busy)
        count("CallsRetried")
        logger.warning("call not placed, will retry", extra={"form_id": form_id,
                                                             "error": exc.public_message})
        if busy and publisher is not None and self_url and _last_delivery(delivery):
            # QStash will not retry this message again: a busy hour must not fail the form,
            # so hand it a fresh message instead.
            until = now() + timedelta(seconds=exc.retry_after or 5)
            message = call_message(form_id, reason="busy", moment=until, not_before=until)
            message_id = publisher().publish_call(message, destination=self_url)
            store.record_deferred(form_id, until=until, message_id=message_id)
            count("CallsDeferred")
            return CallResult("deferred", form_id, until=until, reason="busy")
        raise
    except VapiRejected as exc:
        store.record_failed(form_id, exc.public_message)
        count("CallsFailed")
        logger.error("call rejected by Vapi", extra={"form_id": form_id})
        raise
    except CallOutcomeUnknown as exc:
        store.record_unknown(form_id, str(exc))
        count("CallsOutcomeUnknown")
        logger.error("call outcome unknown; the sweep reconciles it",
                     extra={"form_id": form_id, "error": str(exc)})
        return CallResult("unknown", form_id, reason=f"outcome unknown: {exc}")

    try:
        store.record_placed(form_id, call_id)
    except DatabaseUnavailable:
        # The call is real; the row stays 'calling' (never claimable) until the sweep finds
        # this call in Vapi's list and records it.
        logger.exception("call placed but not recorded", extra={"form_id": form_id,
                                                                "call_id": call_id})
    count("CallsPlaced")
    logger.info("call placed", extra={"form_id": form_id, "call_id": call_id})
    return CallResult("called", form_id, call_id=call_id)

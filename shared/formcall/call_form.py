"""call-form's use case: claim the patient's due forms atomically, place one call, record it.

Every path that could call goes through here, so the calling window, the caps and the line
ledger hold by construction: outside the patient's window nothing is claimed and the message
is published again for the opening; over a cap the claim refuses and the message is published
for the earliest moment the caps and the window allow; with every line taken the delivery
waits (503) and a freed line wakes the oldest waiting form.

An ambiguous Vapi answer never places a second call: the claim stays until Vapi's call list
was checked (a reconcile message comes back after the claim's lease).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta

from formcall.errors import (CallOutcomeUnknown, DatabaseUnavailable, FormcallError,
                             PermanentFailure, TransientFailure, VapiBusy, VapiRejected,
                             VapiUnavailable)
from formcall.messages import call_message, now, opening
from formcall.models import CallResult, MessageToCancel, StaleCall
from formcall.observability import count, logger
from formcall.ports import Caller, Publisher
from formcall.reconcile import reconcile_claim
from formcall.schedule import cancel_form_messages, wake_waiting_forms
from formcall.store import FormStore
from formcall.window import CallWindow

# A delivery this close before the deadline is retried at the deadline rather than skipped;
# further ahead means the deadline moved and a newer message will come.
EARLY_DELIVERY_SECONDS = 300
# How long a delivery with no free line waits at most before QStash tries it again (a freed
# line usually wakes it sooner).
LINE_RETRY_SECONDS = (5, 600)


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
    if claim.outcome == "skipped" and claim.reason == "in_progress" and claim.open_call and (
            not claim.open_call.placed):
        settled = _settle_open_claim(form_id, claim.open_call, store=store, vapi=vapi)
        if settled is not None:
            return settled
        claim = store.claim(form_id)  # released: no call exists, so call now
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
    if claim.outcome == "no_line":
        low, high = LINE_RETRY_SECONDS
        count("CallsWaitingForLine")
        raise TransientFailure("no Vapi line free", formId=form_id,
                               retry_after=min(max(claim.retry_after or low, low), high))
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
        wake_waiting_forms(store=store, publisher=publisher, call_form_url=call_form_url)
        return _defer(form_id, now() + timedelta(seconds=exc.retry_after or 5), "busy",
                      store=store, publisher=publisher, call_form_url=call_form_url)
    except VapiUnavailable as exc:
        store.release(call.call_id, exc.public_message)
        wake_waiting_forms(store=store, publisher=publisher, call_form_url=call_form_url)
        count("CallsRetried")
        logger.warning("call not placed, will retry", extra={"form_id": form_id,
                                                             "error": exc.public_message})
        raise
    except VapiRejected as exc:
        store.record_failed(call.call_id, str(exc.detail.get("stored") or exc.public_message))
        wake_waiting_forms(store=store, publisher=publisher, call_form_url=call_form_url)
        count("CallsFailed", len(call.forms))
        logger.error("call rejected by Vapi", extra={"form_id": form_id,
                                                     "error": exc.public_message})
        raise PermanentFailure(exc.public_message, formId=form_id) from None
    except CallOutcomeUnknown as exc:
        store.record_unknown(call.call_id, str(exc))
        count("CallsOutcomeUnknown")
        logger.error("call outcome unknown; reconciled after the claim's lease",
                     extra={"form_id": form_id, "error": str(exc)})
        _publish_reconcile(form_id, store=store, publisher=publisher, call_form_url=call_form_url)
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


def _settle_open_claim(form_id: str, open_call: StaleCall, *, store: FormStore,
                       vapi: Caller) -> CallResult | None:
    """A delivery for a form whose claim has no Vapi call id yet.

    Within the lease the claimant may still be at work: a live claim is "in_progress", an
    unknown outcome comes back when the lease is over. Past the lease, Vapi's call list
    decides: the call exists (recorded placed) or the claim is released (None: call now).
    """
    age = (now() - open_call.claimed_at).total_seconds()
    lease = store.rules.lease_seconds
    if age < lease:
        if open_call.unknown:
            raise TransientFailure("call outcome not known yet", formId=form_id,
                                   retry_after=math.ceil(lease - age) + 1)
        return CallResult("skipped", form_id, reason="in_progress")
    try:
        result, vapi_call_id = reconcile_claim(open_call, store=store, vapi=vapi)
    except VapiUnavailable as exc:
        raise TransientFailure("Vapi's call list cannot be read", formId=form_id,
                               retry_after=30) from exc
    if result == "found":
        return CallResult("skipped", form_id, reason="already_called", call_id=vapi_call_id)
    return None


def _publish_reconcile(form_id: str, *, store: FormStore, publisher: Callable[[], Publisher],
                       call_form_url: str) -> None:
    """This endpoint again once the claim's lease is over: the call is looked up then."""
    at = now() + timedelta(seconds=store.rules.lease_seconds + 1)
    try:
        publisher().publish_call(call_message(form_id, reason="reconcile", moment=at,
                                              not_before=at), destination=call_form_url)
    except FormcallError as exc:  # the hourly sweep reconciles it instead
        logger.warning("reconcile message not published", extra={"form_id": form_id,
                                                                 "error": exc.public_message})


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

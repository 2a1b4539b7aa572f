"""The use cases: call one form, schedule its deadline, sweep for overdue forms, reconcile, record failures."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol

from formcall.errors import (BadRequest, CallOutcomeUnknown, ConfigurationError,
                             DatabaseUnavailable, PermanentFailure, TransientFailure, VapiBusy,
                             VapiRejected, VapiUnavailable)
from formcall.models import CallFormRequest, CallResult, FormForCall, OverdueForm, SweepReport
from formcall.observability import count, logger
from formcall.publisher import CALL_RETRIES, CallMessage
from formcall.store import FormStore
from formcall.window import DEFAULT_WINDOW, CallWindow, next_opening, zone_for

# A claim older than this with no recorded outcome is reconciled against Vapi's call list.
# It is longer than any Lambda invocation (15 min), so the claimant is certainly gone.
CLAIM_LEASE_SECONDS = 900
CHECK_FORMS_SCHEDULE_ID = "formcall-check-forms"
CHECK_FORMS_CRON = "0 * * * *"
PAGE_SIZE = 100
# A delivery this close before the deadline is retried at the deadline rather than skipped;
# further ahead means the deadline moved and a newer message will come.
EARLY_DELIVERY_SECONDS = 300
# What a QStash message id can look like ("msg_" and URL-safe characters). An id is pasted into
# the QStash API path by the client, so anything else (a "/", "..", a NUL) must never reach it.
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_=-]{1,256}")


class Caller(Protocol):
    def create_call(self, form: FormForCall) -> str: ...
    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> str | None: ...


class Publisher(Protocol):
    def publish_call(self, message: CallMessage, *, destination: str) -> str: ...
    def enqueue_calls(self, messages: list[CallMessage], *, destination: str) -> int: ...
    def cancel(self, message_id: str) -> bool: ...
    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict: ...


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _opening(at: datetime, zone_name: str, window: CallWindow, form_id: str) -> datetime | None:
    zone, valid = zone_for(zone_name)
    if not valid:
        logger.warning("invalid patient time zone; using UTC", extra={"form_id": form_id})
    return next_opening(at, zone, window)


def _last_delivery(delivery: dict | None) -> bool:
    """Whether QStash makes no further attempt after this one (Upstash-Retried is 0-based)."""
    try:
        return int((delivery or {}).get("retried") or 0) >= CALL_RETRIES
    except ValueError:
        return False


def deadline_message(form_id: str, deadline: datetime, not_before: datetime) -> CallMessage:
    """The one-time message for a deadline: deduplicated per form and deadline."""
    return CallMessage(form_id=form_id, not_before=not_before,
                       dedup_id=f"call-form-{form_id}-{math.ceil(deadline.timestamp())}")


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
            until = _opening(_now(), state.timezone, window, form_id)
            if until is not None:
                message = CallMessage(form_id=form_id, not_before=until,
                                      dedup_id=f"call-form-{form_id}-w{math.ceil(until.timestamp())}")
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
            until = _now() + timedelta(seconds=exc.retry_after or 5)
            message = CallMessage(form_id=form_id, not_before=until,
                                  dedup_id=f"call-form-{form_id}-busy-{math.ceil(until.timestamp())}")
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
    not_before = _opening(max(state.deadline, _now()), state.timezone, window, form_id) \
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


def _cancel(message_id: str, *, publisher: Publisher, form_id: str) -> None:
    """Cancel a message, unless its id cannot be QStash's (then there is nothing to cancel)."""
    if _is_message_id(message_id):
        publisher.cancel(message_id)
    else:
        logger.warning("not a QStash message id; nothing cancelled", extra={"form_id": form_id})


def cancel_message(message_id: object, *, publisher: Publisher) -> ScheduleResult:
    """A deleted form: cancel the message its last row pointed at (the id is the webhook's)."""
    if not message_id:
        return ScheduleResult("gone")
    if not _is_message_id(message_id):
        logger.warning("deleted form's message id is not a QStash message id; nothing cancelled")
        return ScheduleResult("gone")
    publisher.cancel(message_id)
    count("FormsCancelled")
    return ScheduleResult("cancelled", message_id)


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _as_text(value: object, limit: int = 200) -> str | None:
    """A string field of QStash's payload, as the database can store it (no NUL), or None."""
    return value.replace("\x00", "")[:limit] if isinstance(value, str) else None


def record_failed_delivery(payload: dict, *, store: FormStore) -> tuple[str, str]:
    """QStash's failure callback for a call-form message: mark the form failed with the reason."""
    try:
        source = base64.b64decode(payload.get("sourceBody") or "", validate=True)
        body = base64.b64decode(payload.get("body") or "").decode("utf-8", "replace")
        form_id = str(CallFormRequest.parse(source).formId)
    except (binascii.Error, ValueError, TypeError, BadRequest):
        raise BadRequest("not a QStash failure callback for a call-form message") from None
    # Only typed values reach the database: a string with a NUL cannot be stored (500, retried).
    status, retried = _as_int(payload.get("status")), _as_int(payload.get("retried")) or 0
    reason = f"QStash gave up after {retried} retries: last answer HTTP {status}"
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError, RecursionError):
        error = None
    if error:
        reason += f" ({str(error).replace(chr(0), '')[:200]})"
    detail = {"source_message_id": _as_text(payload.get("sourceMessageId")), "status": status,
              "retried": retried, "dlq_id": _as_text(payload.get("dlqId"))}
    outcome = store.record_delivery_failed(form_id, reason=reason, detail=detail)
    count("DeliveryFailed")
    logger.error("call-form message failed for good", extra={"form_id": form_id,
                                                             "status": status,
                                                             "outcome": outcome})
    return form_id, outcome


def reconcile_stale_calls(*, store: FormStore, vapi: Caller,
                          lease_seconds: int = CLAIM_LEASE_SECONDS) -> dict[str, int]:
    """Resolve claims whose outcome was never recorded: found in Vapi -> called, absent -> released."""
    outcome = {"found": 0, "released": 0, "unresolved": 0}
    now = _now()
    for stale in store.stale_calls(lease_seconds=lease_seconds):
        try:
            call_id = vapi.find_call_for_form(
                stale.id, created_after=stale.claimed_at - timedelta(minutes=1),
                created_before=now)
        except VapiUnavailable as exc:
            outcome["unresolved"] += 1
            logger.error("could not reconcile a stale call", extra={"form_id": stale.id,
                                                                   "error": exc.public_message})
            continue
        if call_id:
            store.record_placed(stale.id, call_id)
            outcome["found"] += 1
        else:
            store.release(stale.id, "no call found in Vapi after an unknown outcome")
            outcome["released"] += 1
        logger.warning("stale call reconciled", extra={"form_id": stale.id,
                                                       "found": bool(call_id)})
    return outcome


def sweep_overdue_forms(*, store: FormStore, vapi: Caller, publisher: Callable[[], Publisher],
                        call_form_url: str, window: CallWindow = DEFAULT_WINDOW,
                        page_size: int = PAGE_SIZE) -> SweepReport:
    """Enqueue one call-form message per overdue form (the catch-all for missed one-time jobs).

    Forms outside their patient's calling window are enqueued for the window's opening. The
    publisher is built only when there is something to enqueue (its client costs ~0.25 s of
    import). A QStash that refuses the token is a configuration error, not a failed batch.
    """
    report = SweepReport(reconciled=reconcile_stale_calls(store=store, vapi=vapi))
    now = _now()
    hour = math.floor(now.timestamp() / 3600)
    overdue_long = 0
    after: OverdueForm | None = None
    while True:
        page = store.overdue_page(limit=page_size, after=after)
        if not page:
            break
        report.found += len(page)
        overdue_long += sum(form.deadline < now - timedelta(hours=1) for form in page)
        messages = []
        for form in page:
            opening = _opening(now, form.timezone, window, form.id)
            # One message per form per sweep hour: two sweeps close together enqueue once.
            messages.append(CallMessage(form_id=form.id, not_before=opening,
                                        dedup_id=f"sweep-{form.id}-{hour}"))
        try:
            report.enqueued += publisher().enqueue_calls(messages, destination=call_form_url)
        except ConfigurationError:
            raise
        except Exception as exc:  # one failed batch must not stop the rest
            report.failed += len(messages)
            logger.error("enqueue batch failed", extra={"forms": len(messages),
                                                        "error": type(exc).__name__})
        if len(page) < page_size:
            break
        after = page[-1]
    count("FormsFound", report.found)
    count("FormsEnqueued", report.enqueued)
    count("EnqueueFailed", report.failed)
    count("OverdueOverAnHour", overdue_long)
    if not report.failed:
        count("SweepSucceeded")
    if overdue_long:
        logger.warning("forms overdue by more than an hour: one-time jobs were missed",
                       extra={"forms": overdue_long})
    logger.info("sweep done", extra={"found": report.found, "enqueued": report.enqueued,
                                     "failed": report.failed, "reconciled": report.reconciled})
    return report


def ensure_check_forms_schedule(*, publisher: Publisher, destination: str) -> dict:
    """Create or overwrite the hourly sweep schedule under a fixed id: never a second schedule."""
    return publisher.upsert_schedule(schedule_id=CHECK_FORMS_SCHEDULE_ID, destination=destination,
                                     cron=CHECK_FORMS_CRON)

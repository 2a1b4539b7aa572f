"""The use cases: call one form, sweep for overdue forms, reconcile unknown outcomes, set up the schedule."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Protocol

from formcall.errors import (CallOutcomeUnknown, DatabaseUnavailable, PermanentFailure,
                             TransientFailure, VapiRejected, VapiUnavailable)
from formcall.models import CallResult, FormForCall, OverdueForm, SweepReport
from formcall.observability import count, logger
from formcall.store import FormStore

# A claim older than this with no recorded outcome is reconciled against Vapi's call list.
# It is longer than any Lambda invocation (15 min), so the claimant is certainly gone.
CLAIM_LEASE_SECONDS = 900
CHECK_FORMS_SCHEDULE_ID = "formcall-check-forms"
CHECK_FORMS_CRON = "0 * * * *"
PAGE_SIZE = 100
# A delivery this close before the deadline is retried at the deadline rather than skipped;
# further ahead means the deadline moved and a newer message will come.
EARLY_DELIVERY_SECONDS = 300


class Caller(Protocol):
    def create_call(self, form: FormForCall) -> str: ...
    def find_call_for_form(self, form_id: str, *, created_after: datetime,
                           created_before: datetime) -> str | None: ...


class Publisher(Protocol):
    def enqueue_calls(self, form_ids: list[str], *, destination: str) -> int: ...
    def publish_call(self, form_id: str, *, destination: str, not_before: datetime | None = None,
                     deduplication_id: str | None = None) -> str: ...
    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict: ...


def call_form(form_id: str, *, store: FormStore, vapi: Caller) -> CallResult:
    """Claim the form atomically, place its call, record the outcome."""
    claim = store.claim(form_id)
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
        count("CallsDeferred")
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
        store.release(form_id, exc.public_message)
        count("CallsRetried")
        logger.warning("call not placed, will retry", extra={"form_id": form_id,
                                                             "error": exc.public_message})
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


def reconcile_stale_calls(*, store: FormStore, vapi: Caller,
                          lease_seconds: int = CLAIM_LEASE_SECONDS) -> dict[str, int]:
    """Resolve claims whose outcome was never recorded: found in Vapi -> called, absent -> released."""
    outcome = {"found": 0, "released": 0, "unresolved": 0}
    now = datetime.now(timezone.utc)
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


def sweep_overdue_forms(*, store: FormStore, vapi: Caller, publisher: Publisher,
                        call_form_url: str, page_size: int = PAGE_SIZE) -> SweepReport:
    """Enqueue one call-form message per overdue form (the catch-all for missed one-time jobs)."""
    report = SweepReport(reconciled=reconcile_stale_calls(store=store, vapi=vapi))
    after: OverdueForm | None = None
    while True:
        page = store.overdue_page(limit=page_size, after=after)
        if not page:
            break
        report.found += len(page)
        ids = [form.id for form in page]
        try:
            report.enqueued += publisher.enqueue_calls(ids, destination=call_form_url)
        except Exception as exc:  # one failed batch must not stop the rest
            report.failed += len(ids)
            logger.error("enqueue batch failed", extra={"forms": len(ids),
                                                        "error": type(exc).__name__})
        if len(page) < page_size:
            break
        after = page[-1]
    count("FormsFound", report.found)
    count("FormsEnqueued", report.enqueued)
    count("EnqueueFailed", report.failed)
    logger.info("sweep done", extra={"found": report.found, "enqueued": report.enqueued,
                                     "failed": report.failed, "reconciled": report.reconciled})
    return report


def schedule_call(*, publisher: Publisher, form_id: str, deadline: datetime,
                  call_form_url: str) -> str:
    """Publish the form's one-time call-form message for its deadline; returns the message id.

    Deduplicated per form and deadline, so publishing the same deadline twice is one message.
    """
    return publisher.publish_call(
        form_id, destination=call_form_url, not_before=deadline,
        deduplication_id=f"call-form-{form_id}-{math.ceil(deadline.timestamp())}")


def ensure_check_forms_schedule(*, publisher: Publisher, destination: str) -> dict:
    """Create or overwrite the hourly sweep schedule under a fixed id: never a second schedule."""
    return publisher.upsert_schedule(schedule_id=CHECK_FORMS_SCHEDULE_ID, destination=destination,
                                     cron=CHECK_FORMS_CRON)

"""check-forms' and setup's use cases: the hourly sweep (the catch-all) and its schedule."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from formcall.call_events import record_call_event
from formcall.errors import ConfigurationError, VapiUnavailable
from formcall.messages import now, opening, sweep_message
from formcall.models import OverdueForm, SweepReport
from formcall.observability import count, logger
from formcall.reconcile import reconcile_claim
from formcall.ports import Caller, Publisher
from formcall.store import FormStore
from formcall.vapi_webhooks import call_event_from_record, ended_without_record
from formcall.window import CallWindow

CHECK_FORMS_SCHEDULE_ID = "formcall-check-forms"
CHECK_FORMS_CRON = "0 * * * *"
PAGE_SIZE = 100


def reconcile_stale_calls(*, store: FormStore, vapi: Caller,
                          lease_seconds: int | None = None) -> dict[str, int]:
    """Claims whose Vapi answer was never recorded, past their lease: found -> placed, absent -> released."""
    outcome = {"found": 0, "released": 0, "unresolved": 0}
    lease = store.rules.lease_seconds if lease_seconds is None else lease_seconds
    for stale in store.stale_calls(lease_seconds=lease):
        try:
            result, _ = reconcile_claim(stale, store=store, vapi=vapi)
        except VapiUnavailable as exc:
            outcome["unresolved"] += 1
            logger.error("could not reconcile a stale call", extra={"call_id": stale.call_id,
                                                                   "error": exc.public_message})
            continue
        outcome[result] += 1
    return outcome


def look_up_lost_outcomes(*, store: FormStore, vapi: Caller, publisher: Callable[[], Publisher],
                          call_form_url: str, window: CallWindow,
                          timeout_seconds: int) -> dict[str, int]:
    """Placed calls whose end was never reported: record the end Vapi's own record shows."""
    outcome = {"ended": 0, "open": 0, "unresolved": 0}
    for call in store.calls_awaiting_outcome(timeout_seconds=timeout_seconds):
        try:
            record = vapi.get_call(call.vapi_call_id)
        except VapiUnavailable as exc:
            outcome["unresolved"] += 1
            logger.error("could not look a call up", extra={"call_id": call.vapi_call_id,
                                                            "error": exc.public_message})
            continue
        event = (ended_without_record(call.vapi_call_id, now()) if record is None
                 else call_event_from_record(record))
        if event.outcome is None:
            outcome["open"] += 1
            continue
        record_call_event(event, store=store, publisher=publisher, call_form_url=call_form_url,
                          window=window, source="lookup")
        outcome["ended"] += 1
        logger.warning("lost call report recovered from Vapi's record",
                       extra={"call_id": call.vapi_call_id, "outcome": event.outcome})
    return outcome


def sweep_overdue_forms(*, store: FormStore, vapi: Caller, publisher: Callable[[], Publisher],
                        call_form_url: str, window: CallWindow,
                        outcome_timeout_seconds: int = 1800,
                        page_size: int = PAGE_SIZE) -> SweepReport:
    """Enqueue one call-form message per due form (the catch-all for missed one-time jobs).

    First it resolves stale claims and looks up calls whose end was never reported (their
    follow-ups are then due like any other). Forms outside their patient's calling window
    are enqueued for the window's opening. The publisher is built only when there is
    something to publish (its client costs ~0.25 s of import). A QStash that refuses the
    token is a configuration error, not a failed batch.
    """
    report = SweepReport(
        reconciled=reconcile_stale_calls(store=store, vapi=vapi),
        outcomes=look_up_lost_outcomes(store=store, vapi=vapi, publisher=publisher,
                                       call_form_url=call_form_url, window=window,
                                       timeout_seconds=outcome_timeout_seconds))
    at = now()
    overdue_long = 0
    after: OverdueForm | None = None
    while True:
        page = store.overdue_page(limit=page_size, after=after)
        if not page:
            break
        report.found += len(page)
        overdue_long += sum(form.deadline < at - timedelta(hours=1) for form in page)
        messages = []
        for form in page:
            messages.append(sweep_message(form.id, at=at, not_before=opening(
                at, form.timezone, window, form.id)))
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
                                     "failed": report.failed, "reconciled": report.reconciled,
                                     "outcomes": report.outcomes})
    return report


def ensure_check_forms_schedule(*, publisher: Publisher, destination: str) -> dict:
    """Create or overwrite the hourly sweep schedule under a fixed id: never a second schedule."""
    return publisher.upsert_schedule(schedule_id=CHECK_FORMS_SCHEDULE_ID, destination=destination,
                                     cron=CHECK_FORMS_CRON)

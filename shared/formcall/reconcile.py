"""A claim whose Vapi answer is unknown: find the call in Vapi's list, else release the claim.

Used by call-form (a delivery for a form whose claim outlived its lease, e.g. the reconcile
message call-form publishes after an unknown outcome) and by the hourly sweep (the safety net).
"""

from __future__ import annotations

from datetime import timedelta

from formcall.messages import now
from formcall.models import StaleCall
from formcall.observability import logger
from formcall.ports import Caller
from formcall.store import FormStore


def reconcile_claim(stale: StaleCall, *, store: FormStore, vapi: Caller) -> tuple[str, str | None]:
    """("found", Vapi's call id) when Vapi has the call, else ("released", None).

    Raises VapiUnavailable when Vapi's list cannot be read: then nothing changes.
    """
    if not stale.form_ids:  # its forms are gone (deleted): nothing to call about
        store.release(stale.call_id, "the call's forms were deleted")
        return "released", None
    found = vapi.find_call_for_form(stale.form_ids[0],
                                    created_after=stale.claimed_at - timedelta(minutes=1),
                                    created_before=now())
    if found:
        store.record_placed(stale.call_id, found["id"], status=found.get("status"))
        logger.warning("unknown outcome reconciled: the call exists",
                       extra={"call_id": stale.call_id, "vapi_call_id": found["id"]})
        return "found", found["id"]
    store.release(stale.call_id, "no call found in Vapi after an unknown outcome")
    logger.warning("unknown outcome reconciled: no call, released", extra={"call_id": stale.call_id})
    return "released", None

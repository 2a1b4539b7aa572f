"""Every call-form message formcall publishes, and the one way its deduplication id is made.

QStash drops a second message with the same deduplication id (for 10 minutes), so each id
names the form, why the message exists and the moment it is for: the same reason and moment
give the same message, however often it is published.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime

from formcall.observability import logger
from formcall.publisher import CallMessage
from formcall.window import CallWindow, next_opening, zone_for


def now() -> datetime:
    return datetime.now(UTC)


def call_message(
    form_id: str, *, reason: str, moment: datetime, not_before: datetime | None = None
) -> CallMessage:
    """A message for `form_id`, deduplicated by (reason, moment), delivered from `not_before`."""
    return CallMessage(
        form_id=form_id,
        not_before=not_before,
        dedup_id=f"call-form-{form_id}-{reason}-{math.ceil(moment.timestamp())}",
    )


def deadline_message(form_id: str, deadline: datetime, not_before: datetime) -> CallMessage:
    """The one-time message for a deadline: deduplicated per form and deadline."""
    return call_message(form_id, reason="deadline", moment=deadline, not_before=not_before)


def sweep_message(form_id: str, *, at: datetime, not_before: datetime | None) -> CallMessage:
    """One message per form per sweep hour: two sweeps close together enqueue once."""
    hour = datetime.fromtimestamp(math.floor(at.timestamp() / 3600) * 3600, UTC)
    return call_message(form_id, reason="sweep", moment=hour, not_before=not_before)


def opening(at: datetime, zone_name: str, window: CallWindow, form_id: str) -> datetime | None:
    """The calling window's next opening at or after `at` in the patient's zone (None: open now)."""
    zone, valid = zone_for(zone_name)
    if not valid:
        logger.warning("invalid patient time zone; using UTC", extra={"form_id": form_id})
    return next_opening(at, zone, window)

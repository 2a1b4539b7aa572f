"""Publishing to QStash with the official client: call-form batches and the sweep schedule."""

from __future__ import annotations

import math
from contextlib import contextmanager
from datetime import datetime

from formcall.errors import ConfigurationError, TransientFailure

# QStash's batch endpoint takes at most 100 messages per request.
BATCH_LIMIT = 100
CALL_RETRIES = 3


class QStashPublisher:
    def __init__(self, *, url: str, token: str) -> None:
        from qstash import QStash  # imported on first use: only check-forms and setup publish

        # The client retries only requests that raised (connection errors): safe, since every
        # call-form message carries a deduplication id and schedules are upserts by id.
        self._client = QStash(token, base_url=url,
                              retry={"retries": 2, "backoff": lambda attempt: 200 * (attempt + 1)})

    def enqueue_calls(self, form_ids: list[str], *, destination: str) -> int:
        """Send one call-form message per form, 100 per batch request; returns how many were accepted."""
        accepted = 0
        for start in range(0, len(form_ids), BATCH_LIMIT):
            chunk = form_ids[start:start + BATCH_LIMIT]
            responses = self._client.message.batch_json([
                {
                    "url": destination,
                    "body": {"formId": form_id},
                    "retries": CALL_RETRIES,
                    "deduplication_id": f"call-form-{form_id}",
                }
                for form_id in chunk
            ])
            accepted += len(responses)
        return accepted

    def publish_call(self, form_id: str, *, destination: str, not_before: datetime | None = None,
                     deduplication_id: str | None = None) -> str:
        """One call-form message for one form, delivered at `not_before` (now when None)."""
        with _qstash_errors():
            response = self._client.message.publish_json(
                url=destination, body={"formId": form_id}, retries=CALL_RETRIES,
                # Whole seconds, rounded up: never before the deadline.
                not_before=math.ceil(not_before.timestamp()) if not_before else None,
                deduplication_id=deduplication_id)
        return response.message_id

    def upsert_schedule(self, *, schedule_id: str, destination: str, cron: str) -> dict:
        with _qstash_errors():
            self._client.schedule.create(destination=destination, cron=cron,
                                         schedule_id=schedule_id, retries=CALL_RETRIES)
            schedule = self._client.schedule.get(schedule_id)
        return {"scheduleId": schedule.schedule_id, "cron": schedule.cron,
                "destination": schedule.destination}


@contextmanager
def _qstash_errors():
    """Map the client's failures: a refused token is configuration, anything else is transient."""
    import httpx
    from qstash.errors import QStashError

    try:
        yield
    except QStashError as exc:
        if "status: 401" in str(exc) or "status: 403" in str(exc):
            raise ConfigurationError(["QSTASH_TOKEN"], "QStash refused QSTASH_TOKEN") from exc
        raise TransientFailure("QStash unavailable", cause=type(exc).__name__) from exc
    except httpx.HTTPError as exc:
        raise TransientFailure("QStash unreachable", cause=type(exc).__name__) from exc
